"""The TUN device: created by the agent, configured with pyroute2, gone when the fd closes.

pyroute2 can create tuntap links but hands back no file descriptor, so the device itself comes
from /dev/net/tun + TUNSETIFF; everything else (MTU, queue length, addresses, routes, up) goes
through netlink. The device is not persistent: if the agent dies, the kernel removes it.

Every read and write carries a virtio-net header (IFF_VNET_HDR). With offload on, the kernel
hands the agent TCP bursts of up to 64 KB (TSO) with a partial checksum, and takes the same back
on the other side: one row, one database round trip and one system call per burst instead of
per wire-sized segment. The header is logged with the packet and written back verbatim; see
`check_offload` for what a receiver accepts from a stored row.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable

from pyroute2 import IPRoute

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6 = 0x01, 0x02, 0x04
IFA_F_NODAD = 0x02

# struct virtio_net_hdr (TUN's default header size): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset, in host byte order.
VNET = struct.Struct("=BBHHHH")
VNET_SIZE = VNET.size
NO_OFFLOAD = bytes(VNET_SIZE)
NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_TCPV6 = 0, 1, 4
_TCP, _UDP = 6, 17
# One read returns one packet; anything shorter than the largest possible packet truncates.
READ_SIZE = VNET_SIZE + 65536


class TunError(RuntimeError):
    """The TUN device could not be set up; the message says what the host lacks."""


class Tun:
    """An open, configured TUN device. The fd is non-blocking: callers select() and drain."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd

    def read(self) -> bytes | None:
        """One packet behind its VNET_SIZE-byte offload header, or None when the queue is empty."""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, packet: bytes, offload: bytes = NO_OFFLOAD) -> bool:
        """Hand a packet to the kernel; False if the kernel refused it (e.g. malformed)."""
        try:
            os.writev(self.fd, (offload, packet))
        except OSError as exc:
            log.debug("TUN write of %d bytes refused: %s", len(packet), exc)
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def check_offload(offload: bytes, packet: bytes, version: int) -> bool:
    """Is a stored offload header one this agent's own kernel could have produced for `packet`?

    Rows come from other peers; the kernel parses the header we write (a history of bugs), so
    only the shapes TUN hands out with TSO and checksum offload pass: a partial TCP or UDP
    checksum inside the packet, and TCP segmentation matching the IP version.
    """
    if len(offload) != VNET_SIZE:
        return False
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET.unpack(offload)
    if flags & ~NEEDS_CSUM or hdr_len > len(packet):
        return False
    if flags and (csum_offset not in (16, 6) or csum_start < 20
                  or csum_start + csum_offset + 2 > len(packet)):
        return False
    if gso_type == GSO_NONE:
        return not gso_size
    expected = GSO_TCPV4 if version == 4 else GSO_TCPV6
    return gso_type == expected and bool(flags) and csum_offset == 16 and 0 < gso_size < len(packet)


def segments(offload: bytes | None, length: int) -> int:
    """How many wire-sized packets a row stands for: its TSO burst cut at gso_size."""
    if not offload:
        return 1
    _, gso_type, hdr_len, gso_size, _, _ = VNET.unpack(offload)
    if gso_type == GSO_NONE or not gso_size:
        return 1
    return max(1, -(-(length - int(hdr_len)) // int(gso_size)))


def open_tun(name: str, offload: bool = True) -> Tun:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(
            f"cannot open /dev/net/tun ({exc.strerror}): load the tun module and make sure the "
            "agent may use the device (systemd DeviceAllow=/dev/net/tun rw)"
        ) from exc
    ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        # Without TUNSETOFFLOAD the kernel segments and checksums everything itself; the header
        # is still there (all zeros) so that bursts from peers with offload can be written back.
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if offload else 0)
    except OSError as exc:
        os.close(fd)
        raise TunError(
            f"cannot create TUN device {name!r} ({exc.strerror}): the agent needs CAP_NET_ADMIN, "
            "and the name must not belong to another device"
        ) from exc
    return Tun(name, fd)


def configure(
    tun: Tun,
    *,
    mtu: int,
    txqueuelen: int,
    addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    routes: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> None:
    """Addresses, MTU and routes; IPv6 addresses skip DAD so the tunnel is usable at once."""
    addresses = list(addresses)
    if any(a.version == 6 for a in addresses):
        _enable_ipv6(tun.name)
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=tun.name)[0]
        ipr.link("set", index=index, mtu=mtu, txqlen=txqueuelen)
        for a in addresses:
            ipr.addr(
                "add",
                index=index,
                address=str(a.ip),
                prefixlen=a.network.prefixlen,
                family=socket.AF_INET6 if a.version == 6 else socket.AF_INET,
                **({"flags": IFA_F_NODAD} if a.version == 6 else {}),
            )
        ipr.link("set", index=index, state="up")
        on_link = [a.network for a in addresses]
        for net in routes:
            if any(net.version == o.version and net.subnet_of(o) for o in on_link):  # type: ignore[arg-type]
                continue
            ipr.route("replace", dst=str(net), oif=index,
                      family=socket.AF_INET6 if net.version == 6 else socket.AF_INET)


def _enable_ipv6(name: str) -> None:
    """New links inherit net.ipv6.conf.default; only a host that disables IPv6 needs a write
    (which a hardened unit, with /proc/sys read-only, cannot do)."""
    path = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    try:
        with open(path) as f:
            if f.read().strip() == "0":
                return
        with open(path, "w") as f:
            f.write("0")
    except OSError as exc:
        log.warning("cannot enable IPv6 on %s (%s); IPv6 addresses may fail", name, exc.strerror)
