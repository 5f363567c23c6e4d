#!/usr/bin/env bash
# The JavaScript client's tests (clients/js/test/, Node's test runner) against real
# Warren processes the tests start themselves and the real RabbitMQ (and a node of
# the test cluster, scripts/cluster.sh). No npm packages:
# Node >= 22 has a WebSocket; Node 20/21 get theirs from --experimental-websocket.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-services.sh
cargo build --locked -q --bin warren
target=${CARGO_TARGET_DIR:-target}
[[ $target == /* ]] || target="$PWD/$target"
export WARREN_BIN="$target/debug/warren"
flags=()
major=$(node -p 'process.versions.node.split(".")[0]')
if (( major < 20 )); then echo "Node >= 20 is needed (found $(node --version))" >&2; exit 1; fi
if (( major < 22 )); then flags+=(--experimental-websocket); fi
# test/restart.test.mjs restarts a node of the test cluster (not the shared broker);
# start the cluster unless it runs already, and stop it afterwards if started here.
if ! (exec 3<>/dev/tcp/127.0.0.1/5684) 2>/dev/null; then
  scripts/cluster.sh start
  trap "$PWD/scripts/cluster.sh stop" EXIT
fi
cd clients/js
node "${flags[@]}" --check warren.js
node "${flags[@]}" --test --test-timeout 120000 test/*.test.mjs
