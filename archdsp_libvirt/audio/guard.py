"""A master on every address kept to the VM's bridge: an nftables table of the bridge's own.

Where a NETJACK2 master cannot be bound to master_ip (a server the bridge did not start, or a kernel with no
bind hook), ``--allow-any-address`` starts it anyway behind :func:`nft_rules`: datagrams to its port are
dropped unless they come in on master_ip's interface, to master_ip, over IPv4. The table is the
bridge's alone (``inet archdsp_netjack_DOMAIN``); stop deletes it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from ..errors import BridgeError
from ..procs import child_env


def nft_table(domain: str) -> str:
    return "archdsp_netjack_" + re.sub(r"[^A-Za-z0-9_]", "_", domain)


def nft_rules(domain: str, ifname: str, master_ip: str, port: int) -> str:
    """Drop datagrams to the master's port unless they come in on the VM's bridge to master_ip."""
    return (
        f"table inet {nft_table(domain)} {{\n"
        "    chain input {\n"
        "        type filter hook input priority -10; policy accept;\n"
        f"        udp dport {port} iifname != \"{ifname}\" drop\n"
        f"        udp dport {port} meta nfproto ipv6 drop\n"
        f"        udp dport {port} ip daddr != {master_ip} drop\n"
        "    }\n}\n"
    )


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["nft", *args], input=stdin, capture_output=True, text=True, timeout=15,
                              env=child_env())
    except subprocess.TimeoutExpired:
        raise BridgeError("nft did not answer within 15 s") from None


def install(domain: str, ifname: str, master_ip: str, port: int, otherwise: str = "") -> str:
    """Install (again) the table keeping ``port`` to ``ifname`` and ``master_ip``; its name."""
    if not shutil.which("nft"):
        raise BridgeError(f"--allow-any-address needs nftables to keep port {port}/udp to {ifname}: "
                          f"apt-get install nftables{f' ({otherwise})' if otherwise else ''}")
    _nft(["delete", "table", "inet", nft_table(domain)])
    r = _nft(["-f", "-"], nft_rules(domain, ifname, master_ip, port))
    if r.returncode != 0:
        raise BridgeError(f"cannot install the nftables rule for port {port}/udp: {r.stderr.strip()[:200]}")
    return nft_table(domain)


def drop(domain: str) -> bool:
    """Delete the domain's table; whether there was one."""
    if not shutil.which("nft"):
        return False
    return _nft(["delete", "table", "inet", nft_table(domain)]).returncode == 0
