"""SCHED_FIFO for the vCPUs: the cgroup's RT budget, libvirtd's RT priority limit, the kernel's RT
throttling, and the kernel threads on the vCPU cores that must run above the vCPUs."""

from __future__ import annotations

import re
import resource

from ...config import DspConfig
from ...cpuset import format_cpuset
from ..files import Host
from ..findings import Finding, Resched, Status, Write
from ..model import HostModel
from ..sched import Task, tasks

RT_RUNTIME = "/proc/sys/kernel/sched_rt_runtime_us"
RT_PERIOD = "/proc/sys/kernel/sched_rt_period_us"
PREPARE = "archdsp-virt host prepare apply CONFIG"

# The kernel threads of a vCPU core that must preempt the SCHED_FIFO vCPU, and how far above its priority
# each goes: tuned's realtime-virtual-host puts ksoftirqd at FIFO 2, ktimersoftd at 3, rcuc and rcub at 4
# over a FIFO-1 vCPU. ktimers is ktimersoftd's name on newer PREEMPT_RT kernels.
KTHREAD_ABOVE = {"ksoftirqd": 1, "ktimers": 2, "ktimersoftd": 2, "rcuc": 3, "rcub": 3}
_KTHREAD = re.compile(r"(ksoftirqd|ktimers|ktimersoftd|rcuc|rcub)/(\d+)")

CAP_SYS_NICE = 23

# libvirt's default controllers less "cpu": its cgroup v1 RT budget is what refuses SCHED_FIFO vCPUs.
QEMU_CGROUP_LINE = 'cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ]'

QEMU_CONF_FIX = f"set {QEMU_CGROUP_LINE} in /etc/libvirt/qemu.conf and restart libvirtd (or set realtime.enable = false)"


def rt_cgroup(host: Host) -> tuple[Status, str]:
    """Whether vCPUs may run SCHED_FIFO in libvirt's cgroup, and what was seen: ok, or fail/warn when
    a cgroup v1 cpu controller hands libvirt's machine cgroup (or the VMs' below it) no RT budget.

    The one place this is decided: ``check`` reports it, ``scripts/host-services`` applies the fix
    (``archdsp-virt host prepare rt-budget``).
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


def throttling_writes(host: Host) -> list[Write]:
    """``kernel.sched_rt_runtime_us = -1`` unless it is so (or the kernel has no RT throttling)."""
    value = host.setting(RT_RUNTIME)
    return [] if value in (None, "-1") else [Write(RT_RUNTIME, "-1", tuned=True)]


def check_throttling(cfg: DspConfig, model: HostModel) -> list[Finding]:
    expected = "kernel.sched_rt_runtime_us = -1 (no RT throttling: what tuned's realtime profiles set)"
    if not cfg.realtime.enable:
        return [Finding("rt.throttling", "skip", "realtime.enable = false", expected)]
    host = model.files
    if host is None:
        return [Finding("rt.throttling", "skip", model.unknown("kernel.sched_rt_runtime_us"), expected)]
    runtime, period = host.read_int(RT_RUNTIME), host.read_int(RT_PERIOD) or 1_000_000
    if runtime is None:
        return [Finding("rt.throttling", "skip", f"no {RT_RUNTIME} (this kernel has no RT throttling)", expected)]
    if runtime < 0:
        return [Finding("rt.throttling", "ok", f"kernel.sched_rt_runtime_us = {runtime}: RT throttling off", expected)]
    stop_ms = (period - runtime) / 1000
    return [Finding("rt.throttling", "warn",
                    f"kernel.sched_rt_runtime_us = {runtime} of {period}: a SCHED_FIFO vCPU that never sleeps "
                    f"(the guest's idle=poll, a busy DSP load) is stopped {stop_ms:g} ms every {period / 1e6:g} s",
                    expected, f"sysctl -w kernel.sched_rt_runtime_us=-1 ({PREPARE}; to keep it: "
                    "kernel.sched_rt_runtime_us = -1 in /etc/sysctl.d/)")]


def vcpu_core_kthreads(cfg: DspConfig, host: Host) -> list[Task]:
    """ksoftirqd, ktimers, rcuc and rcub threads that may run on the config's vCPU cores."""
    cores = frozenset(cfg.isolated_cores)
    out = []
    for t in tasks(host, lambda comm: _KTHREAD.fullmatch(comm) is not None):
        kind, num = _KTHREAD.fullmatch(t.comm).groups()  # type: ignore[union-attr]
        reach = t.allowed if t.allowed is not None else frozenset({int(num)}) if kind != "rcub" else frozenset()
        if reach & cores:
            out.append(t)
    return out


def kthread_target(cfg: DspConfig, t: Task) -> int:
    """The FIFO priority kernel thread ``t`` gets above the vCPU (tuned's order, capped at 99)."""
    kind = t.comm.partition("/")[0]
    return min(99, cfg.realtime.priority + KTHREAD_ABOVE[kind])


def kthread_changes(cfg: DspConfig, host: Host) -> list[Resched]:
    """``chrt -f`` for each of those threads that does not already run above the vCPU's FIFO priority."""
    prio = cfg.realtime.priority
    return [Resched(t.pid, t.comm, t.start, kthread_target(cfg, t), tuned=True)
            for t in vcpu_core_kthreads(cfg, host) if not (t.realtime and t.priority > prio)]


def check_kthreads(cfg: DspConfig, model: HostModel) -> list[Finding]:
    prio = cfg.realtime.priority
    cores = format_cpuset(frozenset(cfg.isolated_cores))
    expected = (f"ksoftirqd, ktimers, rcuc and rcub on the vCPU cores ({cores}) at SCHED_FIFO above the vCPUs' "
                f"FIFO {prio} (tuned: FIFO 2, 3 and 4 over FIFO 1), or they starve behind them: RCU stalls")
    if not cfg.realtime.enable:
        return [Finding("rt.kthreads", "skip", "realtime.enable = false (the vCPUs are not SCHED_FIFO)", expected)]
    host = model.files
    if host is None:
        return [Finding("rt.kthreads", "skip", model.unknown("the kernel threads' priorities"), expected)]
    threads = vcpu_core_kthreads(cfg, host)
    if not threads:
        return [Finding("rt.kthreads", "skip", f"no ksoftirqd, ktimers, rcuc or rcub thread found on {cores} "
                        "(/proc)", expected)]
    low = [t for t in threads if not (t.realtime and t.priority > prio)]
    if not low:
        return [Finding("rt.kthreads", "ok", ", ".join(f"{t.comm} {t.sched()}" for t in threads), expected)]
    if prio >= 99:
        return [Finding("rt.kthreads", "warn", "realtime.priority = 99 leaves no priority above the vCPU", expected,
                        "set realtime.priority = 1 (libvirt's and tuned's figure)")]
    fix = "; ".join(c.command for c in kthread_changes(cfg, host))
    return [Finding("rt.kthreads", "warn",
                    ", ".join(f"{t.describe()}" for t in low) + f": not above the vCPUs' FIFO {prio}", expected,
                    f"{fix} ({PREPARE})")]
