"""``guest check``: the in-guest preflight, through the QEMU guest agent.

One probe (:func:`.guest.probe`) and plain functions over its sections: the kernel (PREEMPT_RT),
the NETJACK slave running with the config's link settings, jackd and cyclictest present, the
clocksource (``tsc``, with ``tsc_deadline_timer`` among the CPU flags), ``idle=`` or
cpuidle-haltpoll, threaded IRQs, the guest's own isolation of the core its DSP threads use (with
more than one vCPU), and the IRQ threads' priorities against the slave's. Each finding carries its
fix, as the host's ``check`` does (:class:`..host.findings.Finding`).
"""

from __future__ import annotations

from ..config import DspConfig
from ..cpuset import format_cpuset, parse_cpuset
from ..domain.contract import settings as contract_settings
from ..errors import AgentUnavailable, GuestAgentError
from ..host.findings import Finding
from . import agent
from .guest import first, is_realtime, probe, slaves

# The link settings a slave's argv carries, in the contract's keys (rate and period are the master's).
COMPARED = ("master", "port", "name", "latency", "channels", "sync")
RT_KERNEL_FIX = ("boot a PREEMPT_RT kernel in the guest (Debian: apt-get install linux-image-rt-amd64; "
                 "NixOS: boot.kernelPackages = pkgs.linuxPackages-rt_latest)")
UNIT_FIX = "in the guest: archdsp-virt guest unit CONFIG (a systemd unit for jackd -d net), then start it"


def _cmdline(sections) -> list[str]:
    return (first(sections, "cmdline") or "").split()


def _param(words: list[str], key: str) -> str | None:
    for w in reversed(words):
        if w == key or w.startswith(key + "="):
            return w.partition("=")[2] if "=" in w else ""
    return None


def _cpus(text: str | None) -> frozenset[int]:
    try:
        return parse_cpuset(text) if text and text.strip() else frozenset()
    except ValueError:
        return frozenset()


def check_kernel(sections) -> Finding:
    release = first(sections, "uname_r") or "unknown"
    if is_realtime(sections):
        return Finding("guest.kernel", "ok", f"{release} is PREEMPT_RT", "a PREEMPT_RT kernel")
    return Finding("guest.kernel", "warn", f"{release} is not PREEMPT_RT ({first(sections, 'uname_v') or '?'})",
                   "a PREEMPT_RT kernel", RT_KERNEL_FIX)


def check_slave(cfg: DspConfig, sections) -> Finding:
    want = contract_settings(cfg) or {}
    want = {k: want[k] for k in COMPARED if k in want}
    expected = " ".join(f"{k}={v}" for k, v in want.items())
    found = slaves(sections)
    if not found:
        return Finding("guest.slave", "fail", "no jackd -d net running", f"one NETJACK slave with {expected}", UNIT_FIX)
    s = found[0]
    wrong = {k: s.settings.get(k, "(default)") for k, v in want.items() if s.settings.get(k, _defaults(k)) != v}
    observed = f"pid {s.pid}: " + " ".join(f"{k}={v}" for k, v in sorted(s.settings.items()))
    if len(found) > 1:
        return Finding("guest.slave", "warn", f"{len(found)} slaves (pids {', '.join(str(x.pid) for x in found)})",
                       "one NETJACK slave", "stop the others: only one slave joins the master by this name")
    if wrong:
        return Finding("guest.slave", "fail", observed + "; differs: " + ", ".join(f"{k}={v}" for k, v in wrong.items()),
                       expected, "restart the slave with the domain's settings (the credential archdsp.netjack): "
                       "systemctl restart archdsp-netjack.service, or 'archdsp-virt up --restart CONFIG' for the "
                       "demo guest")
    return Finding("guest.slave", "ok", observed, expected)


def _defaults(key: str) -> str | None:
    """jackd -d net's own defaults, for an option the argv leaves out."""
    return {"port": "19000", "sync": "0", "latency": "5", "channels": "2"}.get(key)


def check_programs(sections) -> list[Finding]:
    have = dict(line.split(" ", 1) for line in sections.get("programs", []) if " " in line)
    out = []
    for prog, status, fix in (
            ("jackd", "fail", "install JACK2 in the guest (Debian: apt-get install jackd2; NixOS: pkgs.jack2)"),
            ("cyclictest", "warn", "install rt-tests in the guest (Debian: apt-get install rt-tests; "
                                   "NixOS: environment.systemPackages = [ pkgs.rt-tests ]): archdsp-virt rt-test runs it")):
        if prog in have:
            out.append(Finding(f"guest.{prog}", "ok", have[prog], f"{prog} on PATH"))
        else:
            out.append(Finding(f"guest.{prog}", status, f"no {prog} on PATH", f"{prog} on PATH", fix))
    return out


def check_clocksource(sections) -> list[Finding]:
    cur = first(sections, "clocksource") or "unknown"
    avail = first(sections, "clocksources") or ""
    flags = (first(sections, "flags") or "").split()
    out = []
    if cur == "tsc":
        out.append(Finding("guest.clocksource", "ok", "tsc", "tsc"))
    else:
        fix = ("add clocksource=tsc tsc=reliable to the guest's kernel command line" if "tsc" in avail.split() else
               "give the guest a stable TSC: under KVM the rendered host-passthrough CPU has it (invariant TSC); "
               "under TCG there is none")
        out.append(Finding("guest.clocksource", "warn", f"{cur} (available: {avail or 'unknown'})", "tsc", fix))
    if "tsc_deadline_timer" in flags:
        out.append(Finding("guest.tsc_deadline", "ok", "tsc_deadline_timer in /proc/cpuinfo", "tsc_deadline_timer"))
    else:
        out.append(Finding("guest.tsc_deadline", "warn", "no tsc_deadline_timer in /proc/cpuinfo" if flags else
                           "no CPU flags read", "tsc_deadline_timer (the local APIC timer in TSC-deadline mode)",
                           "run the domain under KVM with the rendered <cpu mode='host-passthrough'> and <feature "
                           "policy='require' name='tsc-deadline'/> (domain_type = \"auto\" or \"kvm\"); TCG has none"))
    return out


def check_idle(sections) -> Finding:
    words = _cmdline(sections)
    idle = _param(words, "idle")
    driver = first(sections, "cpuidle") or ""
    if idle is not None:
        return Finding("guest.idle", "ok", f"idle={idle} on the kernel command line", "idle=poll or cpuidle-haltpoll",
                       "")
    if driver == "haltpoll":
        return Finding("guest.idle", "ok", "cpuidle driver haltpoll", "idle=poll or cpuidle-haltpoll")
    return Finding("guest.idle", "warn", f"no idle= and cpuidle driver {driver or 'none'}",
                   "idle=poll or cpuidle-haltpoll: a halted vCPU wakes late (a VM exit and re-entry per wake-up)",
                   "load cpuidle-haltpoll in the guest (modprobe cpuidle-haltpoll; it polls before halting), or add "
                   "idle=poll to its command line (a vCPU that never halts: the host must not throttle it, "
                   "kernel.sched_rt_runtime_us = -1)")


def check_threadirqs(sections) -> Finding:
    if is_realtime(sections):
        return Finding("guest.threadirqs", "ok", "PREEMPT_RT threads every IRQ", "threaded IRQs")
    if _param(_cmdline(sections), "threadirqs") is not None:
        return Finding("guest.threadirqs", "ok", "threadirqs on the kernel command line", "threaded IRQs")
    return Finding("guest.threadirqs", "warn", "IRQs are not threaded", "threaded IRQs (their priority can be set)",
                   "add threadirqs to the guest's kernel command line (or boot a PREEMPT_RT kernel)")


def check_isolation(sections) -> Finding:
    ncpu = int(first(sections, "cpus") or "1") if (first(sections, "cpus") or "1").isdigit() else 1
    if ncpu <= 1:
        return Finding("guest.isolation", "skip", "one vCPU: the DSP threads have it to themselves",
                       "isolcpus/nohz_full of the DSP core (with more than one vCPU)")
    isolated = _cpus(first(sections, "isolated"))
    nohz = _cpus(first(sections, "nohz_full"))
    found = slaves(sections)
    aff = {}
    for line in sections.get("affinity", []):
        pid, _, cpus = line.partition(" ")
        if pid.isdigit():
            aff[int(pid)] = _cpus(cpus)
    dsp = aff.get(found[0].pid) if found else None
    observed = (f"{ncpu} vCPUs, isolated {format_cpuset(isolated) or '(none)'}, nohz_full "
                f"{format_cpuset(nohz) or '(none)'}" + (f", slave on {format_cpuset(dsp)}" if dsp else ""))
    expected = "the slave's core(s) in isolcpus and nohz_full, the slave pinned there"
    if isolated and dsp and dsp <= isolated and dsp <= nohz:
        return Finding("guest.isolation", "ok", observed, expected)
    core = format_cpuset(isolated) if isolated else str(ncpu - 1)
    return Finding("guest.isolation", "warn", observed, expected,
                   f"add isolcpus={core} nohz_full={core} rcu_nocbs={core} to the guest's kernel command line and "
                   f"run the slave there (taskset -c {core} jackd ..., or CPUAffinity={core} in its unit)")


def check_irq_threads(sections) -> Finding:
    found = slaves(sections)
    prio = None
    if found:
        argv = list(found[0].argv)
        for i, a in enumerate(argv[:-1]):
            if a in ("-P", "--realtime-priority") and argv[i + 1].isdigit():
                prio = int(argv[i + 1])
                break
            if a in ("-d", "--driver"):
                break
    threads = []
    for line in sections.get("irqthreads", []):
        parts = line.split()
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            threads.append((parts[0], int(parts[1]), int(parts[2])))
    net = [t for t in threads if "virtio" in t[0] and not t[0].endswith("-config")]  # the queues' threads
    if not threads:
        return Finding("guest.irq_threads", "skip", "no IRQ threads (IRQs not threaded)",
                       "virtio IRQ threads SCHED_FIFO above the slave")
    if not net:
        return Finding("guest.irq_threads", "skip", f"{len(threads)} IRQ threads, none of a virtio device",
                       "virtio IRQ threads SCHED_FIFO above the slave")
    floor = (prio or 0) + 1
    low = [t for t in net if t[2] not in (1, 2) or t[1] < floor]
    observed = ", ".join(f"{n} {'FIFO' if p == 1 else 'RR' if p == 2 else 'OTHER'} {r}" for n, r, p in net[:6])
    expected = f"SCHED_FIFO >= {floor} (above the slave's {prio})" if prio else "SCHED_FIFO"
    if low:
        return Finding("guest.irq_threads", "warn", observed, expected,
                       f"in the guest: chrt -f -p {floor + 4} PID for each irq/*virtio* thread (the demo init does: "
                       "its rtprio + 5)")
    return Finding("guest.irq_threads", "ok", observed, expected)


CHECK_PROBE_TIMEOUT = 60.0  # a preflight can wait longer for a slow guest (TCG) than status (guest.PROBE_TIMEOUT)


def findings(cfg: DspConfig, sections: dict[str, list[str]]) -> list[Finding]:
    """Every guest finding from the probe's sections, in a fixed order."""
    return [check_kernel(sections), check_slave(cfg, sections), *check_programs(sections),
            *check_clocksource(sections), check_idle(sections), check_threadirqs(sections),
            check_isolation(sections), check_irq_threads(sections)]


def run(cfg: DspConfig, session) -> list[Finding]:
    """The guest check of ``cfg``'s running domain: one agent finding, then (with an agent) the rest."""
    try:
        sections = probe(session, cfg.name, timeout=CHECK_PROBE_TIMEOUT)
    except AgentUnavailable as err:
        fix = agent.HOW_TO_ADD if agent.HOW_TO_ADD in str(err) else "start the domain: archdsp-virt up CONFIG"
        return [Finding("guest.agent", "fail", str(err), "a QEMU guest agent answering on org.qemu.guest_agent.0",
                        fix)]
    except GuestAgentError as err:
        return [Finding("guest.agent", "fail", str(err), "the guest agent runs the probe (guest-exec of /bin/sh)",
                        "check the agent's log in the guest; guest-exec must not be blocked (qemu-ga -b)")]
    return [Finding("guest.agent", "ok", "the guest agent answers", "a QEMU guest agent"), *findings(cfg, sections)]
