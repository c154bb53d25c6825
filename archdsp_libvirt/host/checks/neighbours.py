"""What the VM shares with the rest of the host: other DSP VMs, and the NETJACK master's network."""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import Struct

from ...config import PAGE_SIZES_KIB, DspConfig
from ...cpuset import format_cpuset
from ..findings import Finding
from ..network import is_wildcard
from ..model import HostModel

if TYPE_CHECKING:
    from ..files import Host


def check_domains(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """Other DSP VMs this tool defined on the same host: shared cores, hugepages, NETJACK port or slave."""
    others = [d for d in model.domains if d.name != cfg.name]
    names = ", ".join(d.name for d in others) or "none"
    wanted = frozenset(cfg.isolated_cores)
    out = []
    clash = [f"{d.name} ({format_cpuset(d.cpus & wanted)})" for d in others if d.cpus & wanted]
    expected = "isolated_cores used by no other DSP VM on the host"
    if clash:
        # Both VMs start and run, their vCPUs taking turns on the shared core: worse latency, a warn.
        out.append(Finding("domains.cores", "warn", "cores shared with " + ", ".join(clash), expected,
                           "give each DSP VM its own isolated_cores"))
    else:
        out.append(Finding("domains.cores", "ok", f"other DSP VMs: {names}", expected))

    kib = PAGE_SIZES_KIB[cfg.hugepage_size]
    expected = "free hugepages for this VM and every other DSP VM that is defined but not running"
    pool = model.pool(kib)
    if not cfg.hugepages:
        out.append(Finding("domains.hugepages", "skip", "hugepages = 0 in the config", expected))
    elif pool is None or pool.free is None:
        out.append(Finding("domains.hugepages", "skip", f"free {cfg.hugepage_size} pages unknown", expected))
    else:
        need = -(-cfg.memory_mb * 1024 // kib)
        waiting = [d for d in others if not d.active and d.page_size_kib == kib and d.hugepages]
        total = need + sum(d.hugepages for d in waiting)
        seen = f"{pool.free} free; this VM {need}" + "".join(f", {d.name} {d.hugepages} (not running)"
                                                              for d in waiting)
        if waiting and total > pool.free >= need:
            out.append(Finding("domains.hugepages", "warn", seen + f" = {total}", expected,
                               f"raise the {cfg.hugepage_size} pool to {(pool.total or 0) - pool.free + total} pages, "
                               "or start only one of them"))
        else:
            out.append(Finding("domains.hugepages", "ok", seen, expected))

    nj = cfg.netjack
    expected = "a NETJACK port and slave name of its own on the host"
    if not nj.enable:
        out.append(Finding("domains.netjack", "skip", "archibaldos.netjack.enable = false", expected))
    else:
        same = [f"{d.name} (port {d.netjack_port})" for d in others
                if d.netjack_port == nj.source_port and d.master_ip in (None, nj.master_ip)]
        same += [f"{d.name} (slave {d.netjack_client!r})" for d in others
                 if d.netjack_client == nj.client_name and d.netjack_port != nj.source_port]
        if same:
            out.append(Finding("domains.netjack", "fail", "link shared with " + ", ".join(same), expected,
                               "set archibaldos.netjack.source_port and client_name apart from the other VMs'"))
        else:
            out.append(Finding("domains.netjack", "ok", f"port {nj.source_port}, slave {nj.client_name!r}", expected))
    return out


LAN_FIX = ("set archibaldos.netjack.master_ip to the host's address on the VM's bridge (192.168.122.1 on libvirt's "
           "default network), or allow_lan = true to accept that")
NO_INTERFACE_FIX = ("start the VM's network (virsh net-start default), or set archibaldos.netjack.master_ip to the "
                    "host's address on the VM's bridge")


class MasterAddress(Struct, frozen=True):
    """The master-address rule's answer for one address (``check`` and ``netjack start`` both ask it)."""

    status: str                # ok, warn (LAN reach allowed by allow_lan, or no interface now) or fail
    interface: str | None      # the interface holding the address; None: not an address of this host now
    exposed: str | None        # why other machines reach it, or None
    fix: str | None = None


def master_address(ip: str, allow_lan: bool, host: Host) -> MasterAddress:
    """The master-address rule: NETJACK has no authentication and JACK names no slave's source address, so
    any machine that reaches the master's port can join the link and take host audio. The address must be
    this host's, on a network only VMs reach (a libvirt bridge, not a LAN NIC or the default route), unless
    ``allow_lan`` accepts the LAN."""
    iface = host.interface_of(ip)
    if iface is None:
        return MasterAddress("warn", None, None, NO_INTERFACE_FIX)
    exposed = host.lan_exposure(ip)
    if exposed and not allow_lan:
        return MasterAddress("fail", iface, exposed, LAN_FIX)
    return MasterAddress("warn" if exposed else "ok", iface, exposed)


WILDCARD_FIX = ("archdsp-virt netjack restart CONFIG: the bridge binds the master it starts to master_ip; a JACK "
                "server it did not start cannot be bound, so start it on one of its own (netjack start --jack-server "
                "NAME --server dummy), or keep the port behind the nftables rule of --allow-any-address")


def check_netjack_master(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """The master's address: this host's, on a network only VMs reach (:func:`master_address`)."""
    nj = cfg.netjack
    expected = "master_ip on this host's VM-only network (a libvirt bridge, not a LAN NIC or the default route)"
    if not nj.enable:
        return [Finding("netjack.master", "skip", "archibaldos.netjack.enable = false", expected)]
    host = model.files
    if host is None:
        return [Finding("netjack.master", "skip", model.unknown(f"the interface of {nj.master_ip}"), expected)]
    rule = master_address(nj.master_ip, nj.allow_lan, host)
    if rule.interface is None:
        return [Finding("netjack.master", "warn", f"{nj.master_ip} is on no interface of this host now", expected,
                        rule.fix)]
    if rule.status == "fail":
        return [Finding("netjack.master", "fail", f"{rule.exposed}: other machines can join the link", expected,
                        rule.fix)]
    if rule.exposed:
        return [Finding("netjack.master", "warn", f"{rule.exposed} (allow_lan = true)", expected)]
    where = host.udp_listeners(nj.source_port)  # the kernel's table: where the port is really bound
    asked = f"{nj.master_ip}:{nj.source_port}"
    if where is None:
        return [Finding("netjack.master", "ok", f"{nj.master_ip} on {rule.interface}", expected)]
    if not where:
        return [Finding("netjack.master", "ok", f"{nj.master_ip} on {rule.interface}; nothing listens on "
                                                f"{nj.source_port}/udp now", expected)]
    bound = ", ".join(f"{w}/udp" for w in where)
    if any(is_wildcard(w) for w in where):
        return [Finding("netjack.master", "warn", f"{nj.master_ip} on {rule.interface}, but port {nj.source_port} "
                        f"listens on {bound} (every address, the kernel's table): any machine that reaches this host "
                        "can join the link", expected, WILDCARD_FIX)]
    if where != [asked]:
        return [Finding("netjack.master", "warn", f"port {nj.source_port} listens on {bound}, not {asked}/udp "
                        "(the kernel's table)", expected, WILDCARD_FIX)]
    return [Finding("netjack.master", "ok", f"listening on {bound} ({rule.interface}; the kernel's table)", expected)]
