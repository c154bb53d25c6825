"""``archdsp-virt``: the command line. Thin: each command parses its options
and calls one library function. Errors become one line and an exit code
(2 for bad input, 1 for a failing host or libvirt), never a traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from pathlib import Path

import click

from ..errors import ArchdspError
from .options import Finite, config_argument, json_option, nperiods_option


class Failure(click.ClickException):
    """One of our errors, shown as one line with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Group(click.Group):
    """The top-level group: our errors become one line, and the host commands
    (``check``, ``host``, ``vfio``) are imported only when one of them runs
    or help lists them."""

    lazy = {"check": "host", "host": "host", "vfio": "host", "rt-test": "rt", "tune": "rt"}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module = importlib.import_module(f".{self.lazy[name]}", __package__)
            self.add_command(getattr(module, name.replace("-", "_")))
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ArchdspError as err:
            raise Failure(err.message, err.exit_code) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            raise click.exceptions.Exit(130) from None
        except Exception as exc:  # the one boundary where anything else becomes one line
            failure = unexpected(exc)
            if failure is None:
                raise
            raise failure from None


# Programs the package runs, and where they come from, for a "not found" hint.
_PROGRAMS = {
    "jack_iodelay": "apt-get install jackd2", "jack_load": "apt-get install jackd2",
    "jack_unload": "apt-get install jackd2", "jackd": "apt-get install jackd2",
    "stdbuf": "apt-get install coreutils", "virsh": "apt-get install libvirt-clients",
}
_HINTS = {
    errno.EACCES: "run as root (or with sudo)",
    errno.EPERM: "run as root (or with sudo)",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "free some space",
    errno.ENOENT: "check that it exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ESRCH: "the process exited meanwhile; run the command again",
}


def _shown(name) -> str:
    text = os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name)
    return text if text.isprintable() else repr(text)


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError: the file or program, the operation's reason, and a hint."""
    reason = exc.strerror or type(exc).__name__
    name = exc.filename
    if isinstance(exc, FileNotFoundError) and isinstance(name, str) and os.sep not in name:
        # subprocess: a program looked up on PATH
        fix = _PROGRAMS.get(name, "install it, or put it on PATH")
        return f"cannot run {name}: not found on PATH ({fix})"
    if isinstance(exc, ProcessLookupError) or exc.errno == errno.ESRCH:
        return f"no such process ({_HINTS[errno.ESRCH]})"
    where = ""
    if name is not None:
        where = _shown(name) + (f" -> {_shown(exc.filename2)}" if exc.filename2 is not None else "") + ": "
    hint = _HINTS.get(exc.errno or 0)
    return f"{where}{reason}" + (f" ({hint})" if hint else "")


def unexpected(exc: Exception) -> Failure | None:
    """What the CLI says about an exception that is not one of ours; None to let it through
    (ARCHDSP_DEBUG=1 keeps the traceback of an internal error)."""
    if isinstance(exc, OSError):
        return Failure(describe_os_error(exc), 1)
    jack = sys.modules.get("jack")  # JACK-Client: imported only by the commands that use it
    if jack is not None and isinstance(exc, getattr(jack, "JackError", ())):
        return Failure(f"JACK: {exc}", 1)
    if os.environ.get("ARCHDSP_DEBUG") == "1":
        return None
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return Failure(f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else "")
                   + "; please report it (ARCHDSP_DEBUG=1 shows the traceback)", 1)


class Ctx:
    """What the top-level options say to every command."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri




def warn(message: str) -> None:
    click.echo(f"warning: {message}", err=True)


def note(message: str) -> None:
    click.echo(message, err=True)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--connect",
    "uri",
    metavar="URI",
    help="libvirt URI, as for virsh (default: $LIBVIRT_DEFAULT_URI, else qemu:///system).",
)
@click.version_option(package_name="archdsp-libvirt")
@click.pass_context
def cli(ctx: click.Context, uri: str | None) -> None:
    """A real-time DSP coprocessor VM, defined and run through libvirt."""
    ctx.obj = Ctx(uri=uri)


@cli.command()
@config_argument
@click.option("--host-cpus", metavar="LIST", help="Render for a host whose online CPUs are LIST (e.g. 0-7), not this one.")
@click.option(
    "--port-forwards",
    type=click.Choice(["auto", "passt", "hostfwd"]),
    default=None,
    help="How port forwards are rendered (default: the config's network.port_forward_backend; "
    "auto asks libvirt whether it has passt).",
)
@click.pass_obj
def xml(obj: Ctx, config: Path, host_cpus: str | None, port_forwards: str | None) -> None:
    """Print the libvirt domain XML for CONFIG (for virsh define)."""
    from ..service import render_for_cli

    rendered, notes = render_for_cli(config, obj.uri, host_cpus=host_cpus, port_forwards=port_forwards)
    for line in notes:
        note(line)
    for line in rendered.warnings:
        warn(line)
    click.echo(rendered.xml, nl=False)


@cli.command()
@config_argument
@click.option("--restart", is_flag=True, help="Restart a running domain whose definition changed.")
@click.option("--no-autostart", is_flag=True, help="Do not mark the domain to start when the host boots.")
@click.option("--skip-check", "skip_checks", multiple=True, metavar="ID",
              help="Go on despite a failing preflight check ID (repeatable; recorded in the output).")
@click.option("--no-check", is_flag=True, help="Skip the host preflight altogether.")
@click.pass_obj
def up(obj: Ctx, config: Path, restart: bool, no_autostart: bool, skip_checks: tuple[str, ...], no_check: bool) -> None:
    """Define CONFIG's domain (keeping its UUID) and start it."""
    from ..service import up_command

    up_command(config, obj.uri, restart=restart, autostart=not no_autostart, skip=set(skip_checks),
               preflight=not no_check, say=click.echo)


@cli.command()
@config_argument
@click.option("--timeout", type=Finite(0, 3600), default=60.0, show_default=True,
              help="Seconds to wait for the ACPI shutdown before destroying.")
@click.option("--force", is_flag=True, help="Destroy at once, without an ACPI shutdown.")
@click.option("--undefine", is_flag=True, help="Remove the definition too.")
@click.pass_obj
def down(obj: Ctx, config: Path, timeout: float, force: bool, undefine: bool) -> None:
    """Shut CONFIG's domain down (ACPI, then destroy after --timeout)."""
    from ..service import down_command

    down_command(config, obj.uri, timeout=timeout, force=force, undefine=undefine, say=click.echo)


@cli.command()
@config_argument
@json_option()
@click.pass_obj
def status(obj: Ctx, config: Path, as_json: bool) -> None:
    """The DSP VM's state, vCPUs, isolation, hugepages, console log and drift."""
    from ..service import status_command

    click.echo(status_command(config, obj.uri, as_json=as_json), nl=False)


@cli.command()
@config_argument
@click.option("--force", is_flag=True, help="Take over a console another session holds.")
@click.option("--expect", "pattern", metavar="REGEX", help="Non-interactive: read until REGEX matches, then exit 0.")
@click.option("--timeout", type=Finite(0, 86400), default=60.0, show_default=True,
              help="With --expect: give up (exit 1) after this many seconds.")
@click.option("--send", metavar="TEXT", help="With --expect: type TEXT first (backslash escapes such as \\n work).")
@click.pass_obj
def console(obj: Ctx, config: Path, force: bool, pattern: str | None, timeout: float, send: str | None) -> None:
    """Attach to the serial console (Ctrl-] leaves), or wait for --expect REGEX."""
    from ..service import console_command

    console_command(config, obj.uri, force=force, pattern=pattern, timeout=timeout,
                    echo=lambda t: click.echo(t, nl=False), send=send)


@cli.group()
def netjack() -> None:
    """The host side of the NETJACK2 link (dsp-netjack-bridge)."""


jack_server_option = click.option("--jack-server", metavar="NAME",
                                  help="JACK server to join (default: $JACK_DEFAULT_SERVER, else 'default').")
server_option = click.option("--server", "start_server", type=click.Choice(["dummy", "alsa"]),
                             help="Start a jackd with this backend at the config's rate and period if none runs.")
wait_option = click.option("--wait", type=Finite(0, 3600), default=0.0, show_default=True,
                           help="Wait this many seconds for the VM to join; exit 1 if it does not.")


audio_server_option = click.option(
    "--audio-server", type=click.Choice(["auto", "pipewire", "jack"]), default="auto", show_default=True,
    help="Host audio server: auto takes the user's PipeWire when one answers (and no JACK option is given), "
    "else JACK.")
pipewire_user_option = click.option("--pipewire-user", metavar="USER",
                                    help="Join USER's PipeWire (default: sudo's user, else $XDG_RUNTIME_DIR).")
any_address_option = click.option(
    "--allow-any-address", is_flag=True,
    help="PipeWire: start its NETJACK2 manager although it listens on every address, behind an nftables "
    "rule that keeps the port to master_ip's interface (refused without this flag).")


@netjack.command("start")
@config_argument
@audio_server_option
@pipewire_user_option
@any_address_option
@jack_server_option
@server_option
@click.option("--device", default="hw:0", show_default=True, help="ALSA device for --server alsa.")
@nperiods_option
@wait_option
def netjack_start(config: Path, audio_server: str, pipewire_user: str | None, allow_any_address: bool,
                  jack_server: str | None, start_server: str | None, device: str, nperiods: int,
                  wait: float) -> None:
    """Join the host's audio server (PipeWire or JACK) and start the NETJACK master for CONFIG's VM."""
    from ..config import load_config
    from ..audio.servers import start

    start(load_config(config), audio_server=audio_server, pipewire_user=pipewire_user,
          allow_any_address=allow_any_address, server=jack_server, start_server=start_server, device=device,
          nperiods=nperiods, wait=wait, say=click.echo)


@netjack.command("stop")
@config_argument
def netjack_stop(config: Path) -> None:
    """Stop the bridge: its supervisor, the NETJACK master, and a jackd it started."""
    from ..config import load_config
    from ..audio.servers import stop

    stop(load_config(config).name, say=click.echo)


@netjack.command("restart")
@config_argument
@audio_server_option
@pipewire_user_option
@any_address_option
@jack_server_option
@server_option
@wait_option
def netjack_restart(config: Path, audio_server: str, pipewire_user: str | None, allow_any_address: bool,
                    jack_server: str | None, start_server: str | None, wait: float) -> None:
    """Stop and start the bridge again (dsp-netjack-restart)."""
    from ..config import load_config
    from ..audio.servers import restart

    restart(load_config(config), wait=wait, say=click.echo, audio_server=audio_server,
            pipewire_user=pipewire_user, allow_any_address=allow_any_address, server=jack_server,
            start_server=start_server)


@netjack.command("status")
@config_argument
@json_option()
def netjack_status(config: Path, as_json: bool) -> None:
    """Server, link up/down, the VM's ports and xruns since start."""
    import json

    from ..config import load_config
    from ..audio.servers import format_status, status

    info = status(load_config(config).name)
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else "\n".join(format_status(info)))


@netjack.command("unit")
@config_argument
@click.option("--audio-server", type=click.Choice(["jack", "pipewire"]), default="jack", show_default=True,
              help="The host audio server the unit's bridge joins.")
@pipewire_user_option
@jack_server_option
@server_option
def netjack_unit(config: Path, audio_server: str, pipewire_user: str | None, jack_server: str | None,
                 start_server: str | None) -> None:
    """Print a systemd unit that runs the bridge at boot."""
    from ..config import load_config
    from ..audio.bridge import Link, systemd_unit

    cfg = load_config(config)
    Link.of(cfg)
    if audio_server == "pipewire":
        from ..audio.pwbridge import systemd_unit as pw_unit

        click.echo(pw_unit(cfg, config, pipewire_user), nl=False)
        return
    click.echo(systemd_unit(cfg, config, start_server, jack_server), nl=False)


@netjack.command("dropin")
@config_argument
@click.option("--nixos", is_flag=True, help="Print it as NixOS configuration (services.pipewire.extraConfig).")
@any_address_option
def netjack_dropin(config: Path, nixos: bool, allow_any_address: bool) -> None:
    """Print the PipeWire drop-in that loads the NETJACK2 manager at login (~/.config/pipewire/pipewire.conf.d/)."""
    from ..config import load_config
    from ..audio import pipewire as pw
    from ..audio.bridge import Link
    from ..errors import BridgeError

    cfg = load_config(config)
    link = Link.of(cfg)
    if not allow_any_address:
        raise BridgeError(f"PipeWire's netjack2 manager listens on 0.0.0.0:{link.port}/udp, not only on "
                          f"{link.master_ip}: pass --allow-any-address to print the drop-in anyway (and keep the "
                          "port to the VM's bridge with a firewall; the NixOS form opens it there only)")
    args = pw.manager_args(link.master_ip, link.port, link.rate, link.period, link.channels)
    latency = cfg.netjack.network_latency
    if nixos:
        click.echo(pw.nixos(link.domain, args, latency, pw.interface_of(link.master_ip) or "virbr0"), nl=False)
    else:
        note(f"install as ~/.config/pipewire/pipewire.conf.d/{pw.dropin_name(link.domain)} "
             "(then: systemctl --user restart pipewire)")
        click.echo(pw.dropin(link.domain, args, latency), nl=False)


@cli.command()
@config_argument
@click.option("--measure", is_flag=True, help="Measure the round trip through the VM with jack_iodelay.")
@click.option("--seconds", type=Finite(2, 86400), default=6.0, show_default=True,
              help="How long --measure listens (a soak: xruns per minute and the round trip over time).")
@click.option("--target-ms", type=Finite(0, 1000), help="Say whether this round trip can be met.")
@click.option("--host-backend", type=click.Choice(["dummy", "alsa"]), default="dummy", show_default=True,
              help="The host JACK backend: alsa adds its periods of buffering.")
@nperiods_option
@click.option("--audio-server", type=click.Choice(["auto", "pipewire", "jack"]), default="auto", show_default=True,
              help="Whose model: auto follows the running bridge (JACK when none runs).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="With --measure: draw the round trip and xruns over time into this PNG.")
@json_option("Print JSON (measured_frames, predicted_frames, xruns, ...).")
def latency(config: Path, measure: bool, seconds: float, target_ms: float | None, host_backend: str,
            nperiods: int, audio_server: str, as_json: bool, plot_path: Path | None) -> None:
    """The latency budget of CONFIG's link, and with --measure the real round trip."""
    import json

    from ..config import load_config
    from ..audio.latency import budget, format_report, measure as do_measure, report

    cfg = load_config(config)
    if plot_path and not measure:
        raise click.UsageError("--plot draws a measurement: add --measure")
    if audio_server == "auto":
        from ..audio.servers import status

        audio_server = status(cfg.name).get("audio_server", "jack") if cfg.netjack.enable else "jack"
    b = budget(cfg, host_backend=host_backend, host_nperiods=nperiods, target_ms=target_ms, audio_server=audio_server)
    rep = report(cfg, b, do_measure(cfg, seconds=seconds) if measure else None)
    if plot_path:
        from ..audio.soak import plot

        rep["plot"] = str(plot(rep, plot_path))
    click.echo(json.dumps(rep, indent=2, sort_keys=True) if as_json else format_report(rep, b), nl=as_json)
    if plot_path and not as_json:
        click.echo(f"plot: {plot_path}")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="archdsp-virt", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - outside any command (e.g. while importing)
        sys.exit(130)
