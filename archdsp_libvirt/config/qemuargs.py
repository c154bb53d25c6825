"""QEMU-argument rules: which ``qemu_extra_args`` would go around libvirt's security model."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from ..errors import Invalid


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


# --- qemu_extra_args: what would go around libvirt -------------------------------------------

# QEMU options that take no value; every other option takes exactly one.
_QEMU_FLAGS = frozenset({
    "S", "s", "daemonize", "enable-kvm", "enable-sync-profile", "enable-fips", "full-screen", "mem-prealloc",
    "no-acpi", "no-fd-bootchk", "no-hpet", "no-reboot", "no-shutdown", "no-user-config", "nodefaults",
    "nodefconfig", "nographic", "only-migratable", "portrait", "singlestep", "one-insn-per-tb", "snapshot",
    "usb", "version", "win2k-hack", "xen-attach", "xen-domid-restrict", "preconfig", "audio-help", "h", "help",
    "no-quit", "alt-grab", "ctrl-grab", "no-frame", "sdl", "curses", "semihosting", "no-kvm",
})
_DISK = "gives the guest a host file or device as a disk (use archibaldos.disk_image)"
_HOST_FILE = "makes QEMU read or write a host file that libvirt does not label"
_MONITOR = "opens a QEMU monitor that libvirt does not own (it could reconfigure or stop the domain)"
_CHAR = "connects a guest port or channel to a host file, device or socket"
# Options refused outright, and why.
_QEMU_REFUSED = {
    "sandbox": "changes QEMU's seccomp sandbox, which libvirt sets itself",
    "runas": "changes the user QEMU runs as (libvirt runs it as libvirt-qemu)",
    "run-with": "changes the user or root folder QEMU runs as",
    "chroot": "changes QEMU's root folder",
    "daemonize": "detaches QEMU from libvirt",
    "add-fd": "hands QEMU host file descriptors",
    "incoming": "loads guest state from a host file, socket or command",
    "loadvm": "restores a snapshot libvirt does not know of",
    "monitor": _MONITOR, "qmp": _MONITOR, "qmp-pretty": _MONITOR, "mon": _MONITOR,
    "gdb": "opens a debugger socket into the guest", "s": "opens a debugger socket into the guest (tcp::1234)",
    "serial": _CHAR, "parallel": _CHAR, "debugcon": _CHAR, "chardev": _CHAR,
    "drive": _DISK, "blockdev": _DISK, "hda": _DISK, "hdb": _DISK, "hdc": _DISK, "hdd": _DISK,
    "cdrom": _DISK, "fda": _DISK, "fdb": _DISK, "mtdblock": _DISK, "sd": _DISK, "pflash": _DISK,
    "iscsi": _DISK, "usbdevice": "passes a host USB device or file through",
    "bios": _HOST_FILE, "L": _HOST_FILE, "option-rom": _HOST_FILE, "dtb": _HOST_FILE,
    "kernel": "boots a host file (use [boot] kernel)", "initrd": "boots a host file (use [boot] initrd)",
    "append": "sets the kernel command line (use [boot] cmdline)",
    "readconfig": _HOST_FILE, "writeconfig": _HOST_FILE, "pidfile": _HOST_FILE, "D": _HOST_FILE,
    "dump-vmstate": _HOST_FILE, "acpitable": _HOST_FILE, "mem-path": "backs guest memory with a host file",
    "plugin": "loads a host shared library into QEMU",
    "virtfs": "shares a host folder with the guest", "fsdev": "shares a host folder with the guest",
    "tpmdev": "passes the host's TPM through",
    "vnc": "opens a display outside libvirt's graphics (use vnc = true with display_listen/display_password)",
    "spice": "opens a display outside libvirt's graphics (use spice = true with display_listen/display_password)",
    "display": "opens a display outside libvirt's graphics (use spice/vnc with display_listen/display_password)",
    "set": "rewrites options libvirt generated",
}
# Keys (in option values) that name a host file, device, socket or file descriptor.
_HOST_KEYS = frozenset({
    "file", "filename", "path", "mem-path", "romfile", "script", "downscript", "dumpdtb", "kernel", "initrd",
    "firmware", "dtb", "bios", "evdev", "dir", "sock", "socket", "fd", "fds", "vhostfd", "vhostfds", "ifname", "br",
    "helper", "sysfsdev", "host", "hostaddr", "hostbus", "hostport", "hostdevice", "vendorid", "productid",
    "chardev", "events", "logfile", "smb", "tftp", "bootfile", "guestfwd",
})
_NETDEV_TYPES = {"netdev": {"user"}, "nic": {"user", "none"}, "net": {"user", "nic", "none", "hubport"}}
_DEVICE_REFUSED = re.compile(
    r"^(vfio-.*|vhost-.*|.*-host|pci-assign|kvm-pci-assign|virtio-9p.*|ivshmem.*|loader|guest-loader|"
    r"u2f-passthrough|ccid-card-passthru|usb-redir|xen-.*|scsi-generic|scsi-block)$"
)
_OBJECT_REFUSED = re.compile(
    r"^(memory-backend-file|memory-backend-epc|input-linux|filter-dump|filter-mirror|filter-redirector|"
    r"colo-compare|can-host-socketcan|cryptodev-vhost-user|tls-creds-.*|authz-listfile|pr-manager-helper|"
    r"rng-random|rng-egd|x-.*)$"
)


def _qemu_pairs(value: str) -> tuple[str, list[tuple[str, str]]]:
    """QEMU's ``kind,key=value,...`` (or JSON) as its kind and its (key, value) pairs, keys lower-cased.

    Splitting on every comma (QEMU escapes a comma in a value as ``,,``)
    finds every key QEMU would see, and perhaps a few it would not: for a
    check that refuses, that errs the right way.
    """
    pairs: list[tuple[str, str]] = []
    if value.lstrip().startswith("{"):
        import json

        try:
            obj = json.loads(value)
        except ValueError:
            raise Invalid(f"{value!r} is not valid JSON; QEMU's JSON option syntax is expected") from None

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(f"{prefix}{k}.", v)
            elif isinstance(node, list):
                for item in node:
                    walk(prefix, item)
            else:
                pairs.append((prefix[:-1].lower(), str(node)))

        walk("", obj)
        kinds = {k: v for k, v in pairs if k in ("driver", "qom-type", "type")}
        return next(iter(kinds.values()), ""), pairs
    parts = value.split(",")
    kind = ""
    for i, part in enumerate(parts):
        key, eq, val = part.partition("=")
        if not eq:
            if i == 0:
                kind = part
            continue
        pairs.append((key.strip().lower(), val))
        if key in ("driver", "qom-type", "type") and not kind:
            kind = val
    return kind, pairs


def unsafe_qemu_args(args: list[str]) -> str | None:
    """Why ``args`` would go around libvirt's security model, or None when they would not."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg == "-":
            return (f"{arg[:80]!r} is not an option (QEMU takes a bare argument as a disk image: "
                    "a host file the guest could read and write)")
        opt = arg[2:] if arg.startswith("--") else arg[1:]
        if opt in _QEMU_REFUSED:
            value = "" if opt in _QEMU_FLAGS or i + 1 >= len(args) else " " + args[i + 1][:80]
            return f"'{arg}{value}' {_QEMU_REFUSED[opt]}"
        if opt in _QEMU_FLAGS:
            i += 1
            continue
        if i + 1 >= len(args):
            return f"'{arg}' needs a value (QEMU would take the next argument libvirt passes)"
        value = args[i + 1]
        shown = f"'{arg} {value if len(value) <= 80 else value[:77] + '...'}'"
        kind, pairs = _qemu_pairs(value)
        if opt == "device" and _DEVICE_REFUSED.match(kind):
            return f"{shown} passes a host device or host resource through (device {kind!r}; use [audio_device])"
        if opt == "object" and _OBJECT_REFUSED.match(kind):
            return f"{shown} gives QEMU a host file, device or socket (object {kind!r})"
        if opt in _NETDEV_TYPES and kind not in _NETDEV_TYPES[opt]:
            return f"{shown} connects the guest to the host network outside libvirt (use [network])"
        for key, val in pairs:
            leaf = key.rsplit(".", 1)[-1]
            if leaf == "property" and val.lower() in _HOST_KEYS:
                leaf = val.lower()
            if leaf in ("guestfwd", "smb", "tftp", "bootfile"):
                return f"{shown} lets the guest reach host files or commands ({leaf}=)"
            if leaf in _HOST_KEYS:
                return f"{shown} names a host file, device or socket ({leaf}=), which libvirt does not label"
        if opt in _NETDEV_TYPES:
            for key, val in pairs:
                if key == "hostfwd":
                    proto, _, rest = val.partition(":")
                    address = rest.partition(":")[0]
                    if proto not in ("", "tcp", "udp") or not address or not _loopback_text(address):
                        return (f"{shown} forwards a host port on {address or 'every address'} "
                                "(use [network] hostfwd, with hostfwd_allow_external for other hosts)")
        i += 2
    return None


def _loopback_text(address: str) -> bool:
    try:
        return _is_loopback(address)
    except ValueError:
        return False
