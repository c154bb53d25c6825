"""Which accelerator a domain runs under: ``domain_type = "auto"`` resolved against the host model.

The rule: KVM where the host offers it and a stock Linux guest can boot under it; TCG (QEMU's
software emulation, libvirt's ``<domain type='qemu'>``) otherwise, said in one line with the reason.
``"kvm"`` and ``"qemu"`` mean exactly that and are never changed.

What the host says comes from the host model: ``kvm`` (libvirt's capabilities list KVM guests, or
``/dev/kvm`` where libvirt was not asked) and ``kvm_pvm`` (``/sys/module/kvm_pvm`` on this machine:
a nested PVM host runs only kernels built as PVM guests; over a remote URI libvirt cannot tell it).
Where the host's KVM is not known at all (no connection, a host given by hand), auto renders KVM,
as the offline default, and says so.
"""

from __future__ import annotations

from msgspec import Struct

from .model import HostModel

TCG_COST = ("running under TCG, software emulation: expect xruns, and figures that say nothing "
            "about a KVM host")
# The cause a bad verdict names when the domain runs under TCG.
TCG_CAUSE = ("the VM runs under TCG (software emulation, no KVM): expect xruns and late wake-ups; "
             "these figures say nothing about a KVM host")


class Accel(Struct, frozen=True):
    """What a config's ``domain_type`` becomes on one host, and why."""

    domain_type: str  # libvirt's <domain type=...>: "kvm" or "qemu"
    asked: str  # the config's domain_type: "auto", "kvm" or "qemu"
    reason: str
    assumed: bool = False  # part of the reason is assumed, not read from the host (said with it)

    @property
    def name(self) -> str:
        """The accelerator in the words status and --json use: "kvm" or "tcg"."""
        return accelerator_name(self.domain_type)

    @property
    def fallback(self) -> bool:
        """Whether auto had to fall back to TCG (the line ``up`` prints)."""
        return self.asked == "auto" and self.domain_type == "qemu"


def accelerator_name(domain_type: str | None) -> str | None:
    """libvirt's domain type in the accelerator's own name: qemu -> "tcg", kvm -> "kvm"."""
    if domain_type is None:
        return None
    return {"qemu": "tcg", "kvm": "kvm"}.get(domain_type, domain_type)


def _pvm_reason(model: HostModel) -> str:
    where = "here" if model.is_local or model.uri is None else f"at {model.where}"
    return f"KVM {where} is nested PVM: stock kernels cannot boot; {TCG_COST}"


def resolve(domain_type: str, model: HostModel) -> Accel:
    """``domain_type`` ("auto", "kvm" or "qemu") on the host ``model`` describes."""
    if domain_type == "kvm":
        return Accel("kvm", "kvm", "domain_type = \"kvm\"")
    if domain_type == "qemu":
        return Accel("qemu", "qemu", "domain_type = \"qemu\" (TCG, software emulation)")
    if model.kvm_pvm:
        return Accel("qemu", "auto", _pvm_reason(model))
    if model.kvm is False:
        if model.kvm_from == "libvirt":
            if not model.is_local:
                seen = "on that host"
            elif model.files.exists("/dev/kvm"):
                seen = ("with /dev/kvm present (its QEMU user may not open it: "
                        "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm)")
            else:
                seen = "and there is no /dev/kvm"
            return Accel("qemu", "auto", f"no KVM: libvirt at {model.where} offers no KVM guests {seen}; {TCG_COST}")
        return Accel("qemu", "auto", f"no KVM here (no /dev/kvm); {TCG_COST}")
    if model.kvm is None:
        return Accel("kvm", "auto", "the host's KVM was not read, so KVM is assumed (offline default; 'up' decides "
                                    "against the host, domain_type = \"qemu\" renders TCG)", assumed=True)
    if model.kvm_pvm is None:
        return Accel("kvm", "auto", f"libvirt at {model.where} offers KVM guests; assumed not nested PVM "
                                    "(libvirt cannot tell it; if stock kernels do not boot there, set "
                                    "domain_type = \"qemu\")", assumed=True)
    if not model.is_local:
        return Accel("kvm", "auto", f"libvirt at {model.where} offers KVM guests and its host CPU has "
                                    "vmx/svm (hardware virtualisation, not nested PVM)")
    source = "libvirt offers KVM guests" if model.kvm_from == "libvirt" else "/dev/kvm present"
    return Accel("kvm", "auto", f"{source}, not nested PVM (no kvm_pvm module)")
