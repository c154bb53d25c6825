"""Read-only inspection of a domain through libvirt: its state in words, its definitions, whether it
runs an older one, and where its vCPUs run. Nothing here changes the domain."""

from __future__ import annotations

import libvirt
from msgspec import Struct

from .drift import differences
from .connection import Session

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed (QEMU exited unexpectedly)",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed to start",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from snapshot",
}


def has_qemu_namespace(session: Session) -> bool:
    """Whether the driver keeps ``<qemu:commandline>`` (QEMU's does; the test driver drops it)."""
    return session.uri.startswith("qemu")


def inactive_xml(session: Session, name: str) -> str:
    """The persistent definition of ``name``, secrets included (what the next start runs)."""
    return session.dom(name, f"reading the definition of {name}",
                       lambda d: d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


def live_xml(session: Session, name: str, secure: bool = False) -> str:
    """The definition the running domain was started from."""
    flags = libvirt.VIR_DOMAIN_XML_SECURE if secure else 0
    return session.dom(name, "reading the running definition", lambda d: d.XMLDesc(flags))


def accelerator_of(xml: str) -> str | None:
    """The accelerator a definition runs under, from its ``<domain type=...>``: "kvm", or "tcg" for
    libvirt's type 'qemu' (QEMU's software emulation); None when the XML has no type."""
    from lxml import etree

    from ..host.accel import accelerator_name

    return accelerator_name(etree.fromstring(xml.encode()).get("type"))


def accelerator(session: Session, name: str) -> str | None:
    """The accelerator ``name`` runs under, as its live definition (``virsh dumpxml``) says."""
    return accelerator_of(live_xml(session, name))


def uuid_of(session: Session, name: str) -> str:
    return session.dom(name, "reading the UUID", lambda d: d.UUIDString())


def is_active(session: Session, name: str) -> bool:
    return bool(session.dom(name, "checking state", lambda d: d.isActive()))


def is_updated(session: Session, name: str) -> bool:
    """Whether the running domain was started from an older definition than the persistent one.

    Compared on what the config owns, between libvirt's live and inactive XML (virDomainIsUpdated
    does not track redefinitions).
    """
    live = live_xml(session, name)
    return bool(differences(inactive_xml(session, name), live, with_commandline=has_qemu_namespace(session)))


class VcpuPlacement(Struct, frozen=True):
    """Where libvirt says one vCPU runs: its host CPU now, the CPUs it may use, its scheduler."""

    vcpu: int
    cpu: int
    affinity: frozenset[int]
    scheduler: str | None  # "fifo", "rr", "other"... from the live XML's vcpusched; None: libvirt's default
    priority: int | None


def vcpu_placement(session: Session, name: str) -> list[VcpuPlacement]:
    """Each vCPU's placement as libvirt reports it (virDomainGetVcpus and the live XML's
    ``vcpusched``): the same on a remote host as on this one, with nothing read from /proc."""
    from lxml import etree

    from ..cpuset import parse_cpuset

    info, maps = session.dom(name, "reading vCPUs", lambda d: d.vcpus())
    root = etree.fromstring(live_xml(session, name).encode())
    sched: dict[int, tuple[str, int | None]] = {}
    for el in root.iterfind("cputune/vcpusched"):
        prio = el.get("priority")
        for v in parse_cpuset(el.get("vcpus") or ""):
            sched[v] = (el.get("scheduler") or "other", int(prio) if prio else None)
    out = []
    for (n, _state, _cpu_time, cpu), cpumap in zip(info, maps):
        s, prio = sched.get(n, (None, None))
        out.append(VcpuPlacement(n, cpu, frozenset(i for i, on in enumerate(cpumap) if on), s, prio))
    return out
