"""Decisions: from what the user asked (the config) and what the host is
(its facts) to the concrete tuning the renderer maps to XML.

Nothing here builds XML, and nothing in the renderer decides.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

from msgspec import Struct

from ..config import DspConfig
from ..cpuset import CpuSet, format_cpuset
from ..errors import ConfigError
from ..host.accel import Accel, resolve as resolve_accel
from ..host.model import HostModel
from . import contract

QCOW2_MAGIC = b"QFI\xfb"
HOSTFWD_NETDEV = "archdspfwd0"
# The host facts :func:`plan` reads (the host model's field names): a command that only renders asks
# for these alone. The disk image's header is read through the model's files, where it has them.
PLAN_FACTS = frozenset({"online_cpus", "isolated_cpus", "passt", "kvm", "kvm_pvm", "vhost_net"})


class VcpuPin(Struct, frozen=True):
    vcpu: int
    cpus: CpuSet


class Nic(Struct, frozen=True):
    """One virtio NIC the domain has: ``kind`` is network, bridge or user."""

    kind: str
    source: str | None
    mac: str
    forwards: tuple[tuple[int, int], ...] = ()
    address: str = "127.0.0.1"
    passt: bool = False
    vhost: bool = False  # <driver name='vhost'/>: virtio-net in the kernel's vhost-net worker (KVM, tap NICs)


TAP_KINDS = ("network", "bridge")  # the NICs on a tap device, the ones vhost-net can serve


class VhostTuning(Struct, frozen=True):
    """Where and how the network data path's vhost-net threads run. libvirt has no element for them:
    ``up`` sets it on the threads after the start (``virt.vhost``)."""

    cpus: CpuSet  # empty: left where the kernel put them
    priority: int = 0  # SCHED_FIFO priority, below the vCPUs'; 0 = SCHED_OTHER
    nice: int | None = None  # SCHED_OTHER's niceness; None: the scheduling is left as the kernel made it


class Plan(Struct, frozen=True):
    """Concrete tuning of one DSP domain: what to render, nothing left to decide."""

    config: DspConfig
    pins: tuple[VcpuPin, ...]
    emulator_cpus: CpuSet
    fifo_vcpus: CpuSet
    disk_format: str | None
    disk_path: str | None
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    nics: tuple[Nic, ...]
    hostfwd_args: tuple[str, ...]
    console_log: str
    uuid: str | None = None
    emulator_priority: int = 0  # SCHED_FIFO priority of the emulator threads; 0 = SCHED_OTHER
    iothreads: int = 0  # I/O threads serving the disk (pinned with the emulator)
    oem_strings: tuple[str, ...] = ()  # SMBIOS type 11 strings: the guest contract (see .contract)
    warnings: tuple[str, ...] = ()
    accel: Accel | None = None  # domain_type resolved on the host (None: as the config says)
    vhost: VhostTuning = VhostTuning(frozenset())

    @property
    def domain_type(self) -> str:
        """libvirt's ``<domain type=...>``: the config's kvm or qemu, or what auto resolved to."""
        return self.accel.domain_type if self.accel is not None else self.config.domain_type

    @property
    def port_forward_backend(self) -> str | None:
        if self.hostfwd_args:
            return "hostfwd"
        if any(n.passt for n in self.nics):
            return "passt"
        return None

    @property
    def extra_args(self) -> tuple[str, ...]:
        return self.hostfwd_args + tuple(self.config.qemu_extra_args)


def forced_passt(cfg: DspConfig) -> bool | None:
    """Whether port forwards use passt as far as the config decides it; None when libvirt must be
    asked (``port_forward_backend = "auto"`` with forwards to render)."""
    net = cfg.network
    if net.port_forward_backend != "auto":
        return net.port_forward_backend == "passt"
    return None if net.enable and net.hostfwd else False


def mac_for(name: str, index: int) -> str:
    """A stable locally administered MAC for NIC ``index`` of domain ``name``.

    libvirt invents a new MAC on every define without one, and a definition
    that changes on every define never compares equal to itself.
    """
    digest = hashlib.sha256(f"{name}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def detect_disk_format(path: str, forced: str | None, head: bytes | None = None) -> str:
    """qcow2 or raw: the ``disk_format`` key, else the file's header (``head``, its first bytes as the
    host that runs the domain has them; None when unknown), else its extension."""
    if forced:
        return forced
    if head is not None:
        return "qcow2" if head[:4] == QCOW2_MAGIC else "raw"
    suffix = Path(path).suffix.lower()
    if suffix == ".qcow2":
        return "qcow2"
    if suffix in (".raw", ".img"):
        return "raw"
    raise ConfigError(
        f"archibaldos.disk_image: cannot tell the format of {path} (unreadable here, extension "
        f"{suffix or 'none'}); set archibaldos.disk_format = \"qcow2\" or \"raw\""
    )


def _hostfwd_args(cfg: DspConfig, mac: str) -> tuple[str, ...]:
    net = cfg.network
    rules = ",".join(f"hostfwd=tcp:{net.hostfwd_address}:{h}-:{g}" for h, g in net.forwards)
    bus = "pcie.0" if cfg.machine == "q35" else "pci.0"
    return (
        "-netdev",
        f"user,id={HOSTFWD_NETDEV},{rules}",
        "-device",
        f"virtio-net-pci,netdev={HOSTFWD_NETDEV},mac={mac},bus={bus},addr=0x10",
    )


def _nics(cfg: DspConfig, passt: bool, vhost: bool) -> tuple[tuple[Nic, ...], tuple[str, ...]]:
    net = cfg.network
    if not net.enable:
        return (), ()
    nics: list[Nic] = []
    hostfwd: tuple[str, ...] = ()
    if net.mode in ("nat", "bridge"):
        kind = "network" if net.mode == "nat" else "bridge"
        nics.append(Nic(kind=kind, source=net.source, mac=mac_for(cfg.name, 0), vhost=vhost))
    forwards = tuple(net.forwards)
    if net.mode == "user" or forwards:
        mac = mac_for(cfg.name, len(nics))
        use_passt = bool(forwards) and (
            net.port_forward_backend == "passt" or (net.port_forward_backend == "auto" and passt)
        )
        if forwards and not use_passt:
            hostfwd = _hostfwd_args(cfg, mac)
        else:
            nics.append(
                Nic(kind="user", source=None, mac=mac, forwards=forwards,
                    address=net.hostfwd_address, passt=use_passt)
            )
    return tuple(nics), hostfwd


def plan(cfg: DspConfig, host: HostModel, uuid: str | None = None) -> Plan:
    """Derive the concrete tuning of ``cfg`` for ``host``."""
    warnings: list[str] = []
    isolated = frozenset(cfg.isolated_cores)
    pins = tuple(VcpuPin(i, frozenset({core})) for i, core in enumerate(cfg.isolated_cores))

    if cfg.emulator_cores is not None:
        emulator = frozenset(cfg.emulator_cores)
    elif host.online_cpus is None:
        emulator = frozenset()
        warnings.append("emulatorpin omitted: the host's CPUs are unknown; set emulator_cores to pin QEMU's own threads")
    else:
        emulator = host.housekeeping(isolated) or frozenset()
        if not emulator:
            warnings.append(
                f"emulatorpin omitted: the host has no core outside isolated_cores and the kernel's isolated cores "
                f"({format_cpuset(isolated)}); QEMU's own threads will share the vCPUs' cores"
            )

    disk_path = disk_format = None
    if cfg.disk_image:
        disk_path = os.path.expanduser(cfg.disk_image)
        # The header only where the host's files are at hand: over a remote URI this machine's file of
        # the same name is another file.
        head = host.files.head(disk_path, 4) if host.files is not None and not cfg.archibaldos.disk_format else None
        disk_format = detect_disk_format(disk_path, cfg.archibaldos.disk_format, head)

    kernel = os.path.expanduser(cfg.boot.kernel) if cfg.boot.kernel else None
    initrd = os.path.expanduser(cfg.boot.initrd) if cfg.boot.initrd else None
    cmdline = cfg.boot.cmdline.strip() if kernel else None
    oem = contract.oem_string(cfg)

    accel = resolve_accel(cfg.domain_type, host)
    kvm = accel.domain_type == "kvm"
    # vhost-net: explicit under KVM (libvirt then fails the start where it cannot have it, rather than
    # carrying the audio in QEMU's main loop unsaid), except where the host is known to lack it.
    nics, hostfwd = _nics(cfg, host.passt, vhost=kvm and host.vhost_net is not False)
    if kvm and host.vhost_net is False and any(n.kind in TAP_KINDS for n in nics):
        warnings.append("no /dev/vhost-net on the host: virtio-net runs in QEMU's main loop, not in a vhost-net "
                        "thread (modprobe vhost_net, then 'up --restart')")
    if hostfwd or cfg.qemu_extra_args:
        users = " and ".join(
            what for what, used in (("port forwards (hostfwd)", hostfwd), ("qemu_extra_args", cfg.qemu_extra_args))
            if used
        )
        warnings.append(f"{users} go through <qemu:commandline>: libvirt marks the domain tainted (custom-argv)")

    net = cfg.network
    if net.enable and net.forwards and not ipaddress.ip_address(net.hostfwd_address).is_loopback:
        warnings.append(
            f"port forwards listen on {net.hostfwd_address} (network.hostfwd_allow_external): "
            "other hosts can reach the guest's ports"
        )
    if cfg.qemu_extra_args and cfg.qemu_extra_args_allow_unsafe:
        warnings.append("qemu_extra_args_allow_unsafe = true: qemu_extra_args were passed to QEMU unchecked")
    if (cfg.spice or cfg.vnc) and not ipaddress.ip_address(cfg.display_listen).is_loopback:
        warnings.append(f"the display listens on {cfg.display_listen}, password-protected: other hosts can reach it")

    console_log = cfg.console_log or f"/var/log/libvirt/qemu/{cfg.name}-console.log"
    rt = cfg.realtime
    fifo = frozenset(range(len(pins))) if rt.enable else frozenset()
    emulator_priority = rt.emulator_priority if rt.enable else 0
    if emulator_priority and not emulator:
        warnings.append("emulatorsched omitted: QEMU's own threads have no housekeeping core to run FIFO on "
                        "without starving the vCPUs (set emulator_cores)")
        emulator_priority = 0
    iothreads = rt.iothreads if disk_path else 0
    vhost = _vhost_tuning(cfg, emulator)
    return Plan(
        config=cfg,
        pins=pins,
        emulator_cpus=emulator,
        fifo_vcpus=fifo,
        disk_format=disk_format,
        disk_path=disk_path,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        oem_strings=(oem,) if oem else (),
        nics=nics,
        hostfwd_args=hostfwd,
        console_log=console_log,
        uuid=uuid,
        emulator_priority=emulator_priority,
        iothreads=iothreads,
        warnings=tuple(warnings),
        accel=accel,
        vhost=vhost,
    )


def _vhost_tuning(cfg: DspConfig, emulator: CpuSet) -> VhostTuning:
    """The vhost threads on ``realtime.vhost_cores``, else with the emulator; SCHED_FIFO one below the
    vCPUs (``vhost_priority`` to choose), or SCHED_OTHER at the emulator's nice when the vCPUs run at
    FIFO 1; untouched scheduling without ``realtime.enable``."""
    rt = cfg.realtime
    cpus = frozenset(rt.vhost_cores) if rt.vhost_cores is not None else emulator
    if not rt.enable:
        return VhostTuning(cpus)
    prio = rt.vhost_priority if rt.vhost_priority is not None else rt.priority - 1
    return VhostTuning(cpus, prio, rt.nice if prio == 0 else None)
