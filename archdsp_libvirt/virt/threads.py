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


def qemu_pid(name: str, run_dir: str = "/run/libvirt/qemu") -> int | None:
    """The PID of the QEMU process of domain ``name`` (libvirt's pid file), or None."""
    try:
        return int(Path(run_dir, f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None


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


def emulator_threads(pid: int, proc: str = "/proc") -> list[Thread]:
    """QEMU's own threads: everything that is not a vCPU."""
    return [t for t in threads(pid, proc) if t.vcpu is None]


def renice(tids: list[int], nice: int) -> None:
    """Set the niceness of each thread (Linux: PRIO_PROCESS on a TID is per thread)."""
    for tid in tids:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
