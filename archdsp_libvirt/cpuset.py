"""CPU sets: ``frozenset[int]`` inside, ``"0-3,^2"`` strings only at the edges."""

from __future__ import annotations

import re
from collections.abc import Iterable

CpuSet = frozenset[int]
# Linux's largest CONFIG_NR_CPUS: a bound, so that "0-99999999" is an error and not 100 million ints.
MAX_CPU = 8191
_DIGITS = re.compile(r"[0-9]{1,12}")


def parse_cpuset(spec: str) -> CpuSet:
    """Parse libvirt/sysfs CPU list syntax: ``"0-3,^2,8"`` -> ``{0, 1, 3, 8}``.

    An empty or blank string is the empty set (sysfs writes ``isolated`` that way).
    """
    include: set[int] = set()
    exclude: set[int] = set()
    for raw in spec.replace("\n", "").split(","):
        part = raw.strip()
        if not part:
            continue
        target = include
        if part.startswith("^"):
            target = exclude
            part = part[1:].strip()
        lo, sep, hi = part.partition("-")
        # ASCII digits only: int() also takes other scripts' digits, "+1", "1_0" and spaces.
        if not _DIGITS.fullmatch(lo.strip()) or (sep and not _DIGITS.fullmatch(hi.strip())):
            raise ValueError(f"invalid CPU list {spec[:40]!r}: {raw.strip()[:20]!r} is not a number or range")
        first = int(lo)
        last = int(hi) if sep else first
        if first < 0 or last < first:
            raise ValueError(f"invalid CPU list {spec!r}: bad range {raw.strip()!r}")
        if last > MAX_CPU:
            raise ValueError(f"invalid CPU list {spec[:40]!r}: CPU {last} is above {MAX_CPU}")
        target.update(range(first, last + 1))
    return frozenset(include - exclude)


def format_cpuset(cpus: Iterable[int]) -> str:
    """Format a CPU set compactly: ``{0, 1, 2, 5}`` -> ``"0-2,5"``."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
