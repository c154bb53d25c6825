"""The host's commands: kernel parameters, VFIO, what scripts/host-services asks, and a headless PipeWire for
the demo (``check`` is a domain command: it needs the config's host)."""

from __future__ import annotations

from pathlib import Path

from ..host.files import Host


def kernel_params(config: Path, host_root: Path, fmt: str, diff: bool, cpu_vendor: str | None) -> tuple[str, bool]:
    from ..host.kernelparams import kernel_params_command

    return kernel_params_command(config, Host(host_root), fmt=fmt, diff=diff, cpu_vendor=cpu_vendor)


def tuned_profile(config: Path) -> str:
    from ..config import load_config
    from ..host.checks.tuned import tuned_variables

    return tuned_variables(load_config(config))


def prepare_apply(config: Path, host_root: Path, state: Path | None, dry_run: bool, say) -> int:
    from ..config import load_config
    from ..host.prepare import PREPARE_STATE, apply

    host = Host(host_root)
    return apply(load_config(config), host, state or host.path(PREPARE_STATE), dry_run=dry_run, say=say)


def prepare_undo(host_root: Path, state: Path | None, say) -> bool:
    from ..host.prepare import PREPARE_STATE, undo

    host = Host(host_root)
    return undo(host, state or host.path(PREPARE_STATE), say=say)


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


# What scripts/host-services asks (``archdsp-virt host prepare``): the verdicts are the package's own.

def qemu_conf_fix(host_root: Path) -> tuple[bool, str]:
    from ..host.prepare import needs_qemu_conf_fix

    return needs_qemu_conf_fix(Host(host_root))


def qemu_conf_line() -> str:
    from ..host.prepare import QEMU_CGROUP_LINE

    return QEMU_CGROUP_LINE


def process_start_time(pid: int) -> int | None:
    from ..procs import start_time

    return start_time(pid)


def daemon_still_ours(name: str, pid: int, start: int) -> bool:
    from ..host.prepare import still_ours

    return still_ours(name, pid, start)


# A headless PipeWire of our own for the demo and the tests (``archdsp-virt netjack headless``).

def headless_pipewire_start(directory: Path, user: str | None, say) -> None:
    from ..audio.pipewire.headless import start

    start(directory, user, say=say)


def headless_pipewire_stop(directory: Path, say) -> bool:
    from ..audio.pipewire.headless import stop

    return stop(directory, say=say)
