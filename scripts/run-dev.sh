#!/usr/bin/env bash
# Runs Warren in dev mode (loopback only, tenant `default` on vhost `/`), after making
# sure a RabbitMQ is running. Extra arguments go to `warren serve`, e.g. --listen.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
exec cargo run --release --locked -- serve "$@"
