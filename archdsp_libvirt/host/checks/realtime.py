"""SCHED_FIFO for the vCPUs: the cgroup's RT budget and libvirtd's RT priority limit."""

from __future__ import annotations

import resource

from ...config import DspConfig
from ..files import Host
from ..findings import Finding, Status
from ..model import HostModel

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
