#!/usr/bin/env bash
# Makes sure the services Warren and its tests talk to are up on 127.0.0.1:
# RabbitMQ (5672) and Redis (6379, for the shared idempotency store). Starts locally
# installed ones that are down; otherwise says exactly what to install. Idempotent.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2 deadline=$((SECONDS + 90))
  until port_open "$port"; do
    if ((SECONDS > deadline)); then
      echo "error: $name did not come up on 127.0.0.1:$port within 90s" >&2
      exit 1
    fi
    sleep 1
  done
}

if ! port_open 5672; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "Starting the local RabbitMQ (rabbitmq-server -detached)..." >&2
    rabbitmq-server -detached || true
    wait_port 5672 RabbitMQ
  else
    cat >&2 <<'MSG'
error: no RabbitMQ on 127.0.0.1:5672 and none installed.
Install one, for example:
  sudo apt-get install rabbitmq-server          # Debian/Ubuntu
  docker run -d -p 5672:5672 rabbitmq:3-management
or point Warren at yours with WARREN_AMQP__URL=amqp://user:pass@host:5672
MSG
    exit 1
  fi
fi
if ! port_open 6379; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "Starting a local Redis (redis-server --daemonize yes)..." >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
    wait_port 6379 Redis
  else
    cat >&2 <<'MSG'
error: no Redis on 127.0.0.1:6379 and none installed (the tests of the shared
idempotency store need one). Install one, for example:
  sudo apt-get install redis-server
  docker run -d -p 6379:6379 redis:7
MSG
    exit 1
  fi
fi

if command -v rabbitmqctl >/dev/null 2>&1; then
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi

# The management API (15672): tests create vhosts through it (rabbitmqctl takes
# seconds per call) and benchmarks compare against its publish endpoint.
if ! port_open 15672 && command -v rabbitmq-plugins >/dev/null 2>&1; then
  echo "Enabling rabbitmq_management..." >&2
  rabbitmq-plugins enable rabbitmq_management >/dev/null
  wait_port 15672 "RabbitMQ management API"
fi
