"""scripts/install-test-deps: the entry point it installs runs isolated (no user site, no PYTHON*
variables, not the folder it lies in), and ARCHDSP_VENV is removed only when it is a venv of root's.

The script is sourced by bash (its install steps then do not run) and its steps are called on paths
of the test's own: nothing is installed, no venv of the machine is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "install-test-deps"
GUARD = '[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0'

pytestmark = pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")


def source(steps: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    text = SCRIPT.read_text()
    # Sourcing a script without the guard would run the whole install (apt, pip into the shared venv).
    assert GUARD in text and text.index(GUARD) < text.index("install_debian_packages\n"), \
        "scripts/install-test-deps must stop when sourced, before it installs anything"
    return subprocess.run(["bash", "-c", f"source {SCRIPT}\n{steps}"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})}, cwd=cwd)


def planted(tmp_path: Path, marker: Path) -> dict:
    """A HOME whose user site holds a .pth, and a PYTHONPATH with a sitecustomize: each writes ``marker``."""
    home = tmp_path / "home"
    site = subprocess.run([sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)}
                          ).stdout.strip()
    assert site.startswith(str(home)), site
    Path(site).mkdir(parents=True)
    Path(site, "archdsp-evil.pth").write_text(f"import os; open({str(marker)!r} + '.pth', 'w')\n")
    extra = tmp_path / "pythonpath"
    extra.mkdir()
    (extra / "sitecustomize.py").write_text(f"open({str(marker)!r} + '.pythonpath', 'w')\n")
    return {"HOME": str(home), "PYTHONPATH": str(extra)}


def test_the_entry_point_runs_isolated(tmp_path):
    marker = tmp_path / "ran"
    env = planted(tmp_path, marker)
    # Without -I this interpreter runs both (the venv sees the system site, so its user site is on):
    # what the entry point must not do.
    subprocess.run([sys.executable, "-c", "pass"], env={**os.environ, **env}, timeout=60, check=True)
    ran = sorted(p.name for p in tmp_path.glob("ran.*"))
    if "ran.pth" not in ran:
        pytest.skip(f"{sys.executable} has no user site to plant a .pth in: nothing to show here")
    assert ran == ["ran.pth", "ran.pythonpath"]
    for p in tmp_path.glob("ran.*"):
        p.unlink()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entry = bin_dir / "archdsp-virt"
    (bin_dir / "archdsp_libvirt").mkdir()  # a package planted beside the entry point and in the current folder
    (bin_dir / "archdsp_libvirt" / "__init__.py").write_text(f"open({str(marker)!r} + '.beside', 'w')\n")
    r = source(f"write_entry_point {sys.executable} {entry}")
    assert r.returncode == 0, r.stderr
    assert entry.read_text().splitlines()[0] == f"#!{sys.executable} -I"
    ran = subprocess.run([str(entry), "--version"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, **env}, cwd=bin_dir)
    assert ran.returncode == 0 and "version" in ran.stdout, ran.stderr
    assert sorted(p.name for p in tmp_path.glob("ran.*")) == []


def test_a_folder_that_is_not_a_venv_is_not_removed(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("keep me")
    r = source(f"prepare_venv {target}")
    assert r.returncode == 1 and "is not a venv (no pyvenv.cfg): not removed" in r.stderr, r.stderr
    assert (target / "data").read_text() == "keep me"


def test_a_symlink_or_a_file_is_not_removed(tmp_path):
    real = tmp_path / "real"
    (real / "bin").mkdir(parents=True)
    (real / "pyvenv.cfg").write_text("home = /usr/bin\n")
    link = tmp_path / "link"
    link.symlink_to(real)
    r = source(f"prepare_venv {link}")
    assert r.returncode == 1 and "is a symlink" in r.stderr and (real / "pyvenv.cfg").exists()
    plain = tmp_path / "file"
    plain.write_text("keep me")
    r = source(f"prepare_venv {plain}")
    assert r.returncode == 1 and "is not a folder" in r.stderr and plain.read_text() == "keep me"
    r = source("prepare_venv relative/venv")
    assert r.returncode == 1 and "absolute path" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: gives the venv's file to another user")
def test_a_venv_another_user_can_write_is_neither_run_nor_removed(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    marker = tmp_path / "ran"
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\ntouch {marker}\n")
    py.chmod(0o755)
    os.chown(py, 65534, -1)  # nobody's
    r = source(f"prepare_venv {venv}")
    assert r.returncode == 1 and "owned by another user or writable by others" in r.stderr, r.stderr
    assert py.exists() and not marker.exists()
