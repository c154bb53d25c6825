"""scripts/build-dsp-guest --disk's arguments, checked before anything is built (the build itself is
tests/test_real_disk_guest.py's)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")


def build(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts/build-dsp-guest"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_disk_help_names_its_outputs():
    r = build("--disk", "--help")
    assert r.returncode == 0, r.stderr
    assert "--unit-config FILE" in r.stdout
    for key in ("disk=PATH", "vmlinuz=PATH", "initrd=PATH", "build_seconds=N"):
        assert key in r.stdout


def test_the_initramfs_help_points_at_disk():
    r = build("--help")
    assert r.returncode == 0 and "--disk" in r.stdout


def test_an_unknown_disk_argument_is_refused():
    r = build("--disk", "--flavour", "rt")
    assert r.returncode != 0
    assert "unknown argument for --disk: --flavour" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the build refuses to start without root first")
def test_a_missing_unit_config_is_named(tmp_path):
    r = build("--disk", "--dir", str(tmp_path / "out"), "--unit-config", str(tmp_path / "nope.toml"))
    assert r.returncode != 0
    assert f"{tmp_path / 'nope.toml'}" in r.stderr or "mmdebstrap is not installed" in r.stderr
    assert not (tmp_path / "out").exists()
