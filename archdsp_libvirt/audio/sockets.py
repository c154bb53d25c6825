"""What the kernel says about a process's UDP sockets: ``/proc/PID/net/udp`` (and udp6) and the
process's descriptors. Where a bridge listens is read here, never taken from what it was asked."""

from __future__ import annotations

import os
from pathlib import Path

from ..host.network import is_wildcard, listeners, parse_udp_table  # noqa: F401  (the kernel's table, read once)


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
    return listeners(table, port)
