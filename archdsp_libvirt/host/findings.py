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
