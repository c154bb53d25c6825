"""The JACK2 bridge's records under /run: its state, its supervisor's status and the stale slaves."""

from __future__ import annotations

import re
from typing import ClassVar

from msgspec import Struct

from ...procs import Owned
from ..records import BridgeState, Seen

NAME = "jack"  # the registry's key, and the state file's audio_server


class JackState(BridgeState, kw_only=True):
    audio_server: str = NAME
    server_process: Owned | None = None  # a jackd the bridge started (stopped with it)
    server_kind: str | None = None       # the driver it was started with (--server)
    device: str = "hw:0"
    nperiods: int = 2
    hooked: bool = False                 # our jackd runs under the bind hook its supervisor answers
    nft_table: str | None = None         # the nftables table guarding a master on every address
    interface: str | None = None         # master_ip's interface (what the table keeps the port to)
    allow_any_address: bool = False


class JackSeen(Seen, kw_only=True):
    clients: list[str] = []  # every client that may be the slave (NAME, NAME-01, ...)


class Stale(Struct):
    """Slave clients marked stale (their VM is gone or restarting): the aliases follow another."""

    WHAT: ClassVar[str] = "list of stale NETJACK slaves"
    FIX: ClassVar[str] = "remove the file"

    stale: list[str] = []


_SLAVE_PORT = re.compile(r"^(?P<client>[^:]+):(?P<dir>to|from)_slave_(?P<n>\d+)$")


def slave_clients(port_names: list[str], slave: str) -> dict[str, set[str]]:
    """Clients that may be the slave: ``dsp``, or ``dsp-01`` as JACK renames a second ``dsp``."""
    out: dict[str, set[str]] = {}
    for name in port_names:
        m = _SLAVE_PORT.match(name)
        if m and re.fullmatch(re.escape(slave) + r"(-\d{2,})?", m["client"]):
            out.setdefault(m["client"], set()).add(name)
    return out
