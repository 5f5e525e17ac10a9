"""Classic pcap output (LINKTYPE_RAW: each record is a bare IPv4 or IPv6 packet).

Nanosecond timestamps keep the log's microsecond capture times exact; tshark and Wireshark read
the format natively, also from a pipe.
"""

from __future__ import annotations

import struct
from datetime import datetime
from typing import BinaryIO

MAGIC_NS = 0xA1B23C4D
LINKTYPE_RAW = 101
SNAPLEN = 65535
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")


class PcapWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0
        out.write(_GLOBAL.pack(MAGIC_NS, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW))

    def write(self, when: datetime, packet: bytes) -> None:
        ts = when.timestamp()
        seconds = int(ts)
        nanos = when.microsecond * 1000
        self.out.write(_RECORD.pack(seconds, nanos, len(packet), len(packet)))
        self.out.write(packet)
        self.count += 1
