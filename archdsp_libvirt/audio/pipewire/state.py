"""The PipeWire bridge's records under /run: its state and its supervisor's status."""

from __future__ import annotations

from msgspec import Struct

from ...procs import Owned
from ..records import BridgeState, Seen

NAME = "pipewire"  # the registry's key, and the state file's audio_server


class Joined(Struct, kw_only=True):
    """The user's PipeWire the bridge joined."""

    remote: str
    user: str | None = None
    how: str = "?"
    version: str = "?"


class PipeWireState(BridgeState, kw_only=True):
    audio_server: str = NAME
    pipewire: Joined
    nft_table: str | None = None  # the nftables table guarding a manager on every address
    interface: str | None = None  # master_ip's interface
    allow_any_address: bool = False


class Node(Struct, kw_only=True):
    id: int
    name: str
    slave: str | None = None
    state: str | None = None


class Queue(Struct, kw_only=True):
    """A data socket of the manager (one per slave) and the bound on its receive queue."""

    remote: str = "?"
    queued: int = 0
    bound: int | None = None
    drops: int = 0
    raised: int = 0


class Joins(Struct, kw_only=True):
    new: int = 0
    let_go: int = 0
    refused: int = 0
    held: int = 0  # let-gos of a live pair held back (at most one per address per joins.LET_GO_EVERY)


class PipeWireSeen(Seen, kw_only=True):
    pairs: int = 0
    nodes: list[Node] = []
    manager: Owned | None = None
    restarts: int = 0
    queues: list[Queue] = []
    queue_problem: str | None = None
    listening: list[str] = []  # the manager's port as /proc/PID/net/udp shows it bound
    joins: Joins | None = None
    restarts_held: str | None = None  # "restarts held back: ..." while the restart limit holds them
