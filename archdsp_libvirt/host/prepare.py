"""``host prepare``: the runtime fixes of ``check``'s rows, made and undone (``apply``, ``undo``), and what
``scripts/host-services`` asks the package, so that the script keeps no copy of its logic.

``apply`` records each setting's and each thread's value before it in a state file and ``undo`` puts back
exactly that, for each change only while it is still what ``apply`` made it. Boot-time fixes are not
made here: ``host kernel-params`` prints them.

The script asks through the installed CLI, ``archdsp-virt host prepare ...`` (hidden plumbing, see
:mod:`archdsp_libvirt.cli.host`): whether the qemu.conf cgroup fix is needed, the line it writes, and
whether a recorded PID is still the daemon the script started.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
from msgspec import Struct

from ..config import DspConfig
from ..errors import HostError
from ..procs import Owned
from .checks import QEMU_CGROUP_LINE, rt_cgroup
from .files import Host
from .findings import Resched, Write
from .sched import SCHED_FIFO, Task, set_scheduler, task

__all__ = ["PREPARE_STATE", "QEMU_CGROUP_LINE", "apply", "needs_qemu_conf_fix", "plan", "still_ours", "undo"]


def needs_qemu_conf_fix(host: Host) -> tuple[bool, str]:
    """Whether SCHED_FIFO vCPUs need the qemu.conf fix (check's rt.cgroup is fail or warn), and
    ``"STATUS: what was seen"``: the verdict ``check`` reports, never a copy of it."""
    status, seen = rt_cgroup(host)
    return status != "ok", f"{status}: {seen}"


def still_ours(name: str, pid: int, start: int) -> bool:
    """Whether PID is still the NAME process that started at START (clock ticks since boot): a
    reused PID, or another program under it, is not."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == name and Owned(pid, start).alive()


# --- host prepare apply / undo: the runtime fixes of check's rows, each recorded so undo restores it ---------

PREPARE_STATE = "/run/archdsp-libvirt/host-prepare.json"


class WriteDone(Struct, frozen=True, tag="write"):
    """A kernel setting prepare changed: ``before`` is put back while it still reads ``set``."""

    path: str
    before: str
    set: str


class SchedDone(Struct, frozen=True, tag="sched"):
    """A thread prepare gave SCHED_FIFO ``set``: its policy and priority before, put back while it is
    still that thread (same start time) at FIFO ``set``."""

    pid: int
    comm: str
    start: int
    policy: int
    priority: int
    set: int


class PrepareState(Struct):
    changes: list[WriteDone | SchedDone] = []


def plan(cfg: DspConfig, host: Host) -> tuple[list[Write | Resched], list[str]]:
    """The runtime fixes ``cfg`` wants on ``host`` (what ``check``'s rows name), and notes: what is left to
    tuned's realtime-virtual-host where it is the active profile."""
    from .checks import runtime_changes
    from .checks.tuned import realtime_virtual_host

    changes = runtime_changes(cfg, host)
    notes = []
    profile = realtime_virtual_host(host)
    if profile:
        mine = [c for c in changes if not c.tuned]
        left = [c for c in changes if c.tuned]
        if left:
            notes.append(f"left to tuned (active profile {profile}, which sets them): "
                         + "; ".join(c.command for c in left))
        changes = mine
    return changes, notes


def _load(path: Path) -> PrepareState:
    try:
        return msgspec.json.decode(path.read_bytes(), type=PrepareState)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise HostError(f"{path}: cannot read what host prepare changed ({e}); nothing was undone") from None


def _save(path: Path, state: PrepareState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    os.replace(tmp, path)


def apply(cfg: DspConfig, host: Host, state_path: Path, dry_run: bool = False, say=print) -> int:
    """Make each runtime fix, recording what it was before in ``state_path`` (after every change, so an
    interrupted apply can still be undone). Returns how many changes were made. A change the kernel
    refuses is said and skipped. Refuses while an earlier apply is not undone."""
    if state_path.exists() and not dry_run:
        raise HostError(f"host prepare was applied already ({state_path}): run 'archdsp-virt host prepare undo' "
                        "first")
    changes, notes = plan(cfg, host)
    for note in notes:
        say(note)
    if not changes:
        say("nothing to change")
        return 0
    state = PrepareState()
    for c in changes:
        if dry_run:
            say(f"would run: {c.command}")
            continue
        try:
            if isinstance(c, Write):
                before = host.setting(c.path)
                if before is None:
                    continue
                host.set_setting(c.path, c.value)
                done: WriteDone | SchedDone = WriteDone(c.path, before, c.value)
                was = before
            else:
                t = task(host, c.pid)
                if t is None or t.start != c.start:
                    say(f"{c.comm} (pid {c.pid}): gone, left")
                    continue
                if t.policy not in (0, 1, 2, 3, 5):  # SCHED_DEADLINE: not ours to change
                    say(f"{c.comm} (pid {c.pid}): left at {t.sched()}")
                    continue
                set_scheduler(host, c.pid, SCHED_FIFO, c.priority)
                done = SchedDone(c.pid, c.comm, c.start, t.policy, t.priority, c.priority)
                was = t.sched()
        except OSError as e:
            say(f"could not: {c.command}: {e.strerror or e}")
            continue
        state.changes.append(done)
        _save(state_path, state)
        say(f"{c.command} (was {was})")
    if not dry_run:
        say(f"{len(state.changes)} changes recorded in {state_path}: 'archdsp-virt host prepare undo' puts them back")
    return len(state.changes)


def undo(host: Host, state_path: Path, say=print) -> bool:
    """Put back what :func:`apply` changed, last change first, each only while it is still what apply made it.
    Returns False when a restore was tried and failed (the state then keeps it for another try)."""
    if not state_path.exists():
        say(f"nothing to undo (no {state_path})")
        return True
    state = _load(state_path)
    kept: list[WriteDone | SchedDone] = []
    for d in reversed(state.changes):
        try:
            if isinstance(d, WriteDone):
                now = host.setting(d.path)
                if now != d.set:
                    say(f"{d.path}: left at {now}: changed since prepare set {d.set}")
                    continue
                host.set_setting(d.path, d.before)
                say(f"{d.path}: back to {d.before}")
            else:
                t = task(host, d.pid)
                if t is None or t.start != d.start:
                    say(f"{d.comm} (pid {d.pid}): gone, nothing to put back")
                    continue
                if not (t.policy == SCHED_FIFO and t.priority == d.set):
                    say(f"{d.comm} (pid {d.pid}): left at {t.sched()}: changed since prepare set FIFO {d.set}")
                    continue
                set_scheduler(host, d.pid, d.policy, d.priority)
                say(f"{d.comm} (pid {d.pid}): back to {Task(d.pid, d.comm, d.policy, d.priority, 0, d.start).sched()}")
        except OSError as e:
            say(f"could not put back {d}: {e.strerror or e}")
            kept.insert(0, d)
    if kept:
        _save(state_path, PrepareState(kept))
        return False
    state_path.unlink()
    return True
