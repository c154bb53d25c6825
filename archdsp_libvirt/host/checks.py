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

from msgspec import structs

from ..config import PAGE_SIZES_KIB, DspConfig
from ..cpuset import CpuSet, format_cpuset, parse_cpuset
from ..errors import UsageError
from .audiothreads import check_audio_threads
from .critical import critical_devices
from .files import Host, cmdline_cpus, cmdline_values, page_size_kib
from .findings import STATUSES, Finding, Status
from .model import HostModel
from .sources import local_model


# Every id run_checks can produce, in the order it produces them.
CHECK_IDS: tuple[str, ...] = (
    "kvm.device",
    "libvirt.reachable",
    "boot.files",
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
    "domains.cores",
    "domains.hugepages",
    "domains.netjack",
    "netjack.master",
    "audio.threads",
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
# libvirt's default controllers less "cpu": its cgroup v1 RT budget is what refuses SCHED_FIFO vCPUs.
QEMU_CGROUP_LINE = 'cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ]'
QEMU_CONF_FIX = f"set {QEMU_CGROUP_LINE} in /etc/libvirt/qemu.conf and restart libvirtd (or set realtime.enable = false)"
MEMLOCK_FIX = ("set realtime.mlock = false, or run libvirtd with CAP_SYS_RESOURCE / "
               "raise the hard memlock limit")



def _mib(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB"


# --- the checks -------------------------------------------------------------------


def check_kvm(cfg: DspConfig, model: HostModel) -> list[Finding]:
    fid = "kvm.device"
    expected = "/dev/kvm present, read-write for the QEMU user (group kvm with g+rw, or o+rw)"
    if cfg.domain_type != "kvm":
        return [Finding(fid, "skip", f"domain_type = {cfg.domain_type!r} (TCG, no KVM)", expected)]
    host = model.files
    if host is None:
        if model.kvm:
            return [Finding(fid, "ok", f"libvirt at {model.where} offers KVM guests (capabilities)",
                            expected)]
        if model.kvm is False:
            return [Finding(fid, "fail", f"libvirt at {model.where} offers no KVM domains", expected,
                            "on that host: modprobe kvm_amd (or kvm_intel) and enable SVM/VT-x in the firmware; "
                            "or set domain_type = \"qemu\"")]
        return [Finding(fid, "skip", model.unknown("/dev/kvm"), expected)]
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


def _qemu_ids(host: Host, user: str) -> tuple[int | None, set[int]]:
    """The QEMU user's uid and its groups' gids (from the host's /etc/passwd and /etc/group)."""
    if user.startswith("+") and user[1:].isascii() and user[1:].isdigit():
        return int(user[1:]), set()
    uid, gids = None, set()
    for line in (host.read("/etc/passwd") or "").splitlines():
        f = line.split(":")
        if len(f) >= 4 and f[0] == user and f[2].isdigit() and f[3].isdigit():
            uid, gids = int(f[2]), {int(f[3])}
    for line in (host.read("/etc/group") or "").splitlines():
        f = line.split(":")
        if len(f) >= 4 and f[2].isdigit() and user in f[3].split(","):
            gids.add(int(f[2]))
    return uid, gids


def _may(st: os.stat_result, uid: int | None, gids: set[int], bits: int) -> bool:
    """Whether user ``uid`` (groups ``gids``) has ``bits`` (an rwx triple, 4/2/1) on ``st``."""
    mode = stat.S_IMODE(st.st_mode)
    if uid is not None and st.st_uid == uid:
        return mode >> 6 & bits == bits
    if st.st_gid in gids:
        return mode >> 3 & bits == bits
    return mode & bits == bits


def check_boot_files(cfg: DspConfig, model: HostModel | Host) -> list[Finding]:
    """The disk image, kernel and initrd exist, are regular files, and the QEMU user can reach them.

    QEMU runs as qemu.conf's ``user`` (default libvirt-qemu). With
    ``dynamic_ownership = 1`` (libvirt's default) libvirt chowns the disk,
    kernel and initrd to that user when the domain starts, so a root-owned
    0600 image is fine; it does not change the folders above them, so each
    must let the user through (x). With ``dynamic_ownership = 0`` the files
    must already be readable (the disk also writable) by the user. QEMU as
    root reads everything.
    """
    fid = "boot.files"
    model = model if isinstance(model, HostModel) else local_model(model)
    host = model.files
    files = [(key, os.path.expanduser(path), role) for key, path, role in (
        ("archibaldos.disk_image", cfg.disk_image, "disk"), ("boot.kernel", cfg.boot.kernel, "kernel"),
        ("boot.initrd", cfg.boot.initrd, "initrd")) if path]
    expected = "the disk image, kernel and initrd exist here as regular files the QEMU user can read"
    if not files:
        return [Finding(fid, "skip", "no disk image, kernel or initrd to boot", expected)]
    if host is None:
        return [Finding(fid, "skip", model.unknown("the boot files (" + ", ".join(p for _, p, _ in files) + ")"),
                        expected)]
    user = (host.qemu_conf("user") or '"libvirt-qemu"').strip('"')
    as_root = user in ("root", "+0", "0")
    dynamic = (host.qemu_conf("dynamic_ownership") or "1").strip() != "0"
    uid, gids = _qemu_ids(host, user)
    fixes = {"disk": "qemu-img create -f qcow2 {path} 8G (or copy the image there), or set {key}",
             "kernel": "copy the kernel there (scripts/build-dsp-guest builds the demo's), or set {key}",
             "initrd": "copy the initrd there (scripts/build-dsp-guest builds the demo's), or set {key}"}
    for key, path, role in files:
        st = host.stat(path)
        if st is None:
            return [Finding(fid, "fail", f"{key} {path}: no such file", expected,
                            fixes[role].format(path=path, key=key))]
        if not stat.S_ISREG(st.st_mode):
            return [Finding(fid, "fail", f"{key} {path}: not a regular file", expected,
                            f"set {key} to an image or boot file")]
        if as_root:
            continue
        folder = os.path.dirname(path)
        while folder not in ("/", ""):
            dst = host.stat(folder)
            if dst is not None and not _may(dst, uid, gids, 1):
                return [Finding(fid, "fail", f"{key} {path}: QEMU user {user} cannot enter {folder} "
                                f"(mode {stat.S_IMODE(dst.st_mode):04o})", expected,
                                f"chmod o+x {folder}, or move the file to /var/lib/libvirt/images")]
            folder = os.path.dirname(folder)
        need = 6 if role == "disk" else 4
        if not dynamic and not _may(st, uid, gids, need):
            return [Finding(fid, "fail", f"{key} {path}: mode {stat.S_IMODE(st.st_mode):04o}, not "
                            f"{'readable and writable' if need == 6 else 'readable'} by QEMU user {user} "
                            "(dynamic_ownership = 0)", expected, f"chown {user} {path}")]
    names = ", ".join(path for _, path, _ in files)
    how = ("QEMU runs as root" if as_root else
           f"libvirt chowns them to {user} on start (dynamic_ownership)" if dynamic else f"{user} can read them")
    return [Finding(fid, "ok", f"{names}: present; {how}", expected)]


def check_iommu(cfg: DspConfig, model: HostModel) -> list[Finding]:
    passthrough = cfg.audio_device.enable
    missing: Status = "fail" if passthrough else "warn"
    why = "" if passthrough else " - only needed for audio_device passthrough"
    host = model.files
    if host is None:
        groups = sorted({d.iommu_group for d in model.pci or () if d.iommu_group is not None})
        expected = "/sys/kernel/iommu_groups populated"
        if model.pci is None:
            found = Finding("iommu.groups", "skip", model.unknown("IOMMU groups"), expected)
        elif groups:
            found = Finding("iommu.groups", "ok", f"{len(groups)} IOMMU groups among libvirt's PCI devices", expected)
        else:
            found = Finding("iommu.groups", missing, "no PCI device in an IOMMU group (libvirt node devices)" + why,
                            expected, "on that host: enable AMD-Vi/VT-d in the firmware and add kernel parameters "
                            "amd_iommu=on (or intel_iommu=on) iommu=pt")
        return [Finding("iommu.param", "skip", model.unknown("the kernel command line"),
                        "amd_iommu=on or intel_iommu=on on the kernel command line"),
                Finding("iommu.pt", "skip", model.unknown("the kernel command line"), "iommu=pt"),
                found]
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


def check_cpus(cfg: DspConfig, model: HostModel) -> list[Finding]:
    out: list[Finding] = []
    wanted = frozenset(cfg.isolated_cores)
    cores = format_cpuset(wanted)
    host = model.files
    online = model.online_cpus
    kernel_isolated = model.isolated_cpus or frozenset()

    # Existence: a core that is not there is a VM that cannot be pinned.
    asked = wanted | frozenset(cfg.emulator_cores or ())
    if online is None:
        seen = ("/sys/devices/system/cpu/online unreadable" if host is not None
                else f"libvirt at {model.where} did not give its CPU map")
        out.append(Finding("cpu.online", "fail", seen, f"cores {format_cpuset(asked)} online",
                           "mount sysfs on /sys" if host is not None else "check the connection (-c URI)"))
        online = frozenset()
    else:
        absent = sorted(c for c in asked - online
                        if host is None or not host.exists(f"/sys/devices/system/cpu/cpu{c}"))
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

    housekeeping = model.housekeeping(wanted) or frozenset()
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
    if host is None:
        out.extend(Finding(f"cpu.{what}", "skip", model.unknown(words), expected) for what, words, expected in (
            ("isolated", "isolcpus", f"{cores} in /sys/devices/system/cpu/isolated"),
            ("nohz_full", "nohz_full", f"nohz_full covers {cores}"),
            ("rcu_nocbs", "rcu_nocbs", f"rcu_nocbs covers {cores}"),
            ("threadirqs", "threadirqs", "threadirqs"),
            ("smt", "whether SMT siblings are isolated", "SMT siblings of isolated cores isolated too, or SMT off"),
            ("governor", "the cpufreq governor", "scaling_governor performance"),
        ))
        return out
    tokens = host.cmdline()
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


def check_hugepages(cfg: DspConfig, model: HostModel) -> list[Finding]:
    kib = PAGE_SIZES_KIB[cfg.hugepage_size]
    need = -(-cfg.memory_mb * 1024 // kib)
    pool = f"/sys/kernel/mm/hugepages/hugepages-{kib}kB"
    expected = f">= {need} free {cfg.hugepage_size} pages for memory_mb = {cfg.memory_mb}"
    mount_expected = f"a hugetlbfs mounted with pagesize={cfg.hugepage_size}"
    if not cfg.hugepages:
        return [Finding("hugepages.free", "skip", "hugepages = 0 in the config", expected),
                Finding("hugepages.mount", "skip", "hugepages = 0 in the config", mount_expected)]
    out = []
    host = model.files
    found = model.pool(kib)
    nr, free = (found.total, found.free) if found else (None, None)
    if host is None and (free is None or nr is None):
        if found is None and model.online_cpus is not None:  # libvirt answered, and lists no such pool
            out.append(Finding("hugepages.free", "fail", f"libvirt at {model.where} lists no {cfg.hugepage_size} "
                               "pages", expected, f"on that host: kernel parameters hugepagesz={cfg.hugepage_size} "
                               f"hugepages={need}, or hugepage_size = \"2M\""))
        else:
            out.append(Finding("hugepages.free", "skip", model.unknown(f"free {cfg.hugepage_size} pages"), expected))
    elif nr is None or free is None:
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

    if host is None:
        out.append(Finding("hugepages.mount", "skip", model.unknown("hugetlbfs mounts"), mount_expected))
        return out
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



def check_memlock(cfg: DspConfig, model: HostModel) -> list[Finding]:
    need_mb = cfg.memory_mb + MEMLOCK_MARGIN_MB
    expected = f"hard RLIMIT_MEMLOCK >= {need_mb} MiB (memory_mb + 1 GiB) or CAP_SYS_RESOURCE"
    if not cfg.realtime.mlock:
        return [Finding("memlock.limit", "skip", "realtime.mlock = false", expected)]
    host = model.files
    if host is None:
        return [Finding("memlock.limit", "skip", model.unknown("the locked-memory limit"), expected)]
    lim = host.limit("Max locked memory", resource.RLIMIT_MEMLOCK)
    hard = lim[1] if lim else None
    hard_text = "unknown" if lim is None else "unlimited" if hard is None else _mib(hard)
    cap = host.has_capability(CAP_SYS_RESOURCE)
    observed = f"hard memlock {hard_text}, CAP_SYS_RESOURCE {'yes' if cap else 'no' if cap is False else 'unknown'}"
    if cap or (lim is not None and (hard is None or hard >= need_mb * 1024 * 1024)):
        return [Finding("memlock.limit", "ok", observed, expected)]
    return [Finding("memlock.limit", "fail", observed, expected, MEMLOCK_FIX)]


def rt_cgroup(host: Host) -> tuple[Status, str]:
    """Whether vCPUs may run SCHED_FIFO in libvirt's cgroup, and what was seen: ok, or fail/warn when
    a cgroup v1 cpu controller hands libvirt's machine cgroup (or the VMs' below it) no RT budget.

    The one place this is decided: ``check`` reports it, ``scripts/host-services`` applies the fix
    (``python -m archdsp_libvirt.host.prepare rt-budget``).
    """
    mounts = host.mounts()
    cpu_v1 = next((m for m in mounts if m.fstype == "cgroup" and "cpu" in m.options), None)
    controllers = host.cgroup_controllers()
    if cpu_v1 is None:
        v2 = any(m.fstype == "cgroup2" for m in mounts)
        return "ok", "cgroup v2 (no per-cgroup RT budget)" if v2 else "no cpu cgroup controller mounted"
    if controllers is not None and "cpu" not in controllers:
        return "ok", "cgroup v1; qemu.conf cgroup_controllers leaves out cpu"
    if not host.exists(f"{cpu_v1.path}/cpu.rt_runtime_us"):
        return "ok", "cgroup v1 without RT group scheduling (no cpu.rt_runtime_us)"
    machine = next((f"{cpu_v1.path}/{n}" for n in ("machine.slice", "machine")
                    if host.exists(f"{cpu_v1.path}/{n}/cpu.rt_runtime_us")), None)
    if machine is None:
        parent = host.read_int(f"{cpu_v1.path}/cpu.rt_runtime_us")
        return "fail", (f"cgroup v1 cpu controller used by libvirt; machine cgroup not created yet, new cgroups "
                        f"start with cpu.rt_runtime_us = 0 (parent {cpu_v1.path}: {parent})")
    budget = host.read_int(f"{machine}/cpu.rt_runtime_us")
    seen = f"cgroup v1 {machine}/cpu.rt_runtime_us = {budget}"
    if not budget:
        return "fail", seen
    # libvirt's per-VM child cgroups still start at 0 unless something hands budget down.
    return "warn", seen + "; libvirt's per-VM cgroups start at 0"


def check_realtime(cfg: DspConfig, model: HostModel) -> list[Finding]:
    expected = ("SCHED_FIFO allowed in the VM's cgroup "
                "(cgroup v2, or v1 with RT budget or without libvirt's cpu controller)")
    prio_expected = f"CAP_SYS_NICE or RLIMIT_RTPRIO >= {cfg.realtime.priority}"
    if not cfg.realtime.enable:
        return [Finding("rt.cgroup", "skip", "realtime.enable = false", expected),
                Finding("rt.rtprio", "skip", "realtime.enable = false", prio_expected)]
    host = model.files
    if host is None:
        return [Finding("rt.cgroup", "skip", model.unknown("the RT cgroup budget"), expected),
                Finding("rt.rtprio", "skip", model.unknown("libvirtd's RT priority limit"), prio_expected)]
    status, seen = rt_cgroup(host)
    out = [Finding("rt.cgroup", status, seen, expected, QEMU_CONF_FIX if status != "ok" else "")]

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


def check_passthrough(cfg: DspConfig, model: HostModel) -> list[Finding]:
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
    host = model.files
    dev = host.pci(addr) if host is not None else model.pci_device(addr)
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
                           f"{IOMMU_PARAMS.get((host.cpu_vendor() if host else None) or '', 'amd_iommu=on')} iommu=pt"))
        out.append(Finding("vfio.critical", "skip", "no IOMMU group", expectations["vfio.critical"]))
    else:
        if host is not None:
            names = host.iommu_group_members(dev.iommu_group) or [addr]
            members = [m for m in (host.pci(n) for n in names) if m is not None]
        else:
            members = [m for n in model.iommu_group_members(dev.iommu_group) if (m := model.pci_device(n))]
        listing = f"group {dev.iommu_group}: " + ", ".join(m.describe() for m in members)
        busy = [m for m in members if m.address != addr and not m.is_bridge and m.driver not in VFIO_SAFE_DRIVERS]
        if busy:
            out.append(Finding("vfio.group", "fail", listing, expectations["vfio.group"],
                               "; ".join(f"archdsp-virt vfio bind {m.address}" for m in busy)
                               + " (or pass them through too)"))
        else:
            out.append(Finding("vfio.group", "ok", listing, expectations["vfio.group"]))
        critical = critical_devices(host) if host is not None else {}
        bad = [f"{m.address} (PCI bridge)" for m in members if m.is_bridge]
        bad += [f"{m.address} ({critical[m.address]})" for m in members if m.address in critical]
        if not bad and host is None:
            out.append(Finding("vfio.critical", "skip", f"group {dev.iommu_group}: no PCI bridge; "
                               + model.unknown("the root disk's controller and the default route's NIC"),
                               expectations["vfio.critical"]))
        elif bad:
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

    audio = [d for d in (host.pci_devices() if host is not None else model.pci or ()) if d.is_audio]
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


def check_domains(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """Other DSP VMs this tool defined on the same host: shared cores, hugepages, NETJACK port or slave."""
    others = [d for d in model.domains if d.name != cfg.name]
    names = ", ".join(d.name for d in others) or "none"
    wanted = frozenset(cfg.isolated_cores)
    out = []
    clash = [f"{d.name} ({format_cpuset(d.cpus & wanted)})" for d in others if d.cpus & wanted]
    expected = "isolated_cores used by no other DSP VM on the host"
    if clash:
        # Both VMs start and run, their vCPUs taking turns on the shared core: worse latency, a warn.
        out.append(Finding("domains.cores", "warn", "cores shared with " + ", ".join(clash), expected,
                           "give each DSP VM its own isolated_cores"))
    else:
        out.append(Finding("domains.cores", "ok", f"other DSP VMs: {names}", expected))

    kib = PAGE_SIZES_KIB[cfg.hugepage_size]
    expected = "free hugepages for this VM and every other DSP VM that is defined but not running"
    pool = model.pool(kib)
    if not cfg.hugepages:
        out.append(Finding("domains.hugepages", "skip", "hugepages = 0 in the config", expected))
    elif pool is None or pool.free is None:
        out.append(Finding("domains.hugepages", "skip", f"free {cfg.hugepage_size} pages unknown", expected))
    else:
        need = -(-cfg.memory_mb * 1024 // kib)
        waiting = [d for d in others if not d.active and d.page_size_kib == kib and d.hugepages]
        total = need + sum(d.hugepages for d in waiting)
        seen = f"{pool.free} free; this VM {need}" + "".join(f", {d.name} {d.hugepages} (not running)"
                                                              for d in waiting)
        if waiting and total > pool.free >= need:
            out.append(Finding("domains.hugepages", "warn", seen + f" = {total}", expected,
                               f"raise the {cfg.hugepage_size} pool to {(pool.total or 0) - pool.free + total} pages, "
                               "or start only one of them"))
        else:
            out.append(Finding("domains.hugepages", "ok", seen, expected))

    nj = cfg.netjack
    expected = "a NETJACK port and slave name of its own on the host"
    if not nj.enable:
        out.append(Finding("domains.netjack", "skip", "archibaldos.netjack.enable = false", expected))
    else:
        same = [f"{d.name} (port {d.netjack_port})" for d in others
                if d.netjack_port == nj.source_port and d.master_ip in (None, nj.master_ip)]
        same += [f"{d.name} (slave {d.netjack_client!r})" for d in others
                 if d.netjack_client == nj.client_name and d.netjack_port != nj.source_port]
        if same:
            out.append(Finding("domains.netjack", "fail", "link shared with " + ", ".join(same), expected,
                               "set archibaldos.netjack.source_port and client_name apart from the other VMs'"))
        else:
            out.append(Finding("domains.netjack", "ok", f"port {nj.source_port}, slave {nj.client_name!r}", expected))
    return out


def check_netjack_master(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """The master's address: this host's, on a network only VMs reach (NETJACK has no authentication)."""
    nj = cfg.netjack
    expected = "master_ip on this host's VM-only network (a libvirt bridge, not a LAN NIC or the default route)"
    if not nj.enable:
        return [Finding("netjack.master", "skip", "archibaldos.netjack.enable = false", expected)]
    host = model.files
    if host is None:
        return [Finding("netjack.master", "skip", model.unknown(f"the interface of {nj.master_ip}"), expected)]
    iface = host.interface_of(nj.master_ip)
    if iface is None:
        return [Finding("netjack.master", "warn", f"{nj.master_ip} is on no interface of this host now", expected,
                        "start the VM's network (virsh net-start default), or set archibaldos.netjack.master_ip "
                        "to the host's address on the VM's bridge")]
    exposed = host.lan_exposure(nj.master_ip)
    if exposed and not nj.allow_lan:
        return [Finding("netjack.master", "fail", exposed + ": other machines can join the link", expected,
                        "set archibaldos.netjack.master_ip to the host's address on the VM's bridge "
                        "(192.168.122.1 on libvirt's default network), or allow_lan = true to accept that")]
    if exposed:
        return [Finding("netjack.master", "warn", exposed + " (allow_lan = true)", expected)]
    return [Finding("netjack.master", "ok", f"{nj.master_ip} on {iface}", expected)]


def run_checks(cfg: DspConfig, host: HostModel | Host, libvirt_reachable: bool | None = None, *,
               libvirt_detail: str = "") -> list[Finding]:
    """Every host condition ``cfg`` needs, in :data:`CHECK_IDS` order.

    ``host`` is the host model (a bare :class:`Host` file tree is taken as a local host with no
    libvirt facts). ``libvirt_reachable`` is the caller's verdict (it opens the connection; None:
    not asked), ``libvirt_detail`` what it saw (the URI, or libvirt's error).
    """

    model = host if isinstance(host, HostModel) else local_model(host)
    return [
        *check_kvm(cfg, model),
        *check_libvirt(libvirt_reachable, libvirt_detail),
        *check_boot_files(cfg, model),
        *check_iommu(cfg, model),
        *check_cpus(cfg, model),
        *check_hugepages(cfg, model),
        *check_memlock(cfg, model),
        *check_realtime(cfg, model),
        *check_passthrough(cfg, model),
        *check_domains(cfg, model),
        *check_netjack_master(cfg, model),
        *check_audio_threads(cfg, model),
    ]


def preflight(cfg: DspConfig, host: HostModel | Host, libvirt_reachable: bool | None, skip: Iterable[str] = (), *,
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
