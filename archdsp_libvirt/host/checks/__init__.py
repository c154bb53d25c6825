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

One module a group: platform (KVM, libvirt, IOMMU), boot, cpus, memory, realtime (with RT
throttling and the kernel threads above the vCPUs), irqs, knobs (KVM's module parameters, THP, KSM,
C-states, timer migration, skew_tick, the NMI watchdog), tuned, passthrough, neighbours (other DSP VMs,
the NETJACK master's network); audio threads in :mod:`..audiothreads`.

The runtime fixes the rows name are also values (:class:`~..findings.Write`,
:class:`~..findings.Resched`): :func:`runtime_changes` lists them for ``host prepare apply``.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgspec import structs

from ...config import DspConfig
from ...errors import HostError, UsageError
from ..audiothreads import check_audio_threads
from ..files import Host
from ..findings import STATUSES, Finding, Resched, Write
from ..model import HostModel
from .boot import check_boot_files
from .cpus import check_cpus
from .irqs import check_irqs, irq_writes, vfio_changes
from .knobs import check_knobs, knob_writes
from .memory import MEMLOCK_FIX, check_hugepages, check_memlock, check_memory_size
from .neighbours import check_domains, check_netjack_master
from .passthrough import check_passthrough
from .platform import IOMMU_PARAMS, check_accel, check_iommu, check_kvm, check_libvirt
from .realtime import (
    QEMU_CGROUP_LINE,
    check_kthreads,
    check_realtime,
    check_throttling,
    kthread_changes,
    rt_cgroup,
    throttling_writes,
)
from .tuned import check_tuned

__all__ = [
    "CHECK_IDS", "IOMMU_PARAMS", "MEMLOCK_FIX", "QEMU_CGROUP_LINE", "Finding", "check_boot_files", "failures",
    "findings_json", "format_findings", "preflight", "rt_cgroup", "run_checks", "runtime_changes",
]

# Every id run_checks can produce, in the order it produces them.
CHECK_IDS: tuple[str, ...] = (
    "kvm.device",
    "kvm.accel",
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
    "memory.size",
    "hugepages.free",
    "hugepages.mount",
    "memlock.limit",
    "rt.cgroup",
    "rt.rtprio",
    "rt.throttling",
    "rt.kthreads",
    "irq.affinity",
    "irq.balance",
    "irq.vfio",
    "kvm.halt_poll",
    "kvm.ple",
    "kvm.kvmclock_sync",
    "kvm.nx_huge_pages",
    "mm.thp",
    "mm.ksm",
    "cpu.cstates",
    "cpu.timer_migration",
    "cpu.skew_tick",
    "cpu.nmi_watchdog",
    "tuned.profile",
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


def run_checks(cfg: DspConfig, host: HostModel, libvirt_reachable: bool | None = None, *,
               libvirt_detail: str = "") -> list[Finding]:
    """Every host condition ``cfg`` needs, in :data:`CHECK_IDS` order.

    ``host`` is the command's host model. ``libvirt_reachable`` is the caller's verdict (it opens the connection; None:
    not asked), ``libvirt_detail`` what it saw (the URI, or libvirt's error).
    """

    model = host
    return [
        *check_kvm(cfg, model),
        *check_accel(cfg, model),
        *check_libvirt(libvirt_reachable, libvirt_detail),
        *check_boot_files(cfg, model),
        *check_iommu(cfg, model),
        *check_cpus(cfg, model),
        *check_memory_size(cfg, model),
        *check_hugepages(cfg, model),
        *check_memlock(cfg, model),
        *check_realtime(cfg, model),
        *check_throttling(cfg, model),
        *check_kthreads(cfg, model),
        *check_irqs(cfg, model),
        *check_knobs(cfg, model),
        *check_tuned(cfg, model),
        *check_passthrough(cfg, model),
        *check_domains(cfg, model),
        *check_netjack_master(cfg, model),
        *check_audio_threads(cfg, model),
    ]


def runtime_changes(cfg: DspConfig, host: Host) -> list[Write | Resched]:
    """The runtime fixes of the rows above on this host: what ``host prepare apply`` makes (and undoes).

    RT throttling and the kernel threads' priorities only with ``realtime.enable``; IRQs off the vCPU
    cores, the vfio IRQ threads, and the knobs of :mod:`.knobs`.
    """
    changes: list[Write | Resched] = []
    if cfg.realtime.enable:
        changes += [*throttling_writes(host), *kthread_changes(cfg, host), *vfio_changes(cfg, host)]
    return changes + [*irq_writes(cfg, host), *knob_writes(cfg, host)]


def preflight(cfg: DspConfig, host: HostModel, libvirt_reachable: bool | None, skip: Iterable[str] = (), *,
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


def require(cfg: DspConfig, host: HostModel, libvirt_reachable: bool | None, skip: Iterable[str] = (), *,
            libvirt_detail: str = "", say=lambda _line: None) -> list[Finding]:
    """:func:`preflight`, refusing with a :class:`HostError` (naming the first failed check, its fix and
    how to skip it) when any check fails; says what was skipped and how many warned."""
    findings = preflight(cfg, host, libvirt_reachable, skip, libvirt_detail=libvirt_detail)
    for f in findings:
        if f.observed.startswith("skipped on request"):
            say(f"preflight: {f.id} {f.observed} (--skip-check)")
    failed = failures(findings)
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more: see 'archdsp-virt check')" if len(failed) > 1 else ""
        raise HostError(
            f"preflight {first.id} failed: {first.observed}; expected {first.expected}; fix: {first.fix}{more}"
            f" (or --skip-check {first.id}); nothing was defined or started"
        )
    warned = sum(f.status == "warn" for f in findings)
    say(f"preflight: {len(findings)} checks, none failed" + (f", {warned} warnings (archdsp-virt check)" if warned else ""))
    return findings


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
