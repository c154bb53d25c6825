"""``xml --host-cpus`` renders for a host given by hand: it loads no libvirt and reads only what the
XML needs. Checked by what a fresh interpreter has imported (timings are scripts/bench's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# libvirt itself, and the modules of the package that exist to talk to it or to inspect the host
NOT_FOR_XML = ["libvirt", "libvirtmod", "tenacity", "archdsp_libvirt.virt.connection",
               "archdsp_libvirt.virt.lifecycle", "archdsp_libvirt.virt.inspect", "archdsp_libvirt.host.checks"]


def _xml(*args: str) -> tuple[str, list[str]]:
    """Run ``archdsp-virt xml ARGS`` in a fresh interpreter: (its XML, the NOT_FOR_XML modules it imported)."""
    code = ("import io, json, sys, contextlib\nfrom archdsp_libvirt.cli import cli\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try:\n"
            f"        cli.main(args={['xml', *args]!r}, prog_name='archdsp-virt', standalone_mode=True)\n"
            "    except SystemExit as e:\n        assert e.code in (0, None), e.code\n"
            f"print(json.dumps([out.getvalue(), [m for m in {NOT_FOR_XML!r} if m in sys.modules]]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    xml, mods = json.loads(proc.stdout.strip().splitlines()[-1])
    return xml, mods


def test_xml_with_host_cpus_imports_no_libvirt_even_with_forwards_left_to_the_host():
    # archibaldos-dsp.toml forwards a port with port_forward_backend = "auto": the host is given by hand,
    # so libvirt is not asked whether it has passt, and hostfwd is rendered.
    xml, mods = _xml("--host-cpus", "0-3", "domains/archibaldos-dsp.toml")
    assert mods == []
    assert "<vcpupin" in xml and "hostfwd=tcp:127.0.0.1:2222-:22" in xml


def test_xml_with_host_cpus_renders_what_the_golden_file_holds():
    xml, mods = _xml("--host-cpus", "0-3", "--port-forwards", "hostfwd", "domains/archibaldos-dsp.toml")
    assert mods == []
    assert xml == (REPO / "tests/golden/archibaldos-dsp.xml").read_text()
