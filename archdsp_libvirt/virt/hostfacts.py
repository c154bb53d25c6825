"""The libvirt source of the host model, and :func:`gather`, which joins it with the local one.

What libvirt's API says of the host behind a connection: ``getCPUMap``, the
capabilities and ``getFreePages``, ``getInfo``, the node devices, and the
domains this tool defined there (found by their metadata). Over a remote URI
this is the only source; this machine's files (:mod:`archdsp_libvirt.host.sources`)
are read only when the URI names this machine.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from ..cpuset import CpuSet, parse_cpuset
from ..errors import ArchdspError, HostError
from ..host.files import Host, PciDevice
from ..host.model import METADATA_NS, DspDomain, HostModel, HugePool
from ..host.sources import ALL_FACTS, file_facts
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
    """Whether the hypervisor offers KVM guests of the arch the domain is rendered for (x86_64 hvm): the
    capabilities list ``<domain type='kvm'/>`` under it then (readable on a read-only connection, unlike
    the domain capabilities)."""
    return bool(caps.xpath("guest[os_type='hvm']/arch[@name='x86_64']/domain[@type='kvm']"))


def _kvm_pvm(caps) -> bool | None:
    """Whether the host's KVM is nested PVM, as far as the capabilities tell: a host CPU listing vmx or svm
    has hardware virtualisation (not PVM); otherwise libvirt cannot tell it (None: unknown)."""
    features = set(caps.xpath("host/cpu/feature/@name"))
    return False if features & {"vmx", "svm"} else None


def libvirt_facts(conn: libvirt.virConnect, wanted: Collection[str] = ALL_FACTS) -> dict:
    """What libvirt says of the ``wanted`` facts of the host behind ``conn`` (getCPUMap, capabilities,
    getFreePages, getInfo, node devices, the version); only those wanted are asked."""
    from lxml import etree

    caps = (etree.fromstring(conn.getCapabilities().encode())
            if {"hugepages", "kvm", "kvm_pvm"} & set(wanted) else None)
    asked = {
        "online_cpus": lambda: _online_cpus(conn),
        "isolated_cpus": lambda: None,  # isolcpus is the host kernel's: libvirt does not say
        "hugepages": lambda: _pools(conn, caps),
        "memory_kib": lambda: conn.getInfo()[1] * 1024,
        "pci": lambda: _pci_devices(conn),
        "kvm": lambda: _kvm(caps),
        "kvm_from": lambda: "libvirt",
        "kvm_pvm": lambda: _kvm_pvm(caps),
        "libvirt_version": lambda: _version(conn),
    }
    wanted = set(wanted) | ({"kvm_from"} if "kvm" in wanted else set())
    return {key: ask() for key, ask in asked.items() if key in wanted}


def _version(conn: libvirt.virConnect) -> str:
    version = conn.getLibVersion()
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"


def dsp_domains(conn: libvirt.virConnect) -> tuple[DspDomain, ...]:
    """Every domain this tool defined on the host behind ``conn`` (it carries our metadata)."""
    from lxml import etree

    from .connection import call

    out = []
    for dom in conn.listAllDomains(0):
        try:
            root = etree.fromstring(call("libvirt", "reading a definition", dom.XMLDesc, 0).encode())
        except ArchdspError:  # undefined meanwhile
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
           online_cpus: CpuSet | None = None, notes: list[str] | None = None,
           wanted: Collection[str] = ALL_FACTS) -> HostModel:
    """The host model for a command: the one place its two sources are joined.

    ``session`` is the libvirt connection (None: do not ask libvirt). ``files`` is this machine's file
    source, used only when the connection reaches this machine (or there is none). ``passt`` is the
    config's own decision on port forwards, None when libvirt must be asked. ``online_cpus`` renders
    for a host given by hand (``--host-cpus``). Only the ``wanted`` facts are read or asked (rendering
    needs the CPUs and passt alone). What cannot be had is noted in ``notes``.
    """
    notes = notes if notes is not None else []
    uri = session.uri if session is not None else None
    local = session is None or is_local_uri(uri)
    wanted = set(wanted) - ({"online_cpus"} if online_cpus is not None else set())
    facts: dict = {}
    if local and files is not None:
        facts.update(file_facts(files, wanted))
        if "kvm" in facts:
            facts["kvm_from"] = "/dev/kvm"
    source = "local" if local else "libvirt"
    if session is not None:
        from .connection import supports_passt

        try:
            if not local:
                facts.update(session.run("reading the host's facts", lambda c: libvirt_facts(c, wanted)))
            else:
                if "libvirt_version" in wanted:
                    facts["libvirt_version"] = session.run("reading the libvirt version", _version)
                if "kvm" in wanted:  # libvirt decides whether it can run KVM guests, here as on another host
                    facts.update(session.run("reading the capabilities", lambda c: libvirt_facts(c, {"kvm"})))
            if passt is None and "passt" in wanted:
                passt = session.run("reading domain capabilities", supports_passt)
            if "domains" in wanted:
                facts["domains"] = session.run("listing the host's DSP domains", dsp_domains)
        except ArchdspError as err:
            if not local:
                raise
            notes.append(f"note: libvirt at {uri} did not answer ({err}); its facts are unknown"
                         + ("; port forwards use hostfwd" if passt is None else ""))
    if online_cpus is not None:  # a host given by hand: this machine's KVM and vhost say nothing of it
        facts["online_cpus"] = online_cpus
        for key in ("kvm", "kvm_from", "kvm_pvm", "vhost_net"):
            facts.pop(key, None)
        source = "given"
    return HostModel(uri=uri, source=source, passt=bool(passt), files=files if local else None, **facts)


def _pci_address(a) -> str | None:
    try:
        return (f"{int(a.get('domain', '0'), 0):04x}:{int(a.get('bus'), 0):02x}:"
                f"{int(a.get('slot'), 0):02x}.{int(a.get('function'), 0):x}")
    except (TypeError, ValueError):
        return None


def domains_holding(address: str, uri: str | None) -> list[str]:
    """Names of the running libvirt domains with a PCI ``<hostdev>`` at ``address``.

    Raises :class:`HostError` when libvirt cannot be asked."""
    import libvirt
    from lxml import etree

    from .connection import Session, call

    def holders(conn: libvirt.virConnect) -> list[str]:
        users = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                root = etree.fromstring(call(session.uri, "reading a definition", dom.XMLDesc, 0).encode())
            except ArchdspError:
                continue  # it stopped meanwhile
            if any(_pci_address(a) == address for a in root.iterfind("devices/hostdev[@type='pci']/source/address")):
                users.append(dom.name())
        return users

    with Session(uri, readonly=True, attempts=1) as session:
        try:
            return session.run("listing running domains", holders)
        except ArchdspError as err:
            raise HostError(f"cannot ask libvirt ({session.uri}) whether a running domain holds {address}: {err}") from None
