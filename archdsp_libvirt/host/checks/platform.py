"""KVM, libvirt and the IOMMU: can this host run a VM at all, and pass a device through."""

from __future__ import annotations

import stat

from ...config import DspConfig
from ..accel import resolve
from ..files import cmdline_values
from ..findings import Finding, Status
from ..model import HostModel

# The kernel parameter that turns the IOMMU on, per /proc/cpuinfo vendor_id.
IOMMU_PARAMS = {
    "AuthenticAMD": "amd_iommu=on",
    "HygonGenuine": "amd_iommu=on",
    "GenuineIntel": "intel_iommu=on",
}

KVM_MODULES = {"AuthenticAMD": "kvm_amd", "HygonGenuine": "kvm_amd", "GenuineIntel": "kvm_intel"}


def check_accel(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """Which accelerator the domain gets (``domain_type``, auto resolved on this host) and why."""
    fid = "kvm.accel"
    expected = "KVM where a stock Linux guest boots under it, else TCG said as such (domain_type = \"auto\")"
    accel = resolve(cfg.domain_type, model)
    if cfg.domain_type == "auto":
        if accel.fallback:
            return [Finding(fid, "warn", f"auto picks TCG: {accel.reason}", expected,
                            "on a host with hardware KVM (VT-x/AMD-V, kvm_intel or kvm_amd) auto picks KVM")]
        return [Finding(fid, "ok", f"auto picks KVM: {accel.reason}", expected)]
    if cfg.domain_type == "kvm" and model.kvm_pvm:
        return [Finding(fid, "warn", "domain_type = \"kvm\", but KVM here is nested PVM: only kernels built as PVM "
                        "guests (CONFIG_PVM_GUEST) boot, stock kernels stop after the decompressor", expected,
                        "set domain_type = \"auto\" (TCG here), unless the guest kernel is a PVM guest kernel")]
    return [Finding(fid, "ok", f"{accel.reason}: as the config asks", expected)]


def check_kvm(cfg: DspConfig, model: HostModel) -> list[Finding]:
    fid = "kvm.device"
    expected = "/dev/kvm present, read-write for the QEMU user (group kvm with g+rw, or o+rw)"
    accel = resolve(cfg.domain_type, model)
    if accel.domain_type != "kvm":
        return [Finding(fid, "skip", f"domain_type = {cfg.domain_type!r}: TCG, no KVM needed", expected)]
    host = model.files
    if host is None:
        if model.kvm:
            return [Finding(fid, "ok", f"libvirt at {model.where} offers KVM guests (capabilities)",
                            expected)]
        if model.kvm is False:
            return [Finding(fid, "fail", f"libvirt at {model.where} offers no KVM domains", expected,
                            "on that host: modprobe kvm_amd (or kvm_intel) and enable SVM/VT-x in the firmware; "
                            "or set domain_type = \"qemu\"")]
        return [Finding(fid, "skip", model.unknown("/dev/kvm"), expected)]
    st = host.stat("/dev/kvm")
    vendor = host.cpu_vendor()
    if st is None:
        module = KVM_MODULES.get(vendor or "", "kvm_amd (or kvm_intel)")
        return [Finding(fid, "fail", "/dev/kvm missing", expected,
                        f"modprobe {module}; enable SVM/VT-x in the firmware; or set domain_type = \"qemu\"")]
    mode = stat.S_IMODE(st.st_mode)
    group = host.group_name(st.st_gid) or str(st.st_gid)
    user = (host.qemu_conf("user") or '"libvirt-qemu"').strip('"')
    observed = f"/dev/kvm mode {mode:04o} group {group}"
    if user in ("root", "+0", "0"):
        return [Finding(fid, "ok", observed + f"; QEMU runs as {user}", expected)]
    if mode & 0o006 == 0o006:
        return [Finding(fid, "ok", observed, expected)]
    if mode & 0o060 == 0o060 and (group == "kvm" or host.user_in_group(user, st.st_gid)):
        return [Finding(fid, "ok", observed, expected)]
    return [Finding(fid, "fail", observed + f"; QEMU user {user} cannot open it", expected,
                    "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm")]


def check_libvirt(reachable: bool | None, detail: str = "") -> list[Finding]:
    fid, expected = "libvirt.reachable", "libvirtd answers on the connection URI"
    if reachable is None:
        return [Finding(fid, "skip", "not asked", expected)]
    if reachable:
        return [Finding(fid, "ok", detail or "connected (read-only)", expected)]
    return [Finding(fid, "fail", detail or "cannot connect", expected,
                    "start libvirtd (libvirtd -d, or systemctl start libvirtd) or pass -c URI")]


def check_iommu(cfg: DspConfig, model: HostModel) -> list[Finding]:
    passthrough = cfg.audio_device.enable
    missing: Status = "fail" if passthrough else "warn"
    why = "" if passthrough else " - only needed for audio_device passthrough"
    host = model.files
    if host is None:
        groups = sorted({d.iommu_group for d in model.pci or () if d.iommu_group is not None})
        expected = "/sys/kernel/iommu_groups populated"
        if model.pci is None:
            found = Finding("iommu.groups", "skip", model.unknown("IOMMU groups"), expected)
        elif groups:
            found = Finding("iommu.groups", "ok", f"{len(groups)} IOMMU groups among libvirt's PCI devices", expected)
        else:
            found = Finding("iommu.groups", missing, "no PCI device in an IOMMU group (libvirt node devices)" + why,
                            expected, "on that host: enable AMD-Vi/VT-d in the firmware and add kernel parameters "
                            "amd_iommu=on (or intel_iommu=on) iommu=pt")
        return [Finding("iommu.param", "skip", model.unknown("the kernel command line"),
                        "amd_iommu=on or intel_iommu=on on the kernel command line"),
                Finding("iommu.pt", "skip", model.unknown("the kernel command line"), "iommu=pt"),
                found]
    tokens = host.cmdline()
    vendor = host.cpu_vendor()
    groups = host.listdir("/sys/kernel/iommu_groups")
    out = []

    param = IOMMU_PARAMS.get(vendor or "")
    key = param.partition("=")[0] if param else None
    values = cmdline_values(tokens, key) if key else []
    if param is None:
        out.append(Finding("iommu.param", "skip", f"CPU vendor {vendor or 'unknown'}",
                           "amd_iommu=on or intel_iommu=on on the kernel command line"))
    elif any("on" in v.split(",") for v in values):
        out.append(Finding("iommu.param", "ok", f"{key}={values[-1]}", param))
    elif groups:
        out.append(Finding("iommu.param", "ok", f"{param} not given, but the IOMMU is active ({len(groups)} groups)",
                           param))
    else:
        seen = f"{key}={values[-1]}" if values else f"no {key}= on /proc/cmdline ({vendor})"
        out.append(Finding("iommu.param", missing, seen + why, param, f"kernel parameter {param}"))

    pt = cmdline_values(tokens, "iommu")
    if "pt" in pt:
        out.append(Finding("iommu.pt", "ok", "iommu=pt", "iommu=pt"))
    else:
        # Passthrough works without it; host DMA just goes through the IOMMU's translation.
        out.append(Finding("iommu.pt", "warn", f"iommu={pt[-1]}" if pt else "no iommu= on /proc/cmdline",
                           "iommu=pt (host devices bypass translation)", "kernel parameter iommu=pt"))

    if groups:
        out.append(Finding("iommu.groups", "ok", f"{len(groups)} groups in /sys/kernel/iommu_groups",
                           "/sys/kernel/iommu_groups populated"))
    else:
        fix = f"enable AMD-Vi/VT-d in the firmware and add kernel parameters {param or 'amd_iommu=on'} iommu=pt"
        out.append(Finding("iommu.groups", missing, "/sys/kernel/iommu_groups empty" + why,
                           "/sys/kernel/iommu_groups populated", fix))
    return out
