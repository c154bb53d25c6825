"""KVM's own knobs and the host's latency knobs beside them: halt polling, pause-loop exiting, kvmclock's
periodic sync, nx_huge_pages, transparent hugepages, KSM, C-states, timer migration, skew_tick and the
NMI watchdog. Each row names its fix: a runtime one (``host prepare apply``) or a kernel parameter
(``host kernel-params``). A knob this host does not have is a *skip* that says why."""

from __future__ import annotations

from ...config import DspConfig
from ...cpuset import format_cpuset
from ..files import Host
from ..findings import Finding, Write
from ..model import HostModel

PREPARE = "archdsp-virt host prepare apply CONFIG"
KERNEL_PARAMS = "archdsp-virt host kernel-params CONFIG"
KVM = "/sys/module/kvm/parameters"
HALT_POLL = f"{KVM}/halt_poll_ns"
HALT_POLL_MAX = 50_000  # ServoBox's figure; SEAPATH sets 0
KVMCLOCK_SYNC = f"{KVM}/kvmclock_periodic_sync"
NX_HUGE_PAGES = f"{KVM}/nx_huge_pages"
ITLB_MULTIHIT = "/sys/devices/system/cpu/vulnerabilities/itlb_multihit"
# Pause-loop exiting, per vendor module: (module, parameter).
PLE = {"GenuineIntel": ("kvm_intel", "ple_gap"), "AuthenticAMD": ("kvm_amd", "pause_filter_count"),
       "HygonGenuine": ("kvm_amd", "pause_filter_count")}
THP = "/sys/kernel/mm/transparent_hugepage/enabled"
KSM = "/sys/kernel/mm/ksm/run"
TIMER_MIGRATION = "/proc/sys/kernel/timer_migration"
NMI_WATCHDOG = "/proc/sys/kernel/nmi_watchdog"
# A C-state whose exit takes longer than this is kept off the vCPU cores: at 96 kHz / 128 frames a period
# is 1333 us, and deep states (C6 and below) take 100 us and more to leave.
CSTATE_MAX_LATENCY_US = 10


def _yes(value: str | None) -> bool:
    return (value or "").strip().upper() in ("Y", "1", "ON", "FORCE")


def ple_param(host: Host) -> tuple[str, str] | None:
    """(kernel parameter, sysfs path) of the loaded vendor module's pause-loop knob, None when neither loads."""
    vendor = host.cpu_vendor() or ""
    for module, param in ([PLE[vendor]] if vendor in PLE else []) + list(dict.fromkeys(PLE.values())):
        path = f"/sys/module/{module}/parameters/{param}"
        if host.exists(path):
            return f"{module}.{param}", path
    return None


def cstate_writes(cfg: DspConfig, host: Host) -> list[Write]:
    """``disable = 1`` for each enabled C-state of a vCPU core whose exit latency is above the limit."""
    out = []
    for cpu in sorted(cfg.isolated_cores):
        base = f"/sys/devices/system/cpu/cpu{cpu}/cpuidle"
        for state in host.listdir(base):
            lat = host.read_int(f"{base}/{state}/latency")
            if state.startswith("state") and lat is not None and lat > CSTATE_MAX_LATENCY_US \
                    and host.setting(f"{base}/{state}/disable") == "0":
                out.append(Write(f"{base}/{state}/disable", "1", tuned=True))
    return out


def knob_writes(cfg: DspConfig, host: Host) -> list[Write]:
    """The runtime fixes of this module's rows."""
    out = []
    poll = host.read_int(HALT_POLL)
    if poll is not None and poll > HALT_POLL_MAX:
        out.append(Write(HALT_POLL, str(HALT_POLL_MAX)))
    if host.setting(THP) == "always":
        out.append(Write(THP, "never", tuned=True))
    if host.setting(KSM) == "1":
        out.append(Write(KSM, "2", tuned=True))
    out += cstate_writes(cfg, host)
    for path in (TIMER_MIGRATION, NMI_WATCHDOG):
        if host.setting(path) not in (None, "0"):
            out.append(Write(path, "0", tuned=True))
    return out


def check_knobs(cfg: DspConfig, model: HostModel) -> list[Finding]:
    host = model.files
    rows = [_halt_poll, _ple, _kvmclock, _nx_huge_pages, _thp, _ksm, _cstates, _timer_migration, _skew_tick,
            _nmi_watchdog]
    if host is None:
        return [Finding(fid, "skip", model.unknown(what), expected) for fid, what, expected in (
            ("kvm.halt_poll", "halt_poll_ns", f"halt_poll_ns <= {HALT_POLL_MAX}"),
            ("kvm.ple", "pause-loop exiting", "ple_gap / pause_filter_count = 0"),
            ("kvm.kvmclock_sync", "kvmclock_periodic_sync", "kvmclock_periodic_sync = 0"),
            ("kvm.nx_huge_pages", "nx_huge_pages", "nx_huge_pages as the guest's trust allows"),
            ("mm.thp", "transparent hugepages", "never or madvise"),
            ("mm.ksm", "KSM", "ksm run = 0 or 2"),
            ("cpu.cstates", "C-states", "no deep C-state on the vCPU cores"),
            ("cpu.timer_migration", "kernel.timer_migration", "kernel.timer_migration = 0"),
            ("cpu.skew_tick", "the kernel command line", "skew_tick=1"),
            ("cpu.nmi_watchdog", "kernel.nmi_watchdog", "kernel.nmi_watchdog = 0"))]
    return [row(cfg, host) for row in rows]


def _no_kvm(fid: str, expected: str, host: Host) -> Finding:
    return Finding(fid, "skip", "no kvm module loaded (/sys/module/kvm)" if not host.exists("/sys/module/kvm")
                   else "this kvm module has no such parameter", expected)


def _halt_poll(cfg: DspConfig, host: Host) -> Finding:
    expected = (f"halt_poll_ns <= {HALT_POLL_MAX}: 0 (SEAPATH) lets a halting vCPU sleep at once, the least CPU "
                "burnt for a slower wake-up; 50000 (ServoBox) polls 50 us on the host first, catching short halts "
                "at the cost of burning the core (and its SMT sibling's share) meanwhile")
    poll = host.read_int(HALT_POLL)
    if poll is None:
        return _no_kvm("kvm.halt_poll", expected, host)
    seen = f"halt_poll_ns = {poll}"
    if poll <= HALT_POLL_MAX:
        return Finding("kvm.halt_poll", "ok", seen, expected)
    return Finding("kvm.halt_poll", "warn", seen + f": a halting vCPU burns up to {poll / 1000:g} us of its core "
                   "polling on the host", expected,
                   f"echo {HALT_POLL_MAX} > {HALT_POLL} (or 0; {PREPARE}; "
                   f"to keep it: kvm.halt_poll_ns={HALT_POLL_MAX})")


def _ple(cfg: DspConfig, host: Host) -> Finding:
    expected = ("pause-loop exiting off (kvm_intel.ple_gap=0 / kvm_amd.pause_filter_count=0): a pinned vCPU that "
                "spins on a lock has no other vCPU to yield to; exiting only adds latency")
    found = ple_param(host)
    if found is None:
        return Finding("kvm.ple", "skip", "neither kvm_intel nor kvm_amd is loaded (/sys/module)", expected)
    param, path = found
    value = host.read_int(path)
    seen = f"{param} = {value if value is not None else 'unreadable'}"
    if value == 0:
        return Finding("kvm.ple", "ok", seen, expected)
    return Finding("kvm.ple", "warn", seen, expected,
                   f"kernel parameter {param}=0 ({KERNEL_PARAMS}; read-only while the module is loaded)")


def _kvmclock(cfg: DspConfig, host: Host) -> Finding:
    expected = ("kvmclock_periodic_sync = 0 (tuned's realtime-virtual-host): otherwise KVM updates every vCPU's "
                "kvmclock each 300 s, an interruption of the running vCPU")
    value = host.setting(KVMCLOCK_SYNC)
    if value is None:
        return _no_kvm("kvm.kvmclock_sync", expected, host)
    seen = f"kvm.kvmclock_periodic_sync = {value}"
    if not _yes(value):
        return Finding("kvm.kvmclock_sync", "ok", seen, expected)
    return Finding("kvm.kvmclock_sync", "warn", seen, expected,
                   f"kernel parameter kvm.kvmclock_periodic_sync=0 ({KERNEL_PARAMS}; read-only while kvm is loaded)")


def _nx_huge_pages(cfg: DspConfig, host: Host) -> Finding:
    expected = ("on where the CPU has iTLB multihit and the guest is not trusted (the mitigation); "
                "kvm.nx_huge_pages=off, for a trusted guest only, keeps its code on huge pages and stops the "
                "per-VM kvm-nx-lpage-recovery thread's periodic work")
    value = host.setting(NX_HUGE_PAGES)
    if value is None:
        return _no_kvm("kvm.nx_huge_pages", expected, host)
    vuln = (host.read(ITLB_MULTIHIT) or "unknown").strip()
    if not _yes(value):
        return Finding("kvm.nx_huge_pages", "ok", f"nx_huge_pages = {value} (itlb_multihit: {vuln})", expected)
    return Finding("kvm.nx_huge_pages", "ok",
                   f"nx_huge_pages = {value} (itlb_multihit: {vuln}): the guest's executable pages are split to 4 KiB "
                   "(more iTLB misses); kvm.nx_huge_pages=off trades that mitigation away, for trusted guests only",
                   expected)


def _thp(cfg: DspConfig, host: Host) -> Finding:
    expected = ("transparent hugepages never or madvise (tuned: never): with always, khugepaged's scans and "
                "compaction stall the host's threads at random")
    value = host.setting(THP)
    if value is None:
        return Finding("mm.thp", "skip", f"no {THP} (kernel without transparent hugepages)", expected)
    if value in ("never", "madvise"):
        return Finding("mm.thp", "ok", f"transparent_hugepage = {value}", expected)
    return Finding("mm.thp", "warn", f"transparent_hugepage = {value}", expected,
                   f"echo never > {THP} ({PREPARE}; to keep it: kernel parameter transparent_hugepage=never)")


def _ksm(cfg: DspConfig, host: Host) -> Finding:
    expected = ("KSM off (ksm run 0, or 2 as tuned sets it: stop and unmerge): ksmd scans and merges pages of "
                "other VMs; nosharepages covers only this guest")
    value = host.setting(KSM)
    if value is None:
        return Finding("mm.ksm", "skip", f"no {KSM} (kernel without KSM)", expected)
    if value in ("0", "2"):
        return Finding("mm.ksm", "ok", f"ksm run = {value}", expected)
    return Finding("mm.ksm", "warn", f"ksm run = {value}: ksmd is merging pages", expected,
                   f"echo 2 > {KSM} ({PREPARE})")


def _cstates(cfg: DspConfig, host: Host) -> Finding:
    cores = format_cpuset(frozenset(cfg.isolated_cores))
    expected = (f"no C-state with an exit latency above {CSTATE_MAX_LATENCY_US} us on the vCPU cores ({cores}); "
                "writing /dev/cpu_dma_latency does the same for every core, but only while the process that wrote "
                "it keeps it open (tuned's force_latency)")
    bases = [f"/sys/devices/system/cpu/cpu{c}/cpuidle" for c in sorted(cfg.isolated_cores)]
    if not any(host.listdir(b) for b in bases):
        return Finding("cpu.cstates", "skip", f"no cpuidle on {cores} (/sys/devices/system/cpu/cpuN/cpuidle: "
                       "idle states are the hypervisor's or the firmware's)", expected)
    deep = cstate_writes(cfg, host)
    if not deep:
        return Finding("cpu.cstates", "ok", f"no enabled C-state above {CSTATE_MAX_LATENCY_US} us on {cores}", expected)
    names = []
    for w in deep:
        state = w.path.rsplit("/", 1)[0]
        cpu = state.split("/")[5]
        names.append(f"{cpu} {(host.read(state + '/name') or '?').strip()} "
                     f"({host.read_int(state + '/latency')} us)")
    return Finding("cpu.cstates", "warn", "enabled: " + ", ".join(names), expected,
                   "; ".join(w.command for w in deep) + f" ({PREPARE})")


def _sysctl_zero(fid: str, path: str, key: str, expected: str, why: str, host: Host) -> Finding:
    value = host.setting(path)
    if value is None:
        return Finding(fid, "skip", f"no {path} (this kernel has no such setting)", expected)
    if value == "0":
        return Finding(fid, "ok", f"{key} = 0", expected)
    return Finding(fid, "warn", f"{key} = {value}: {why}", expected,
                   f"sysctl -w {key}=0 ({PREPARE}; to keep it: {key} = 0 in /etc/sysctl.d/)")


def _timer_migration(cfg: DspConfig, host: Host) -> Finding:
    return _sysctl_zero("cpu.timer_migration", TIMER_MIGRATION, "kernel.timer_migration",
                        "kernel.timer_migration = 0 (tuned's network-latency, under realtime-virtual-host)",
                        "timers armed on housekeeping cores may move to a vCPU core", host)


def _nmi_watchdog(cfg: DspConfig, host: Host) -> Finding:
    return _sysctl_zero("cpu.nmi_watchdog", NMI_WATCHDOG, "kernel.nmi_watchdog",
                        "kernel.nmi_watchdog = 0 (tuned's network-latency)",
                        "a periodic NMI on every core, the vCPU cores too", host)


def _skew_tick(cfg: DspConfig, host: Host) -> Finding:
    expected = ("skew_tick=1 on the kernel command line (tuned's network-latency): the cores' ticks are offset, "
                "so they do not contend for the same locks at once")
    if "skew_tick=1" in host.cmdline():
        return Finding("cpu.skew_tick", "ok", "skew_tick=1", expected)
    return Finding("cpu.skew_tick", "warn", "no skew_tick=1 in /proc/cmdline", expected,
                   f"kernel parameter skew_tick=1 ({KERNEL_PARAMS})")
