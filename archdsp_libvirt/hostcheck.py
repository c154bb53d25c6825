"""Host preflight: can this host run the DSP VM as configured, and if not, what to do.

Every check returns a :class:`Finding` with a stable id (``kvm.device``,
``cpu.isolated``, ``hugepages.free``, ``rt.cgroup``, ``vfio.group``...),
a status (ok, warn, fail, skip), what was observed, what is expected and
the exact fix: a command, a kernel parameter or a config change.

A *fail* is a condition under which the VM does not start or does not do
what the config asks (no /dev/kvm access, too few free hugepages, locked
memory that cannot be granted, SCHED_FIFO refused, an unsafe VFIO group).
A *warn* is a condition under which it runs, with worse latency (cores not
isolated by the kernel, no nohz_full, a powersave governor, SMT siblings
busy with host work). *skip* means the check does not apply to this
config (or was skipped on request by :func:`preflight`).

Every read of sysfs, procfs, /dev and /etc goes through :class:`Host`,
whose one root directory tests point at a fake host tree.
"""

from __future__ import annotations

import os
import re
import resource
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from msgspec import Struct, structs

from .config import PAGE_SIZES_KIB, DspConfig
from .cpuset import CpuSet, format_cpuset, parse_cpuset
from .errors import UsageError

Status = Literal["ok", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip")

# Every id run_checks can produce, in the order it produces them.
CHECK_IDS: tuple[str, ...] = (
    "kvm.device",
    "libvirt.reachable",
    "iommu.param",
    "iommu.pt",
    "iommu.groups",
    "cpu.online",
    "cpu.housekeeping",
    "cpu.isolated",
    "cpu.nohz_full",
    "cpu.rcu_nocbs",
    "cpu.threadirqs",
    "cpu.smt",
    "cpu.governor",
    "hugepages.free",
    "hugepages.mount",
    "memlock.limit",
    "rt.cgroup",
    "rt.rtprio",
    "vfio.device",
    "vfio.vendor",
    "vfio.group",
    "vfio.critical",
    "vfio.driver",
    "vfio.host-audio",
)

# The kernel parameter that turns the IOMMU on, per /proc/cpuinfo vendor_id.
IOMMU_PARAMS = {
    "AuthenticAMD": "amd_iommu=on",
    "HygonGenuine": "amd_iommu=on",
    "GenuineIntel": "intel_iommu=on",
}
KVM_MODULES = {"AuthenticAMD": "kvm_amd", "HygonGenuine": "kvm_amd", "GenuineIntel": "kvm_intel"}

# libvirt's memtune hard_limit for locked memory is memory + 1 GiB (see render.memtune).
MEMLOCK_MARGIN_MB = 1024
CAP_SYS_NICE = 23
CAP_SYS_RESOURCE = 24
# Drivers a VFIO group member may have while the group is in use (kernel vfio's list).
VFIO_SAFE_DRIVERS = {None, "vfio-pci", "pci-stub"}
PCI_BRIDGE_CLASS = 0x0604
AUDIO_CLASSES = {0x0401, 0x0403}  # multimedia audio, HD audio
QEMU_CONF = "/etc/libvirt/qemu.conf"
QEMU_CONF_FIX = ('set cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ] '
                 "in /etc/libvirt/qemu.conf and restart libvirtd (or set realtime.enable = false)")
MEMLOCK_FIX = ("set realtime.mlock = false, or run libvirtd with CAP_SYS_RESOURCE / "
               "raise the hard memlock limit")

_PCI_ADDR = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-1][0-9a-f]\.[0-7]$")
_ISOLCPUS_FLAGS = {"nohz", "domain", "managed_irq"}


class Finding(Struct, frozen=True):
    """One host condition: ``fix`` is the exact command or kernel parameter ("" when ok)."""

    id: str
    status: Status
    observed: str
    expected: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


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
    if not _PCI_ADDR.match(addr):
        raise UsageError(f"{address!r} is not a PCI address; expected DDDD:BB:SS.F such as 0000:00:1b.0 (lspci -D)")
    return addr


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _pci_in_path(path: str) -> str | None:
    """The last PCI address among the components of a resolved sysfs path."""
    found = None
    for part in path.split("/"):
        if _PCI_ADDR.match(part):
            found = part
    return found


class Host:
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

    def root_storage_devices(self) -> dict[str, str]:
        """PCI address -> why, for the controller(s) holding the root filesystem."""
        roots = [m for m in self.mounts() if m.path == "/"]
        if not roots:
            return {}
        dev = roots[-1].device
        if not dev.startswith("/dev/"):
            return {}
        resolved = self.resolve(dev)
        name = os.path.basename(resolved or dev)
        out: dict[str, str] = {}
        for disk in self._block_leaves(name, depth=0):
            addr = _pci_in_path(self.resolve(f"/sys/class/block/{disk}") or "")
            if addr:
                out[addr] = f"storage controller of the root filesystem ({dev})"
        return out

    def _block_leaves(self, name: str, depth: int) -> list[str]:
        slaves = self.listdir(f"/sys/class/block/{name}/slaves")
        if not slaves or depth > 4:
            return [name]
        return [leaf for s in slaves for leaf in self._block_leaves(s, depth + 1)]

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

    def _nic_pci(self, iface: str, depth: int = 0) -> list[str]:
        addr = _pci_in_path(self.resolve(f"/sys/class/net/{iface}") or "")
        if addr:
            return [addr]
        if depth > 3:
            return []
        lower = self.listdir(f"/sys/class/net/{iface}/brif")
        lower += [n[len("lower_"):] for n in self.listdir(f"/sys/class/net/{iface}") if n.startswith("lower_")]
        return [a for n in lower for a in self._nic_pci(n, depth + 1)]

    def default_route_nics(self) -> dict[str, str]:
        """PCI address -> why, for the NIC(s) carrying the default route."""
        return {a: f"NIC of the default route ({i})" for i in self.default_route_interfaces() for a in self._nic_pci(i)}

    def critical_devices(self) -> dict[str, str]:
        """PCI devices the host cannot lose: root storage and default-route NIC (bridges by class)."""
        return {**self.default_route_nics(), **self.root_storage_devices()}


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


def _mib(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB"


# --- the checks -------------------------------------------------------------------


def check_kvm(cfg: DspConfig, host: Host) -> list[Finding]:
    fid = "kvm.device"
    expected = "/dev/kvm present, read-write for the QEMU user (group kvm with g+rw, or o+rw)"
    if cfg.domain_type != "kvm":
        return [Finding(fid, "skip", f"domain_type = {cfg.domain_type!r} (TCG, no KVM)", expected)]
    st = host.stat("/dev/kvm")
    vendor = host.cpu_vendor()
    if st is None:
        module = KVM_MODULES.get(vendor or "", "kvm_amd (or kvm_intel)")
        return [Finding(fid, "fail", "/dev/kvm missing", expected,
                        f"modprobe {module}; enable SVM/VT-x in the firmware; or set domain_type = \"qemu\"")]
    mode = stat.S_IMODE(st.st_mode)
    group = host.group_name(st.st_gid) or str(st.st_gid)
    user = (host.qemu_conf("user") or '"libvirt-qemu"').strip('"')
    observed = f"/dev/kvm mode {mode:04o} group {group}"
    if user in ("root", "+0", "0"):
        return [Finding(fid, "ok", observed + f"; QEMU runs as {user}", expected)]
    if mode & 0o006 == 0o006:
        return [Finding(fid, "ok", observed, expected)]
    if mode & 0o060 == 0o060 and (group == "kvm" or host.user_in_group(user, st.st_gid)):
        return [Finding(fid, "ok", observed, expected)]
    return [Finding(fid, "fail", observed + f"; QEMU user {user} cannot open it", expected,
                    "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm")]


def check_libvirt(reachable: bool | None, detail: str = "") -> list[Finding]:
    fid, expected = "libvirt.reachable", "libvirtd answers on the connection URI"
    if reachable is None:
        return [Finding(fid, "skip", "not asked", expected)]
    if reachable:
        return [Finding(fid, "ok", detail or "connected (read-only)", expected)]
    return [Finding(fid, "fail", detail or "cannot connect", expected,
                    "start libvirtd (libvirtd -d, or systemctl start libvirtd) or pass -c URI")]


def check_iommu(cfg: DspConfig, host: Host) -> list[Finding]:
    passthrough = cfg.audio_device.enable
    missing: Status = "fail" if passthrough else "warn"
    why = "" if passthrough else " - only needed for audio_device passthrough"
    tokens = host.cmdline()
    vendor = host.cpu_vendor()
    groups = host.listdir("/sys/kernel/iommu_groups")
    out = []

    param = IOMMU_PARAMS.get(vendor or "")
    key = param.partition("=")[0] if param else None
    values = cmdline_values(tokens, key) if key else []
    if param is None:
        out.append(Finding("iommu.param", "skip", f"CPU vendor {vendor or 'unknown'}",
                           "amd_iommu=on or intel_iommu=on on the kernel command line"))
    elif any("on" in v.split(",") for v in values):
        out.append(Finding("iommu.param", "ok", f"{key}={values[-1]}", param))
    elif groups:
        out.append(Finding("iommu.param", "ok", f"{param} not given, but the IOMMU is active ({len(groups)} groups)",
                           param))
    else:
        seen = f"{key}={values[-1]}" if values else f"no {key}= on /proc/cmdline ({vendor})"
        out.append(Finding("iommu.param", missing, seen + why, param, f"kernel parameter {param}"))

    pt = cmdline_values(tokens, "iommu")
    if "pt" in pt:
        out.append(Finding("iommu.pt", "ok", "iommu=pt", "iommu=pt"))
    else:
        # Passthrough works without it; host DMA just goes through the IOMMU's translation.
        out.append(Finding("iommu.pt", "warn", f"iommu={pt[-1]}" if pt else "no iommu= on /proc/cmdline",
                           "iommu=pt (host devices bypass translation)", "kernel parameter iommu=pt"))

    if groups:
        out.append(Finding("iommu.groups", "ok", f"{len(groups)} groups in /sys/kernel/iommu_groups",
                           "/sys/kernel/iommu_groups populated"))
    else:
        fix = f"enable AMD-Vi/VT-d in the firmware and add kernel parameters {param or 'amd_iommu=on'} iommu=pt"
        out.append(Finding("iommu.groups", missing, "/sys/kernel/iommu_groups empty" + why,
                           "/sys/kernel/iommu_groups populated", fix))
    return out


def check_cpus(cfg: DspConfig, host: Host) -> list[Finding]:
    out: list[Finding] = []
    wanted = frozenset(cfg.isolated_cores)
    cores = format_cpuset(wanted)
    online = host.cpus("online")
    kernel_isolated = host.cpus("isolated") or frozenset()
    tokens = host.cmdline()

    # Existence: a core that is not there is a VM that cannot be pinned.
    asked = wanted | frozenset(cfg.emulator_cores or ())
    if online is None:
        out.append(Finding("cpu.online", "fail", "/sys/devices/system/cpu/online unreadable",
                           f"cores {format_cpuset(asked)} online", "mount sysfs on /sys"))
        online = frozenset()
    else:
        absent = sorted(c for c in asked - online if not host.exists(f"/sys/devices/system/cpu/cpu{c}"))
        offline = sorted(c for c in asked - online if c not in absent)
        if not absent and not offline:
            out.append(Finding("cpu.online", "ok", f"online {format_cpuset(online)}",
                               f"cores {format_cpuset(asked)} online"))
        else:
            seen = []
            if absent:
                seen.append(f"no core {format_cpuset(absent)} on this host")
            if offline:
                seen.append(f"core {format_cpuset(offline)} offline")
            fix = "; ".join(
                ([f"echo 1 > /sys/devices/system/cpu/cpu{c}/online" for c in offline])
                + ([f"set isolated_cores/emulator_cores to online cores (this host: {format_cpuset(online)})"]
                   if absent else [])
            )
            out.append(Finding("cpu.online", "fail", "; ".join(seen) + f" (online {format_cpuset(online)})",
                               f"cores {format_cpuset(asked)} online", fix))

    housekeeping = online - wanted - kernel_isolated
    if housekeeping:
        out.append(Finding("cpu.housekeeping", "ok", f"host keeps {format_cpuset(housekeeping)}",
                           "at least one online core outside isolated_cores for the host"))
    elif online:
        # FIFO vCPUs on every core can starve the host; without real-time it only runs slowly.
        out.append(Finding("cpu.housekeeping", "fail" if cfg.realtime.enable else "warn",
                           f"isolated_cores {cores} leave none of {format_cpuset(online)} to the host",
                           "at least one online core outside isolated_cores for the host",
                           "leave at least one online core out of isolated_cores "
                           f"(e.g. isolated_cores = [{max(online)}] on this host)"))

    present = wanted & online
    if wanted <= kernel_isolated:
        out.append(Finding("cpu.isolated", "ok", f"kernel isolated {format_cpuset(kernel_isolated)}",
                           f"{cores} in /sys/devices/system/cpu/isolated"))
    else:
        out.append(Finding("cpu.isolated", "warn",
                           f"kernel isolated {format_cpuset(kernel_isolated) or 'none'}",
                           f"{cores} in /sys/devices/system/cpu/isolated", f"kernel parameter isolcpus={cores}"))

    for key in ("nohz_full", "rcu_nocbs"):
        values = cmdline_values(tokens, key)
        covered = frozenset().union(*(cmdline_cpus(v) or frozenset() for v in values))
        seen = f"{key}={values[-1]}" if values else f"no {key}= on /proc/cmdline"
        if wanted <= covered:
            out.append(Finding(f"cpu.{key}", "ok", seen, f"{key} covers {cores}"))
        else:
            out.append(Finding(f"cpu.{key}", "warn", seen, f"{key} covers {cores}",
                               f"kernel parameter {key}={format_cpuset(covered | wanted)}"))

    if "threadirqs" in tokens:
        out.append(Finding("cpu.threadirqs", "ok", "threadirqs", "threadirqs"))
    else:
        out.append(Finding("cpu.threadirqs", "warn", "no threadirqs on /proc/cmdline", "threadirqs",
                           "kernel parameter threadirqs"))

    smt = (host.read("/sys/devices/system/cpu/smt/control") or "").strip()
    expected_smt = "SMT siblings of isolated cores isolated too, or SMT off"
    if smt in ("off", "forceoff", "notsupported", "notimplemented"):
        out.append(Finding("cpu.smt", "ok", f"SMT {smt}", expected_smt))
    else:
        busy: dict[int, CpuSet] = {}
        for core in sorted(present):
            sib = host.read(f"/sys/devices/system/cpu/cpu{core}/topology/thread_siblings_list")
            try:
                siblings = parse_cpuset(sib) - {core} if sib is not None else frozenset()
            except ValueError:
                siblings = frozenset()
            stray = siblings - wanted - kernel_isolated
            if stray:
                busy[core] = stray
        if not busy:
            out.append(Finding("cpu.smt", "ok", f"no host-busy siblings of {cores}", expected_smt))
        else:
            stray_all = frozenset().union(*busy.values())
            seen = ", ".join(f"core {c} shares with {format_cpuset(s)}" for c, s in busy.items())
            out.append(Finding("cpu.smt", "warn", seen + " (not isolated)", expected_smt,
                               f"kernel parameter isolcpus={format_cpuset(wanted | stray_all)} "
                               "(siblings left idle), or nosmt / echo off > /sys/devices/system/cpu/smt/control"))

    governors = {c: (host.read(f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_governor") or "").strip()
                 for c in sorted(present)}
    governors = {c: g for c, g in governors.items() if g}
    if not governors:
        out.append(Finding("cpu.governor", "skip", "no cpufreq on the isolated cores (fixed frequency)",
                           "scaling_governor performance"))
    else:
        slow = {c: g for c, g in governors.items() if g != "performance"}
        seen = ", ".join(f"cpu{c} {g}" for c, g in governors.items())
        if not slow:
            out.append(Finding("cpu.governor", "ok", seen, "scaling_governor performance"))
        else:
            out.append(Finding("cpu.governor", "warn", seen, "scaling_governor performance",
                               f"for c in {' '.join(map(str, slow))}; do echo performance > "
                               "/sys/devices/system/cpu/cpu$c/cpufreq/scaling_governor; done"))
    return out


def check_hugepages(cfg: DspConfig, host: Host) -> list[Finding]:
    kib = PAGE_SIZES_KIB[cfg.hugepage_size]
    need = -(-cfg.memory_mb * 1024 // kib)
    pool = f"/sys/kernel/mm/hugepages/hugepages-{kib}kB"
    expected = f">= {need} free {cfg.hugepage_size} pages for memory_mb = {cfg.memory_mb}"
    mount_expected = f"a hugetlbfs mounted with pagesize={cfg.hugepage_size}"
    if not cfg.hugepages:
        return [Finding("hugepages.free", "skip", "hugepages = 0 in the config", expected),
                Finding("hugepages.mount", "skip", "hugepages = 0 in the config", mount_expected)]
    out = []
    nr, free = host.read_int(f"{pool}/nr_hugepages"), host.read_int(f"{pool}/free_hugepages")
    if nr is None or free is None:
        out.append(Finding("hugepages.free", "fail", f"no {pool} (page size {cfg.hugepage_size} not supported here)",
                           expected, f"kernel parameters hugepagesz={cfg.hugepage_size} hugepages={need}, "
                           "or hugepage_size = \"2M\""))
    elif free >= need:
        out.append(Finding("hugepages.free", "ok", f"{free} of {nr} free", expected))
    else:
        target = nr - free + need
        fix = (f"echo {target} > {pool}/nr_hugepages" if cfg.hugepage_size == "2M"
               else f"echo {target} > {pool}/nr_hugepages (or kernel parameters hugepagesz=1G hugepages={target})")
        out.append(Finding("hugepages.free", "fail", f"{free} of {nr} free", expected, fix))

    default_kib = _default_hugepage_kib(host)
    fits = [m for m in host.mounts() if m.fstype == "hugetlbfs"
            and (page_size_kib(m.option("pagesize") or "") or default_kib) == kib]
    if fits:
        out.append(Finding("hugepages.mount", "ok", f"hugetlbfs on {fits[0].path}", mount_expected))
    else:
        others = [m.path for m in host.mounts() if m.fstype == "hugetlbfs"]
        seen = f"hugetlbfs only for other page sizes ({', '.join(others)})" if others else "no hugetlbfs mounted"
        mnt = "/dev/hugepages" if cfg.hugepage_size == "2M" else "/dev/hugepages1G"
        out.append(Finding("hugepages.mount", "fail", seen, mount_expected,
                           f"mkdir -p {mnt} && mount -t hugetlbfs -o pagesize={cfg.hugepage_size} hugetlbfs {mnt}, "
                           "then restart libvirtd"))
    return out


def _default_hugepage_kib(host: Host) -> int:
    m = re.search(r"^Hugepagesize:\s*(\d+)\s*kB", host.read("/proc/meminfo") or "", re.M)
    return int(m.group(1)) if m else 2048


def page_size_kib(text: str) -> int | None:
    """A page size as the kernel writes it (``2M``, ``1G``, ``2048k``, ``1024M``) in KiB; None if unparsable."""
    m = re.fullmatch(r"(\d+)([KMG])B?", text.strip().upper())
    return int(m.group(1)) * {"K": 1, "M": 1024, "G": 1024 * 1024}[m.group(2)] if m else None


def check_memlock(cfg: DspConfig, host: Host) -> list[Finding]:
    need_mb = cfg.memory_mb + MEMLOCK_MARGIN_MB
    expected = f"hard RLIMIT_MEMLOCK >= {need_mb} MiB (memory_mb + 1 GiB) or CAP_SYS_RESOURCE"
    if not cfg.realtime.mlock:
        return [Finding("memlock.limit", "skip", "realtime.mlock = false", expected)]
    lim = host.limit("Max locked memory", resource.RLIMIT_MEMLOCK)
    hard = lim[1] if lim else None
    hard_text = "unknown" if lim is None else "unlimited" if hard is None else _mib(hard)
    cap = host.has_capability(CAP_SYS_RESOURCE)
    observed = f"hard memlock {hard_text}, CAP_SYS_RESOURCE {'yes' if cap else 'no' if cap is False else 'unknown'}"
    if cap or (lim is not None and (hard is None or hard >= need_mb * 1024 * 1024)):
        return [Finding("memlock.limit", "ok", observed, expected)]
    return [Finding("memlock.limit", "fail", observed, expected, MEMLOCK_FIX)]


def check_realtime(cfg: DspConfig, host: Host) -> list[Finding]:
    expected = ("SCHED_FIFO allowed in the VM's cgroup "
                "(cgroup v2, or v1 with RT budget or without libvirt's cpu controller)")
    prio_expected = f"CAP_SYS_NICE or RLIMIT_RTPRIO >= {cfg.realtime.priority}"
    if not cfg.realtime.enable:
        return [Finding("rt.cgroup", "skip", "realtime.enable = false", expected),
                Finding("rt.rtprio", "skip", "realtime.enable = false", prio_expected)]
    out = []
    mounts = host.mounts()
    cpu_v1 = next((m for m in mounts if m.fstype == "cgroup" and "cpu" in m.options), None)
    controllers = host.cgroup_controllers()
    if cpu_v1 is None:
        v2 = any(m.fstype == "cgroup2" for m in mounts)
        out.append(Finding("rt.cgroup", "ok", "cgroup v2 (no per-cgroup RT budget)" if v2 else
                           "no cpu cgroup controller mounted", expected))
    elif controllers is not None and "cpu" not in controllers:
        out.append(Finding("rt.cgroup", "ok", "cgroup v1; qemu.conf cgroup_controllers leaves out cpu", expected))
    elif not host.exists(f"{cpu_v1.path}/cpu.rt_runtime_us"):
        out.append(Finding("rt.cgroup", "ok", "cgroup v1 without RT group scheduling (no cpu.rt_runtime_us)",
                           expected))
    else:
        machine = next((f"{cpu_v1.path}/{n}" for n in ("machine.slice", "machine")
                        if host.exists(f"{cpu_v1.path}/{n}/cpu.rt_runtime_us")), None)
        if machine is None:
            parent = host.read_int(f"{cpu_v1.path}/cpu.rt_runtime_us")
            out.append(Finding("rt.cgroup", "fail",
                               f"cgroup v1 cpu controller used by libvirt; machine cgroup not created yet, new cgroups "
                               f"start with cpu.rt_runtime_us = 0 (parent {cpu_v1.path}: {parent})",
                               expected, QEMU_CONF_FIX))
        else:
            budget = host.read_int(f"{machine}/cpu.rt_runtime_us")
            seen = f"cgroup v1 {machine}/cpu.rt_runtime_us = {budget}"
            if not budget:
                out.append(Finding("rt.cgroup", "fail", seen, expected, QEMU_CONF_FIX))
            else:
                # libvirt's per-VM child cgroups still start at 0 unless something hands budget down.
                out.append(Finding("rt.cgroup", "warn", seen + "; libvirt's per-VM cgroups start at 0",
                                   expected, QEMU_CONF_FIX))

    nice = host.has_capability(CAP_SYS_NICE)
    lim = host.limit("Max realtime priority", resource.RLIMIT_RTPRIO)
    hard = lim[1] if lim else 0
    hard_text = "unlimited" if lim is not None and hard is None else str(hard)
    seen = f"CAP_SYS_NICE {'yes' if nice else 'no'}, RLIMIT_RTPRIO hard {hard_text}"
    if nice or hard is None or hard >= cfg.realtime.priority:
        out.append(Finding("rt.rtprio", "ok", seen, prio_expected))
    else:
        out.append(Finding("rt.rtprio", "warn", seen + " (libvirtd needs one of them)", prio_expected,
                           f"run libvirtd as root, or raise its hard limit: ulimit -r {cfg.realtime.priority}"))
    return out


def check_passthrough(cfg: DspConfig, host: Host) -> list[Finding]:
    dev_cfg = cfg.audio_device
    ids = ("vfio.device", "vfio.vendor", "vfio.group", "vfio.critical", "vfio.driver", "vfio.host-audio")
    expectations = {
        "vfio.device": "the PCI device exists",
        "vfio.vendor": f"vendor:device {dev_cfg.vendor_device or '(any)'}",
        "vfio.group": "an IOMMU group whose other members are free for VFIO (no driver, vfio-pci or pci-stub)",
        "vfio.critical": "no PCI bridge, root-filesystem storage or default-route NIC in the group",
        "vfio.driver": "vfio-pci, or any driver when managed (libvirt rebinds it)",
        "vfio.host-audio": "not the host's only audio controller in use by the host",
    }
    if not dev_cfg.enable:
        return [Finding(i, "skip", "audio_device.enable = false", expectations[i]) for i in ids]
    addr = (dev_cfg.pci_id or "").lower()
    dev = host.pci(addr)
    if dev is None:
        return [Finding("vfio.device", "fail", f"no {addr} in /sys/bus/pci/devices", expectations["vfio.device"],
                        "set audio_device.pci_id to an address from lspci -Dnn")] + [
            Finding(i, "skip", f"{addr} missing", expectations[i]) for i in ids[1:]]
    out = [Finding("vfio.device", "ok", dev.describe(), expectations["vfio.device"])]

    want = (dev_cfg.vendor_device or "").lower()
    if not want:
        out.append(Finding("vfio.vendor", "skip", f"{dev.vendor_device} (vendor_device not set)",
                           expectations["vfio.vendor"]))
    elif want == dev.vendor_device:
        out.append(Finding("vfio.vendor", "ok", dev.vendor_device, expectations["vfio.vendor"]))
    else:
        out.append(Finding("vfio.vendor", "fail", f"{addr} is {dev.vendor_device}", expectations["vfio.vendor"],
                           f"check audio_device.pci_id, or set audio_device.vendor_device = \"{dev.vendor_device}\""))

    if dev.iommu_group is None:
        out.append(Finding("vfio.group", "fail", f"{addr} has no iommu_group (IOMMU off)", expectations["vfio.group"],
                           "enable AMD-Vi/VT-d in the firmware and add kernel parameters "
                           f"{IOMMU_PARAMS.get(host.cpu_vendor() or '', 'amd_iommu=on')} iommu=pt"))
        out.append(Finding("vfio.critical", "skip", "no IOMMU group", expectations["vfio.critical"]))
    else:
        names = host.iommu_group_members(dev.iommu_group) or [addr]
        members = [m for m in (host.pci(n) for n in names) if m is not None]
        listing = f"group {dev.iommu_group}: " + ", ".join(m.describe() for m in members)
        busy = [m for m in members if m.address != addr and not m.is_bridge and m.driver not in VFIO_SAFE_DRIVERS]
        if busy:
            out.append(Finding("vfio.group", "fail", listing, expectations["vfio.group"],
                               "; ".join(f"archdsp-virt vfio bind {m.address}" for m in busy)
                               + " (or pass them through too)"))
        else:
            out.append(Finding("vfio.group", "ok", listing, expectations["vfio.group"]))
        critical = host.critical_devices()
        bad = [f"{m.address} (PCI bridge)" for m in members if m.is_bridge]
        bad += [f"{m.address} ({critical[m.address]})" for m in members if m.address in critical]
        if bad:
            out.append(Finding("vfio.critical", "fail", f"group {dev.iommu_group} holds " + ", ".join(bad),
                               expectations["vfio.critical"],
                               "move the card to a slot with its own IOMMU group, or use NETJACK instead "
                               "(audio_device.enable = false)"))
        else:
            out.append(Finding("vfio.critical", "ok", f"group {dev.iommu_group}: nothing host-critical",
                               expectations["vfio.critical"]))

    if dev.driver == "vfio-pci":
        out.append(Finding("vfio.driver", "ok", "vfio-pci", expectations["vfio.driver"]))
    elif dev_cfg.managed:
        out.append(Finding("vfio.driver", "ok", f"{dev.driver or 'no driver'} now; libvirt binds vfio-pci on start "
                           "(managed)", expectations["vfio.driver"]))
    else:
        out.append(Finding("vfio.driver", "fail", f"{dev.driver or 'no driver'} (managed = false expects vfio-pci)",
                           expectations["vfio.driver"], f"archdsp-virt vfio bind {addr}"))

    audio = [d for d in host.pci_devices() if d.is_audio]
    in_use = dev.driver not in VFIO_SAFE_DRIVERS
    if dev.is_audio and in_use and all(d.address == addr for d in audio):
        out.append(Finding("vfio.host-audio", "fail", f"{addr} is the host's only audio controller, bound to "
                           f"{dev.driver}", expectations["vfio.host-audio"],
                           "give the host another audio device (or none: NETJACK needs none), or accept losing it "
                           "with up --skip-check vfio.host-audio"))
    else:
        others = [d.address for d in audio if d.address != addr]
        seen = (f"{len(others)} other audio controller(s)" if others
                else f"{dev.driver or 'no driver'} (not in use by the host)" if dev.is_audio
                else f"class {dev.class_code:06x} is not an audio controller")
        out.append(Finding("vfio.host-audio", "ok", seen, expectations["vfio.host-audio"]))
    return out


def run_checks(cfg: DspConfig, host: Host, libvirt_reachable: bool | None = None, *,
               libvirt_detail: str = "") -> list[Finding]:
    """Every host condition ``cfg`` needs, in :data:`CHECK_IDS` order.

    ``libvirt_reachable`` is the caller's verdict (it opens the connection; None: not asked),
    ``libvirt_detail`` what it saw (the URI, or libvirt's error).
    """
    return [
        *check_kvm(cfg, host),
        *check_libvirt(libvirt_reachable, libvirt_detail),
        *check_iommu(cfg, host),
        *check_cpus(cfg, host),
        *check_hugepages(cfg, host),
        *check_memlock(cfg, host),
        *check_realtime(cfg, host),
        *check_passthrough(cfg, host),
    ]


def preflight(cfg: DspConfig, host: Host, libvirt_reachable: bool | None, skip: Iterable[str] = (), *,
              libvirt_detail: str = "") -> list[Finding]:
    """:func:`run_checks`, with the ids in ``skip`` turned into status skip (and saying so).

    ``skip`` holds ids (``vfio.host-audio``) or groups (``cpu`` for every ``cpu.*``);
    an unknown one is a :class:`UsageError`.
    """
    skip = set(skip)
    groups = {i.partition(".")[0] for i in CHECK_IDS}
    unknown = sorted(s for s in skip if s not in CHECK_IDS and s not in groups)
    if unknown:
        raise UsageError(f"--skip-check {unknown[0]}: no such check; known: {', '.join(CHECK_IDS)}")
    out = []
    for f in run_checks(cfg, host, libvirt_reachable, libvirt_detail=libvirt_detail):
        if (f.id in skip or f.id.partition(".")[0] in skip) and f.status != "skip":
            f = Finding(f.id, "skip", f"skipped on request (was {f.status}: {f.observed})", f.expected, f.fix)
        out.append(f)
    return out


def failures(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.status == "fail"]


def findings_json(findings: Iterable[Finding]) -> list[dict[str, str]]:
    """The JSON form: one dict per finding (id, status, observed, expected, fix)."""
    return [structs.asdict(f) for f in findings]


def format_findings(findings: Iterable[Finding]) -> str:
    """A table: status and id, then what was observed; expected and the fix indented below."""
    findings = list(findings)
    width = max([len(f.id) for f in findings] + [len("ID")])
    lines = [f"{'STATUS':<6}  {'ID':<{width}}  OBSERVED / EXPECTED / FIX"]
    pad = " " * (6 + 2 + width + 2)
    for f in findings:
        lines.append(f"{f.status:<6}  {f.id:<{width}}  {f.observed}")
        lines.append(f"{pad}expected: {f.expected}")
        if f.fix:
            lines.append(f"{pad}fix: {f.fix}")
    counts = {s: sum(f.status == s for f in findings) for s in STATUSES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n"


# --- what the CLI calls ------------------------------------------------------------


def probe_libvirt(uri: str | None) -> tuple[bool, str]:
    """Whether a read-only libvirt connection to ``uri`` opens now (no retries), and what was seen."""
    from .connection import open_connection, resolve_uri
    from .errors import ArchdspError

    target = resolve_uri(uri)
    try:
        conn = open_connection(target, readonly=True, retry=False)
    except ArchdspError as err:
        return False, str(err)
    conn.close()
    return True, f"connected to {target} (read-only)"


def check_command(config: str | os.PathLike[str], uri: str | None, host: Host,
                  as_json: bool = False) -> tuple[str, bool]:
    """What ``archdsp-virt check`` prints, and whether any check failed."""
    import json

    from .config import load_config

    cfg = load_config(config)
    reachable, detail = probe_libvirt(uri)
    findings = run_checks(cfg, host, reachable, libvirt_detail=detail)
    text = json.dumps(findings_json(findings), indent=2) + "\n" if as_json else format_findings(findings)
    return text, bool(failures(findings))
