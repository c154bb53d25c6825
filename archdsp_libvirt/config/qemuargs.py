"""QEMU-argument rules: the allow-list of ``qemu_extra_args``.

``qemu_extra_args`` reach QEMU through ``<qemu:commandline>``, around
libvirt: nothing they name is labelled, chowned or confined by libvirt's
security drivers. QEMU has hundreds of options, and many take a host file,
device or socket somewhere in their values; a deny-list of them always has
holes. So only a short list of option families known to be harmless passes,
each value parsed as QEMU 7.2 parses it (QemuOpts ``key=value,...`` with
``,,`` for a comma and ``noKEY`` for ``KEY=off``, or JSON), with the keys
each family may use; anything else needs ``qemu_extra_args_allow_unsafe``.
A key given twice is refused (QEMU would take the last one silently),
except the list-valued ``hostfwd`` and ``dnssearch``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable

from ..errors import Invalid

# --- values ---------------------------------------------------------------------------------

Check = Callable[[str], bool]


def _re(pattern: str) -> Check:
    rx = re.compile(pattern)
    return lambda v: rx.fullmatch(v) is not None


_ID = _re(r"[A-Za-z][A-Za-z0-9_.-]{0,31}")  # QEMU's id_wellformed, bounded
_NAME = _re(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_ONOFF = _re(r"on|off|yes|no|true|false")
_UINT = _re(r"[0-9]{1,10}")
_ADDR = _re(r"(0x)?[0-9a-fA-F]{1,2}(\.[0-7])?")
_MAC = _re(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_IPV4 = _re(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")
_NET = _re(r"[0-9]{1,3}(\.[0-9]{1,3}){3}(/[0-9.]{1,15})?")
# SMBIOS strings: printable ASCII without a comma (QEMU's own separator, ',,' included: kept simple).
_SMBIOS_TEXT = _re(r"[\x20-\x2b\x2d-\x7e]{1,64}")


def _hostfwd(rule: str) -> bool:
    """``[tcp|udp]:HOSTADDR:HOSTPORT-[GUESTADDR]:GUESTPORT`` with HOSTADDR a literal IPv4 loopback address.

    QEMU reads the ports with strtol(base 0): a leading zero is octal, so none is allowed.
    """
    m = re.fullmatch(r"(tcp|udp)?:([0-9.]+):([1-9][0-9]{0,4})-([0-9.]*):([1-9][0-9]{0,4})", rule)
    if not m or int(m[3]) > 65535 or int(m[5]) > 65535:
        return False
    try:
        return ipaddress.IPv4Address(m[2]).is_loopback
    except ValueError:
        return False


# --- the allow-list -------------------------------------------------------------------------

_DEVICE_COMMON: dict[str, Check] = {"id": _ID, "bus": _NAME, "addr": _ADDR}
_NIC_KEYS: dict[str, Check] = {**_DEVICE_COMMON, "mac": _MAC, "netdev": _ID}
# -device: drivers that are purely virtual (no host file, device, socket or audio backend behind
# them), with the keys each may use. Left out on purpose: anything with a chardev, drive, fsdev,
# audiodev, rng object or romfile key, host passthrough (vfio, usb-host, u2f, vhost, 9p),
# and devices whose default backend is the host's (hda codecs open the host's sound system).
_DEVICES: dict[str, dict[str, Check]] = {
    "intel-hda": {**_DEVICE_COMMON, "msi": _ONOFF},           # the controller alone: no codec, no audio backend
    "ich9-intel-hda": {**_DEVICE_COMMON, "msi": _ONOFF},
    "virtio-rng-pci": {**_DEVICE_COMMON, "max-bytes": _UINT, "period": _UINT},  # rng-builtin: getrandom()
    "virtio-keyboard-pci": _DEVICE_COMMON, "virtio-mouse-pci": _DEVICE_COMMON,  # fed by libvirt's display
    "virtio-tablet-pci": _DEVICE_COMMON,
    "pvpanic-pci": _DEVICE_COMMON,                             # tells libvirt the guest panicked
    "i6300esb": _DEVICE_COMMON,                                # a watchdog: resets the guest
    # NICs, only on a -netdev user of these same arguments (netdev= is checked against them)
    "virtio-net-pci": _NIC_KEYS, "e1000": _NIC_KEYS, "e1000e": _NIC_KEYS, "rtl8139": _NIC_KEYS,
}
# -netdev user / -nic user: QEMU's own user-mode network, inside the QEMU process. Forwards only on
# loopback; no guestfwd (connects to host sockets or runs commands), smb (runs smbd on a host folder),
# tftp/bootfile (serve host files).
_USERNET: dict[str, Check] = {
    "id": _ID, "net": _NET, "host": _IPV4, "dhcpstart": _IPV4, "dns": _IPV4, "restrict": _ONOFF,
    "ipv4": _ONOFF, "ipv6": _ONOFF, "hostname": _NAME, "domainname": _NAME, "dnssearch": _NAME, "hostfwd": _hostfwd,
}
_REPEATABLE = frozenset({"hostfwd", "dnssearch"})
_RTC_BASE = _re(r"utc|localtime|[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2})?")
# SMBIOS types 0-3 (BIOS, system, baseboard, chassis): strings the guest reads, nothing more.
# Not file= (a host file QEMU reads) nor the other types.
_SMBIOS_FIELDS = {
    "0": {"vendor", "version", "date", "release"},
    "1": {"manufacturer", "product", "version", "serial", "uuid", "sku", "family"},
    "2": {"manufacturer", "product", "version", "serial", "asset", "location"},
    "3": {"manufacturer", "version", "serial", "asset", "sku"},
}
# -global DRIVER.PROPERTY=VALUE: only these pairs (guest power states, the PIT's lost ticks).
_GLOBALS: dict[str, Check] = {
    "kvm-pit.lost_tick_policy": _re(r"discard|delay"),
    "ICH9-LPC.disable_s3": _re(r"[01]"), "ICH9-LPC.disable_s4": _re(r"[01]"),
    "PIIX4_PM.disable_s3": _re(r"[01]"), "PIIX4_PM.disable_s4": _re(r"[01]"),
}
# -cpu MODEL[,+feat|-feat|feat=value...]: the guest's CPU model and features (no host resource).
_CPU = _re(r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}(,([+-]?[A-Za-z0-9_.-]{1,40}(=[A-Za-z0-9_.-]{1,20})?))*")

# Options that take no value and are harmless: -S (start paused; libvirt passes it anyway),
# -no-hpet (no HPET timer in the guest).
_FLAGS = frozenset({"S", "no-hpet"})
# Options with a value: (implied first key, allowed keys) for QemuOpts values; a callable for the rest.
_OPTIONS: dict[str, str] = {
    "device": "a virtual device from the list (README: qemu_extra_args)",
    "netdev": "a user-mode network (user,id=ID[,hostfwd=tcp:127.0.0.1:HOST-:GUEST])",
    "nic": "a user-mode NIC (user[,model=virtio-net-pci][,hostfwd=...])",
    "rtc": "base=, clock=, driftfix= (the guest's clock)",
    "msg": "timestamp=, guest-name= (QEMU's log format)",
    "overcommit": "mem-lock=, cpu-pm= (on/off)",
    "smbios": "type=0|1|2|3 with that type's string fields",
    "fw_cfg": "name=opt/...,string=TEXT (a string for the guest)",
    "global": "one of " + ", ".join(_GLOBALS),
    "cpu": "MODEL[,+feature,-feature,feature=value]",
}

# Why well-known options that are not on the list are dangerous (the message says it; the list decides).
_DISK = "gives the guest a host file or device as a disk (use archibaldos.disk_image)"
_MONITOR = "opens a QEMU monitor that libvirt does not own"
_CHAR = "connects a guest port to a host file, device or socket"
_DISPLAY = "opens a display outside libvirt's graphics (use spice/vnc with display_listen/display_password)"
_WHY = {
    "sandbox": "changes QEMU's seccomp sandbox, which libvirt sets itself",
    "runas": "changes the user QEMU runs as", "run-with": "changes the user or root folder QEMU runs as",
    "chroot": "changes QEMU's root folder", "daemonize": "detaches QEMU from libvirt",
    "add-fd": "hands QEMU host file descriptors", "incoming": "loads guest state from a host file, socket or command",
    "loadvm": "restores a snapshot libvirt does not know of",
    "monitor": _MONITOR, "qmp": _MONITOR, "qmp-pretty": _MONITOR, "mon": _MONITOR,
    "gdb": "opens a debugger socket into the guest", "s": "opens a debugger socket into the guest (tcp::1234)",
    "qtest": "opens a test socket that drives the guest",
    "serial": _CHAR, "parallel": _CHAR, "debugcon": _CHAR, "chardev": _CHAR,
    "drive": _DISK, "blockdev": _DISK, "hda": _DISK, "hdb": _DISK, "cdrom": _DISK, "pflash": _DISK, "sd": _DISK,
    "kernel": "boots a host file (use [boot] kernel)", "initrd": "boots a host file (use [boot] initrd)",
    "bios": "loads a host file as firmware", "readconfig": "reads a host file of options",
    "plugin": "loads a host shared library into QEMU", "virtfs": "shares a host folder with the guest",
    "fsdev": "shares a host folder with the guest", "object": "creates a QEMU object (many open host files or sockets)",
    "audiodev": "opens a host audio backend (the DSP VM's audio goes over NETJACK)",
    "vnc": _DISPLAY, "spice": _DISPLAY, "display": _DISPLAY, "sdl": _DISPLAY, "curses": _DISPLAY,
    "nographic": _DISPLAY, "icount": "can record or replay to a host file (rrfile=)",
    "boot": "is set by libvirt (and splash= reads a host file)", "machine": "is set by libvirt",
    "accel": "is set by libvirt", "set": "rewrites options libvirt generated",
}


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _qemu_opts(value: str, implied: str | None) -> list[tuple[str, str]]:
    """QemuOpts' ``key=value,...`` as QEMU 7.2's opts_do_parse reads it: ``,,`` is a comma inside a value;
    a first element without ``=`` is the ``implied`` key's value; a later one is a flag (``KEY`` is
    ``KEY=on``, ``noKEY`` is ``KEY=off``)."""
    pairs: list[tuple[str, str]] = []
    i, first = 0, True

    def opt_value(j: int) -> tuple[str, int]:
        out = []
        while j < len(value):
            if value[j] == ",":
                if value[j + 1:j + 2] != ",":
                    return "".join(out), j + 1
                j += 1
            out.append(value[j])
            j += 1
        return "".join(out), j

    while i < len(value):
        n = len(re.match(r"[^=,]*", value[i:])[0])
        if i + n == len(value) or value[i + n] == ",":
            if first and implied:
                val, i = opt_value(i)
                pairs.append((implied, val))
            else:
                name = value[i:i + n]
                pairs.append((name[2:], "off") if name.startswith("no") else (name, "on"))
                i += n + 1
        else:
            key = value[i:i + n]
            val, i = opt_value(i + n + 1)
            pairs.append((key, val))
        first = False
    return pairs


def _json_opts(value: str) -> list[tuple[str, str]]:
    """A JSON option value (``{"driver": ...}``): a flat object of strings, numbers and booleans."""
    def pairs_hook(items):
        return items

    try:
        items = json.loads(value, object_pairs_hook=pairs_hook)
    except ValueError:
        raise Invalid(f"{_cut(value)!r} is not valid JSON; QEMU's JSON option syntax is expected") from None
    if not isinstance(items, list):
        raise Invalid(f"{_cut(value)!r}: a JSON object is expected")
    out = []
    for key, val in items:
        if isinstance(val, bool):
            val = "on" if val else "off"
        elif isinstance(val, (int, str)) and not isinstance(val, bool):
            val = str(val)
        else:
            raise Invalid(f"{_cut(value)!r}: {key!r} holds a nested value; only flat JSON objects are allowed here")
        out.append((str(key), val))
    return out


def _pairs(value: str, implied: str | None) -> list[tuple[str, str]]:
    pairs = _json_opts(value) if value.startswith("{") else _qemu_opts(value, implied)
    seen = set()
    for key, _ in pairs:
        if key in seen and key not in _REPEATABLE:
            raise Invalid(f"gives {key}= twice (QEMU takes the last one); give each key once")
        seen.add(key)
    return pairs


# Why some keys that are not allowed are dangerous (the message says it; the allowed keys decide).
_KEY_WHY = {
    "guestfwd": "lets the guest reach host sockets or commands", "smb": "shares a host folder (smbd)",
    "tftp": "serves host files to the guest", "bootfile": "serves a host file to the guest",
    "romfile": "names a host file", "file": "names a host file", "rootdir": "shares a host folder",
    "chardev": "connects to a host file, device or socket", "drive": "names a disk", "audiodev": "names an audio backend",
}


def _check_keys(pairs: list[tuple[str, str]], allowed: dict[str, Check], what: str) -> None:
    for key, val in pairs:
        check = allowed.get(key)
        if check is None:
            why = _KEY_WHY.get(key, f"allowed: {', '.join(sorted(allowed))}")
            raise Invalid(f"key {_cut(key, 30)!r} is not allowed for {what} ({why})")
        if key == "hostfwd" and not check(val):
            raise Invalid(f"hostfwd={_cut(val, 40)!r} must forward from a loopback address "
                          "(tcp:127.0.0.1:HOST-:GUEST); use [network] hostfwd for other addresses")
        if not check(val):
            raise Invalid(f"{key}={_cut(val, 40)!r} is not allowed for {what}")


def _kind(pairs: list[tuple[str, str]], key: str) -> str:
    return next((v for k, v in pairs if k == key), "")


def _check_option(opt: str, value: str, netdevs: set[str]) -> None:
    """Refuse ``-opt value`` unless it is on the allow-list (raises Invalid with the reason)."""
    if opt == "cpu":
        if not _CPU(value):
            raise Invalid("is not a CPU model with +feature/-feature/feature=value items")
        return
    if opt == "global":
        name, eq, val = value.partition("=")
        if not eq or name not in _GLOBALS or not _GLOBALS[name](val):
            raise Invalid(f"is not one of the allowed DRIVER.PROPERTY=VALUE settings ({', '.join(_GLOBALS)})")
        return
    implied = {"device": "driver", "netdev": "type", "nic": "type"}.get(opt)
    pairs = _pairs(value, implied)
    if opt == "device":
        driver = _kind(pairs, "driver")
        if driver not in _DEVICES:
            raise Invalid(f"device {_cut(driver, 40)!r} is not on the list of purely virtual devices "
                          "(host devices go in [audio_device]; README lists the allowed ones)")
        _check_keys([p for p in pairs if p[0] != "driver"], _DEVICES[driver], f"device {driver!r}")
        nic = _kind(pairs, "netdev")
        if nic and nic not in netdevs:
            raise Invalid(f"netdev={nic!r} is not a -netdev user given earlier in qemu_extra_args")
    elif opt in ("netdev", "nic"):
        kind = _kind(pairs, "type")
        if opt == "nic" and kind == "none" and len(pairs) == 1:
            return
        if kind != "user":
            raise Invalid(f"network backend {_cut(kind, 20)!r} connects the guest to the host network outside "
                          "libvirt (only user-mode networking is allowed; use [network])")
        allowed = {**_USERNET, "type": _re("user")}
        if opt == "nic":
            allowed |= {"mac": _MAC, "model": lambda v: v in _DEVICES and _DEVICES[v] is _NIC_KEYS}
        _check_keys(pairs, allowed, f"-{opt} user")
        if opt == "netdev":
            netdevs.add(_kind(pairs, "id"))
    elif opt == "smbios":
        kind = _kind(pairs, "type")
        if kind not in _SMBIOS_FIELDS:
            raise Invalid("only type=0, 1, 2 or 3 with their string fields is allowed (file= reads a host file)")
        fields = {"type": _re(re.escape(kind)), **{f: _SMBIOS_TEXT for f in _SMBIOS_FIELDS[kind]}}
        _check_keys(pairs, fields, f"-smbios type={kind}")
    elif opt == "rtc":
        _check_keys(pairs, {"base": _RTC_BASE, "clock": _re(r"host|rt|vm"), "driftfix": _re(r"none|slew")}, "-rtc")
    elif opt == "msg":
        _check_keys(pairs, {"timestamp": _ONOFF, "guest-name": _ONOFF}, "-msg")
    elif opt == "overcommit":
        _check_keys(pairs, {"mem-lock": _ONOFF, "cpu-pm": _ONOFF}, "-overcommit")
    elif opt == "fw_cfg":
        _check_keys(pairs, {"name": _re(r"opt/[A-Za-z0-9_./-]{1,50}"), "string": _SMBIOS_TEXT}, "-fw_cfg")
        if not _kind(pairs, "string"):
            raise Invalid("needs name=opt/...,string=TEXT (file= would read a host file)")


def unsafe_qemu_args(args: list[str]) -> str | None:
    """Why ``args`` are not all on the allow-list, or None when they are."""
    netdevs: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            return (f"{_cut(arg)!r} is not an option (QEMU takes a bare argument as a disk image: "
                    "a host file the guest could read and write)")
        opt = arg[2:] if arg.startswith("--") else arg[1:]
        if opt in _FLAGS:
            i += 1
            continue
        if opt not in _OPTIONS:
            why = _WHY.get(opt, "is not on the allow-list of harmless QEMU options (README: qemu_extra_args)")
            return f"'{_cut(arg, 40)}' {why}"
        if i + 1 >= len(args):
            return f"'{arg}' needs a value (QEMU would take the next argument libvirt passes)"
        value = args[i + 1]
        try:
            _check_option(opt, value, netdevs)
        except Invalid as exc:
            return f"'{arg} {_cut(value, 60)}': {exc.message}"
        i += 2
    return None


ALLOWED_OPTIONS = _OPTIONS
ALLOWED_FLAGS = _FLAGS
ALLOWED_DEVICES = tuple(_DEVICES)
