"""JACK2's NETJACK master (``netmanager``) in a jackd: loaded, proven where it listens from the kernel's
table, unloaded. JACK2 binds the master's port on every address whatever ``-a`` says: a jackd the bridge
starts runs under the bind hook (:mod:`..bindhook`), one it joins is refused while its master is on every
address, unless ``--allow-any-address`` keeps the port behind an nftables table (:mod:`..guard`)."""

from __future__ import annotations

import subprocess
import time
from typing import TYPE_CHECKING

from ...errors import BridgeError
from ...procs import Owned, child_env
from .. import guard, sockets

if TYPE_CHECKING:
    from ...host.model import HostModel
    from ..link import Link


def jack_env(server: str) -> dict[str, str]:
    """Environment for JACK tools: this server, never auto-started, no D-Bus device reservation."""
    return child_env({"JACK_DEFAULT_SERVER": server, "JACK_NO_START_SERVER": "1",
                      "JACK_NO_AUDIO_RESERVATION": "1"})


def jack_tool(argv: list[str], server: str, timeout: float = 15) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=jack_env(server))
    except subprocess.TimeoutExpired:
        raise BridgeError(f"{argv[0]} did not finish within {timeout:g} s") from None


def port_names(server: str) -> list[str]:
    """Every port the JACK server has now (``jack_lsp``); empty when it does not answer."""
    try:
        r = jack_tool(["jack_lsp"], server, timeout=10)
    except BridgeError:
        return []
    return r.stdout.splitlines() if r.returncode == 0 else []


def load(server: str, master_ip: str, port: int) -> str:
    """(Re)load JACK2's netmanager bound to ``master_ip:port``; retried briefly while an unloaded
    master still holds the port."""
    jack_tool(["jack_unload", "netmanager", server], server)  # a master from an earlier run
    options = f"-a {master_ip} -p {port}"
    out = ""
    for _attempt in range(20):
        loaded = jack_tool(["jack_load", "-s", server, "netmanager", "-i", options], server)
        if loaded.returncode == 0:
            return options
        out = (loaded.stderr or loaded.stdout).strip()[-300:]
        time.sleep(0.5)
    raise BridgeError(f"cannot load the NETJACK master on {master_ip}:{port}: {out}")


def where_bound(server_process: Owned | None, port: int) -> list[str]:
    """Where the master's port is bound, as the kernel says: the sockets of the jackd the bridge started,
    else (a server it joined, whose PID it does not know) every socket on the port."""
    if server_process is not None:
        return sockets.listening(server_process.pid, port)
    return sockets.bound(port)


def verify(link: Link, owned_server: Owned | None, hooked: bool, allow_any: bool, model: HostModel,
           server: str, say) -> tuple[str | None, str | None]:
    """Where the loaded master listens, read from the kernel: master_ip alone, or (``allow_any``) every
    address behind the nftables table (its name and interface). Else the master is unloaded and the start
    refused."""
    where = where_bound(owned_server, link.port)
    wildcard = [w for w in where if sockets.is_wildcard(w)]
    want = f"{link.master_ip}:{link.port}"
    if hooked and where == [want]:
        return None, None
    if not wildcard and want in where:
        return None, None
    if wildcard and allow_any:
        ifname = model.files.interface_of(link.master_ip) if model.files is not None else None
        if ifname is None:
            _unload_quietly(server)
            raise BridgeError(f"archibaldos.netjack.master_ip {link.master_ip} is on no interface of this host: "
                              "start the VM's network (virsh net-start default)")
        table = guard.install(link.domain, ifname, link.master_ip, link.port)
        say(f"nftables table inet {table}: port {link.port}/udp only on {ifname} to {link.master_ip} (JACK2's "
            f"master itself listens on {', '.join(wildcard)}; --allow-any-address)")
        return table, ifname
    _unload_quietly(server)
    if wildcard:
        owner = ("the bridge's own jackd" if owned_server is not None
                 else f"JACK server '{server}' (not started by the bridge, so its binds cannot be hooked)")
        raise BridgeError(f"the NETJACK master in {owner} listens on {', '.join(f'{w}/udp' for w in wildcard)} "
                          f"(every address, the kernel's table), not {want} alone: start the bridge on a jackd of its "
                          "own (netjack start --jack-server NAME --server dummy), or pass --allow-any-address to keep "
                          "the port behind an nftables rule")
    raise BridgeError(f"the NETJACK master does not listen on {want}/udp (the kernel's table: "
                      f"{', '.join(where) or 'nothing on that port'}): see the bridge's log")


def unload(server: str) -> subprocess.CompletedProcess:
    """``jack_unload netmanager``; :class:`BridgeError` when it does not finish."""
    return jack_tool(["jack_unload", "netmanager", server], server, timeout=20)


def _unload_quietly(server: str) -> None:
    try:
        unload(server)
    except BridgeError:
        pass
