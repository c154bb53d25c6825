"""The host's commands: kernel parameters and VFIO (``check`` is a domain command: it needs the config's host)."""

from __future__ import annotations

from pathlib import Path

from ..host.files import Host


def kernel_params(config: Path, host_root: Path, fmt: str, diff: bool, cpu_vendor: str | None) -> tuple[str, bool]:
    from ..host.kernelparams import kernel_params_command

    return kernel_params_command(config, Host(host_root), fmt=fmt, diff=diff, cpu_vendor=cpu_vendor)


def vfio_show(pci: str, host_root: Path) -> str:
    from ..host.vfio import show

    return show(Host(host_root), pci).format()


def vfio_bind(pci: str, host_root: Path, dry_run: bool) -> list:
    from ..host.vfio import bind

    return bind(Host(host_root), pci, dry_run=dry_run)


def vfio_unbind(pci: str, host_root: Path, dry_run: bool, uri: str | None, force: bool, say) -> list:
    from ..host.vfio import unbind
    from ..virt.hostfacts import domains_holding

    return unbind(Host(host_root), pci, dry_run=dry_run, uri=uri, force=force, in_use=domains_holding, say=say)
