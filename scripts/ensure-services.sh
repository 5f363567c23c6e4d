#!/usr/bin/env bash
# Makes sure the services Warren and its tests talk to are up where the tests look
# for them: RabbitMQ at WARREN_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672),
# its management API at WARREN_TEST_MANAGEMENT_URL (default http://127.0.0.1:15672) and
# Redis at WARREN_TEST_REDIS_URL (default redis://127.0.0.1:6379, for the shared
# idempotency store). Starts locally installed ones that are down when they are meant
# to be on this machine; otherwise says exactly what to install. Idempotent.
set -euo pipefail

# host and port of a URL, with the given default port: "127.0.0.1 5672".
host_port() {
  local url=$1 default_port=$2 authority host port
  authority=${url#*://}
  authority=${authority%%[/?]*}
  authority=${authority##*@}
  if [[ $authority =~ ^(.*):([0-9]+)$ ]]; then
    host=${BASH_REMATCH[1]} port=${BASH_REMATCH[2]}
  else
    host=$authority port=$default_port
  fi
  host=${host#[}
  host=${host%]}
  echo "${host:-127.0.0.1} $port"
}

read -r AMQP_HOST AMQP_PORT < <(host_port "${WARREN_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672}" 5672)
read -r MGMT_HOST MGMT_PORT < <(host_port "${WARREN_TEST_MANAGEMENT_URL:-http://127.0.0.1:15672}" 15672)
read -r REDIS_HOST REDIS_PORT < <(host_port "${WARREN_TEST_REDIS_URL:-redis://127.0.0.1:6379}" 6379)

is_local() { [[ $1 == 127.* || $1 == localhost || $1 == ::1 ]]; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  local host=$1 port=$2 name=$3 deadline=$((SECONDS + 90))
  until port_open "$host" "$port"; do
    if ((SECONDS > deadline)); then
      echo "error: $name did not come up on $host:$port within 90s" >&2
      exit 1
    fi
    sleep 1
  done
}

# A service the tests expect on another machine is not ours to start.
require_remote() {
  local host=$1 port=$2 name=$3
  if ! port_open "$host" "$port"; then
    echo "error: no $name on $host:$port (from the WARREN_TEST_* URL); start it there" >&2
    exit 1
  fi
}

if ! is_local "$AMQP_HOST"; then
  require_remote "$AMQP_HOST" "$AMQP_PORT" RabbitMQ
elif ! port_open "$AMQP_HOST" "$AMQP_PORT"; then
  if [[ $AMQP_PORT != 5672 ]]; then
    echo "error: no RabbitMQ on $AMQP_HOST:$AMQP_PORT (WARREN_TEST_AMQP_URL); a local one would listen on 5672" >&2
    exit 1
  elif command -v rabbitmq-server >/dev/null 2>&1; then
    echo "Starting the local RabbitMQ (rabbitmq-server -detached)..." >&2
    rabbitmq-server -detached || true
    wait_port "$AMQP_HOST" "$AMQP_PORT" RabbitMQ
  else
    cat >&2 <<'MSG'
error: no RabbitMQ on 127.0.0.1:5672 and none installed.
Install one, for example:
  sudo apt-get install rabbitmq-server          # Debian/Ubuntu
  docker run -d -p 5672:5672 rabbitmq:3-management
or point Warren at yours with WARREN_AMQP__URL=amqp://user:pass@host:5672
and the tests with WARREN_TEST_AMQP_URL (the same URL)
MSG
    exit 1
  fi
fi
if ! is_local "$REDIS_HOST"; then
  require_remote "$REDIS_HOST" "$REDIS_PORT" Redis
elif ! port_open "$REDIS_HOST" "$REDIS_PORT"; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "Starting a local Redis (redis-server --daemonize yes --port $REDIS_PORT)..." >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null
    wait_port 127.0.0.1 "$REDIS_PORT" Redis
  else
    cat >&2 <<'MSG'
error: no local Redis (WARREN_TEST_REDIS_URL) and none installed (the tests of the shared
idempotency store need one). Install one, for example:
  sudo apt-get install redis-server
  docker run -d -p 6379:6379 redis:7
MSG
    exit 1
  fi
fi

if is_local "$AMQP_HOST" && command -v rabbitmqctl >/dev/null 2>&1; then
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi

# The management API (15672): tests create vhosts through it (rabbitmqctl takes
# seconds per call) and benchmarks compare against its publish endpoint.
if ! is_local "$MGMT_HOST"; then
  require_remote "$MGMT_HOST" "$MGMT_PORT" "RabbitMQ management API"
elif ! port_open "$MGMT_HOST" "$MGMT_PORT" && command -v rabbitmq-plugins >/dev/null 2>&1; then
  echo "Enabling rabbitmq_management..." >&2
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port "$MGMT_HOST" "$MGMT_PORT" "RabbitMQ management API"
fi
