"""The host's network as its files show it: routes, its own addresses, the interfaces under a bridge.

A mixin of :class:`.files.Host` (it reads through ``self.read``, ``self.listdir`` and ``self.resolve``):
where a NETJACK master's address sits, and whether machines other than this one's VMs can reach it.
"""

from __future__ import annotations

import re
import socket

PCI_ADDR = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")


def pci_in_path(path: str) -> str | None:
    """The last PCI address among the components of a resolved sysfs path."""
    found = None
    for part in path.split("/"):
        if PCI_ADDR.match(part):
            found = part
    return found


def _udp_addr(hexaddr: str) -> tuple[str, int]:
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
            remote, rport = _udp_addr(f[2])
            local, lport = _udp_addr(f[1])
            rx = int(f[4].split(":")[1], 16)
            rows[int(f[9])] = (remote, rport, rx, int(f[12]), f"[{local}]:{lport}" if ":" in local else f"{local}:{lport}")
        except (ValueError, IndexError):
            continue
    return rows


def listeners(rows: dict[int, tuple[str, int, int, int, str]], port: int) -> list[str]:
    """``address:port`` of the unconnected sockets on ``port`` among ``rows`` (:func:`parse_udp_table`)."""
    return sorted({row[4] for row in rows.values() if row[1] == 0 and row[4].rsplit(":", 1)[1] == str(port)})


def is_wildcard(where: str) -> bool:
    """Whether ``address:port`` (as :func:`listeners` gives it) is every address: ``0.0.0.0``, ``[::]``, or
    the IPv4-mapped ``[::ffff:0.0.0.0]``."""
    host = where.rsplit(":", 1)[0].strip("[]")
    return host in ("0.0.0.0", "::", "::ffff:0.0.0.0")


class NetworkFiles:
    """Network facts of a host tree; the class that mixes it in gives ``read``, ``listdir``, ``resolve``."""

    def default_route_interfaces(self) -> list[str]:
        ifaces: list[str] = []
        for line in (self.read("/proc/net/route") or "").splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000" and f[0] not in ifaces:
                ifaces.append(f[0])
        for line in (self.read("/proc/net/ipv6_route") or "").splitlines():
            f = line.split()
            if len(f) >= 10 and set(f[0]) == {"0"} and f[1] == "00" and f[9] != "lo" and f[9] not in ifaces:
                ifaces.append(f[9])
        return ifaces

    def udp_listeners(self, port: int) -> list[str] | None:
        """Where UDP ``port`` is bound, as the kernel's table says (this network namespace, any process):
        ``address:port`` of each unconnected socket; None when the host tree has no such table."""
        texts = [self.read(f"/proc/net/{name}") for name in ("udp", "udp6")]
        if all(t is None for t in texts):
            return None
        rows: dict[int, tuple[str, int, int, int, str]] = {}
        for text in texts:
            rows.update(parse_udp_table(text or ""))
        return listeners(rows, port)

    def nic_pci(self, iface: str, depth: int = 0) -> list[str]:
        addr = pci_in_path(self.resolve(f"/sys/class/net/{iface}") or "")
        if addr:
            return [addr]
        if depth > 3:
            return []
        lower = self.listdir(f"/sys/class/net/{iface}/brif")
        lower += [n[len("lower_"):] for n in self.listdir(f"/sys/class/net/{iface}") if n.startswith("lower_")]
        return [a for n in lower for a in self.nic_pci(n, depth + 1)]

    def interface_of(self, ip: str) -> str | None:
        """The interface holding the local IPv4 address ``ip``: the one whose connected route (no gateway)
        holds it, the longest prefix winning; ``lo`` for 127/8. None when ``ip`` is no address of this
        host (the kernel's ``/proc/net/fib_trie`` lists its own as ``/32 host LOCAL``; a host tree without
        that file is asked for the route alone). The one answer for ``check`` and both bridge backends."""
        import ipaddress

        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return None
        if addr.is_loopback:
            return "lo"
        local = self.local_addresses()
        if local is not None and ip not in local:
            return None
        best: tuple[int, str] | None = None
        for line in (self.read("/proc/net/route") or "").splitlines()[1:]:
            f = line.split()
            if len(f) < 8 or f[2] != "00000000" or f[1] == "00000000":
                continue
            try:
                dest = ipaddress.IPv4Address(int(f[1], 16).to_bytes(4, "little"))
                mask = ipaddress.IPv4Address(int(f[7], 16).to_bytes(4, "little"))
                net = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
            except ValueError:
                continue
            if addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, f[0])
        return best[1] if best else None

    def local_addresses(self) -> set[str] | None:
        """This host's own IPv4 addresses as the kernel's FIB lists them (None: no fib_trie to read)."""
        text = self.read("/proc/net/fib_trie")
        if text is None:
            return None
        found, last = set(), None
        for line in text.splitlines():
            words = line.split()
            if len(words) == 2 and words[0] == "|--":
                last = words[1]
            elif last and words[:1] == ["/32"] and "LOCAL" in words:
                found.add(last)
        return found

    def lan_exposure(self, ip: str) -> str | None:
        """Why other machines can reach ``ip`` (a NETJACK master's address), or None when it sits on a
        virtual network only (libvirt's bridge, loopback, a veth): the interface carries the default route,
        or a physical NIC is (under) it."""
        iface = self.interface_of(ip)
        if iface is None or iface == "lo":
            return None
        if iface in self.default_route_interfaces():
            return f"{ip} is on {iface}, which carries the default route"
        nics = self.nic_pci(iface)
        if nics:
            return f"{ip} is on {iface}, a LAN interface (NIC {', '.join(sorted(set(nics)))})"
        return None

    def default_route_nics(self) -> dict[str, str]:
        """PCI address -> why, for the NIC(s) carrying the default route."""
        return {a: f"NIC of the default route ({i})" for i in self.default_route_interfaces() for a in self.nic_pci(i)}

