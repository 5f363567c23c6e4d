#!/usr/bin/env bash
# The whole test suite: unit tests and integration tests against the real RabbitMQ.
# Starts the services the tests need first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
exec cargo test --locked "$@"
