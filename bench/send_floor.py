#!/usr/bin/env python3
"""The kernel's cost of one WebSocket delivery on this machine: one send() of a 304-byte
frame (a 300-byte text frame, about what Warren's live fan-out writes per delivery) to
each of 1,000 loopback TCP sockets, 100 rounds. The system time per send is a floor
under any gateway's CPU per delivery that writes each delivery to its socket (at 20 or
100 messages per second per socket nothing is queued to coalesce). BENCHMARKS.md, fan-out.
"""
import resource
import socket

SOCKETS, ROUNDS = 1000, 100


def main():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(SOCKETS)
    peers, servers = [], []
    for _ in range(SOCKETS):
        peers.append(socket.create_connection(listener.getsockname()))
        server, _ = listener.accept()
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        servers.append(server)
    # 100 frames of 304 bytes fit in a socket's receive buffer: nothing needs reading.
    frame = b"\x81\x7e\x01\x2c" + b"x" * 300
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(ROUNDS):
        for server in servers:
            server.send(frame)
    after = resource.getrusage(resource.RUSAGE_SELF)
    sends = SOCKETS * ROUNDS
    system = (after.ru_stime - before.ru_stime) * 1e6 / sends
    print(
        f"\nkernel floor of a delivery: {sends} sends of {len(frame)} bytes to {SOCKETS} "
        f"loopback TCP sockets cost {system:.2f} µs of system time each"
    )


if __name__ == "__main__":
    main()
