#!/usr/bin/env bash
# Every test: unit and integration tests against the real RabbitMQ and Redis, the
# browser end-to-end test in headless Chromium, the JavaScript client against a real
# Warren, the API contract proofs (a generated
# Python client and schemathesis against a running Warren), every command example of
# README.md and docs/ (scripts/docs-examples.sh), and the static checks of deploy/.
# Starts (or installs) what the tests need first. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo test --locked "$@"
# The memory alarm and broker restart tests change the shared broker (every publisher
# is blocked, every connection dropped), so the run above skips them (#[ignore]) and
# they run here, alone and one at a time.
# The scale-out tests (tests/solo/cluster.rs) and the JavaScript client's broker
# restart test need a throwaway 3-node cluster beside the broker; it is stopped and its
# data deleted at the end, whatever happens.
scripts/cluster.sh start
trap 'scripts/cluster.sh stop' EXIT
cargo test --locked --test solo -- --ignored --test-threads=1
scripts/browser-test.sh
scripts/js-client-test.sh
scripts/api-contract.sh
scripts/docs-examples.sh
bash deploy/check.sh
