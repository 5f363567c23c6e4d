#!/usr/bin/env bash
# Makes sure the services Warren and its tests talk to are up on 127.0.0.1:
# RabbitMQ (5672). Starts a locally installed one if it is down; otherwise says
# exactly what to install. Safe to run repeatedly.
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
if command -v rabbitmqctl >/dev/null 2>&1; then
  timeout 60 rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
