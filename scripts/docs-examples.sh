#!/usr/bin/env bash
# Runs every command example of README.md and docs/ (the ```sh blocks) against a real
# Warren and the local RabbitMQ, in the order a newcomer reads them: a dev-mode gateway
# for the README, then Getting started's own config (publish, pull, push) and every
# guide. Fails naming the block that did not do what its page says. How blocks are
# chosen and run: scripts/docs_examples.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo build --locked --quiet --bin warren
exec python3 scripts/docs_examples.py "$@"
