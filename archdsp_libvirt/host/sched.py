"""Kernel threads and their scheduling: read from ``/proc/PID/stat``, changed with ``sched_setscheduler``.

``tasks(files, match)`` lists the processes whose name ``match`` accepts, with the policy and
priority the kernel reports (``/proc/PID/stat`` fields 40 and 41, what ``chrt -p`` shows), their
nice value, start time and the cores they may run on. ``set_scheduler`` is ``chrt -p``: on this
machine it calls :func:`os.sched_setscheduler`; on a fake host tree it rewrites the tree's
``/proc/PID/stat`` as the kernel would then show it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from msgspec import Struct

from ..cpuset import CpuSet, parse_cpuset

SCHED_OTHER, SCHED_FIFO, SCHED_RR = 0, 1, 2
POLICY_NAMES = {0: "SCHED_OTHER", 1: "SCHED_FIFO", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
                6: "SCHED_DEADLINE"}
# Field numbers of /proc/PID/stat (proc(5)), counted from 1 as the manual does.
_NICE, _START, _RT_PRIORITY, _POLICY = 19, 22, 40, 41


class Task(Struct, frozen=True):
    pid: int
    comm: str
    policy: int
    priority: int  # the RT priority (0 for the normal policies)
    nice: int
    start: int  # clock ticks since boot: a reused PID has another
    allowed: CpuSet | None = None

    @property
    def realtime(self) -> bool:
        return self.policy in (SCHED_FIFO, SCHED_RR)

    def sched(self) -> str:
        """``FIFO 2`` or ``SCHED_OTHER``."""
        return f"{POLICY_NAMES[self.policy][6:]} {self.priority}" if self.realtime \
            else POLICY_NAMES.get(self.policy, f"policy {self.policy}")

    def describe(self) -> str:
        return f"{self.comm} (pid {self.pid}) {self.sched()}"


def _fields(text: str) -> tuple[str, list[str]] | None:
    """(comm, fields) of a stat line; ``fields[n]`` is field number n (1-based) and n >= 3."""
    head, sep, rest = text.rpartition(")")
    if not sep or "(" not in head:
        return None
    return head.partition("(")[2], ["", "", ""] + rest.split()


def task(files, pid: int) -> Task | None:
    """The process ``pid`` as ``files`` (host.files.Host) shows it; None when it is gone or unreadable."""
    parsed = _fields(files.read(f"/proc/{pid}/stat") or "")
    if parsed is None:
        return None
    comm, f = parsed
    try:
        policy, prio, nice, start = int(f[_POLICY]), int(f[_RT_PRIORITY]), int(f[_NICE]), int(f[_START])
    except (IndexError, ValueError):
        return None
    allowed = None
    for line in (files.read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            try:
                allowed = parse_cpuset(line.split(":", 1)[1].strip())
            except ValueError:
                allowed = None
    return Task(pid, comm, policy, prio, nice, start, allowed)


def tasks(files, match: Callable[[str], bool]) -> list[Task]:
    """Every process whose name ``match`` accepts (kernel threads are processes of their own), by PID."""
    out = []
    for entry in files.listdir("/proc"):
        if not entry.isdigit():
            continue
        comm = (files.read(f"/proc/{entry}/comm") or "").strip()
        if match(comm) and (t := task(files, int(entry))) is not None:
            out.append(t)
    return sorted(out, key=lambda t: t.pid)


def set_scheduler(files, pid: int, policy: int, priority: int) -> None:
    """``chrt -p``: give ``pid`` ``policy`` at ``priority`` (raises OSError). The nice value stays."""
    if files.is_this_machine:
        os.sched_setscheduler(pid, policy, os.sched_param(priority))
        return
    path = f"/proc/{pid}/stat"
    parsed = _fields(files.read(path) or "")
    if parsed is None:
        raise FileNotFoundError(2, "no such process", path)
    comm, f = parsed
    f[_POLICY], f[_RT_PRIORITY] = str(policy), str(priority)
    files.write(path, f"{pid} ({comm}) {' '.join(f[3:])}\n")
