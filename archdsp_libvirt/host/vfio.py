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
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from msgspec import Struct

from ..errors import HostError
from ..procs import flock_within
from .critical import critical_devices
from .files import Host, PciDevice, normalize_pci

STATE_FILE = "/run/archdsp-libvirt/vfio.json"
LOCK_FILE = "/run/archdsp-libvirt/vfio.lock"  # held around every read-modify-write of STATE_FILE
LOCK_WAIT = 30.0  # seconds
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
    """Replace the state file atomically (a temporary file in the same folder, then rename)."""
    path = host.path(STATE_FILE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not state:
            path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(prefix=".vfio.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as exc:
        raise HostError(f"cannot write {STATE_FILE}: {exc.strerror} (run as root)") from None


@contextmanager
def _locked(host: Host) -> Iterator[None]:
    """Hold an exclusive flock on LOCK_FILE (waiting at most LOCK_WAIT s) for a read-modify-write."""
    path = host.path(LOCK_FILE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise HostError(f"cannot open {LOCK_FILE}: {exc.strerror} (run as root)") from None
    try:
        if not flock_within(fd, LOCK_WAIT):
            raise HostError(f"another vfio bind or unbind holds {LOCK_FILE} for more than "
                            f"{LOCK_WAIT:g} s; try again when it has finished")
        yield
    finally:
        os.close(fd)


def _apply(host: Host, writes: list[SysfsWrite]) -> None:
    for w in writes:
        try:
            host.write(w.path, w.value)
        except OSError as exc:
            raise HostError(f"writing {w.value.strip()!r} to {w.path} failed: {exc.strerror}") from None


def _apply_or_undo(host: Host, writes: list[SysfsWrite], undo: Callable[[list[SysfsWrite]], list[SysfsWrite]]) -> None:
    """Make ``writes`` in order; when one fails, make ``undo(done)`` (best effort) and raise, saying
    what was undone and what could not be."""
    done: list[SysfsWrite] = []
    for w in writes:
        try:
            host.write(w.path, w.value)
        except OSError as exc:
            failed = f"writing {w.value.strip()!r} to {w.path} failed: {exc.strerror}"
            undone, not_undone = [], []
            for u in undo(done):
                try:
                    host.write(u.path, u.value)
                    undone.append(str(u))
                except OSError as uexc:
                    not_undone.append(f"{u} ({uexc.strerror})")
            what = f"; undone: {', '.join(undone)}" if undone else "; nothing to undo"
            if not_undone:
                what += f"; could NOT undo: {', '.join(not_undone)} (check with archdsp-virt vfio show)"
            raise HostError(failed + what) from None
        done.append(w)


def show(host: Host, pci: str) -> DeviceInfo:
    dev = _device(host, pci)
    names = host.iommu_group_members(dev.iommu_group) if dev.iommu_group else []
    members = tuple(m for m in (host.pci(n) for n in names) if m is not None)
    return DeviceInfo(device=dev, members=members, remembered_driver=_load_state(host).get(dev.address))


def bind(host: Host, pci: str, dry_run: bool = False) -> list[SysfsWrite]:
    """Hand ``pci`` to vfio-pci; [] when it already is. Refuses host-critical devices.

    When a sysfs write fails, the writes already made are undone (the override cleared, the old
    driver bound again) and the recorded driver is forgotten, then the failure is raised.
    """
    dev = _device(host, pci)
    if dev.driver == VFIO_DRIVER:
        return []
    critical = critical_devices(host)
    if dev.address in critical or dev.is_bridge:
        why = critical.get(dev.address, "a PCI bridge")
        raise HostError(f"refusing to bind {dev.address} to vfio-pci: it is the {why}")
    if dev.iommu_group is None:
        raise HostError(f"{dev.address} has no IOMMU group: enable the IOMMU (archdsp-virt host kernel-params)")
    if not host.exists(f"/sys/bus/pci/drivers/{VFIO_DRIVER}"):
        raise HostError("the vfio-pci driver is not loaded: modprobe vfio-pci")
    base = f"/sys/bus/pci/devices/{dev.address}"
    override = SysfsWrite(f"{base}/driver_override", VFIO_DRIVER)
    writes = [override]
    release = None
    if dev.driver:
        release = SysfsWrite(f"/sys/bus/pci/drivers/{dev.driver}/unbind", dev.address)
        writes.append(release)
    writes.append(SysfsWrite("/sys/bus/pci/drivers_probe", dev.address))
    if dry_run:
        return writes

    def undo(done: list[SysfsWrite]) -> list[SysfsWrite]:
        out = []
        if override in done:  # first: an override of vfio-pci keeps the old driver from binding
            out.append(SysfsWrite(f"{base}/driver_override", "\n"))
        if release is not None and release in done:
            out.append(SysfsWrite(f"/sys/bus/pci/drivers/{dev.driver}/bind", dev.address))
        return out

    with _locked(host):
        state = _load_state(host)
        before = dict(state)
        state[dev.address] = dev.driver
        _save_state(host, state)
        try:
            _apply_or_undo(host, writes, undo)
        except HostError:
            _save_state(host, before)
            raise
    return writes


InUse = Callable[[str, "str | None"], list[str]]


def unbind(host: Host, pci: str, dry_run: bool = False, uri: str | None = None, force: bool = False,
           in_use: InUse | None = None, say: Callable[[str], None] = lambda _m: None) -> list[SysfsWrite]:
    """Give ``pci`` back to the driver it had before ``bind`` (or to whatever the kernel probes).

    Refuses while a running libvirt domain (on ``uri``) has the device, as ``in_use(address, uri)``
    says (the libvirt side's :func:`archdsp_libvirt.virt.hostfacts.domains_holding`); when it cannot
    say (or is not given), refuses unless ``force``.
    """
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
    try:
        if in_use is None:
            raise HostError(f"nothing was given to ask libvirt whether a running domain holds {dev.address}")
        users = in_use(dev.address, uri)
    except HostError as err:
        if not force:
            raise HostError(f"{err}; refusing to take {dev.address} from vfio-pci under a VM that may use it "
                            "(start libvirtd, or --force)") from None
        say(f"warning: {err}; unbinding anyway (--force)")
        users = []
    if users:
        raise HostError(f"refusing to unbind {dev.address}: the running domain {', '.join(users)} has it "
                        f"(virsh shutdown {users[0]}, then vfio unbind again)")
    with _locked(host):
        _apply(host, writes)
        state = _load_state(host)
        state.pop(dev.address, None)
        _save_state(host, state)
    return writes
