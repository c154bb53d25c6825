"""What the commands do, as library functions: the one layer every click command goes through.

Each command of :mod:`archdsp_libvirt.cli` parses its options and calls one function here; the
functions load the config, build the host model once, and call the rooms below (domain, virt,
audio, host, guest). They live in :mod:`.domain`, :mod:`.audio`, :mod:`.host` and :mod:`.guest`.

Each name below is a small function with the real one's signature that imports its module when
first called and calls through, so that a command pays only for what it runs (``--help`` and
``netjack status`` never import lxml or libvirt) while a reader, or a tool, still follows the call
from the CLI into the module that does the work. ``tests/test_service_face.py`` keeps each
signature equal to the real one's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from ..domain.build import Rendered

__all__ = [
    # domain.py
    "render_for_cli", "up_command", "down_command", "status_command", "console_command", "check_command",
    "guest_check_command",
    # audio.py
    "netjack_start", "netjack_stop", "netjack_restart", "netjack_status", "netjack_unit", "netjack_dropin",
    "latency_command", "rt_test_command", "tune_command",
    # host.py
    "kernel_params", "tuned_profile", "prepare_apply", "prepare_undo", "vfio_show", "vfio_bind", "vfio_unbind",
    "qemu_conf_fix", "qemu_conf_line", "process_start_time", "daemon_still_ours",
    "headless_pipewire_start", "headless_pipewire_stop",
    # guest.py
    "guest_unit", "guest_nixos",
]


# --- the domain: xml, up, down, status, console, check (service/domain.py) ---

def render_for_cli(config: Path, uri: str | None, host_cpus: str | None = None,
                   port_forwards: str | None = None, uuid: str | None = None) -> tuple[Rendered, list[str]]:
    from . import domain

    return domain.render_for_cli(config, uri, host_cpus=host_cpus, port_forwards=port_forwards, uuid=uuid)


def up_command(config: Path, uri: str | None, restart: bool, autostart: bool, skip: set[str],
               preflight: bool, say, host_root: str = "/") -> None:
    from . import domain

    return domain.up_command(config, uri, restart=restart, autostart=autostart, skip=skip, preflight=preflight,
                             say=say, host_root=host_root)


def down_command(config: Path, uri: str | None, timeout: float, force: bool, undefine: bool, say) -> None:
    from . import domain

    return domain.down_command(config, uri, timeout=timeout, force=force, undefine=undefine, say=say)


def status_command(config: Path, uri: str | None, as_json: bool) -> str:
    from . import domain

    return domain.status_command(config, uri, as_json=as_json)


def console_command(config: Path, uri: str | None, force: bool, pattern: str | None, timeout: float, echo,
                    send: str | None = None) -> None:
    from . import domain

    return domain.console_command(config, uri, force=force, pattern=pattern, timeout=timeout, echo=echo, send=send)


def check_command(config: Path, uri: str | None, host_root: str = "/", as_json: bool = False) -> tuple[str, bool]:
    from . import domain

    return domain.check_command(config, uri, host_root=host_root, as_json=as_json)


def guest_check_command(config: Path, uri: str | None, as_json: bool = False) -> tuple[str, bool]:
    from . import domain

    return domain.guest_check_command(config, uri, as_json=as_json)


# --- the audio link: netjack, latency, rt-test, tune (service/audio.py) ---

def netjack_start(config: Path, say, **options) -> None:
    from . import audio

    return audio.netjack_start(config, say=say, **options)


def netjack_stop(config: Path, say) -> None:
    from . import audio

    return audio.netjack_stop(config, say=say)


def netjack_restart(config: Path, say, wait: float = 0.0, **options) -> None:
    from . import audio

    return audio.netjack_restart(config, say=say, wait=wait, **options)


def netjack_status(config: Path, as_json: bool) -> str:
    from . import audio

    return audio.netjack_status(config, as_json=as_json)


def netjack_unit(config: Path, audio_server: str, pipewire_user: str | None, jack_server: str | None,
                 start_server: str | None) -> str:
    from . import audio

    return audio.netjack_unit(config, audio_server=audio_server, pipewire_user=pipewire_user,
                              jack_server=jack_server, start_server=start_server)


def netjack_dropin(config: Path, nixos: bool, allow_any_address: bool, note) -> str:
    from . import audio

    return audio.netjack_dropin(config, nixos=nixos, allow_any_address=allow_any_address, note=note)


def latency_command(config: Path, measure: bool, seconds: float, target_ms: float | None, host_backend: str,
                    nperiods: int, audio_server: str, as_json: bool, plot_path: Path | None,
                    uri: str | None = None) -> str:
    from . import audio

    return audio.latency_command(config, measure=measure, seconds=seconds, target_ms=target_ms,
                                 host_backend=host_backend, nperiods=nperiods, audio_server=audio_server,
                                 as_json=as_json, plot_path=plot_path, uri=uri)


def rt_test_command(config: Path, uri: str | None, seconds: float, force: bool = False,
                    plot_path: Path | None = None) -> tuple[dict, str]:
    from . import audio

    return audio.rt_test_command(config, uri, seconds=seconds, force=force, plot_path=plot_path)


def tune_command(config: Path, uri: str | None, sizes, latencies, syncs, seconds: float, every: bool = False,
                 do_apply: bool = False, plot_path: Path | None = None, say=print) -> tuple[dict, str]:
    from . import audio

    return audio.tune_command(config, uri, sizes=sizes, latencies=latencies, syncs=syncs, seconds=seconds,
                              every=every, do_apply=do_apply, plot_path=plot_path, say=say)


# --- the host: kernel parameters and VFIO (service/host.py) ---

def kernel_params(config: Path, host_root: Path, fmt: str, diff: bool, cpu_vendor: str | None) -> tuple[str, bool]:
    from . import host

    return host.kernel_params(config, host_root, fmt=fmt, diff=diff, cpu_vendor=cpu_vendor)


def tuned_profile(config: Path) -> str:
    from . import host

    return host.tuned_profile(config)


def prepare_apply(config: Path, host_root: Path, state: Path | None, dry_run: bool, say) -> int:
    from . import host

    return host.prepare_apply(config, host_root, state, dry_run=dry_run, say=say)


def prepare_undo(host_root: Path, state: Path | None, say) -> bool:
    from . import host

    return host.prepare_undo(host_root, state, say=say)


def vfio_show(pci: str, host_root: Path) -> str:
    from . import host

    return host.vfio_show(pci, host_root)


def vfio_bind(pci: str, host_root: Path, dry_run: bool) -> list:
    from . import host

    return host.vfio_bind(pci, host_root, dry_run=dry_run)


def vfio_unbind(pci: str, host_root: Path, dry_run: bool, uri: str | None, force: bool, say) -> list:
    from . import host

    return host.vfio_unbind(pci, host_root, dry_run=dry_run, uri=uri, force=force, say=say)


# --- what scripts/host-services and scripts/demo ask the package (service/host.py) ---

def qemu_conf_fix(host_root: Path) -> tuple[bool, str]:
    from . import host

    return host.qemu_conf_fix(host_root)


def qemu_conf_line() -> str:
    from . import host

    return host.qemu_conf_line()


def process_start_time(pid: int) -> int | None:
    from . import host

    return host.process_start_time(pid)


def daemon_still_ours(name: str, pid: int, start: int) -> bool:
    from . import host

    return host.daemon_still_ours(name, pid, start)


def headless_pipewire_start(directory: Path, user: str | None, say) -> None:
    from . import host

    return host.headless_pipewire_start(directory, user, say=say)


def headless_pipewire_stop(directory: Path, say) -> bool:
    from . import host

    return host.headless_pipewire_stop(directory, say=say)


# --- the guest's own side: guest unit, guest nixos (service/guest.py) ---

def guest_unit(config: Path, rtprio: int, user: str | None, root: Path | None) -> tuple[str, list[Path]]:
    from . import guest

    return guest.guest_unit(config, rtprio=rtprio, user=user, root=root)


def guest_nixos(config: Path, rtprio: int, user: str | None) -> str:
    from . import guest

    return guest.guest_nixos(config, rtprio=rtprio, user=user)
