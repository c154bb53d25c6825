"""``archdsp-virt``: the command line. Thin: each command parses its options
and calls one library function. Errors become one line and an exit code
(2 for bad input, 1 for a failing host or libvirt), never a traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

from ..errors import ArchdspError
from ..service import console_command, down_command, render_for_cli, status_command, up_command
from .options import Finite, config_argument, json_option


class Failure(click.ClickException):
    """One of our errors, shown as one line with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# The commands of cli/host.py, cli/audio.py, cli/rt.py and cli/guest.py, by name (Group.get_command adds them).
_HOST = ("check", "host", "vfio")
_AUDIO = ("netjack", "latency")
_RT = ("rt-test", "tune")
_GUEST = ("guest",)


class Group(click.Group):
    """The top-level group: our errors become one line, with their own exit code.

    The commands of the other rooms are added when one of them runs or help lists them, so that a
    command imports only its own room: ``check``, ``host`` and ``vfio`` from cli/host.py, ``netjack``
    and ``latency`` from cli/audio.py, ``rt-test`` and ``tune`` from cli/rt.py, the ``guest`` group from
    cli/guest.py."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_HOST, *_AUDIO, *_RT, *_GUEST})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands:
            if name in _HOST:
                from . import host

                self._add(host.check, host.host, host.vfio)
            elif name in _AUDIO:
                from . import audio

                self._add(audio.netjack, audio.latency)
            elif name in _RT:
                from . import rt

                self._add(rt.rt_test, rt.tune)
            elif name in _GUEST:
                from . import guest

                self._add(guest.guest)
        return super().get_command(ctx, name)

    def _add(self, *commands: click.Command) -> None:
        for command in commands:
            self.add_command(command)

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
    down_command(config, obj.uri, timeout=timeout, force=force, undefine=undefine, say=click.echo)


@cli.command()
@config_argument
@json_option()
@click.pass_obj
def status(obj: Ctx, config: Path, as_json: bool) -> None:
    """The DSP VM's state, vCPUs, isolation, hugepages, console log and drift."""
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
    console_command(config, obj.uri, force=force, pattern=pattern, timeout=timeout,
                    echo=lambda t: click.echo(t, nl=False), send=send)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="archdsp-virt", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - outside any command (e.g. while importing)
        sys.exit(130)
