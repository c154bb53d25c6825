"""The local source of the host model: what this machine's files say.

The other source, libvirt, is :mod:`archdsp_libvirt.virt.hostfacts`, whose
``gather`` joins the two; the service layer
(:func:`archdsp_libvirt.service.domain.host_model`) calls it once per command.
"""

from __future__ import annotations

import re
from collections.abc import Collection

from .files import Host
from .model import HugePool

_HUGEPAGE_DIR = re.compile(r"^hugepages-(\d+)kB$")


# --- local: /proc and /sys ------------------------------------------------------------------------

# Every fact the host model has, by its field name; a command asks only for those it needs.
ALL_FACTS = frozenset({"online_cpus", "isolated_cpus", "hugepages", "memory_kib", "pci", "kvm",
                       "kvm_pvm", "vhost_net", "libvirt_version", "domains", "passt"})


def _pools(files: Host) -> tuple[HugePool, ...]:
    pools = []
    for entry in files.listdir("/sys/kernel/mm/hugepages"):
        m = _HUGEPAGE_DIR.match(entry)
        if m:
            base = f"/sys/kernel/mm/hugepages/{entry}"
            pools.append(HugePool(int(m[1]), files.read_int(f"{base}/nr_hugepages"),
                                  files.read_int(f"{base}/free_hugepages")))
    return tuple(sorted(pools, key=lambda p: p.size_kib))


def _memory_kib(files: Host) -> int | None:
    mem = re.search(r"^MemTotal:\s*(\d+)\s*kB", files.read("/proc/meminfo") or "", re.M)
    return int(mem[1]) if mem else None


_FILE_FACTS = {
    "online_cpus": lambda files: files.cpus("online"),
    # An unreadable isolated list (no sysfs) is unknown; an empty one is "none isolated".
    "isolated_cpus": lambda files: files.cpus("isolated"),
    "hugepages": _pools,
    "memory_kib": _memory_kib,
    "pci": lambda files: tuple(files.pci_devices()),
    "kvm": lambda files: files.exists("/dev/kvm"),
    # PVM (kvm_pvm) runs only guest kernels built with CONFIG_PVM_GUEST: a stock kernel cannot boot there.
    "kvm_pvm": lambda files: files.exists("/sys/module/kvm_pvm"),
    # Without /dev/vhost-net (the vhost_net module), libvirt's QEMU runs virtio-net in its own main loop.
    "vhost_net": lambda files: files.exists("/dev/vhost-net"),
}


def file_facts(files: Host, wanted: Collection[str] = ALL_FACTS) -> dict:
    """What this machine's files say of the ``wanted`` facts: CPUs, isolation, hugepage pools, memory,
    PCI devices, /dev/kvm, whether KVM is nested PVM, /dev/vhost-net. Only those wanted are read."""
    return {key: read(files) for key, read in _FILE_FACTS.items() if key in wanted}
