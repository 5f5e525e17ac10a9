"""Numbered UDP datagrams for delivery tests, run inside a namespace.

`send HOST PORT` sends datagram N for every line "N" read on stdin (so the test decides when);
`recv PORT` prints every number it receives, one per line, until stdin closes.
"""

import select
import socket
import sys

PAD = b"." * 200


def send(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    for line in sys.stdin:
        try:
            s.sendto(line.strip().encode() + b" " + PAD, (host, port))
            print("ok", flush=True)
        except OSError as exc:  # no route while the local agent (and its TUN) is down
            print(f"error {exc.errno}", flush=True)


def recv(port: int) -> None:
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::", port))
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([s, sys.stdin], [], [])
        if sys.stdin in ready and not sys.stdin.readline():
            return
        if s in ready:
            data = s.recv(65535)
            print(data.split(b" ", 1)[0].decode(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]))
    else:
        recv(int(sys.argv[2]))
