"""Where the host's audio server threads run: on the housekeeping cores, never on a vCPU's core.

A JACK or PipeWire thread on the core of a SCHED_FIFO vCPU takes that core from the guest
every period (both are real-time), and the guest misses its deadline: an xrun on both sides.
``check`` reports the placement of a running server (``audio.threads``); ``netjack start``
pins the jackd it starts to the housekeeping cores.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..cpuset import CpuSet

if TYPE_CHECKING:
    from ..host.model import HostModel


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


def housekeeping_cores(model: HostModel, vcpu_cores) -> CpuSet | None:
    """The host's housekeeping cores as ``model`` counts them (online, not the VM's, not
    kernel-isolated): where the audio server belongs (None: no such core, or unknown)."""
    return model.housekeeping(frozenset(vcpu_cores)) or None


def confine_self(model: HostModel, vcpu_cores) -> CpuSet | None:
    """Keep this process's calling thread, and every thread and process it makes from now on (JACK
    clients' real-time threads, jack_iodelay, the bridge supervisor), off the VM's cores."""
    keep = housekeeping_cores(model, vcpu_cores)
    if keep:
        try:
            os.sched_setaffinity(0, keep)
        except OSError:
            return None
    return keep
