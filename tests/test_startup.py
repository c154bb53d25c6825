"""Command start-up stays lean: heavy modules are imported where they are used, not by every command.

Checked by what a fresh interpreter has imported, not by timing (timings are scripts/bench's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ["msgspec", "lxml.etree", "libvirt", "tenacity", "archdsp_libvirt.config", "archdsp_libvirt.host.checks"]


def imported_after(code: str, watched: list[str] = HEAVY) -> set[str]:
    """The ``watched`` modules (HEAVY unless told) a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {watched!r} if m in sys.modules]))\n"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def run_cli(*args: str) -> str:
    return ("import sys\nfrom archdsp_libvirt.cli import cli\n"
            f"try:\n    cli.main(args={list(args)!r}, prog_name='archdsp-virt', standalone_mode=True)\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n")


def test_a_command_s_help_imports_nothing_heavy():
    assert imported_after(run_cli("status", "--help")) == set()
    assert imported_after(run_cli("netjack", "status", "--help")) == set()


def test_top_level_help_loads_the_host_commands_for_their_summaries_only():
    assert not {"lxml.etree", "libvirt", "tenacity"} & imported_after(run_cli("--help"))


def test_package_names_load_on_first_use():
    assert imported_after("import archdsp_libvirt") == set()
    assert {"msgspec", "archdsp_libvirt.config"} <= imported_after("from archdsp_libvirt import load_config")


def test_host_commands_load_only_when_asked_for():
    assert "archdsp_libvirt.host.checks" not in imported_after(run_cli("xml", "--help"))
    assert "archdsp_libvirt.host.checks" in imported_after(run_cli("check", "--help"))


def test_xml_without_a_connection_needs_neither_libvirt_nor_tenacity():
    mods = imported_after(run_cli("xml", "--host-cpus", "0-3", "domains/minimal.toml"))
    assert {"msgspec", "lxml.etree"} <= mods
    assert not {"libvirt", "tenacity"} & mods


def test_libvirt_calls_that_succeed_do_not_import_tenacity():
    code = ("from archdsp_libvirt.virt.connection import Session\n"
            "with Session('test:///default') as s:\n"
            "    assert s.run('asking', lambda c: c.getLibVersion()) > 0\n")
    mods = imported_after(code)
    assert "libvirt" in mods and "tenacity" not in mods


def test_a_transient_failure_brings_in_the_retry_policy():
    code = ("import libvirt\nfrom archdsp_libvirt.virt.connection import Session\n"
            "calls = []\n"
            "def fn(conn):\n"
            "    calls.append(1)\n"
            "    if len(calls) < 2:\n"
            "        libvirt.open('qemu+unix:///system?socket=/nonexistent/archdsp-test-sock')\n"
            "    return conn.getLibVersion()\n"
            "with Session('test:///default') as s:\n"
            "    assert s.run('asking', fn) > 0 and len(calls) == 2\n")
    assert "tenacity" in imported_after(code)


# --- per command: what it may and may not import (a module it starts importing fails here) ---

PKG = "archdsp_libvirt."
WATCHED = HEAVY + ["jack", "matplotlib", PKG + "service.domain", PKG + "service.audio", PKG + "audio.servers",
                   PKG + "virt.connection", PKG + "cli.host", PKG + "cli.audio", PKG + "cli.rt", PKG + "host.kernelparams"]
GUEST = (REPO / "domains" / "archibaldos-dsp.toml").read_text()  # forwards a port: passt or hostfwd to decide
NAME = "archdsp-test-startup"  # no bridge, no domain of this name: nothing of another run is read


def _config(tmp_path: Path) -> str:
    path = tmp_path / "guest.toml"
    path.write_text(GUEST.replace('name = "archibaldos-dsp"', f'name = "{NAME}"', 1))
    return str(path)


# command -> (its arguments, CONFIG standing for the config's path; what it must import; what it must not)
STARTUP = {
    "--help": (["--help"], set(),
               {"lxml.etree", "libvirt", "tenacity", "jack", "matplotlib", PKG + "service.domain",
                PKG + "service.audio", PKG + "audio.servers", PKG + "virt.connection"}),
    "netjack status": (["netjack", "status", "CONFIG"], {PKG + "config", PKG + "audio.servers"},
                       {"lxml.etree", "libvirt", "tenacity", "jack", "matplotlib", PKG + "host.checks",
                        PKG + "service.domain", PKG + "virt.connection", PKG + "cli.host", PKG + "cli.rt",
                        PKG + "host.kernelparams"}),
    "status": (["-c", "test:///default", "status", "CONFIG"], {"libvirt", PKG + "service.domain"},
               {"tenacity", "jack", "matplotlib", PKG + "host.checks", PKG + "service.audio", PKG + "cli.host",
                PKG + "cli.audio", PKG + "cli.rt", PKG + "host.kernelparams"}),
    "xml --host-cpus 0-1": (["xml", "--host-cpus", "0-1", "CONFIG"], {"msgspec", "lxml.etree", PKG + "service.domain"},
                            {"libvirt", "tenacity", "jack", "matplotlib", PKG + "host.checks",
                             PKG + "service.audio", PKG + "audio.servers", PKG + "cli.host", PKG + "cli.audio",
                             PKG + "cli.rt"}),
}


@pytest.mark.parametrize("command", list(STARTUP))
def test_each_command_imports_what_it_uses_and_no_more(command, tmp_path):
    args, needed, forbidden = STARTUP[command]
    mods = imported_after(run_cli(*[_config(tmp_path) if a == "CONFIG" else a for a in args]), WATCHED)
    assert needed <= mods, f"{command}: the probe did not run it (missing {sorted(needed - mods)})"
    assert not forbidden & mods, f"{command} imports {sorted(forbidden & mods)}"


def test_xml_for_given_cpus_asks_libvirt_nothing_but_what_the_config_leaves_open(tmp_path):
    """The same guard, where the config decides the port-forward backend itself (passes today)."""
    path = Path(_config(tmp_path))
    path.write_text(path.read_text().replace("[network]\n", '[network]\nport_forward_backend = "hostfwd"\n', 1))
    mods = imported_after(run_cli("xml", "--host-cpus", "0-1", str(path)), WATCHED)
    assert {"lxml.etree", PKG + "service.domain"} <= mods
    assert not {"libvirt", "tenacity"} & mods


def test_every_command_help_lists_is_the_one_its_room_defines():
    """The names the top-level group lists before it imports a room are the names of that room's commands."""
    import click

    from archdsp_libvirt.cli import cli

    ctx = click.Context(cli)
    names = cli.list_commands(ctx)
    assert {"check", "host", "vfio", "netjack", "latency", "rt-test", "tune", "xml", "up", "status"} <= set(names)
    for name in names:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name, name
    assert sorted(cli.commands) == names  # every room's commands were added, none beside the list
