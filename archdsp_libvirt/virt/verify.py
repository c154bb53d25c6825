"""After the start: renice QEMU's emulator threads, place the network data path's vhost threads, and
check that every vCPU runs where and how the config says, from /proc on this machine, from libvirt's
own report on a remote host."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..config import DspConfig
from ..cpuset import format_cpuset
from ..domain.policy import TAP_KINDS, Plan
from ..errors import HostError
from . import threads as qthreads
from . import vhost
from .connection import Session
from .inspect import vcpu_placement

Say = Callable[[str], None]

RENICE_LOOKS = 5  # looks at QEMU's emulator threads until none is left at another nice


def verify_remote(cfg: DspConfig, plan: Plan, session: Session, say: Say) -> None:
    """The vCPU check for a host we cannot read: affinity and scheduler as libvirt reports them."""
    placement = {p.vcpu: p for p in vcpu_placement(session, cfg.name)}
    problems = []
    for pin in plan.pins:
        p = placement.get(pin.vcpu)
        if p is None:
            problems.append(f"libvirt reports no vCPU {pin.vcpu}")
            continue
        want_fifo = pin.vcpu in plan.fifo_vcpus
        say(f"vCPU {pin.vcpu}: on CPU {p.cpu}, affinity {format_cpuset(p.affinity)}, scheduler "
            f"{p.scheduler or 'default'}{f' priority {p.priority}' if p.priority is not None else ''} (from libvirt)")
        if p.affinity != pin.cpus:
            problems.append(f"vCPU {pin.vcpu} may run on {format_cpuset(p.affinity)}, "
                            f"config pins it to {format_cpuset(pin.cpus)}")
        if want_fifo and (p.scheduler != "fifo" or p.priority != cfg.realtime.priority):
            problems.append(f"vCPU {pin.vcpu} runs {p.scheduler or 'default'} priority {p.priority}, "
                            f"config wants fifo priority {cfg.realtime.priority}")
    if cfg.realtime.enable:
        say(f"emulator threads' nice {cfg.realtime.nice}: not set (libvirt has no call for it; "
            "run 'archdsp-virt up' on that host to renice them)")
    if any(n.vhost for n in plan.nics):
        say("network data path (vhost threads): not placed (they run on that host and libvirt has no call "
            "for them; run 'archdsp-virt up' on that host to place them)")
    if problems:
        raise HostError("the running domain does not match the config: " + "; ".join(problems))


def _renice_emulator(cfg: DspConfig, pid: int, proc: str, say: Say) -> None:
    # QEMU starts threads of its own while it boots, and one started by a thread not yet reniced keeps
    # nice 0: look again until a look finds none left (a few looks, 0.1 s apart).
    for _ in range(RENICE_LOOKS):
        left = [t.tid for t in qthreads.emulator_threads(pid, proc) if t.nice != cfg.realtime.nice]
        if not left:
            break
        try:
            qthreads.renice(left, cfg.realtime.nice)
        except ProcessLookupError:
            pass  # a thread that ended meanwhile; the next look renices the rest
        except OSError as exc:
            raise HostError(
                f"cannot set nice {cfg.realtime.nice} on QEMU's emulator threads: {exc.strerror} "
                "(run as root, or set realtime.nice to 0)"
            ) from None
        time.sleep(0.1)
    emu = qthreads.emulator_threads(pid, proc)
    say(f"emulator threads ({len(emu)}) at nice {cfg.realtime.nice}")


def _place_vhost(plan: Plan, pid: int, proc: str, vhost_dev: str, say: Say,
                 sched: vhost.Sched | None = None) -> list[str]:
    """Pin and schedule the vhost threads of QEMU ``pid`` as the plan says, or say why there are none;
    what differs after the read-back."""
    found = vhost.find(pid, proc)
    if not found:
        taps = sum(1 for n in plan.nics if n.kind in TAP_KINDS)
        say("network data path: " + vhost.why_none(pid, plan.domain_type, taps, os.path.exists(vhost_dev)))
        return []
    now, problems = vhost.tune(found, plan.vhost, proc, sched)
    for nt in now:
        say(f"network data path: {vhost.describe(nt.as_dict())} (wanted: {vhost.wanted(plan.vhost)})")
    return problems


def tune_and_verify(cfg: DspConfig, plan: Plan, say: Say, timeout: float = 30.0,
                    proc: str = "/proc", run_dir: str = "/run/libvirt/qemu", vhost_dev: str = vhost.VHOST_DEV,
                    sched: vhost.Sched | None = None) -> None:
    """Renice QEMU's emulator threads; place the vhost threads; check every vCPU thread's affinity and
    class."""
    deadline = time.monotonic() + timeout
    vcpus: dict[int, qthreads.Thread] = {}
    pid = None
    while time.monotonic() < deadline:
        pid = qthreads.qemu_pid(cfg.name, run_dir, proc)
        if pid is not None:
            vcpus = qthreads.vcpu_threads(pid, proc)
            if len(vcpus) >= len(plan.pins):
                break
        time.sleep(0.2)
    if pid is None:
        raise HostError(f"{cfg.name}: no QEMU process found ({run_dir}/{cfg.name}.pid)")
    if len(vcpus) < len(plan.pins):
        raise HostError(f"{cfg.name}: found {len(vcpus)} vCPU threads in QEMU (pid {pid}), expected {len(plan.pins)}")
    if cfg.realtime.enable:
        _renice_emulator(cfg, pid, proc, say)
    problems = _place_vhost(plan, pid, proc, vhost_dev, say, sched)

    for pin in plan.pins:
        t = vcpus[pin.vcpu]
        want_policy = "FIFO" if pin.vcpu in plan.fifo_vcpus else None
        line = (f"vCPU {pin.vcpu}: thread {t.tid} affinity {format_cpuset(t.affinity)} "
                f"class {t.policy} rtprio {t.rt_priority}")
        if t.affinity != pin.cpus:
            problems.append(f"vCPU {pin.vcpu} thread {t.tid} may run on {format_cpuset(t.affinity)}, "
                            f"config pins it to {format_cpuset(pin.cpus)}")
        if want_policy and (t.policy != want_policy or t.rt_priority != cfg.realtime.priority):
            problems.append(f"vCPU {pin.vcpu} thread {t.tid} runs {t.policy} rtprio {t.rt_priority}, "
                            f"config wants FIFO rtprio {cfg.realtime.priority}")
        say(line)
    if problems:
        raise HostError("the running domain does not match the config: " + "; ".join(problems))
