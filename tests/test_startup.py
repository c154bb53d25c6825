"""Command start-up stays lean: heavy modules are imported where they are used, not by every command.

Checked by what a fresh interpreter has imported, not by timing (timings are scripts/bench's).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ["msgspec", "lxml.etree", "libvirt", "tenacity", "archdsp_libvirt.config", "archdsp_libvirt.host.checks"]


def imported_after(code: str) -> set[str]:
    """The HEAVY modules a fresh interpreter has imported after running ``code``."""
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
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
