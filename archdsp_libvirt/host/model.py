"""The host model: what one host is, gathered once per command and passed down.

Two sources fill it:

- **local**: this machine's /proc and /sys, through :class:`~.files.Host`
  (whose root tests point at a fake tree). Used only when the libvirt
  connection reaches this machine.
- **libvirt**: ``getCPUMap``, the capabilities and ``getFreePages``,
  ``getInfo``, the domain capabilities and the node devices. Over a remote
  URI every fact libvirt can give comes from here, and nothing is read
  from this machine.

A fact neither source can give is ``None``: unknown, and said so in words
(:meth:`HostModel.unknown`). Facts only the host itself knows (isolcpus,
nohz_full, the kernel command line, the RT cgroup budget, memlock,
governors) are read from ``files``, which is ``None`` for a remote host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from msgspec import Struct

from ..cpuset import CpuSet, format_cpuset, parse_cpuset

if TYPE_CHECKING:
    from .files import PciDevice

SYSFS_ONLINE = "/sys/devices/system/cpu/online"
# libvirt's advice for locked memory: a hard limit of the guest's memory plus 1 GiB for QEMU itself.
MEMLOCK_MARGIN_MB = 1024


def memlock_limit_mb(memory_mb: int) -> int:
    """The locked-memory limit a guest of ``memory_mb`` needs: the memtune hard_limit the renderer
    writes, and the RLIMIT_MEMLOCK the memory check asks of the host."""
    return memory_mb + MEMLOCK_MARGIN_MB
# How a domain this tool defined says so in its XML (see domain.render.metadata).
METADATA_NS = "https://archdsp-libvirt.invalid/xmlns/dsp/1"


class HugePool(Struct, frozen=True):
    """One hugepage pool: pages of ``size_kib``, on NUMA ``node`` (None: the whole host)."""

    size_kib: int
    total: int | None
    free: int | None
    node: int | None = None


class DspDomain(Struct, frozen=True):
    """Another DSP VM this tool defined on the same host, as its libvirt definition says."""

    name: str
    active: bool
    cpus: CpuSet
    hugepages: int = 0
    page_size_kib: int | None = None
    netjack_port: int | None = None
    netjack_client: str | None = None
    master_ip: str | None = None


class HostModel(Struct, frozen=True):
    """One host's facts. Every field but ``passt`` may be unknown (None or empty)."""

    online_cpus: CpuSet | None = None
    passt: bool = False
    uri: str | None = None
    source: str = "given"  # "local" (this machine's files + libvirt), "libvirt" (remote), "given"
    isolated_cpus: CpuSet | None = None
    memory_kib: int | None = None
    hugepages: tuple[HugePool, ...] = ()
    kvm: bool | None = None
    kvm_from: str | None = None  # who said so: "libvirt" (its capabilities) or "/dev/kvm" (this machine's files)
    kvm_pvm: bool | None = None  # KVM is nested PVM (only PVM guest kernels boot); None: cannot be told
    vhost_net: bool | None = None  # /dev/vhost-net is there (virtio-net in a vhost worker); None: unknown
    pci: tuple[Any, ...] | None = None  # PciDevice, with IOMMU groups
    libvirt_version: str | None = None
    domains: tuple[DspDomain, ...] = ()
    files: Any = None  # the local source (host.files.Host); None for a remote host

    @classmethod
    def local(cls, passt: bool = False, sysfs_online: str = SYSFS_ONLINE) -> HostModel:
        """This machine, known by its online CPUs alone (for rendering without libvirt); its files are
        the local source of every other fact, so it is a local model (:attr:`is_local`)."""
        from .files import Host

        try:
            with open(sysfs_online) as fh:
                cpus: CpuSet | None = parse_cpuset(fh.read())
        except (OSError, ValueError):
            cpus = None
        return cls(online_cpus=cpus, passt=passt, source="local", files=Host())

    @property
    def is_local(self) -> bool:
        """Whether this machine is the host (its files are the local source)."""
        return self.files is not None

    @property
    def where(self) -> str:
        """The host's name for messages: its URI without the query (which may name key files)."""
        return self.uri.split("?", 1)[0] if self.uri else "this host"

    def unknown(self, what: str) -> str:
        """The words for a fact only the host itself knows, over a remote connection."""
        return (f"{what}: unknown over {self.where} (only that host knows it): "
                "run 'archdsp-virt check CONFIG' on that host")

    def housekeeping(self, cores: CpuSet) -> CpuSet | None:
        """The cores left to the host and to QEMU's own threads: online, not given to the VM,
        not isolated by the kernel. None when the online CPUs are unknown."""
        if self.online_cpus is None:
            return None
        return self.online_cpus - cores - (self.isolated_cpus or frozenset())

    def pool(self, size_kib: int) -> HugePool | None:
        """The whole host's pool of ``size_kib`` pages (NUMA nodes added up), None when unknown."""
        pools = [p for p in self.hugepages if p.size_kib == size_kib]
        whole = [p for p in pools if p.node is None]
        if whole:
            return whole[0]
        if not pools:
            return None

        def total(values: list[int | None]) -> int | None:
            return None if any(v is None for v in values) else sum(v for v in values if v is not None)

        return HugePool(size_kib, total([p.total for p in pools]), total([p.free for p in pools]))

    def pci_device(self, address: str) -> PciDevice | None:
        for dev in self.pci or ():
            if dev.address == address:
                return dev
        return None

    def iommu_group_members(self, group: str) -> list[str]:
        return sorted(d.address for d in self.pci or () if d.iommu_group == group)

    def describe_cpus(self) -> str:
        return format_cpuset(self.online_cpus) if self.online_cpus is not None else "unknown"


# Kept for code written against the earlier name: the renderer's host facts are the host model.
HostFacts = HostModel
