"""``audio.threads``: a running JACK or PipeWire server's threads on the housekeeping cores only."""

from __future__ import annotations

from msgspec import Struct

from ..config import DspConfig
from ..cpuset import CpuSet, format_cpuset, parse_cpuset
from .findings import Finding
from .model import HostModel

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


def check_audio_threads(cfg: DspConfig, model: HostModel) -> list[Finding]:
    vcpus = frozenset(cfg.isolated_cores)
    expected = f"audio server threads off the vCPU cores ({format_cpuset(vcpus)})"
    if model.files is None:
        return [Finding("audio.threads", "skip", model.unknown("where the audio server's threads run"), expected)]
    threads = server_threads(model.files)
    if not threads:
        return [Finding("audio.threads", "ok", "no JACK or PipeWire server runs", expected)]
    servers = sorted({f"{t.comm} {t.pid}" for t in threads})
    bad = [t for t in threads if t.allowed & vcpus]
    if not bad:
        return [Finding("audio.threads", "ok", f"{', '.join(servers)}: every thread off the vCPU cores", expected)]
    keep = model.housekeeping(vcpus)
    cores = format_cpuset(keep) if keep else "HOUSEKEEPING"
    pids = sorted({t.pid for t in bad})
    fix = "; ".join(f"taskset -a -p -c {cores} {pid}" for pid in pids)
    return [Finding("audio.threads", "warn",
                    describe(threads, vcpus) + " (they preempt the SCHED_FIFO vCPU: xruns)", expected,
                    fix + " (archdsp-virt netjack start --server pins the jackd it starts)")]
