"""Known bytes over parallel TCP connections, for checking what a tunnel delivers, run inside a
namespace.

`recv PORT N` takes N connections, reads each to its end and prints one JSON line: the
connection's first 8 bytes (its number and size, sent first) and the SHA-256 of the rest.
`send HOST PORT N BYTES` opens N connections at once and sends BYTES on each, connection i's
bytes being `stream(i, BYTES)`.
"""

from __future__ import annotations

import hashlib
import json
import random
import socket
import struct
import sys
import threading

CHUNK = 1 << 16


def stream(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


def send(host: str, port: int, n: int, size: int) -> None:
    def one(i: int) -> None:
        with socket.create_connection((host, port), timeout=30) as s:
            s.sendall(struct.pack("!II", i, size))
            data = memoryview(stream(i, size))
            for off in range(0, size, CHUNK):
                s.sendall(data[off:off + CHUNK])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def recv(port: int, n: int) -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(n)
    print("ready", flush=True)
    results: list[dict[str, object]] = []

    def one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(60)
            head = b""
            while len(head) < 8:
                head += conn.recv(8 - len(head))
            i, size = struct.unpack("!II", head)
            h = hashlib.sha256()
            got = 0
            while chunk := conn.recv(CHUNK):
                h.update(chunk)
                got += len(chunk)
            results.append({"i": i, "size": size, "got": got, "sha256": h.hexdigest()})

    threads = []
    for _ in range(n):
        conn, _ = srv.accept()
        t = threading.Thread(target=one, args=(conn,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    print(json.dumps(sorted(results, key=lambda r: int(r["i"]))), flush=True)  # type: ignore[call-overload]


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        recv(int(sys.argv[2]), int(sys.argv[3]))
