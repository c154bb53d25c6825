"""The network data path: the vhost-net worker threads of a QEMU process, found after the start,
pinned and scheduled as the plan says (:class:`~archdsp_libvirt.domain.policy.VhostTuning`), read back.

Under KVM with ``/dev/vhost-net``, virtio-net on a tap device (libvirt's network and bridge NICs)
runs in the kernel, in a worker named ``vhost-<QEMU PID>`` (one per vhost device: per NIC and
queue pair): a kernel thread, a child of kthreadd, on kernels before 6.4; a thread of the QEMU
process itself (vhost_task) from 6.4 on. libvirt has no element for it, QEMU's emulator pin does
not reliably cover it, and the audio crosses it on every period: it is placed here, after the start.

Where there is none the reason is said: TCG (libvirt opens vhost-net only for KVM guests), no NIC
on a tap device, no ``/dev/vhost-net``. Everything is read from /proc through an injectable root;
the system calls go through :class:`Sched`, which a test may replace.
"""

from __future__ import annotations

import os
from pathlib import Path

from msgspec import Struct

from ..cpuset import CpuSet, format_cpuset
from ..domain.policy import VhostTuning
from . import threads as qthreads

VHOST_DEV = "/dev/vhost-net"
TAP_TYPES = ("network", "bridge", "ethernet", "direct")  # libvirt interfaces on a tap (or macvtap) device
KTHREADD = 2


class NetworkThread(Struct, frozen=True):
    """One vhost worker: ``owner`` is the process whose task list holds it (QEMU, or the kernel
    thread itself), ``kind`` "qemu thread" (vhost_task) or "kernel thread"."""

    thread: qthreads.Thread
    owner: int
    kind: str

    @property
    def tid(self) -> int:
        return self.thread.tid

    def as_dict(self) -> dict:
        t = self.thread
        return {"tid": t.tid, "comm": t.comm, "kind": self.kind, "cpus": format_cpuset(t.affinity),
                "cpu": t.processor, "policy": t.policy, "priority": t.rt_priority, "nice": t.nice}


def _ppid(pid: int, proc: str) -> int | None:
    try:
        for line in Path(proc, str(pid), "status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def find(pid: int, proc: str = "/proc") -> list[NetworkThread]:
    """The vhost workers of QEMU process ``pid``: its own threads named ``vhost-PID`` (Linux >= 6.4),
    else the kernel threads of that name."""
    name = qthreads.vhost_comm(pid)
    own = [NetworkThread(t, pid, "qemu thread") for t in qthreads.threads(pid, proc) if t.comm == name]
    if own:
        return own
    found = []
    try:
        entries = sorted(int(e) for e in os.listdir(proc) if e.isdigit())
    except OSError:
        return []
    for n in entries:
        try:
            comm = Path(proc, str(n), "comm").read_text().rstrip("\n")
        except OSError:
            continue  # gone meanwhile
        if comm != name or _ppid(n, proc) != KTHREADD:
            continue
        t = qthreads.read_thread(n, n, proc)
        if t is not None:
            found.append(NetworkThread(t, n, "kernel thread"))
    return found


def why_none(pid: int, domain_type: str | None, taps: int, dev: bool | None, qemu_driver: bool = False) -> str:
    """Why QEMU ``pid`` has no vhost worker: ``domain_type`` as libvirt's <domain type>, ``taps`` its NICs
    on a tap device, ``dev`` whether /dev/vhost-net is there (None: unknown), ``qemu_driver`` whether
    every such NIC asks for QEMU's own virtio-net (<driver name='qemu'/>)."""
    why = []
    if domain_type != "kvm":
        why.append("TCG cannot use it" if domain_type in ("qemu", "tcg") else f"a {domain_type} domain cannot use it")
    if not taps:
        why.append("no network or bridge NIC (user-mode networking runs in QEMU or passt)")
    elif qemu_driver:
        why.append("the NIC asks for QEMU's own virtio-net (<driver name='qemu'/>)")
    if dev is False:
        why.append(f"{VHOST_DEV} absent")
    if not why:
        why.append(f"no thread {qthreads.vhost_comm(pid)} in QEMU (pid {pid}) nor among the kernel threads: "
                   "virtio-net runs in QEMU's main loop")
    return "no vhost: " + "; ".join(why)


class Sched:
    """The system calls that place a thread (this machine's kernel; a test passes its own)."""

    def setaffinity(self, tid: int, cpus: CpuSet) -> None:
        os.sched_setaffinity(tid, cpus)

    def setscheduler(self, tid: int, policy: str, priority: int) -> None:
        os.sched_setscheduler(tid, os.SCHED_FIFO if policy == "FIFO" else os.SCHED_OTHER, os.sched_param(priority))

    def setnice(self, tid: int, nice: int) -> None:
        os.setpriority(os.PRIO_PROCESS, tid, nice)


def wanted(tuning: VhostTuning) -> str:
    """The tuning in words: ``CPUs 0-1, FIFO 4`` / ``SCHED_OTHER nice -20``."""
    where = f"CPUs {format_cpuset(tuning.cpus)}" if tuning.cpus else "CPUs as the kernel chose"
    if tuning.priority:
        return f"{where}, FIFO {tuning.priority}"
    return f"{where}, " + (f"SCHED_OTHER nice {tuning.nice}" if tuning.nice is not None else "scheduling unchanged")


def tune(found: list[NetworkThread], tuning: VhostTuning, proc: str = "/proc",
         sched: Sched | None = None) -> tuple[list[NetworkThread], list[str]]:
    """Place each vhost worker as ``tuning`` says, then read it back from /proc: the threads as the
    kernel has them now, and what differs from ``tuning`` (or could not be set)."""
    sched = sched or Sched()
    now, problems = [], []
    for nt in found:
        tid = nt.tid
        try:
            if tuning.cpus:
                sched.setaffinity(tid, tuning.cpus)
            if tuning.priority:
                sched.setscheduler(tid, "FIFO", tuning.priority)
            elif tuning.nice is not None:
                sched.setscheduler(tid, "OTHER", 0)
                sched.setnice(tid, tuning.nice)
        except ProcessLookupError:
            problems.append(f"vhost thread {tid} ended before it was placed")
            continue
        except OSError as exc:
            fix = " (run as root)" if isinstance(exc, PermissionError) else (
                " (its cpuset cgroup may not allow those cores: name cores in QEMU's cpuset, or leave "
                "realtime.vhost_cores out)" if tuning.cpus else "")
            problems.append(f"vhost thread {tid}: cannot set {wanted(tuning)}: {exc.strerror}{fix}")
            failed = True
        else:
            failed = False
        back = qthreads.read_thread(nt.owner, tid, proc)
        if back is None:
            problems.append(f"vhost thread {tid} ended before it was read back")
            continue
        now.append(NetworkThread(back, nt.owner, nt.kind))
        if not failed:
            problems.extend(_differs(back, tuning))
    return now, problems


def _differs(t: qthreads.Thread, tuning: VhostTuning) -> list[str]:
    out = []
    if tuning.cpus and t.affinity != tuning.cpus:
        out.append(f"vhost thread {t.tid} may run on {format_cpuset(t.affinity)}, "
                   f"the config places it on {format_cpuset(tuning.cpus)}")
    if tuning.priority and (t.policy != "FIFO" or t.rt_priority != tuning.priority):
        out.append(f"vhost thread {t.tid} runs {t.policy} rtprio {t.rt_priority}, "
                   f"the config wants FIFO {tuning.priority}")
    elif not tuning.priority and tuning.nice is not None and (t.policy != "OTHER" or t.nice != tuning.nice):
        out.append(f"vhost thread {t.tid} runs {t.policy} nice {t.nice}, "
                   f"the config wants SCHED_OTHER nice {tuning.nice}")
    return out


def describe(d: dict) -> str:
    """One line of :meth:`NetworkThread.as_dict`:
    ``vhost-4242 thread 4250 (qemu thread): CPUs 0-1, on CPU 0, FIFO rtprio 4, nice 0``."""
    return (f"{d['comm']} thread {d['tid']} ({d['kind']}): CPUs {d['cpus']}, on CPU {d['cpu']}, "
            f"{d['policy']} rtprio {d['priority']}, nice {d['nice']}")
