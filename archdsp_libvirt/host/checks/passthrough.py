"""VFIO passthrough of the PCI audio device: the device, its IOMMU group, its drivers."""

from __future__ import annotations

from ...config import DspConfig
from ..critical import critical_devices
from ..findings import Finding
from ..model import HostModel
from .platform import IOMMU_PARAMS

# Drivers a VFIO group member may have while the group is in use (kernel vfio's list).
VFIO_SAFE_DRIVERS = {None, "vfio-pci", "pci-stub"}


def check_passthrough(cfg: DspConfig, model: HostModel) -> list[Finding]:
    dev_cfg = cfg.audio_device
    ids = ("vfio.device", "vfio.vendor", "vfio.group", "vfio.critical", "vfio.driver", "vfio.host-audio")
    expectations = {
        "vfio.device": "the PCI device exists",
        "vfio.vendor": f"vendor:device {dev_cfg.vendor_device or '(any)'}",
        "vfio.group": "an IOMMU group whose other members are free for VFIO (no driver, vfio-pci or pci-stub)",
        "vfio.critical": "no PCI bridge, root-filesystem storage or default-route NIC in the group",
        "vfio.driver": "vfio-pci, or any driver when managed (libvirt rebinds it)",
        "vfio.host-audio": "not the host's only audio controller in use by the host",
    }
    if not dev_cfg.enable:
        return [Finding(i, "skip", "audio_device.enable = false", expectations[i]) for i in ids]
    addr = (dev_cfg.pci_id or "").lower()
    host = model.files
    dev = host.pci(addr) if host is not None else model.pci_device(addr)
    if dev is None:
        return [Finding("vfio.device", "fail", f"no {addr} in /sys/bus/pci/devices", expectations["vfio.device"],
                        "set audio_device.pci_id to an address from lspci -Dnn")] + [
            Finding(i, "skip", f"{addr} missing", expectations[i]) for i in ids[1:]]
    out = [Finding("vfio.device", "ok", dev.describe(), expectations["vfio.device"])]

    want = (dev_cfg.vendor_device or "").lower()
    if not want:
        out.append(Finding("vfio.vendor", "skip", f"{dev.vendor_device} (vendor_device not set)",
                           expectations["vfio.vendor"]))
    elif want == dev.vendor_device:
        out.append(Finding("vfio.vendor", "ok", dev.vendor_device, expectations["vfio.vendor"]))
    else:
        out.append(Finding("vfio.vendor", "fail", f"{addr} is {dev.vendor_device}", expectations["vfio.vendor"],
                           f"check audio_device.pci_id, or set audio_device.vendor_device = \"{dev.vendor_device}\""))

    if dev.iommu_group is None:
        out.append(Finding("vfio.group", "fail", f"{addr} has no iommu_group (IOMMU off)", expectations["vfio.group"],
                           "enable AMD-Vi/VT-d in the firmware and add kernel parameters "
                           f"{IOMMU_PARAMS.get((host.cpu_vendor() if host else None) or '', 'amd_iommu=on')} iommu=pt"))
        out.append(Finding("vfio.critical", "skip", "no IOMMU group", expectations["vfio.critical"]))
    else:
        if host is not None:
            names = host.iommu_group_members(dev.iommu_group) or [addr]
            members = [m for m in (host.pci(n) for n in names) if m is not None]
        else:
            members = [m for n in model.iommu_group_members(dev.iommu_group) if (m := model.pci_device(n))]
        listing = f"group {dev.iommu_group}: " + ", ".join(m.describe() for m in members)
        busy = [m for m in members if m.address != addr and not m.is_bridge and m.driver not in VFIO_SAFE_DRIVERS]
        if busy:
            out.append(Finding("vfio.group", "fail", listing, expectations["vfio.group"],
                               "; ".join(f"archdsp-virt vfio bind {m.address}" for m in busy)
                               + " (or pass them through too)"))
        else:
            out.append(Finding("vfio.group", "ok", listing, expectations["vfio.group"]))
        critical = critical_devices(host) if host is not None else {}
        bad = [f"{m.address} (PCI bridge)" for m in members if m.is_bridge]
        bad += [f"{m.address} ({critical[m.address]})" for m in members if m.address in critical]
        if not bad and host is None:
            out.append(Finding("vfio.critical", "skip", f"group {dev.iommu_group}: no PCI bridge; "
                               + model.unknown("the root disk's controller and the default route's NIC"),
                               expectations["vfio.critical"]))
        elif bad:
            out.append(Finding("vfio.critical", "fail", f"group {dev.iommu_group} holds " + ", ".join(bad),
                               expectations["vfio.critical"],
                               "move the card to a slot with its own IOMMU group, or use NETJACK instead "
                               "(audio_device.enable = false)"))
        else:
            out.append(Finding("vfio.critical", "ok", f"group {dev.iommu_group}: nothing host-critical",
                               expectations["vfio.critical"]))

    if dev.driver == "vfio-pci":
        out.append(Finding("vfio.driver", "ok", "vfio-pci", expectations["vfio.driver"]))
    elif dev_cfg.managed:
        out.append(Finding("vfio.driver", "ok", f"{dev.driver or 'no driver'} now; libvirt binds vfio-pci on start "
                           "(managed)", expectations["vfio.driver"]))
    else:
        out.append(Finding("vfio.driver", "fail", f"{dev.driver or 'no driver'} (managed = false expects vfio-pci)",
                           expectations["vfio.driver"], f"archdsp-virt vfio bind {addr}"))

    audio = [d for d in (host.pci_devices() if host is not None else model.pci or ()) if d.is_audio]
    in_use = dev.driver not in VFIO_SAFE_DRIVERS
    if dev.is_audio and in_use and all(d.address == addr for d in audio):
        out.append(Finding("vfio.host-audio", "fail", f"{addr} is the host's only audio controller, bound to "
                           f"{dev.driver}", expectations["vfio.host-audio"],
                           "give the host another audio device (or none: NETJACK needs none), or accept losing it "
                           "with up --skip-check vfio.host-audio"))
    else:
        others = [d.address for d in audio if d.address != addr]
        seen = (f"{len(others)} other audio controller(s)" if others
                else f"{dev.driver or 'no driver'} (not in use by the host)" if dev.is_audio
                else f"class {dev.class_code:06x} is not an audio controller")
        out.append(Finding("vfio.host-audio", "ok", seen, expectations["vfio.host-audio"]))
    return out
