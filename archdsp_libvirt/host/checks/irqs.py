"""Interrupts off the vCPU cores: device IRQs' affinity (``/proc/irq/N/smp_affinity_list``, ``irqaffinity=``),
irqbalance's ban list where irqbalance runs, and the passthrough device's ``vfio-msi`` IRQ threads above the
vCPUs."""

from __future__ import annotations

import re

from ...config import DspConfig
from ...cpuset import CpuSet, format_cpuset, parse_cpuset
from ..files import Host, cmdline_cpus, cmdline_values
from ..findings import Finding, Resched, Write
from ..model import HostModel
from ..sched import Task, tasks

PREPARE = "archdsp-virt host prepare apply CONFIG"
IRQBALANCE_CONFS = ("/etc/default/irqbalance", "/etc/sysconfig/irqbalance")
# /proc/irq/N/ holds these files; any other entry is a handler's directory (an IRQ a device uses).
_IRQ_FILES = {"smp_affinity", "smp_affinity_list", "effective_affinity", "effective_affinity_list",
              "affinity_hint", "node", "spurious"}
_VFIO_THREAD = re.compile(r"irq/\d+-vfio.*")  # irq/N-vfio-msi[x][V](DEVICE), cut to 15 characters


def _cpulist(text: str | None) -> CpuSet | None:
    try:
        return parse_cpuset(text.strip()) if text and text.strip() else None
    except ValueError:
        return None


def device_irqs(host: Host) -> list[tuple[int, CpuSet, list[str]]]:
    """(IRQ, the cores it may be delivered to, its handlers) of every IRQ a device has requested."""
    out = []
    for entry in host.listdir("/proc/irq"):
        if not entry.isdigit():
            continue
        names = [n for n in host.listdir(f"/proc/irq/{entry}") if n not in _IRQ_FILES]
        cpus = _cpulist(host.read(f"/proc/irq/{entry}/smp_affinity_list"))
        if names and cpus is not None:
            out.append((int(entry), cpus, names))
    return sorted(out)


def _housekeeping(cfg: DspConfig, host: Host) -> CpuSet | None:
    online = host.cpus("online")
    if online is None:
        return None
    return online - frozenset(cfg.isolated_cores) - (host.cpus("isolated") or frozenset())


def irq_writes(cfg: DspConfig, host: Host) -> list[Write]:
    """Each device IRQ that may reach a vCPU core, moved to the housekeeping cores."""
    keep = _housekeeping(cfg, host)
    if not keep:
        return []
    vcpus = frozenset(cfg.isolated_cores)
    return [Write(f"/proc/irq/{irq}/smp_affinity_list", format_cpuset(keep), tuned=True)
            for irq, cpus, _ in device_irqs(host) if cpus & vcpus]


def vfio_threads(host: Host) -> list[Task]:
    return tasks(host, lambda comm: _VFIO_THREAD.fullmatch(comm) is not None)


def vfio_changes(cfg: DspConfig, host: Host) -> list[Resched]:
    """``chrt -f`` above the vCPU for each vfio IRQ thread that is not above it (with passthrough only)."""
    if not cfg.audio_device.enable:
        return []
    prio = cfg.realtime.priority
    return [Resched(t.pid, t.comm, t.start, min(99, prio + 1)) for t in vfio_threads(host)
            if not (t.realtime and t.priority > prio)]


def _irqbalance(host: Host) -> tuple[int, dict[str, str]] | None:
    """irqbalance's PID and its environment, None when it does not run."""
    for entry in host.listdir("/proc"):
        if entry.isdigit() and (host.read(f"/proc/{entry}/comm") or "").strip() == "irqbalance":
            env = {}
            for item in (host.read(f"/proc/{entry}/environ") or "").split("\0"):
                k, sep, v = item.partition("=")
                if sep:
                    env[k] = v
            return int(entry), env
    return None


def _conf_value(text: str, key: str) -> str | None:
    m = None
    for m in re.finditer(rf"^\s*(?:export\s+)?{key}\s*=\s*[\"']?([^\"'#\s]*)", text, re.M):
        pass
    return m.group(1) if m else None


def banned_cpus(env: dict[str, str], host: Host) -> tuple[CpuSet | None, str]:
    """irqbalance's banned CPUs (IRQBALANCE_BANNED_CPULIST, or the IRQBALANCE_BANNED_CPUS mask) from its
    environment, else from its config file; and where they were read. None: no ban list."""
    sources = [("its environment", env)] + [(p, {k: v for k in ("IRQBALANCE_BANNED_CPULIST", "IRQBALANCE_BANNED_CPUS")
                                                  if (v := _conf_value(host.read(p) or "", k)) is not None})
                                            for p in IRQBALANCE_CONFS if host.exists(p)]
    for where, values in sources:
        if values.get("IRQBALANCE_BANNED_CPULIST"):
            return _cpulist(values["IRQBALANCE_BANNED_CPULIST"]), where
        mask = (values.get("IRQBALANCE_BANNED_CPUS") or "").replace(",", "")
        if mask:
            try:
                bits = int(mask, 16)
            except ValueError:
                continue
            return frozenset(i for i in range(bits.bit_length()) if bits >> i & 1), where
    return None, ", ".join(w for w, _ in sources)


def check_irqs(cfg: DspConfig, model: HostModel) -> list[Finding]:
    vcpus = frozenset(cfg.isolated_cores)
    cores = format_cpuset(vcpus)
    aff_expected = f"no device IRQ may be delivered to the vCPU cores ({cores}); irqaffinity= names the others"
    bal_expected = f"irqbalance not running, or banned from {cores} (IRQBALANCE_BANNED_CPULIST={cores})"
    prio = cfg.realtime.priority
    vfio_expected = f"the passthrough device's vfio-msi IRQ threads at SCHED_FIFO above the vCPUs' FIFO {prio}"
    host = model.files
    if host is None:
        return [Finding("irq.affinity", "skip", model.unknown("IRQ affinities"), aff_expected),
                Finding("irq.balance", "skip", model.unknown("irqbalance's ban list"), bal_expected),
                Finding("irq.vfio", "skip", model.unknown("the vfio IRQ threads"), vfio_expected)]
    return [_affinity(cfg, host, aff_expected), _balance(host, vcpus, cores, bal_expected),
            _vfio(cfg, host, vfio_expected)]


def _affinity(cfg: DspConfig, host: Host, expected: str) -> Finding:
    vcpus = frozenset(cfg.isolated_cores)
    irqs = device_irqs(host)
    if not irqs and not host.exists("/proc/irq"):
        return Finding("irq.affinity", "skip", "no /proc/irq", expected)
    keep = _housekeeping(cfg, host)
    boot = cmdline_values(host.cmdline(), "irqaffinity")
    boot_cpus = cmdline_cpus(boot[-1]) if boot else None
    boot_text = f"irqaffinity={boot[-1]}" if boot else "no irqaffinity="
    bad = [(irq, cpus, names) for irq, cpus, names in irqs if cpus & vcpus]
    boot_bad = boot_cpus is None or bool(boot_cpus & vcpus)
    if not bad and not boot_bad:
        return Finding("irq.affinity", "ok", f"{len(irqs)} device IRQs off {format_cpuset(vcpus)}; {boot_text}",
                       expected)
    parts = []
    if bad:
        shown = ", ".join(f"{irq} ({names[0]}: {format_cpuset(cpus)})" for irq, cpus, names in bad[:6])
        parts.append(f"{len(bad)} of {len(irqs)} device IRQs may reach the vCPU cores: {shown}"
                     + (", ..." if len(bad) > 6 else ""))
    parts.append(boot_text + (" (new IRQs may land on the vCPU cores)" if boot_bad else ""))
    hk = format_cpuset(keep) if keep else "HOUSEKEEPING"
    fixes = []
    if bad:
        fixes.append(f"for each: echo {hk} > /proc/irq/N/smp_affinity_list ({PREPARE}; a kernel-managed IRQ refuses "
                     f"it: isolcpus=managed_irq,{format_cpuset(vcpus)} moves those)")
    if boot_bad:
        fixes.append(f"kernel parameter irqaffinity={hk} (archdsp-virt host kernel-params CONFIG)")
    return Finding("irq.affinity", "warn", "; ".join(parts), expected, "; ".join(fixes))


def _balance(host: Host, vcpus: CpuSet, cores: str, expected: str) -> Finding:
    found = _irqbalance(host)
    if found is None:
        return Finding("irq.balance", "ok", "irqbalance does not run", expected)
    pid, env = found
    banned, where = banned_cpus(env, host)
    fix = (f"IRQBALANCE_BANNED_CPULIST={cores} in /etc/default/irqbalance (or /etc/sysconfig/irqbalance), "
           "then restart irqbalance")
    if banned is None:
        return Finding("irq.balance", "warn",
                       f"irqbalance (pid {pid}) runs with no banned CPUs ({where or 'no config'})"
                       ": it may move device IRQs onto the vCPU cores", expected, fix)
    if vcpus <= banned:
        return Finding("irq.balance", "ok", f"irqbalance (pid {pid}) banned from {format_cpuset(banned)} ({where})",
                       expected)
    return Finding("irq.balance", "warn", f"irqbalance (pid {pid}) banned from {format_cpuset(banned)} only ({where})",
                   expected, fix)


def _vfio(cfg: DspConfig, host: Host, expected: str) -> Finding:
    if not cfg.audio_device.enable:
        return Finding("irq.vfio", "skip", "audio_device.enable = false (no passthrough)", expected)
    if not cfg.realtime.enable:
        return Finding("irq.vfio", "skip", "realtime.enable = false (the vCPUs are not SCHED_FIFO)", expected)
    threads = vfio_threads(host)
    if not threads:
        return Finding("irq.vfio", "skip", "no vfio IRQ thread runs (the VM is not running, or the device uses no "
                       "MSI yet; threadirqs makes them threads)", expected)
    prio = cfg.realtime.priority
    low = [t for t in threads if not (t.realtime and t.priority > prio)]
    if not low:
        return Finding("irq.vfio", "ok", ", ".join(f"{t.comm} {t.sched()}" for t in threads), expected)
    return Finding("irq.vfio", "warn", ", ".join(t.describe() for t in low) + f": not above the vCPUs' FIFO {prio}",
                   expected, "; ".join(c.command for c in vfio_changes(cfg, host)) + f" ({PREPARE})")
