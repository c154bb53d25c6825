"""``guest nixos``: the guest's NETJACK slave as a NixOS module for ArchibaldOS.

Its golden text; parsed by nix-instantiate and evaluated with stand-ins for ``pkgs`` (nixpkgs is not
at hand here: the options are not evaluated against it), the helper read back byte for byte.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt import load_config
from archdsp_libvirt.cli import cli
from archdsp_libvirt.guest import nixos, unit
from conftest import DOMAINS

DEMO = DOMAINS / "demo-dsp.toml"
STAND_INS = '{ writeScript = name: text: { inherit name text; }; jack2 = "jack2"; gawk = "gawk"; rt-tests = "rt-tests"; }'


def printed(*args: str) -> str:
    result = CliRunner().invoke(cli, ["guest", "nixos", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def nix_instantiate() -> str:
    found = shutil.which("nix-instantiate")
    if found is None:
        pytest.skip("nix-instantiate is not installed here (apt-get install nix-bin)")
    return found


def evaluated(tmp_path: Path, text: str) -> dict:
    module = tmp_path / "archdsp-netjack.nix"
    module.write_text(text)
    proc = subprocess.run([nix_instantiate(), "--eval", "--strict", "--json", "-E",
                           f"import {module} {{ pkgs = {STAND_INS}; }}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_the_demo_s_module_is_the_golden_text(golden):
    golden("guest-nixos.demo-dsp.nix", printed(str(DEMO)))


def test_it_parses(tmp_path):
    module = tmp_path / "archdsp-netjack.nix"
    module.write_text(printed(str(DEMO)))
    proc = subprocess.run([nix_instantiate(), "--parse", str(module)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "it was NOT\n# evaluated against nixpkgs" in module.read_text()


def test_it_evaluates_to_the_unit_s_settings_and_helper(tmp_path):
    m = evaluated(tmp_path, printed(str(DEMO)))
    assert m["services"]["qemuGuest"]["enable"] is True
    assert m["environment"]["systemPackages"] == ["jack2", "rt-tests"]
    svc = m["systemd"]["services"]["archdsp-netjack"]
    assert svc["after"] == svc["wants"] == ["network-online.target"] and svc["wantedBy"] == ["multi-user.target"]
    assert svc["environment"] == {"ARCHDSP_RTPRIO": "70"} and "jack2" in svc["path"]
    sc = svc["serviceConfig"]
    assert sc["ImportCredential"] == sc["LoadCredential"] == "archdsp.netjack"
    assert (sc["LimitRTPRIO"], sc["LimitMEMLOCK"]) == (95, "infinity")
    assert (sc["Restart"], sc["RestartSec"], sc["RestartPreventExitStatus"]) == ("on-failure", 2, unit.EX_CONFIG)
    assert "User" not in sc
    # Nix's indented string gives back the helper byte for byte ('' and ${ escaped)
    assert sc["ExecStart"] == {"name": "archdsp-netjack-slave", "text": unit.helper_script()}


def test_options_reach_the_module(tmp_path):
    text = nixos.module_text(load_config(DEMO, files_here=False), rtprio=60, user="audio")
    sc = evaluated(tmp_path, text)["systemd"]["services"]["archdsp-netjack"]
    assert sc["environment"] == {"ARCHDSP_RTPRIO": "60"} and sc["serviceConfig"]["User"] == "audio"


def test_the_escaping_round_trips_nix_s_own_markers(tmp_path):
    text = "a '' b ${c} d $e ''${f} '''\n\ttab\n\nend\n"
    body = "{ pkgs, ... }: { s = ''\n" + nixos.indented_string(text, "    ") + "''; }\n"
    proc = subprocess.run([nix_instantiate(), "--eval", "--strict", "--json", "-E",
                           f"({body}) {{ pkgs = null; }}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"s": text}


def test_a_missing_config_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["guest", "nixos", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file" in lines[0], result.stderr
