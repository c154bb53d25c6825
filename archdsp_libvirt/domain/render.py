"""Mapping: a :class:`~archdsp_libvirt.policy.Plan` to libvirt domain XML.

One function per libvirt element, named after it, with the XML it emits in
its docstring. Functions return Elements; text is made once, in
:func:`to_xml`. No decisions are taken here (see ``policy``).
"""

from __future__ import annotations

from lxml import etree
from lxml.builder import ElementMaker

from ..cpuset import format_cpuset
from ..host.model import METADATA_NS, memlock_limit_mb
from .policy import Nic, Plan


QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"

E = ElementMaker(typemap={int: lambda _el, v: str(v)})
Q = ElementMaker(namespace=QEMU_NS, nsmap={"qemu": QEMU_NS})
D = ElementMaker(namespace=METADATA_NS, nsmap={"dsp": METADATA_NS})


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def memory(plan: Plan) -> list[etree._Element]:
    """<memory unit='MiB'>N</memory><currentMemory unit='MiB'>N</currentMemory>"""
    mb = plan.config.memory_mb
    return [E.memory(str(mb), unit="MiB"), E.currentMemory(str(mb), unit="MiB")]


def memtune(plan: Plan) -> list[etree._Element]:
    """<memtune><hard_limit unit='MiB'>N</hard_limit></memtune>, only with locked memory.

    libvirt advises a hard limit with <locked/>: the guest's memory plus
    1 GiB for QEMU itself (:func:`~archdsp_libvirt.host.model.memlock_limit_mb`).
    """
    if not plan.config.realtime.mlock:
        return []
    return [E.memtune(E.hard_limit(str(memlock_limit_mb(plan.config.memory_mb)), unit="MiB"))]


def memoryBacking(plan: Plan) -> list[etree._Element]:
    """<memoryBacking><hugepages><page size='2048' unit='KiB'/></hugepages><nosharepages/><locked/></memoryBacking>"""
    cfg = plan.config
    children = []
    if cfg.hugepages:
        children.append(E.hugepages(E.page(size=cfg.page_size_kib, unit="KiB")))
    children.append(E.nosharepages())
    if cfg.realtime.mlock:
        children.append(E.locked())
    return [E.memoryBacking(*children)]


def vcpu(plan: Plan) -> etree._Element:
    """<vcpu placement='static'>N</vcpu>"""
    return E.vcpu(str(len(plan.pins)), placement="static")


def iothreads(plan: Plan) -> list[etree._Element]:
    """<iothreads>N</iothreads>: I/O threads for the disk, off QEMU's main loop."""
    return [E.iothreads(str(plan.iothreads))] if plan.iothreads else []


def cputune(plan: Plan) -> etree._Element:
    """<cputune><vcpupin vcpu='0' cpuset='1'/>...<emulatorpin cpuset='0'/><iothreadpin iothread='1' cpuset='0'/>
    <vcpusched vcpus='0' scheduler='fifo' priority='1'/><iothreadsched iothreads='1' scheduler='fifo' priority='P'/>
    <emulatorsched scheduler='fifo' priority='P'/></cputune> (libvirt's element order)"""
    emu = format_cpuset(plan.emulator_cpus) if plan.emulator_cpus else None
    ids = range(1, plan.iothreads + 1)
    prio = plan.emulator_priority
    return E.cputune(
        *(E.vcpupin(vcpu=p.vcpu, cpuset=format_cpuset(p.cpus)) for p in plan.pins),
        *([E.emulatorpin(cpuset=emu)] if emu else []),
        *([E.iothreadpin(iothread=str(i), cpuset=emu) for i in ids] if emu else []),
        *(
            [E.vcpusched(vcpus=format_cpuset(plan.fifo_vcpus), scheduler="fifo",
                         priority=plan.config.realtime.priority)]
            if plan.fifo_vcpus
            else []
        ),
        *([E.iothreadsched(iothreads=format_cpuset(frozenset(ids)), scheduler="fifo", priority=str(prio))]
          if prio and plan.iothreads else []),
        *([E.emulatorsched(scheduler="fifo", priority=str(prio))] if prio else []),
    )


def sysinfo(plan: Plan) -> list[etree._Element]:
    """<sysinfo type='smbios'><oemStrings><entry>io.systemd.credential:archdsp.netjack=v=1 ...</entry>
    </oemStrings></sysinfo>: the guest contract (:mod:`.contract`) as SMBIOS type 11 strings."""
    if not plan.oem_strings:
        return []
    return [E.sysinfo(E.oemStrings(*(E.entry(s) for s in plan.oem_strings)), type="smbios")]


def smbios(plan: Plan) -> list[etree._Element]:
    """<smbios mode='sysinfo'/>: the guest's SMBIOS tables carry <sysinfo>."""
    return [E.smbios(mode="sysinfo")] if plan.oem_strings else []


def os_(plan: Plan) -> etree._Element:
    """<os><type arch='x86_64' machine='q35'>hvm</type><kernel/><initrd/><cmdline/><boot dev='hd'/>
    <smbios mode='sysinfo'/></os>"""
    children = [E.type("hvm", arch="x86_64", machine=plan.config.machine)]
    if plan.kernel:
        children.append(E.kernel(plan.kernel))
        if plan.initrd:
            children.append(E.initrd(plan.initrd))
        if plan.cmdline:
            children.append(E.cmdline(plan.cmdline))
    else:
        children.append(E.boot(dev="hd"))
    children.extend(smbios(plan))
    return E.os(*children)


def features(plan: Plan) -> etree._Element:
    """<features><acpi/><apic/><pmu state='off'/></features>"""
    return E.features(E.acpi(), E.apic(), E.pmu(state="off"))


def cpu(plan: Plan) -> list[etree._Element]:
    """<cpu mode='host-passthrough' check='none' migratable='off'><topology sockets='1' dies='1' cores='N'
    threads='1'/><feature policy='require' name='tsc-deadline'/></cpu>

    KVM only, as libvirt's real-time guide has it (the topology matching the placement: one vCPU per
    host core, all on one socket); a TCG (``qemu``) domain keeps QEMU's default CPU model.
    """
    if plan.domain_type != "kvm":
        return []
    return [
        E.cpu(
            E.topology(sockets=1, dies=1, cores=len(plan.pins), threads=1),
            E.feature(policy="require", name="tsc-deadline"),
            *(E.feature(policy="disable", name=f) for f in plan.config.cpu_disable_features),
            mode="host-passthrough",
            check="none",
            migratable="off",
        )
    ]


def clock(plan: Plan) -> etree._Element:
    """<clock offset='utc'><timer name='kvmclock' present='yes'/>...</clock>"""
    timers = [
        E.timer(name="rtc", tickpolicy="catchup"),
        E.timer(name="pit", tickpolicy="delay"),
        E.timer(name="hpet", present="no"),
    ]
    if plan.domain_type == "kvm":
        timers.append(E.timer(name="kvmclock", present="yes"))
    return E.clock(*timers, offset="utc")


def lifecycle(plan: Plan) -> list[etree._Element]:
    """<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>"""
    return [E.on_poweroff("destroy"), E.on_reboot("restart"), E.on_crash("destroy")]


def disk(plan: Plan) -> list[etree._Element]:
    """<disk type='file' device='disk'><driver name='qemu' type='qcow2' cache='none' io='native'/>
    <source file='...'/><target dev='vda' bus='virtio'/></disk>"""
    if not plan.disk_path:
        return []
    return [
        E.disk(
            E.driver(name="qemu", type=plan.disk_format, cache="none", io="native",
                     **({"iothread": "1"} if plan.iothreads else {})),
            E.source(file=plan.disk_path),
            E.target(dev="vda", bus="virtio"),
            type="file",
            device="disk",
        )
    ]


def controller(plan: Plan) -> etree._Element:
    """<controller type='usb' model='none'/>: no USB, no polling controller."""
    return E.controller(type="usb", model="none")


def interface(nic: Nic) -> etree._Element:
    """<interface type='network'><mac address='52:54:00:..'/><source network='default'/><model type='virtio'/>
    <driver name='vhost'/></interface> (the driver under KVM: virtio-net in the kernel's vhost-net worker)

    A user-mode NIC with port forwards on passt:
    <interface type='user'><mac/><portForward proto='tcp' address='127.0.0.1'><range start='2222' to='22'/>
    </portForward><model type='virtio'/><backend type='passt'/></interface>
    """
    children = [E.mac(address=nic.mac)]
    if nic.kind == "network":
        children.append(E.source(network=nic.source))
    elif nic.kind == "bridge":
        children.append(E.source(bridge=nic.source))
    if nic.passt:
        children.extend(
            E.portForward(E.range(start=h, to=g), proto="tcp", address=nic.address) for h, g in nic.forwards
        )
    children.append(E.model(type="virtio"))
    if nic.vhost:
        children.append(E.driver(name="vhost"))
    if nic.passt:
        children.append(E.backend(type="passt"))
    return E.interface(*children, type=nic.kind)


def serial(plan: Plan) -> etree._Element:
    """<serial type='pty'><log file='...' append='off'/><target port='0'/></serial>"""
    return E.serial(E.log(file=plan.console_log, append="off"), E.target(port=0), type="pty")


def console(plan: Plan) -> etree._Element:
    """<console type='pty'><target type='serial' port='0'/></console>"""
    return E.console(E.target(type="serial", port=0), type="pty")


def channel(plan: Plan) -> etree._Element:
    """<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>: the QEMU
    guest agent's channel, as virt-install adds it (libvirt picks the socket's path)."""
    return E.channel(E.target(type="virtio", name=GUEST_AGENT_CHANNEL), type="unix")


def graphics(plan: Plan) -> list[etree._Element]:
    """<graphics type='spice' autoport='yes' listen='127.0.0.1' passwd='...'>
    <listen type='address' address='127.0.0.1'/></graphics>

    ``passwd`` only with ``display_password``.
    """
    cfg = plan.config
    listen = cfg.display_listen
    secret = {"passwd": cfg.display_password} if cfg.display_password else {}
    out = []
    for kind, wanted in (("spice", cfg.spice), ("vnc", cfg.vnc)):
        if wanted:
            out.append(
                E.graphics(E.listen(type="address", address=listen), type=kind, autoport="yes",
                           listen=listen, **secret)
            )
    return out


def video(plan: Plan) -> list[etree._Element]:
    """<video><model type='virtio' heads='1' primary='yes'/></video>, only with a display."""
    if not (plan.config.spice or plan.config.vnc):
        return []
    return [E.video(E.model(type="virtio", heads=1, primary="yes"))]


def hostdev(plan: Plan) -> list[etree._Element]:
    """<hostdev mode='subsystem' type='pci' managed='yes'><driver name='vfio'/>
    <source><address domain='0x0000' bus='0x00' slot='0x1b' function='0x0'/></source></hostdev>"""
    dev = plan.config.audio_device
    if not dev.enable:
        return []
    dom, bus, slot, fn = dev.pci_address
    return [
        E.hostdev(
            E.driver(name="vfio"),
            E.source(E.address(domain=f"0x{dom:04x}", bus=f"0x{bus:02x}", slot=f"0x{slot:02x}",
                               function=f"0x{fn:x}")),
            mode="subsystem",
            type="pci",
            managed=yes_no(dev.managed),
        )
    ]


def memballoon(plan: Plan) -> etree._Element:
    """<memballoon model='none'/>"""
    return E.memballoon(model="none")


def devices(plan: Plan) -> etree._Element:
    """<devices>disk, controller, interfaces, serial, console, channel, graphics, video, hostdev, memballoon</devices>"""
    return E.devices(
        *disk(plan),
        controller(plan),
        *(interface(n) for n in plan.nics),
        serial(plan),
        console(plan),
        channel(plan),
        *graphics(plan),
        *video(plan),
        *hostdev(plan),
        memballoon(plan),
    )


def commandline(plan: Plan) -> list[etree._Element]:
    """<qemu:commandline><qemu:arg value='-netdev'/>...</qemu:commandline>"""
    args = plan.extra_args
    if not args:
        return []
    return [Q.commandline(*(Q.arg(value=a) for a in args))]


def metadata(plan: Plan) -> etree._Element:
    """<metadata><dsp:dsp xmlns:dsp='...'><dsp:netjack port='19000' client='dsp' master='192.168.122.1'/>
    </dsp:dsp></metadata>

    Marks the domain as a DSP VM of this tool, so that ``check`` finds the others on the same host
    (their cores, hugepages and NETJACK link) from libvirt alone.
    """
    nj = plan.config.netjack
    link = [D.netjack(port=str(nj.source_port), client=nj.client_name, master=nj.master_ip)] if nj.enable else []
    return E.metadata(D.dsp(*link))


def domain(plan: Plan) -> etree._Element:
    """<domain type='kvm'> with every element above, in libvirt's own order."""
    cfg = plan.config
    nsmap = {"qemu": QEMU_NS} if plan.extra_args else None
    root = etree.Element("domain", type=plan.domain_type, nsmap=nsmap)
    root.append(E.name(cfg.name))
    if plan.uuid:
        root.append(E.uuid(plan.uuid))
    root.append(E.description(f"archdsp-libvirt DSP VM {cfg.name}"))
    root.append(metadata(plan))
    for el in (
        *memory(plan),
        *memtune(plan),
        *memoryBacking(plan),
        vcpu(plan),
        *iothreads(plan),
        cputune(plan),
        *sysinfo(plan),
        os_(plan),
        features(plan),
        *cpu(plan),
        clock(plan),
        *lifecycle(plan),
        devices(plan),
        *commandline(plan),
    ):
        root.append(el)
    return root


def to_xml(root: etree._Element) -> str:
    """Serialise once, at the edge: two-space indent, trailing newline."""
    etree.indent(root, space="  ")
    return etree.tostring(root, encoding="unicode") + "\n"
