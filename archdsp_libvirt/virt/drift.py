"""What of a domain definition this package owns, and how two definitions differ in it.

Used twice: after a define, to catch anything libvirt silently dropped; and
by ``status``, to report a definition edited behind our back (``virsh edit``).
"""

from __future__ import annotations

from lxml import etree

from ..cpuset import format_cpuset, parse_cpuset
from ..domain.render import QEMU_NS


def _norm(cpuset: str | None) -> str:
    return format_cpuset(parse_cpuset(cpuset or ""))


def _attrs(root: etree._Element, path: str, *names: str) -> list[tuple[str | None, ...]]:
    return [tuple(el.get(n) for n in names) for el in root.iterfind(path)]


def managed_parts(xml: str, with_commandline: bool = True) -> dict[str, object]:
    """The parts of a domain definition that come from the DSP config, in comparable form.

    ``with_commandline`` is False for drivers that have no QEMU namespace
    (libvirt's test driver drops ``qemu:commandline``).
    """
    root = etree.fromstring(xml.encode())
    mem = root.find("memory")
    kib = int(mem.text) * {"KiB": 1, "MiB": 1024, "GiB": 1024 * 1024}.get(mem.get("unit", "KiB"), 1) if mem is not None else 0
    facts: dict[str, object] = {
        "type": root.get("type"),
        "memory_kib": kib,
        "vcpus": (root.findtext("vcpu") or "").strip(),
        "vcpupin": sorted((v, _norm(c)) for v, c in _attrs(root, "cputune/vcpupin", "vcpu", "cpuset")),
        "emulatorpin": [_norm(c) for (c,) in _attrs(root, "cputune/emulatorpin", "cpuset")],
        "vcpusched": sorted(
            (vcpu, sched, prio)
            for vcpus, sched, prio in _attrs(root, "cputune/vcpusched", "vcpus", "scheduler", "priority")
            for vcpu in sorted(parse_cpuset(vcpus or ""))
        ),
        "hugepages": _attrs(root, "memoryBacking/hugepages/page", "size"),
        "locked": root.find("memoryBacking/locked") is not None,
        "nosharepages": root.find("memoryBacking/nosharepages") is not None,
        "hostdev": sorted(
            tuple(a.get(k) for k in ("domain", "bus", "slot", "function"))
            for a in root.iterfind("devices/hostdev[@type='pci']/source/address")
        ),
        "nics": sorted(
            (i.get("type"), (i.find("mac").get("address") if i.find("mac") is not None else None))
            for i in root.iterfind("devices/interface")
        ),
        "kernel": root.findtext("os/kernel"),
        "initrd": root.findtext("os/initrd"),
        "cmdline": root.findtext("os/cmdline"),
        "smbios": _attrs(root, "os/smbios", "mode"),
        "oem_strings": [(e.text or "") for e in root.iterfind("sysinfo[@type='smbios']/oemStrings/entry")],
        # what we render of a channel (libvirt adds the socket path, an address and, live, its state)
        "channels": sorted(
            (c.get("type"), c.find("target").get("type"), c.find("target").get("name"))
            for c in root.iterfind("devices/channel") if c.find("target") is not None
        ),
        "disks": sorted(s.get("file") for s in root.iterfind("devices/disk/source") if s.get("file")),
        "console_log": _attrs(root, "devices/serial/log", "file"),
        "memballoon": _attrs(root, "devices/memballoon", "model"),
    }
    if with_commandline:
        facts["qemu_args"] = root.xpath("qemu:commandline/qemu:arg/@value", namespaces={"qemu": QEMU_NS})
    return facts


def differences(wanted: str, actual: str, with_commandline: bool = True) -> list[str]:
    """One line per managed part that differs: ``'vcpupin: wanted [...], libvirt has [...]'``."""
    a, b = managed_parts(wanted, with_commandline), managed_parts(actual, with_commandline)
    return [f"{key}: config wants {a[key]!r}, libvirt has {b[key]!r}" for key in a if a[key] != b[key]]
