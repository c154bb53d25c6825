"""``archdsp-virt``: the command line. Thin: each command parses its options
and calls one library function. Errors become one line and an exit code
(2 for bad input, 1 for a failing host or libvirt), never a traceback.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import ArchdspError


class Failure(click.ClickException):
    """One of our errors, shown as one line with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Group(click.Group):
    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except ArchdspError as err:
            raise Failure(err.message, err.exit_code) from None


@dataclass
class Ctx:
    uri: str | None


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
    from .service import render_for_cli

    rendered, notes = render_for_cli(config, obj.uri, host_cpus=host_cpus, port_forwards=port_forwards)
    for line in notes:
        note(line)
    for line in rendered.warnings:
        warn(line)
    click.echo(rendered.xml, nl=False)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="archdsp-virt", standalone_mode=True)
    except KeyboardInterrupt:  # pragma: no cover - interactive only
        sys.exit(130)
