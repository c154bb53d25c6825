"""``audio.threads``: a running JACK or PipeWire server's threads on the housekeeping cores only."""

from __future__ import annotations

from ..audio.placement import describe, server_threads
from ..config import DspConfig
from ..cpuset import format_cpuset
from .checks import Finding
from .model import HostModel


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
