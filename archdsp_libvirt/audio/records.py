"""The bridge's files under /run as typed records.

A bridge start writes its state (what it started, by PID and start time, and the link it serves);
its supervisor, another process, writes what it sees once a second (the status). Both are JSON
read back by other processes, so both are decoded into these records: a file that is not what
this version writes is one line naming the file, never a missing key deep in a status screen.
Each backend extends :class:`BridgeState` and :class:`Seen` with its own fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, TypeVar

import msgspec
from msgspec import Struct

from ..errors import BridgeError
from ..procs import Owned

T = TypeVar("T", bound=Struct)


class BridgeState(Struct, kw_only=True):
    """What ``netjack start`` started and for which link (``netjack-NAME.json``)."""

    WHAT: ClassVar[str] = "bridge state"
    FIX: ClassVar[str] = ("stop the processes it names by hand (or reboot), then remove the file; "
                          "'archdsp-virt netjack start CONFIG' writes a new one")

    domain: str
    audio_server: str
    server: str
    supervisor: Owned | None = None
    master_ip: str
    port: int
    slave: str
    channels: int
    started: float


class Kind(Struct):
    """The first look at a state file: which backend wrote it (None: a state file from before the
    backends were named, which only one of them wrote)."""

    WHAT: ClassVar[str] = BridgeState.WHAT
    FIX: ClassVar[str] = BridgeState.FIX

    audio_server: str | None = None


class Seen(Struct, kw_only=True):
    """What a supervisor saw last (``netjack-NAME.status.json``), rewritten about once a second."""

    WHAT: ClassVar[str] = "bridge status"
    FIX: ClassVar[str] = "remove the file: the bridge's supervisor writes it again within a second"

    server: str = "running"  # "running", or "gone" when the audio server went away
    link: str = "down"
    slave: str | None = None
    ignored: list[str] = []
    ports: dict[str, str] = {}
    xruns: int | None = 0
    updated: float = 0.0
    since: float | None = None
    link_changed: float | None = None
    problem: str | None = None


def read_record(path: Path, kind: type[T]) -> T | None:
    """The record in ``path``; None when there is none (or it cannot be read); :class:`BridgeError`
    naming the file when it holds something else."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        return msgspec.json.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        what = getattr(kind, "WHAT", "bridge file")
        fix = getattr(kind, "FIX", "remove it")
        detail = " ".join(str(exc).split())[:200]
        raise BridgeError(f"{path}: not a {what} this version reads ({detail}): {fix}") from None


def write_record(path: Path, record: Struct) -> None:
    """Write ``record`` as JSON, atomically (a reader sees the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(record), indent=2) + b"\n")
    tmp.replace(path)
