#!/usr/bin/env bash
# Soak test (not run in CI): starts Warren from a temporary config against the local
# RabbitMQ and drives it for DURATION seconds at RATE requests/s with a mix of REST
# publishes, batches of 10, idempotent retries (the replay must come back) and four
# WebSocket live subscribers (examples/soak.rs). Prints a line every REPORT seconds
# with the errors so far (must stay 0) and Warren's RSS; exits non-zero on any error.
#
#   scripts/soak.sh                          # 10 minutes at 1,200 req/s, release build
#
# 1,200 req/s is about 2,800 msg/s (2.35 messages per request), half of Warren's best
# single-publish rate on the 2-core machine of BENCHMARKS.md; set RATE for yours.
#   DURATION=60 RATE=100 PROFILE=debug scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/warren-config.sh
source scripts/lib/warren-config.sh
DURATION=${DURATION:-600}
RATE=${RATE:-1200}
REPORT=${REPORT:-10}
PROFILE=${PROFILE:-release}
PORT=${PORT:-18080}
scripts/ensure-services.sh

flags=(--locked)
[ "$PROFILE" = release ] && flags+=(--release)
cargo build "${flags[@]}" --bin warren --example soak
target=${CARGO_TARGET_DIR:-target}/$PROFILE

dir=$(mktemp -d)
write_warren_config "$dir/warren.toml" "$PORT" soak

RUST_LOG=${RUST_LOG:-warn} "$target/warren" serve --config "$dir/warren.toml" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null
token=$("$target/warren" token --config "$dir/warren.toml" --tenant soak --sub soak \
  --scope "publish subscribe" --ttl 2h)

echo "warren pid $pid, RSS at start: $(awk '/VmRSS/ {print $2}' /proc/$pid/status) KiB"
WARREN_URL="http://127.0.0.1:$PORT" WARREN_TOKEN="$token" WARREN_PID=$pid SOAK_REPORT_S=$REPORT \
  "$target/examples/soak" "$DURATION" "$RATE"
