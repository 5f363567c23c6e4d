#!/usr/bin/env bash
# End-to-end browser test: starts Warren, then drives its /demo page in headless
# Chromium (Debian's package) with playwright-core; the page runs on the JavaScript
# client Warren serves at /clients/warren.js (clients/js/). Installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/warren-config.sh
source scripts/lib/warren-config.sh
scripts/ensure-services.sh

if [[ ! -x /usr/bin/chromium ]]; then
  echo "Installing Debian's chromium for the browser test..." >&2
  if [[ $(id -u) -eq 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --silent)

cargo build --locked -q --bin warren
BIN="${CARGO_TARGET_DIR:-target}/debug/warren"
work=$(mktemp -d)
pid=""
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
write_warren_config "$work/warren.toml" "$port" browser amq.topic 'demo.#'
# tests/browser/sse.test.mjs replays this stream (it declares and deletes it).
sse_stream="wt-sse-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
sed -i "s|^subscribe = \[\(.*\)\]$|subscribe = [\1, { stream = \"$sse_stream\" }]|" "$work/warren.toml"
"$BIN" serve --config "$work/warren.toml" 2>"$work/warren.log" &
pid=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$work/warren.log" >&2; exit 1; }
token=$("$BIN" token --config "$work/warren.toml" --tenant browser --sub e2e --ttl 10m)

WARREN_URL="http://127.0.0.1:$port" WARREN_TOKEN="$token" WARREN_SSE_STREAM="$sse_stream" WARREN_BIN="$BIN" \
  node --test tests/browser/ || { cat "$work/warren.log" >&2; exit 1; }
