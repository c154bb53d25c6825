"""The local source of the host model: what this machine's files say.

The other source, libvirt, is :mod:`archdsp_libvirt.virt.hostfacts`; the
service layer (:func:`archdsp_libvirt.service.host_model`) joins them, once
per command.
"""

from __future__ import annotations

import re

from .files import Host
from .model import HostModel, HugePool

_HUGEPAGE_DIR = re.compile(r"^hugepages-(\d+)kB$")


# --- local: /proc and /sys ------------------------------------------------------------------------


def file_facts(files: Host) -> dict:
    """What this machine's files say: CPUs, isolation, hugepage pools, memory, PCI devices."""
    pools = []
    for entry in files.listdir("/sys/kernel/mm/hugepages"):
        m = _HUGEPAGE_DIR.match(entry)
        if m:
            base = f"/sys/kernel/mm/hugepages/{entry}"
            pools.append(HugePool(int(m[1]), files.read_int(f"{base}/nr_hugepages"),
                                  files.read_int(f"{base}/free_hugepages")))
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", files.read("/proc/meminfo") or "", re.M)
    isolated = files.cpus("isolated")
    return {
        "online_cpus": files.cpus("online"),
        # An unreadable isolated list (no sysfs) is unknown; an empty one is "none isolated".
        "isolated_cpus": isolated,
        "hugepages": tuple(sorted(pools, key=lambda p: p.size_kib)),
        "memory_kib": int(mem[1]) if mem else None,
        "pci": tuple(files.pci_devices()),
        "kvm": files.exists("/dev/kvm"),
    }


def local_model(files: Host) -> HostModel:
    """A host model from this machine's files alone (no libvirt)."""
    return HostModel(source="local", files=files, **file_facts(files))
