"""VFIO helpers: show a PCI device, bind it to vfio-pci, give it back.

Domains use ``managed='yes'`` by default (libvirt detaches and reattaches
the device itself); these helpers serve the unmanaged mode, which expects
the device bound to vfio-pci before the VM starts.

``bind`` writes ``vfio-pci`` to the device's ``driver_override``, unbinds it
from its current driver and asks the kernel to probe it again
(``/sys/bus/pci/drivers_probe``), so vfio-pci takes it. The driver it had
is remembered in a small state file (``/run/archdsp-libvirt/vfio.json``,
gone at reboot just like the binding) for ``unbind``, which clears the
override, unbinds from vfio-pci and binds the device back to that driver
(or lets the kernel probe when nothing was remembered).

Each returns the sysfs writes it made, or with ``dry_run`` would make.
Everything goes through a :class:`~archdsp_libvirt.hostcheck.Host` root.
"""

from __future__ import annotations

import json

from msgspec import Struct

from ..errors import HostError
from .files import Host, PciDevice, normalize_pci

STATE_FILE = "/run/archdsp-libvirt/vfio.json"
VFIO_DRIVER = "vfio-pci"


class SysfsWrite(Struct, frozen=True):
    path: str
    value: str

    def __str__(self) -> str:
        value = self.value.strip()
        return f"echo {value} > {self.path}" if value else f"echo > {self.path}"


class DeviceInfo(Struct, frozen=True):
    """``vfio show``: the device, its IOMMU group and every member of it."""

    device: PciDevice
    members: tuple[PciDevice, ...]
    remembered_driver: str | None

    def format(self) -> str:
        d = self.device
        override = f" (driver_override {d.driver_override})" if d.driver_override else ""
        lines = [
            f"device:       {d.address}",
            f"vendor:device {d.vendor_device}",
            f"class:        {d.class_code:06x}",
            f"driver:       {d.driver or 'none'}{override}",
            f"iommu group:  {d.iommu_group or 'none (IOMMU off)'}",
        ]
        if self.remembered_driver:
            lines.append(f"restores to:  {self.remembered_driver} (recorded by vfio bind)")
        for m in self.members:
            lines.append(f"  member {m.describe()}")
        return "\n".join(lines) + "\n"


def _device(host: Host, pci: str) -> PciDevice:
    addr = normalize_pci(pci)
    dev = host.pci(addr)
    if dev is None:
        raise HostError(f"no PCI device {addr} in /sys/bus/pci/devices; see lspci -D")
    return dev


def _load_state(host: Host) -> dict[str, str | None]:
    text = host.read(STATE_FILE)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise HostError(f"{STATE_FILE} is not JSON; remove it (the previous drivers it held are lost)") from None
    return data if isinstance(data, dict) else {}


def _save_state(host: Host, state: dict[str, str | None]) -> None:
    path = host.path(STATE_FILE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if state:
            path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise HostError(f"cannot write {STATE_FILE}: {exc.strerror}") from None


def _apply(host: Host, writes: list[SysfsWrite]) -> None:
    for w in writes:
        try:
            host.write(w.path, w.value)
        except OSError as exc:
            raise HostError(f"writing {w.value.strip()!r} to {w.path} failed: {exc.strerror}") from None


def show(host: Host, pci: str) -> DeviceInfo:
    dev = _device(host, pci)
    names = host.iommu_group_members(dev.iommu_group) if dev.iommu_group else []
    members = tuple(m for m in (host.pci(n) for n in names) if m is not None)
    return DeviceInfo(device=dev, members=members, remembered_driver=_load_state(host).get(dev.address))


def bind(host: Host, pci: str, dry_run: bool = False) -> list[SysfsWrite]:
    """Hand ``pci`` to vfio-pci; [] when it already is. Refuses host-critical devices."""
    dev = _device(host, pci)
    if dev.driver == VFIO_DRIVER:
        return []
    critical = host.critical_devices()
    if dev.address in critical or dev.is_bridge:
        why = critical.get(dev.address, "a PCI bridge")
        raise HostError(f"refusing to bind {dev.address} to vfio-pci: it is the {why}")
    if dev.iommu_group is None:
        raise HostError(f"{dev.address} has no IOMMU group: enable the IOMMU (archdsp-virt host kernel-params)")
    if not host.exists(f"/sys/bus/pci/drivers/{VFIO_DRIVER}"):
        raise HostError("the vfio-pci driver is not loaded: modprobe vfio-pci")
    base = f"/sys/bus/pci/devices/{dev.address}"
    writes = [SysfsWrite(f"{base}/driver_override", VFIO_DRIVER)]
    if dev.driver:
        writes.append(SysfsWrite(f"/sys/bus/pci/drivers/{dev.driver}/unbind", dev.address))
    writes.append(SysfsWrite("/sys/bus/pci/drivers_probe", dev.address))
    if dry_run:
        return writes
    state = _load_state(host)
    state[dev.address] = dev.driver
    _save_state(host, state)
    _apply(host, writes)
    return writes


def unbind(host: Host, pci: str, dry_run: bool = False) -> list[SysfsWrite]:
    """Give ``pci`` back to the driver it had before ``bind`` (or to whatever the kernel probes)."""
    dev = _device(host, pci)
    state = _load_state(host)
    remembered = dev.address in state
    previous = state.get(dev.address)
    if dev.driver != VFIO_DRIVER and dev.driver_override != VFIO_DRIVER and not remembered:
        return []
    base = f"/sys/bus/pci/devices/{dev.address}"
    writes = [SysfsWrite(f"{base}/driver_override", "\n")]
    if dev.driver:
        writes.append(SysfsWrite(f"/sys/bus/pci/drivers/{dev.driver}/unbind", dev.address))
    if previous and host.exists(f"/sys/bus/pci/drivers/{previous}"):
        writes.append(SysfsWrite(f"/sys/bus/pci/drivers/{previous}/bind", dev.address))
    elif previous is not None or not remembered:
        writes.append(SysfsWrite("/sys/bus/pci/drivers_probe", dev.address))
    if dry_run:
        return writes
    _apply(host, writes)
    state.pop(dev.address, None)
    _save_state(host, state)
    return writes
