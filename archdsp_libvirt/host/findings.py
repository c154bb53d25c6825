"""A finding: one host condition, its status and the exact fix."""

from __future__ import annotations

from typing import Literal

from msgspec import Struct

Status = Literal["ok", "warn", "fail", "skip"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "skip")


class Finding(Struct, frozen=True):
    """One host condition: ``fix`` is the exact command or kernel parameter ("" when ok)."""

    id: str
    status: Status
    observed: str
    expected: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")


class Write(Struct, frozen=True):
    """A runtime fix ``host prepare`` can make and undo: ``value`` into the kernel setting ``path``.

    ``tuned`` is set when tuned's realtime-virtual-host profile sets the same knob (prepare leaves
    it to tuned where that profile is active).
    """

    path: str
    value: str
    tuned: bool = False

    @property
    def command(self) -> str:
        return f"echo {self.value} > {self.path}"


class Resched(Struct, frozen=True):
    """A runtime fix ``host prepare`` can make and undo: ``chrt -f -p PRIORITY PID`` for one thread."""

    pid: int
    comm: str
    start: int  # the thread's start time: a reused PID is not changed back
    priority: int
    tuned: bool = False

    @property
    def command(self) -> str:
        return f"chrt -f -p {self.priority} {self.pid}"
