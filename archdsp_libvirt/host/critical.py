"""PCI devices the host cannot give to a VM: what holds its filesystems and swap, and its NICs
that carry the default route or an SSH session.

Read through a :class:`~archdsp_libvirt.host.files.Host` (so tests point it at a fake host tree):
/proc/self/mountinfo and /proc/mounts, /proc/swaps, /proc/cmdline, /sys/dev/block, /sys/class/block
(with ``slaves`` for device mapper and md), udev's /run/udev/data for ZFS pool members,
/proc/net/tcp{,6}, /proc/net/route and /proc/net/if_inet6.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .files import Host

# Mount points whose storage the host needs, and how they are named in a refusal.
CRITICAL_MOUNTS = {
    "/": "the root filesystem",
    "/boot": "/boot",
    "/boot/efi": "/boot/efi",
    "/usr": "/usr",
    "/var": "/var",
}
IMAGE_STORE = "/var/lib/libvirt/images"
SSH_PORT = 22


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class _MountEntry:
    __slots__ = ("path", "device", "fstype", "majmin")

    def __init__(self, path: str, device: str, fstype: str, majmin: str | None) -> None:
        self.path, self.device, self.fstype, self.majmin = path, device, fstype, majmin


def _mount_table(host: Host) -> list[_MountEntry]:
    """Mounts with their device numbers (mountinfo), else as /proc/mounts lists them."""
    out = []
    for line in (host.read("/proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        f, r = left.split(), right.split()
        if sep and len(f) >= 5 and len(r) >= 2:
            out.append(_MountEntry(_unescape(f[4]), _unescape(r[1]), r[0], f[2]))
    if out:
        return out
    return [_MountEntry(m.path, m.device, m.fstype, None) for m in host.mounts()]


def _mount_of(table: list[_MountEntry], path: str) -> _MountEntry | None:
    """The mount a path lives on: the last-mounted of the longest mount point above it."""
    best = None
    for m in table:
        if path == m.path or path.startswith(m.path.rstrip("/") + "/"):
            if best is None or len(m.path) >= len(best.path):
                best = m
    return best


def _name_of_dev(host: Host, dev: str) -> str | None:
    """The block device name behind a /dev path (following /dev/mapper, /dev/disk/by-* links)."""
    resolved = host.resolve(dev)
    name = os.path.basename(resolved or dev)  # a /dev without the node still names the device
    return name if host.exists(f"/sys/class/block/{name}") else None


def _name_of_majmin(host: Host, majmin: str | None) -> str | None:
    if not majmin or majmin.startswith("0:"):
        return None  # 0:N is an anonymous device (ZFS, btrfs subvolumes, tmpfs...)
    resolved = host.resolve(f"/sys/dev/block/{majmin}")
    return os.path.basename(resolved) if resolved else None


def _cmdline_root(host: Host) -> str | None:
    """The block device of ``root=`` on the kernel command line (/dev/X, UUID=, PARTUUID=, LABEL=)."""
    from .files import cmdline_values

    values = cmdline_values(host.cmdline(), "root")
    if not values:
        return None
    root = values[-1]
    for key, folder in (("UUID=", "by-uuid"), ("PARTUUID=", "by-partuuid"), ("LABEL=", "by-label")):
        if root.startswith(key):
            return _name_of_dev(host, f"/dev/disk/{folder}/{root[len(key):]}")
    return _name_of_dev(host, root) if root.startswith("/dev/") else None


def _zfs_members(host: Host, pool: str) -> list[str]:
    """Block devices udev saw as members of ZFS pool ``pool`` (blkid's zfs_member label is the pool name)."""
    out = []
    for name in host.listdir("/sys/class/block"):
        majmin = (host.read(f"/sys/class/block/{name}/dev") or "").strip()
        data = host.read(f"/run/udev/data/b{majmin}") if majmin else None
        if data and "E:ID_FS_TYPE=zfs_member" in data.splitlines() and f"E:ID_FS_LABEL={pool}" in data.splitlines():
            out.append(name)
    return out


def _leaves(host: Host, name: str, depth: int = 0) -> list[str]:
    """The physical block devices below ``name`` (through device-mapper and md ``slaves``)."""
    slaves = host.listdir(f"/sys/class/block/{name}/slaves")
    if not slaves or depth > 4:
        return [name]
    return [leaf for s in slaves for leaf in _leaves(host, s, depth + 1)]


def _pci_of_block(host: Host, name: str) -> str | None:
    from .network import pci_in_path

    return pci_in_path(host.resolve(f"/sys/class/block/{name}") or "")


def _storage_controllers(host: Host) -> list[str]:
    """Every PCI device with a block device below it."""
    found = []
    for name in host.listdir("/sys/class/block"):
        addr = _pci_of_block(host, name)
        if addr and addr not in found:
            found.append(addr)
    return found


def _block_names(host: Host, m: _MountEntry) -> tuple[list[str], str | None]:
    """The block devices holding mount ``m``, and, when they cannot be told, why not."""
    if m.fstype == "zfs":
        pool = m.device.split("/", 1)[0]
        members = _zfs_members(host, pool)
        return (members, None) if members else ([], f"ZFS pool {pool}, whose member disks udev does not list")
    name = _name_of_majmin(host, m.majmin)
    if name is None and m.device == "/dev/root":
        name = _cmdline_root(host)
    if name is None and m.device.startswith("/dev/"):
        name = _name_of_dev(host, m.device)
    return ([name], None) if name else ([], None)


def storage_devices(host: Host) -> dict[str, str]:
    """PCI address -> why, for the controllers of /, /boot, /usr, /var, swap and the libvirt image store.

    A ZFS pool whose members cannot be told makes every storage controller critical: the safe guess.
    """
    table = _mount_table(host)
    wanted: list[tuple[str, _MountEntry]] = []
    for point, label in CRITICAL_MOUNTS.items():
        m = next((e for e in reversed(table) if e.path == point), None)
        if m is not None:
            wanted.append((label, m))
    store = _mount_of(table, IMAGE_STORE)
    if store is not None:
        wanted.append((f"the libvirt image store {IMAGE_STORE}", store))
    out: dict[str, str] = {}

    def add(names: list[str], label: str, shown: str) -> None:
        for name in names:
            for leaf in _leaves(host, name):
                addr = _pci_of_block(host, leaf)
                if addr and addr not in out:
                    out[addr] = f"storage controller of {label} ({shown})"

    for label, m in wanted:
        names, unknown = _block_names(host, m)
        if unknown:
            for addr in _storage_controllers(host):
                out.setdefault(addr, f"storage controller, possibly of {label} ({unknown})")
        add(names, label, m.device)
    for line in (host.read("/proc/swaps") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) < 2:
            continue
        what = _unescape(fields[0])
        if fields[1] == "partition":
            name = _name_of_dev(host, what)
            add([name] if name else [], "swap", what)
        else:  # a swap file: the storage of the filesystem it is on
            m = _mount_of(table, what)
            if m is not None:
                names, _unknown = _block_names(host, m)
                add(names, "swap", what)
    return out


# --- NICs carrying SSH ----------------------------------------------------------------------------


def _v4_routes(host: Host) -> list[tuple[str, int, int]]:
    """(iface, destination, mask) of the IPv4 routes, as /proc/net/route writes them (host byte order)."""
    out = []
    for line in (host.read("/proc/net/route") or "").splitlines()[1:]:
        f = line.split()
        if len(f) >= 8:
            try:
                out.append((f[0], int(f[1], 16), int(f[7], 16)))
            except ValueError:
                continue
    return out


def _iface_of_v4(routes: list[tuple[str, int, int]], addr: int) -> str | None:
    best = None
    for iface, dest, mask in routes:
        if mask and addr & mask == dest and (best is None or bin(mask).count("1") > bin(best[1]).count("1")):
            best = (iface, mask)
    return best[0] if best else None


def _tcp6_to_network_order(hexaddr: str) -> str:
    """/proc/net/tcp6 writes each 32-bit word in host (little-endian) order."""
    return "".join(bytes.fromhex(hexaddr[i : i + 8])[::-1].hex() for i in range(0, 32, 8))


def ssh_interfaces(host: Host, port: int = SSH_PORT) -> list[str]:
    """Interfaces with an established TCP connection to this host's port ``port`` (an SSH session)."""
    routes = _v4_routes(host)
    v6 = {}
    for line in (host.read("/proc/net/if_inet6") or "").splitlines():
        f = line.split()
        if len(f) >= 6:
            v6[f[0].lower()] = f[5]
    out: list[str] = []
    for table in ("tcp", "tcp6"):
        for line in (host.read(f"/proc/net/{table}") or "").splitlines()[1:]:
            f = line.split()
            if len(f) < 4 or f[3] != "01":  # 01: ESTABLISHED
                continue
            local, _, lport = f[1].partition(":")
            try:
                if int(lport, 16) != port:
                    continue
            except ValueError:
                continue
            iface = None
            if table == "tcp":
                iface = _iface_of_v4(routes, int(local, 16))
            else:
                net = _tcp6_to_network_order(local)
                if net.startswith("00000000000000000000ffff"):  # IPv4-mapped
                    iface = _iface_of_v4(routes, int.from_bytes(bytes.fromhex(net[24:]), "little"))
                else:
                    iface = v6.get(net)
            if iface and iface != "lo" and iface not in out:
                out.append(iface)
    return out


def ssh_nics(host: Host) -> dict[str, str]:
    """PCI address -> why, for the NICs (below bridges and bonds too) carrying an SSH session."""
    return {a: f"NIC carrying an SSH session ({i})" for i in ssh_interfaces(host) for a in host.nic_pci(i)}


def root_storage_devices(host: Host) -> dict[str, str]:
    """PCI address -> why, for the controller(s) holding the root filesystem."""
    return {a: why for a, why in storage_devices(host).items() if "the root filesystem" in why}


def critical_devices(host: Host) -> dict[str, str]:
    """PCI devices the host cannot lose (bridges are refused by class): the storage of /, /boot,
    /usr, /var, swap and the libvirt image store, the default route's NICs and NICs carrying an
    SSH session."""
    return {**ssh_nics(host), **host.default_route_nics(), **storage_devices(host)}
