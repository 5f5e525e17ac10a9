"""Drive udpstream.py in two namespaces: the test decides when each datagram leaves."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pgvpn_agent.lab import Lab, LabPeer

SCRIPT = str(Path(__file__).with_name("udpstream.py"))


class Stream:
    def __init__(self, lab: Lab, src: LabPeer, dst: LabPeer, port: int, v6: bool = False) -> None:
        self.received: list[int] = []
        self.times: list[float] = []  # time.monotonic() of each arrival
        self._lock = threading.Lock()
        self.recv = subprocess.Popen(
            ["ip", "netns", "exec", dst.netns, sys.executable, SCRIPT, "recv", str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.recv.stdout is not None
        assert self.recv.stdout.readline().strip() == "ready"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        host = dst.ipv6 if v6 else dst.ipv4
        self.send_proc = subprocess.Popen(
            ["ip", "netns", "exec", src.netns, sys.executable, SCRIPT, "send", host, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _read(self) -> None:
        assert self.recv.stdout is not None
        for line in self.recv.stdout:
            with self._lock:
                self.received.append(int(line))
                self.times.append(time.monotonic())

    def send(self, n: int) -> bool:
        """False when the local kernel refused the datagram (no route: the TUN is gone)."""
        assert self.send_proc.stdin is not None and self.send_proc.stdout is not None
        self.send_proc.stdin.write(f"{n}\n")
        self.send_proc.stdin.flush()
        return self.send_proc.stdout.readline().strip() == "ok"

    def wait_for(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if n in self.received:
                    return True
            time.sleep(0.01)
        return False

    def wait_count(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.received) < count:
            time.sleep(0.05)

    def close(self) -> list[int]:
        for proc in (self.send_proc, self.recv):
            assert proc.stdin is not None
            proc.stdin.close()
        self.send_proc.wait(10)
        self.recv.wait(10)
        self._reader.join(10)
        return list(self.received)


def deliver(lab: Lab, src: LabPeer, dst: LabPeer, port: int, count: int,
            v6: bool = False) -> list[int]:
    """Send datagrams 1..count and return the numbers that arrived within 10 s, as they came."""
    stream = Stream(lab, src, dst, port=port, v6=v6)
    for n in range(1, count + 1):
        stream.send(n)
    stream.wait_count(count, timeout=10)
    return stream.close()


def eventually(check: Callable[[], None], timeout: float = 10.0) -> None:
    """Retry an assertion until it holds: packets still in flight settle within moments."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
