"""The VM's cores: online, isolated from the kernel's work, their SMT siblings and governors."""

from __future__ import annotations

from ...config import DspConfig
from ...cpuset import CpuSet, format_cpuset, parse_cpuset
from ..files import cmdline_cpus, cmdline_values
from ..findings import Finding
from ..model import HostModel


def check_cpus(cfg: DspConfig, model: HostModel) -> list[Finding]:
    out: list[Finding] = []
    wanted = frozenset(cfg.isolated_cores)
    cores = format_cpuset(wanted)
    host = model.files
    online = model.online_cpus
    kernel_isolated = model.isolated_cpus or frozenset()

    # Existence: a core that is not there is a VM that cannot be pinned.
    asked = wanted | frozenset(cfg.emulator_cores or ()) | frozenset(cfg.realtime.vhost_cores or ())
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
                + ([f"set isolated_cores/emulator_cores/realtime.vhost_cores to online cores (this host: {format_cpuset(online)})"]
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
