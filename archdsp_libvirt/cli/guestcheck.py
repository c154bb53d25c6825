"""``guest check``: the in-guest preflight through the QEMU guest agent (a command of the ``guest`` group)."""

from __future__ import annotations

from pathlib import Path

import click

from .. import service
from .options import config_argument, json_option


@click.command("check")
@config_argument
@json_option("Print the findings as a JSON list.")
@click.pass_obj
def check(obj, config: Path, as_json: bool) -> None:
    """Check CONFIG's running guest from inside, through its guest agent (exit 1 on any fail)."""
    text, failed = service.guest_check_command(config, getattr(obj, "uri", None), as_json=as_json)
    click.echo(text, nl=False)
    if failed:
        raise click.exceptions.Exit(1)
