#!/usr/bin/env bash
# The API contract proofs, from the outside, against a running Warren and the real
# RabbitMQ (docs/src/guides/clients.md):
#   1. openapi/openapi.json validates as OpenAPI 3.1;
#   2. a Python client generated from it (openapi-python-client) publishes, the message is
#      read back from RabbitMQ, and 401/403/422 come back as typed problems
#      (tests/contract/test_client.py); CloudEvents conformance with the official
#      CloudEvents SDK and its RabbitMQ binding (tests/contract/test_cloudevents.py);
#   3. schemathesis sends generated requests (>= 500) to every operation: no 500, no
#      response outside the spec, schema-valid requests accepted, invalid ones rejected.
# Needs python3 (3.11+) with venv/pip, Rust, RabbitMQ and Redis. The pinned Python tools
# live in a venv under the cache dir, rebuilt when tests/contract/requirements.txt changes.
#
# WARREN_CONTRACT_SEED: schemathesis seed (default fixed, so CI is reproducible; set it
# empty for a random one). WARREN_CONTRACT_EXAMPLES: examples per operation and run.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/warren-config.sh
source scripts/lib/warren-config.sh

VENV="${XDG_CACHE_HOME:-$HOME/.cache}/warren-contract-venv"
REQUIREMENTS=tests/contract/requirements.txt
SEED="${WARREN_CONTRACT_SEED-20261122}"
EXAMPLES="${WARREN_CONTRACT_EXAMPLES:-300}"
MIN_CASES=500
AMQP_URL="${WARREN_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}"

scripts/ensure-services.sh

if [[ ! -x "$VENV/bin/python" ]] || ! cmp -s "$REQUIREMENTS" "$VENV/.requirements"; then
  echo "Creating the contract-test venv in $VENV..." >&2
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 without python3-venv: virtualenv from PyPI does the same.
    rm -rf "$VENV"
    python3 -m pip install --quiet --user --disable-pip-version-check virtualenv
    python3 -m virtualenv --quiet "$VENV"
  fi
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
  cp "$REQUIREMENTS" "$VENV/.requirements"
fi
PY="$VENV/bin/python"

cargo build --locked --quiet --bin warren
BIN="${CARGO_TARGET_DIR:-target}/debug/warren"

WORK="$(mktemp -d)"
WARREN_PID=""
cleanup() {
  local status=$?
  if [[ -n "$WARREN_PID" ]]; then
    kill "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
  fi
  # Generated scheduled publishes wait on the vhost's ladder for up to 7 days: delete
  # it (it is declared again on the next scheduled publish).
  "$VENV/bin/python" - "$AMQP_URL" <<'PYTHON' 2>/dev/null || true
import sys, pika
connection = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
channel = connection.channel()
for name in ["warren.scheduled.due", "warren.scheduled.dlq"] + [f"warren.scheduled.l{k}" for k in range(35)]:
    channel.queue_delete(name)
connection.close()
PYTHON
  if ((status != 0)) && [[ -f "$WORK/warren.log" ]]; then
    echo "--- last lines of Warren's log ---" >&2
    tail -n 40 "$WORK/warren.log" >&2
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== 1. openapi/openapi.json is valid OpenAPI 3.1"
"$VENV/bin/openapi-spec-validator" openapi/openapi.json

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
WARREN_TEST_AMQP_URL="$AMQP_URL" write_warren_config "$WORK/warren.toml" "$PORT" contract
# The pull test (tests/contract/test_client.py) consumes the queue contract-pull.
sed -i 's|^subscribe = \[\(.*\)\]$|subscribe = [\1, { queue = "contract-pull" }]|' "$WORK/warren.toml"
BASE="http://127.0.0.1:$PORT"
"$BIN" serve --config "$WORK/warren.toml" >"$WORK/warren.log" 2>&1 &
WARREN_PID=$!
"$PY" - "$BASE/readyz" <<'PYTHON'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
            if response.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"Warren was not ready at {sys.argv[1]} within 30s")
    time.sleep(0.2)
PYTHON
TOKEN="$("$BIN" token --config "$WORK/warren.toml" --tenant contract --sub contract --scope publish --ttl 1h)"
SUBSCRIBE_ONLY_TOKEN="$("$BIN" token --config "$WORK/warren.toml" --tenant contract --sub contract --scope subscribe --ttl 1h)"
PUBSUB_TOKEN="$("$BIN" token --config "$WORK/warren.toml" --tenant contract --sub contract --scope "publish subscribe" --ttl 1h)"

echo "== 2. a generated Python client against Warren and RabbitMQ"
"$VENV/bin/openapi-python-client" generate --path openapi/openapi.json --meta none \
  --config tests/contract/openapi-python-client.yaml --output-path "$WORK/client/warren_client"
WARREN_URL="$BASE" WARREN_TOKEN="$TOKEN" WARREN_SUBSCRIBE_ONLY_TOKEN="$SUBSCRIBE_ONLY_TOKEN" \
  WARREN_PUBSUB_TOKEN="$PUBSUB_TOKEN" WARREN_BIN="$BIN" \
  WARREN_TEST_AMQP_URL="$AMQP_URL/%2F" PYTHONPATH="$WORK/client" \
  "$VENV/bin/pytest" -q -p no:cacheprovider tests/contract

echo "== 3. schemathesis against every operation"
# $TOKEN has the publish scope only: GET /v1/events answers it with problems (403) before
# any event stream starts, so no endless text/event-stream can hang a run. Its streams
# are proven by tests/integration/sse.rs and the browser test.
seed_args=()
[[ -n "$SEED" ]] && seed_args=(--seed "$SEED")
# Two runs. JSON Schema's maxLength counts characters while AMQP short strings are 255
# *bytes*, so "schema-valid means accepted" holds exactly only for ASCII strings: the
# first run generates ASCII with every check; the second generates any Unicode with
# every check but that one.
run_schemathesis() {
  local name=$1
  shift
  SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$PWD/tests/contract" \
    "$VENV/bin/schemathesis" --config-file tests/contract/schemathesis.toml run openapi/openapi.json \
    --url "$BASE" -H "Authorization: Bearer $TOKEN" --checks all --max-examples "$EXAMPLES" \
    --continue-on-failure --generation-database none --no-color "${seed_args[@]}" "$@" \
    | tee "$WORK/schemathesis-$name.log"
}
run_schemathesis ascii --generation-codec ascii
run_schemathesis unicode --exclude-checks positive_data_acceptance
cases=0
for log in "$WORK"/schemathesis-*.log; do
  n="$(grep -Eo '^ *[0-9]+ generated' "$log" | tr -dc 0-9)"
  cases=$((cases + ${n:-0}))
done
echo "schemathesis: $cases generated cases in total"
if ((cases < MIN_CASES)); then
  echo "error: fewer than $MIN_CASES generated cases" >&2
  exit 1
fi
echo "API contract: all proofs passed"
