"""The host as files: sysfs, procfs, /dev and /etc read through one root directory.

This is the *local* source of the host model (see :mod:`.model`): only a
command whose libvirt connection reaches this machine reads it. Tests
point its root at a fake host tree.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Iterable
from pathlib import Path

from msgspec import Struct

from ..cpuset import CpuSet, parse_cpuset
from ..errors import UsageError
from .network import PCI_ADDR, NetworkFiles, pci_in_path

PCI_BRIDGE_CLASS = 0x0604
AUDIO_CLASSES = {0x0401, 0x0403}  # multimedia audio, HD audio
QEMU_CONF = "/etc/libvirt/qemu.conf"

_ISOLCPUS_FLAGS = {"nohz", "domain", "managed_irq"}


class Mount(Struct, frozen=True):
    device: str
    path: str
    fstype: str
    options: tuple[str, ...]

    def option(self, key: str) -> str | None:
        for opt in self.options:
            k, _, v = opt.partition("=")
            if k == key:
                return v
        return None


class PciDevice(Struct, frozen=True):
    """What sysfs says about one PCI function."""

    address: str
    vendor: str  # "1022"
    device: str  # "15e3"
    class_code: int  # 0x040300
    driver: str | None
    iommu_group: str | None
    driver_override: str | None = None

    @property
    def vendor_device(self) -> str:
        return f"{self.vendor}:{self.device}"

    @property
    def base_class(self) -> int:
        """Class and subclass, e.g. 0x0403 (HD audio), 0x0604 (PCI bridge)."""
        return self.class_code >> 8

    @property
    def is_bridge(self) -> bool:
        return self.base_class == PCI_BRIDGE_CLASS

    @property
    def is_audio(self) -> bool:
        return self.base_class in AUDIO_CLASSES

    def describe(self) -> str:
        return f"{self.address} [{self.class_code:06x}] {self.vendor_device} driver={self.driver or 'none'}"


def normalize_pci(address: str) -> str:
    """``00:1B.0`` or ``0000:00:1b.0`` -> ``0000:00:1b.0``; :class:`UsageError` otherwise."""
    addr = address.strip().lower()
    if re.fullmatch(r"[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]", addr):
        addr = "0000:" + addr
    if not PCI_ADDR.match(addr):
        raise UsageError(f"{address!r} is not a PCI address; expected DDDD:BB:SS.F such as 0000:00:1b.0 (lspci -D)")
    return addr


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


class Host(NetworkFiles):
    """The host as files: every read (sysfs, procfs, /dev, /etc) goes through ``root``.

    ``Host()`` is this machine; ``Host(tmp_path)`` is a fake host tree.
    Symlinks inside the tree must be relative (as sysfs's are) to stay in it.
    """

    def __init__(self, root: str | os.PathLike[str] = "/") -> None:
        self.root = Path(root)

    # --- files ---------------------------------------------------------------

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    def read(self, p: str) -> str | None:
        """The file's text, or None when it is missing or unreadable."""
        try:
            return self.path(p).read_text(errors="replace")
        except OSError:
            return None

    def head(self, p: str, size: int) -> bytes | None:
        """The first ``size`` bytes of the file, or None when it is missing or unreadable."""
        try:
            with open(self.path(p), "rb") as fh:
                return fh.read(size)
        except OSError:
            return None

    def read_int(self, p: str) -> int | None:
        text = self.read(p)
        try:
            return int(text.strip(), 0) if text is not None else None
        except ValueError:
            return None

    def exists(self, p: str) -> bool:
        return self.path(p).exists()

    def listdir(self, p: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(p)))
        except OSError:
            return []

    def stat(self, p: str) -> os.stat_result | None:
        try:
            return os.stat(self.path(p))
        except OSError:
            return None

    def resolve(self, p: str) -> str | None:
        """The host path a (symlinked) path leads to, or None when it does not exist."""
        full = self.path(p)
        if not full.exists():
            return None
        real = os.path.realpath(full)
        root = os.path.realpath(self.root)
        if root == "/":
            return real
        rel = os.path.relpath(real, root)
        return None if rel.startswith("..") else "/" + rel

    def link_name(self, p: str) -> str | None:
        """The last component of a symlink's target (a driver's or group's name)."""
        try:
            return os.path.basename(os.readlink(self.path(p)))
        except OSError:
            return None

    def write(self, p: str, value: str) -> None:
        """Write one sysfs attribute (raises OSError)."""
        with open(self.path(p), "w") as fh:
            fh.write(value)

    @property
    def is_this_machine(self) -> bool:
        """Whether the root is / (this machine's own files, not a fake tree)."""
        return os.path.realpath(self.root) == "/"

    def setting(self, p: str) -> str | None:
        """A kernel setting's value: the file's text stripped, or the bracketed choice of a selection
        file (``always [madvise] never`` -> ``madvise``); None when the file is missing."""
        text = self.read(p)
        if text is None:
            return None
        m = re.search(r"\[([^\]]*)\]", text)
        return m.group(1) if m else text.strip()

    def set_setting(self, p: str, value: str) -> None:
        """Write a kernel setting (raises OSError). On a fake tree the file then reads as the kernel's
        would: a selection file with ``value`` bracketed, any other with ``value`` and a newline."""
        if self.is_this_machine:
            self.write(p, value)
            return
        text = self.read(p)
        if text is None:
            raise FileNotFoundError(2, "no such file", p)
        if "[" in text:
            words = text.replace("[", "").replace("]", "").split()
            if value not in words:
                raise OSError(22, f"invalid argument {value!r}", p)
            self.write(p, " ".join(f"[{w}]" if w == value else w for w in words) + "\n")
        else:
            self.write(p, value + "\n")

    # --- procfs and sysfs facts -------------------------------------------------

    def cmdline(self) -> list[str]:
        """The kernel's own parameters from /proc/cmdline (what follows ``--`` goes to init)."""
        return split_cmdline(self.read("/proc/cmdline") or "")

    def cpu_vendor(self) -> str | None:
        text = self.read("/proc/cpuinfo") or ""
        m = re.search(r"^vendor_id\s*:\s*(\S+)", text, re.M)
        return m.group(1) if m else None

    def mounts(self) -> list[Mount]:
        out = []
        for line in (self.read("/proc/mounts") or "").splitlines():
            fields = line.split()
            if len(fields) >= 4:
                out.append(Mount(_unescape_mount(fields[0]), _unescape_mount(fields[1]), fields[2],
                                 tuple(fields[3].split(","))))
        return out

    def cpus(self, which: str) -> CpuSet | None:
        """``online``, ``isolated``, ``possible``... from /sys/devices/system/cpu, None when unreadable."""
        text = self.read(f"/sys/devices/system/cpu/{which}")
        if text is None:
            return None
        try:
            return parse_cpuset(text)
        except ValueError:
            return None

    def proc_status(self) -> dict[str, str]:
        out = {}
        for line in (self.read("/proc/self/status") or "").splitlines():
            k, sep, v = line.partition(":")
            if sep:
                out[k.strip()] = v.strip()
        return out

    def has_capability(self, cap: int) -> bool | None:
        eff = self.proc_status().get("CapEff")
        if eff is None:
            return None
        try:
            return bool(int(eff, 16) >> cap & 1)
        except ValueError:
            return None

    def limit(self, name: str, rlimit: int | None = None) -> tuple[int | None, int | None] | None:
        """(soft, hard) of a /proc/self/limits row such as "Max locked memory"; None = unlimited.

        Falls back to :func:`resource.getrlimit` for this machine when the file is unreadable.
        """
        for line in (self.read("/proc/self/limits") or "").splitlines():
            if line.startswith(name):
                fields = line[len(name):].split()
                if len(fields) >= 2:
                    return _limit_value(fields[0]), _limit_value(fields[1])
        if rlimit is not None and os.path.realpath(self.root) == "/":
            soft, hard = resource.getrlimit(rlimit)
            return (None if soft == resource.RLIM_INFINITY else soft,
                    None if hard == resource.RLIM_INFINITY else hard)
        return None

    def group_name(self, gid: int) -> str | None:
        for line in (self.read("/etc/group") or "").splitlines():
            fields = line.split(":")
            if len(fields) >= 3 and fields[2] == str(gid):
                return fields[0]
        return None

    def user_in_group(self, user: str, gid: int) -> bool:
        for line in (self.read("/etc/passwd") or "").splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[0] == user and fields[3] == str(gid):
                return True
        for line in (self.read("/etc/group") or "").splitlines():
            fields = line.split(":")
            if len(fields) >= 4 and fields[2] == str(gid) and user in fields[3].split(","):
                return True
        return False

    def qemu_conf(self, key: str) -> str | None:
        """The raw value of an uncommented ``key = value`` in /etc/libvirt/qemu.conf."""
        text = "\n".join(ln for ln in (self.read(QEMU_CONF) or "").splitlines() if not ln.lstrip().startswith("#"))
        m = re.search(rf"^\s*{re.escape(key)}\s*=\s*(\[[^\]]*\]|\"[^\"]*\"|\S+)", text, re.M)
        return m.group(1) if m else None

    def cgroup_controllers(self) -> list[str] | None:
        """qemu.conf's ``cgroup_controllers`` list, None when not set (libvirt uses them all)."""
        raw = self.qemu_conf("cgroup_controllers")
        return None if raw is None else re.findall(r'"([^"]*)"', raw)

    # --- PCI --------------------------------------------------------------------

    def pci(self, address: str) -> PciDevice | None:
        base = f"/sys/bus/pci/devices/{address}"
        if not self.exists(base):
            return None

        def hexfile(name: str) -> str:
            text = (self.read(f"{base}/{name}") or "").strip().lower()
            return text[2:] if text.startswith("0x") else text

        try:
            cls = int(hexfile("class") or "0", 16)
        except ValueError:
            cls = 0
        override = (self.read(f"{base}/driver_override") or "").strip()
        return PciDevice(
            address=address,
            vendor=hexfile("vendor"),
            device=hexfile("device"),
            class_code=cls,
            driver=self.link_name(f"{base}/driver"),
            iommu_group=self.link_name(f"{base}/iommu_group"),
            driver_override=None if override in ("", "(null)") else override,
        )

    def pci_devices(self) -> list[PciDevice]:
        return [d for a in self.listdir("/sys/bus/pci/devices") if (d := self.pci(a)) is not None]

    def iommu_group_members(self, group: str) -> list[str]:
        return self.listdir(f"/sys/kernel/iommu_groups/{group}/devices")


def _limit_value(text: str) -> int | None:
    return None if text == "unlimited" else int(text) if text.isdigit() else None


def split_cmdline(text: str) -> list[str]:
    """Split a kernel command line as the kernel does (double quotes group), up to ``--``."""
    tokens: list[str] = []
    for m in re.finditer(r'(?:[^\s"]+|"[^"]*")+', text):
        tok = m.group(0).replace('"', "")
        if tok == "--":
            break
        tokens.append(tok)
    return tokens


def cmdline_values(tokens: Iterable[str], key: str) -> list[str]:
    """Every value of ``key=value`` on the command line, in order ("" for a bare ``key``)."""
    out = []
    for tok in tokens:
        k, sep, v = tok.partition("=")
        if k == key:
            out.append(v if sep else "")
    return out


def cmdline_cpus(value: str) -> CpuSet | None:
    """The CPU set of ``nohz_full=``, ``rcu_nocbs=`` or ``isolcpus=[flags,]LIST``; None when unparsable."""
    parts = [p for p in value.split(",") if p and p not in _ISOLCPUS_FLAGS]
    if not parts:
        return None
    try:
        return parse_cpuset(",".join(parts))
    except ValueError:
        return None


def page_size_kib(text: str) -> int | None:
    """A page size as the kernel writes it (``2M``, ``1G``, ``2048k``, ``1024M``) in KiB; None if unparsable."""
    m = re.fullmatch(r"(\d+)([KMG])B?", text.strip().upper())
    return int(m.group(1)) * {"K": 1, "M": 1024, "G": 1024 * 1024}[m.group(2)] if m else None
