"""The TUN device: created by the agent, configured with pyroute2, gone when the fd closes.

pyroute2 can create tuntap links but hands back no file descriptor, so the device itself comes
from /dev/net/tun + TUNSETIFF; everything else (MTU, queue length, addresses, routes, up) goes
through netlink. The device is not persistent: if the agent dies, the kernel removes it.
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
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFA_F_NODAD = 0x02
# One read returns one packet; anything shorter than the largest possible packet truncates.
READ_SIZE = 65536


class TunError(RuntimeError):
    """The TUN device could not be set up; the message says what the host lacks."""


class Tun:
    """An open, configured TUN device. The fd is non-blocking: callers select() and drain."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd

    def read(self) -> bytes | None:
        """One packet, or None when the kernel queue is empty."""
        try:
            return os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None

    def write(self, packet: bytes) -> bool:
        """Hand a packet to the kernel; False if the kernel refused it (e.g. malformed)."""
        try:
            os.write(self.fd, packet)
        except OSError as exc:
            log.debug("TUN write of %d bytes refused: %s", len(packet), exc)
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_tun(name: str) -> Tun:
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TunError(
            f"cannot open /dev/net/tun ({exc.strerror}): load the tun module and make sure the "
            "agent may use the device (systemd DeviceAllow=/dev/net/tun rw)"
        ) from exc
    ifr = struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI)
    try:
        fcntl.ioctl(fd, TUNSETIFF, ifr)
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
