"""What the kernel says about a process's UDP sockets: ``/proc/PID/net/udp`` (and udp6) and the
process's descriptors. Where a bridge listens is read here, never taken from what it was asked."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _addr(hexaddr: str) -> tuple[str, int]:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if len(raw) == 4:
        text = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc prints IPv6 as four host-order 32-bit words
        text = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    return text, int(port, 16)


def parse_udp_table(text: str) -> dict[int, tuple[str, int, int, int, str]]:
    """``/proc/net/udp`` (or udp6) rows by inode: (remote address, remote port, rx_queue bytes, drops,
    local ``address:port``)."""
    rows = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 13:
            continue
        try:
            remote, rport = _addr(f[2])
            local, lport = _addr(f[1])
            rx = int(f[4].split(":")[1], 16)
            rows[int(f[9])] = (remote, rport, rx, int(f[12]), f"[{local}]:{lport}" if ":" in local else f"{local}:{lport}")
        except (ValueError, IndexError):
            continue
    return rows


def udp_sockets(pid: int, proc: Path = Path("/proc")) -> list[tuple[int, int, tuple[str, int, int, int, str]]]:
    """Process ``pid``'s UDP sockets: (descriptor, inode, its /proc/net/udp row)."""
    table: dict[int, tuple[str, int, int, int, str]] = {}
    for name in ("udp", "udp6"):
        try:
            table.update(parse_udp_table((proc / str(pid) / "net" / name).read_text()))
        except OSError:
            pass
    try:
        fds = list((proc / str(pid) / "fd").iterdir())
    except OSError:
        return []
    found = []
    for link in fds:
        try:
            target = os.readlink(link)
        except OSError:
            continue
        if target.startswith("socket:[") and (row := table.get(int(target[8:-1]))):
            found.append((int(link.name), int(target[8:-1]), row))
    return sorted(found)


def listening(pid: int, port: int, proc: Path = Path("/proc")) -> list[str]:
    """Where process ``pid`` listens on UDP ``port`` (``address:port`` of its unconnected sockets)."""
    return [row[4] for _fd, _inode, row in udp_sockets(pid, proc)
            if row[1] == 0 and row[4].rsplit(":", 1)[1] == str(port)]


def bound(port: int, proc: Path = Path("/proc")) -> list[str]:
    """Every unconnected UDP socket on ``port`` in the kernel's table (this network namespace, any
    process): ``address:port`` as it is bound, for a server whose PID the bridge does not know."""
    table: dict[int, tuple[str, int, int, int, str]] = {}
    for name in ("udp", "udp6"):
        try:
            table.update(parse_udp_table((proc / "net" / name).read_text()))
        except OSError:
            pass
    return sorted({row[4] for row in table.values() if row[1] == 0 and row[4].rsplit(":", 1)[1] == str(port)})
