"""QEMU's threads as the kernel sees them: vCPU affinity, scheduling class, niceness.

Read from /proc (through an injectable root), never from the QEMU monitor:
a monitor command would mark the domain tainted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from msgspec import Struct

from ..cpuset import CpuSet, parse_cpuset

POLICIES = {0: "OTHER", 1: "FIFO", 2: "RR", 3: "BATCH", 5: "IDLE", 6: "DEADLINE"}
_VCPU_COMM = re.compile(r"^CPU (\d+)/(KVM|TCG|HVF|WHPX)$")


class Thread(Struct, frozen=True):
    tid: int
    comm: str
    affinity: CpuSet
    policy: str
    rt_priority: int
    nice: int
    processor: int

    @property
    def vcpu(self) -> int | None:
        m = _VCPU_COMM.match(self.comm)
        return int(m.group(1)) if m else None


def qemu_pid(name: str, run_dir: str = "/run/libvirt/qemu", proc: str = "/proc") -> int | None:
    """The PID of the QEMU process of domain ``name`` (libvirt's pid file), or None.

    The pid file is not trusted alone: a stale one may name a PID the kernel has given to another
    process. The PID counts only if it runs a ``qemu-system-*`` binary whose ``-name guest=NAME``
    is this domain.
    """
    try:
        pid = int(Path(run_dir, f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and is_qemu_of(pid, name, proc) else None


def _guest_name(value: str) -> str:
    """The guest name of QEMU's ``-name`` value (``guest=NAME,debug-threads=on``, or a plain
    ``NAME,...``); ``,,`` is an escaped comma."""
    rest = value.removeprefix("guest=")
    out, i = [], 0
    while i < len(rest):
        if rest[i] == ",":
            if rest[i + 1 : i + 2] != ",":
                break
            i += 1
        out.append(rest[i])
        i += 1
    return "".join(out)


def is_qemu_of(pid: int, name: str, proc: str = "/proc") -> bool:
    """Whether process ``pid`` is a QEMU system emulator running the domain ``name``."""
    try:
        argv = Path(proc, str(pid), "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [a.decode(errors="replace") for a in argv if a]
    if not args:
        return False  # a zombie, or a kernel thread
    try:
        exe = os.path.basename(os.readlink(Path(proc, str(pid), "exe")))
    except OSError:
        exe = ""
    exe = exe.removesuffix(" (deleted)")  # QEMU upgraded under a running VM
    if not (os.path.basename(args[0]).startswith("qemu-system-") or exe.startswith("qemu-system-")):
        return False
    for flag, value in zip(args, args[1:]):
        if flag == "-name":
            return _guest_name(value) == name
    return False


def read_thread(pid: int, tid: int, proc: str = "/proc") -> Thread | None:
    base = Path(proc, str(pid), "task", str(tid))
    try:
        comm = (base / "comm").read_text().rstrip("\n")
        stat = (base / "stat").read_text()
        status = (base / "status").read_text()
    except OSError:
        return None
    # Fields after the parenthesised comm: index 0 is field 3 (state).
    rest = stat[stat.rindex(")") + 2 :].split()
    nice = int(rest[16])
    processor = int(rest[36])
    rt_priority = int(rest[37])
    policy = POLICIES.get(int(rest[38]), rest[38])
    m = re.search(r"^Cpus_allowed_list:\s*(\S*)", status, re.M)
    affinity = parse_cpuset(m.group(1)) if m else frozenset()
    return Thread(tid, comm, affinity, policy, rt_priority, nice, processor)


def threads(pid: int, proc: str = "/proc") -> list[Thread]:
    """Every thread of process ``pid``."""
    try:
        tids = sorted(int(t) for t in os.listdir(Path(proc, str(pid), "task")))
    except OSError:
        return []
    return [t for t in (read_thread(pid, tid, proc) for tid in tids) if t is not None]


def vcpu_threads(pid: int, proc: str = "/proc") -> dict[int, Thread]:
    """vCPU index -> its thread (QEMU names them ``CPU n/KVM`` or ``CPU n/TCG``)."""
    return {t.vcpu: t for t in threads(pid, proc) if t.vcpu is not None}


def vhost_comm(pid: int) -> str:
    """The name of QEMU ``pid``'s vhost-net workers (a kernel thread, or from Linux 6.4 a thread of
    QEMU's own): placed apart, see :mod:`.vhost`."""
    return f"vhost-{pid}"


def emulator_threads(pid: int, proc: str = "/proc") -> list[Thread]:
    """QEMU's own threads: everything that is neither a vCPU nor a vhost-net worker."""
    return [t for t in threads(pid, proc) if t.vcpu is None and t.comm != vhost_comm(pid)]


def renice(tids: list[int], nice: int) -> None:
    """Set the niceness of each thread (Linux: PRIO_PROCESS on a TID is per thread)."""
    for tid in tids:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
