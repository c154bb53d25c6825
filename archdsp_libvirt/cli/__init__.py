"""``archdsp-virt``: the command line. Thin: each command parses its options
and calls one library function. Errors become one line and an exit code
(2 for bad input, 1 for a failing host or libvirt), never a traceback.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import click

from ..errors import ArchdspError


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


class Ctx:
    """What the top-level options say to every command."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri


_ASCII_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")


class Finite(click.FloatRange):
    """A FloatRange that takes only a finite number in ASCII digits: click's float() also takes
    "nan" (which passes every range check), "inf", "1_0" and other scripts' digits."""

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, str) and not _ASCII_NUMBER.fullmatch(value.strip()):
            self.fail(f"{value[:20]!r} is not a number in ASCII digits (e.g. 2.5)", param, ctx)
        return super().convert(value, param, ctx)


class Count(click.IntRange):
    """An IntRange that takes only ASCII digits (int() also takes other scripts' digits and "1_0")."""

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, str) and not re.fullmatch(r"[+-]?[0-9]{1,6}", value.strip()):
            self.fail(f"{value[:20]!r} is not a whole number in ASCII digits", param, ctx)
        return super().convert(value, param, ctx)


config_argument = click.argument("config", type=click.Path(dir_okay=True, path_type=Path))


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


def _session(obj: Ctx, readonly: bool = False):
    from ..virt.connection import Session

    return Session(obj.uri, readonly=readonly)


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
    from ..config import load_config
    from ..virt.lifecycle import down as do_down

    cfg = load_config(config)
    with _session(obj) as session:
        do_down(cfg.name, session, timeout=timeout, force=force, undefine=undefine, say=click.echo)


@cli.command()
@config_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
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


@netjack.command("start")
@config_argument
@jack_server_option
@server_option
@click.option("--device", default="hw:0", show_default=True, help="ALSA device for --server alsa.")
@click.option("--nperiods", type=Count(2, 8), default=2, show_default=True, help="ALSA periods.")
@wait_option
def netjack_start(config: Path, jack_server: str | None, start_server: str | None, device: str, nperiods: int,
                  wait: float) -> None:
    """Join the host's JACK graph and load the NETJACK master for CONFIG's VM."""
    from ..config import load_config
    from ..audio.bridge import start

    start(load_config(config), server=jack_server, start_server=start_server, device=device, nperiods=nperiods,
          wait=wait, say=click.echo)


@netjack.command("stop")
@config_argument
def netjack_stop(config: Path) -> None:
    """Stop the bridge: its supervisor, the NETJACK master, and a jackd it started."""
    from ..config import load_config
    from ..audio.bridge import stop

    stop(load_config(config).name, say=click.echo)


@netjack.command("restart")
@config_argument
@jack_server_option
@server_option
@wait_option
def netjack_restart(config: Path, jack_server: str | None, start_server: str | None, wait: float) -> None:
    """Stop and start the bridge again (dsp-netjack-restart)."""
    from ..config import load_config
    from ..audio.bridge import restart

    restart(load_config(config), wait=wait, say=click.echo, server=jack_server, start_server=start_server)


@netjack.command("status")
@config_argument
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def netjack_status(config: Path, as_json: bool) -> None:
    """Server, link up/down, the VM's ports and xruns since start."""
    import json

    from ..config import load_config
    from ..audio.bridge import format_status, status

    info = status(load_config(config).name)
    click.echo(json.dumps(info, indent=2, sort_keys=True) if as_json else "\n".join(format_status(info)))


@netjack.command("unit")
@config_argument
@jack_server_option
@server_option
def netjack_unit(config: Path, jack_server: str | None, start_server: str | None) -> None:
    """Print a systemd unit that runs the bridge at boot."""
    from ..config import load_config
    from ..audio.bridge import Link, systemd_unit

    cfg = load_config(config)
    Link.of(cfg)
    click.echo(systemd_unit(cfg, config, start_server, jack_server), nl=False)


@cli.command()
@config_argument
@click.option("--measure", is_flag=True, help="Measure the round trip through the VM with jack_iodelay.")
@click.option("--seconds", type=Finite(2, 86400), default=6.0, show_default=True,
              help="How long --measure listens (a soak: xruns per minute and the round trip over time).")
@click.option("--target-ms", type=Finite(0, 1000), help="Say whether this round trip can be met.")
@click.option("--host-backend", type=click.Choice(["dummy", "alsa"]), default="dummy", show_default=True,
              help="The host JACK backend: alsa adds its periods of buffering.")
@click.option("--nperiods", type=Count(2, 8), default=2, show_default=True, help="ALSA periods.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (measured_frames, predicted_frames, xruns, ...).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="With --measure: draw the round trip and xruns over time into this PNG.")
def latency(config: Path, measure: bool, seconds: float, target_ms: float | None, host_backend: str,
            nperiods: int, as_json: bool, plot_path: Path | None) -> None:
    """The latency budget of CONFIG's link, and with --measure the real round trip."""
    import json

    from ..config import load_config
    from ..audio.latency import budget, format_report, measure as do_measure, report

    cfg = load_config(config)
    if plot_path and not measure:
        raise click.UsageError("--plot draws a measurement: add --measure")
    b = budget(cfg, host_backend=host_backend, host_nperiods=nperiods, target_ms=target_ms)
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
    except KeyboardInterrupt:  # pragma: no cover - interactive only
        sys.exit(130)
