"""Every command's --help prints its usage: each command and subcommand, walked from the top group."""

from __future__ import annotations

import click
from click.testing import CliRunner

from archdsp_libvirt.cli import cli as main


def _commands(group: click.Group, ctx: click.Context, path: tuple[str, ...] = ()):
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, name
        yield (*path, name)
        if isinstance(command, click.Group):
            yield from _commands(command, click.Context(command, parent=ctx), (*path, name))


def test_every_command_prints_its_help():
    ctx = click.Context(main)
    paths = list(_commands(main, ctx))
    assert ("rt-test",) in paths and ("tune",) in paths and ("netjack", "status") in paths
    runner = CliRunner()
    for path in paths:
        r = runner.invoke(main, [*path, "--help"])
        assert r.exit_code == 0, (path, r.output)
        assert r.output.startswith("Usage: "), (path, r.output)
