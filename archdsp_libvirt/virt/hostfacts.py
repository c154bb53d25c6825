"""The libvirt source of the host model, and :func:`gather`, which joins it with the local one.

What libvirt's API says of the host behind a connection: ``getCPUMap``, the
capabilities and ``getFreePages``, ``getInfo``, the node devices, and the
domains this tool defined there (found by their metadata). Over a remote URI
this is the only source; this machine's files (:mod:`archdsp_libvirt.host.sources`)
are read only when the URI names this machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..cpuset import CpuSet, parse_cpuset
from ..errors import ArchdspError, HostError
from ..host.files import Host, PciDevice
from ..host.model import METADATA_NS, DspDomain, HostModel, HugePool
from ..host.sources import file_facts
from .uri import is_local_uri

if TYPE_CHECKING:
    import libvirt

    from .connection import Session


def _online_cpus(conn: libvirt.virConnect) -> CpuSet:
    _count, cpumap, _online = conn.getCPUMap()
    return frozenset(i for i, up in enumerate(cpumap) if up)


def _pools(conn: libvirt.virConnect, caps) -> tuple[HugePool, ...]:
    """Hugepage pools per size and NUMA cell: totals from the capabilities, free pages from getFreePages."""
    out = []
    for cell in caps.iterfind("host/topology/cells/cell"):
        node = int(cell.get("id"))
        sizes = [int(p.get("size")) for p in cell.iterfind("pages") if p.get("unit", "KiB") == "KiB"]
        big = [s for s in sizes if s > 4]
        try:
            free = conn.getFreePages(big, node, 1).get(node, {}) if big else {}
        except Exception:  # noqa: BLE001 - libvirtError: a driver without getFreePages leaves "free" unknown
            free = {}
        for p in cell.iterfind("pages"):
            size = int(p.get("size"))
            if size in big:
                out.append(HugePool(size, int(p.text or 0), free.get(size), node=node))
    return tuple(out)


def _pci_devices(conn: libvirt.virConnect) -> tuple[PciDevice, ...]:
    """PCI functions from libvirt's node devices, with their IOMMU groups."""
    import libvirt
    from lxml import etree

    out = []
    for dev in conn.listAllDevices(libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_PCI_DEV):
        root = etree.fromstring(dev.XMLDesc(0).encode())
        cap = root.find("capability[@type='pci']")
        if cap is None:
            continue

        def num(tag: str) -> int:
            return int(cap.findtext(tag) or "0", 0)

        address = f"{num('domain'):04x}:{num('bus'):02x}:{num('slot'):02x}.{num('function'):x}"
        group = cap.find("iommuGroup")
        out.append(PciDevice(
            address=address,
            vendor=(cap.find("vendor").get("id") if cap.find("vendor") is not None else "0x")[2:].lower(),
            device=(cap.find("product").get("id") if cap.find("product") is not None else "0x")[2:].lower(),
            class_code=int(cap.findtext("class") or "0", 16),
            driver=root.findtext("driver/name"),
            iommu_group=group.get("number") if group is not None else None,
        ))
    return tuple(sorted(out, key=lambda d: d.address))


def _kvm(caps) -> bool:
    """Whether the hypervisor offers KVM guests: the capabilities list ``<domain type='kvm'/>`` then
    (readable on a read-only connection, unlike the domain capabilities)."""
    return bool(caps.xpath("guest/arch/domain[@type='kvm']"))


def libvirt_facts(conn: libvirt.virConnect) -> dict:
    """What libvirt says of the host behind ``conn`` (getCPUMap, capabilities, getFreePages, getInfo,
    domain capabilities, node devices)."""
    from lxml import etree

    caps = etree.fromstring(conn.getCapabilities().encode())
    version = conn.getLibVersion()
    return {
        "online_cpus": _online_cpus(conn),
        "isolated_cpus": None,  # isolcpus is the host kernel's: libvirt does not say
        "hugepages": _pools(conn, caps),
        "memory_kib": conn.getInfo()[1] * 1024,
        "pci": _pci_devices(conn),
        "kvm": _kvm(caps),
        "libvirt_version": f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}",
    }


def dsp_domains(conn: libvirt.virConnect) -> tuple[DspDomain, ...]:
    """Every domain this tool defined on the host behind ``conn`` (it carries our metadata)."""
    import libvirt
    from lxml import etree

    out = []
    for dom in conn.listAllDomains(0):
        try:
            root = etree.fromstring(dom.XMLDesc(0).encode())
        except libvirt.libvirtError:  # undefined meanwhile
            continue
        meta = root.find(f"metadata/{{{METADATA_NS}}}dsp")
        if meta is None:
            continue
        cpus: frozenset[int] = frozenset()
        for pin in root.iterfind("cputune/vcpupin"):
            try:
                cpus |= parse_cpuset(pin.get("cpuset") or "")
            except ValueError:
                pass
        page = root.find("memoryBacking/hugepages/page")
        page_kib = int(page.get("size")) if page is not None else None
        mem_kib = int(root.findtext("memory") or 0) * {"KiB": 1, "MiB": 1024, "GiB": 1024 ** 2}.get(
            root.find("memory").get("unit", "KiB") if root.find("memory") is not None else "KiB", 1)
        nj = meta.find(f"{{{METADATA_NS}}}netjack")
        out.append(DspDomain(
            name=root.findtext("name") or "",
            active=bool(dom.isActive()),
            cpus=cpus,
            hugepages=-(-mem_kib // page_kib) if page_kib else 0,
            page_size_kib=page_kib,
            netjack_port=int(nj.get("port")) if nj is not None and nj.get("port") else None,
            netjack_client=nj.get("client") if nj is not None else None,
            master_ip=nj.get("master") if nj is not None else None,
        ))
    return tuple(sorted(out, key=lambda d: d.name))


def gather(session: Session | None, *, files: Host | None = None, passt: bool | None = None,
           online_cpus: CpuSet | None = None, notes: list[str] | None = None) -> HostModel:
    """The host model for a command.

    ``session`` is the libvirt connection (None: do not ask libvirt). ``files`` is this machine's file
    source, used only when the connection reaches this machine (or there is none). ``passt`` is the
    config's own decision on port forwards, None when libvirt must be asked. ``online_cpus`` renders
    for a host given by hand (``--host-cpus``). What cannot be had is noted in ``notes``.
    """
    notes = notes if notes is not None else []
    uri = session.uri if session is not None else None
    local = session is None or is_local_uri(uri)
    facts: dict = {}
    if local and files is not None:
        facts.update(file_facts(files))
    source = "local" if local else "libvirt"
    if session is not None:
        from .connection import supports_passt

        try:
            if not local:
                facts.update(session.run("reading the host's facts", libvirt_facts))
            else:
                version = session.run("reading the libvirt version", lambda c: c.getLibVersion())
                facts["libvirt_version"] = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
            if passt is None:
                passt = session.run("reading domain capabilities", supports_passt)
            facts["domains"] = session.run("listing the host's DSP domains", dsp_domains)
        except ArchdspError as err:
            if not local:
                raise
            notes.append(f"note: libvirt at {uri} did not answer ({err}); its facts are unknown"
                         + ("; port forwards use hostfwd" if passt is None else ""))
    if online_cpus is not None:
        facts["online_cpus"] = online_cpus
        source = "given"
    return HostModel(uri=uri, source=source, passt=bool(passt), files=files if local else None, **facts)


def domains_holding(address: str, uri: str | None) -> list[str]:
    """Names of the running libvirt domains with a PCI ``<hostdev>`` at ``address``.

    Raises :class:`HostError` when libvirt cannot be asked."""
    from lxml import etree

    import libvirt

    from .connection import call, open_connection, resolve_uri

    target = resolve_uri(uri)
    try:
        conn = open_connection(target, readonly=True, retry=False)
    except ArchdspError as err:
        raise HostError(f"cannot ask libvirt ({target}) whether a running domain holds {address}: {err}") from None
    try:
        doms = call(target, "listing running domains", conn.listAllDomains, libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        users = []
        for dom in doms:
            try:
                root = etree.fromstring(dom.XMLDesc(0).encode())
            except libvirt.libvirtError:
                continue  # it stopped meanwhile
            for a in root.iterfind("devices/hostdev[@type='pci']/source/address"):
                try:
                    addr = (f"{int(a.get('domain', '0'), 0):04x}:{int(a.get('bus'), 0):02x}:"
                            f"{int(a.get('slot'), 0):02x}.{int(a.get('function'), 0):x}")
                except (TypeError, ValueError):
                    continue
                if addr == address:
                    users.append(dom.name())
                    break
        return users
    except ArchdspError as err:
        raise HostError(f"cannot ask libvirt ({target}) whether a running domain holds {address}: {err}") from None
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass
