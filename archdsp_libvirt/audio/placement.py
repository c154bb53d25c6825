"""Where the host's audio server threads run: on the housekeeping cores, never on a vCPU's core.

A JACK or PipeWire thread on the core of a SCHED_FIFO vCPU takes that core from the guest
every period (both are real-time), and the guest misses its deadline: an xrun on both sides.
``check`` reports the placement of a running server (``audio.threads``); ``netjack start``
pins the jackd it starts to the housekeeping cores.
"""

from __future__ import annotations

import os

from msgspec import Struct

from ..cpuset import CpuSet, format_cpuset, parse_cpuset

SERVER_COMMS = ("jackd", "jackdbus", "pipewire")


class ServerThread(Struct, frozen=True):
    pid: int
    tid: int
    comm: str  # the process's name
    allowed: CpuSet


def server_threads(files, comms: tuple[str, ...] = SERVER_COMMS) -> list[ServerThread]:
    """Every thread of every running audio server process, with the cores it may run on.

    ``files`` is the host's file tree (host.files.Host); a process that goes away meanwhile is skipped.
    """
    out = []
    for entry in files.listdir("/proc"):
        if not entry.isdigit():
            continue
        comm = (files.read(f"/proc/{entry}/comm") or "").strip()
        if comm not in comms:
            continue
        for tid in files.listdir(f"/proc/{entry}/task"):
            status = files.read(f"/proc/{entry}/task/{tid}/status") or ""
            line = next((ln for ln in status.splitlines() if ln.startswith("Cpus_allowed_list:")), None)
            if line is None:
                continue
            try:
                allowed = parse_cpuset(line.split(":", 1)[1].strip())
            except ValueError:
                continue
            out.append(ServerThread(int(entry), int(tid), comm, allowed))
    return out


def pin_process(pid: int, cores: CpuSet) -> list[int]:
    """Set the affinity of every thread of ``pid`` (threads made later inherit it); the TIDs pinned."""
    pinned = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return pinned
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cores)
            pinned.append(int(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return pinned


def housekeeping_cores(vcpu_cores) -> CpuSet | None:
    """This machine's online cores minus the VM's: where the audio server belongs (None: no such core)."""
    online = _online() or frozenset(os.sched_getaffinity(0))
    rest = online - frozenset(vcpu_cores)
    return rest or None


def _online() -> CpuSet:
    try:
        with open("/sys/devices/system/cpu/online") as fh:
            return parse_cpuset(fh.read())
    except (OSError, ValueError):
        return frozenset()


def describe(threads: list[ServerThread], cores: CpuSet) -> str:
    """``jackd 1234: 3 of 7 threads may run on 1`` for the threads that reach ``cores``."""
    by_pid: dict[int, list[ServerThread]] = {}
    for t in threads:
        by_pid.setdefault(t.pid, []).append(t)
    parts = []
    for pid, ts in sorted(by_pid.items()):
        bad = [t for t in ts if t.allowed & cores]
        if bad:
            reach = frozenset().union(*(t.allowed & cores for t in bad))
            parts.append(f"{ts[0].comm} {pid}: {len(bad)} of {len(ts)} threads may run on {format_cpuset(reach)}")
    return "; ".join(parts)


def confine_self(vcpu_cores) -> CpuSet | None:
    """Keep this process's calling thread, and every thread and process it makes from now on (JACK
    clients' real-time threads, jack_iodelay, the bridge supervisor), off the VM's cores."""
    keep = housekeeping_cores(vcpu_cores)
    if keep:
        try:
            os.sched_setaffinity(0, keep)
        except OSError:
            return None
    return keep
