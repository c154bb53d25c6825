"""scripts/demo's own logic, with its steps replaced: it runs every step of the package through the
installed archdsp-virt (ARCHDSP_BIN_LINK), never a python3 on the checkout, takes the port from the
bridge's status instead of the TOML, and stops with a clear message when the host is not ready.

The demo runs from a copy of scripts/ whose siblings (install-test-deps, host-services,
build-dsp-guest) and archdsp-virt are stand-ins that record how they were called: nothing is installed
or started.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not shutil.which("bash") or not shutil.which("ss"), reason="needs bash and ss")


def stand_in(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)


@pytest.fixture
def demo(tmp_path):
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "domains").mkdir()
    shutil.copy(REPO / "scripts" / "demo", root / "scripts" / "demo")
    (root / "domains" / "demo-dsp.toml").write_text("source_port = 1\n")  # not what the demo must report
    log = tmp_path / "calls"
    for name in ("install-test-deps", "build-dsp-guest"):
        stand_in(root / "scripts" / name, f'echo "{name} $*" >>{log}\n')
    stand_in(root / "scripts" / "host-services", f'echo "host-services $*" >>{log}\nexit "${{HS_EXIT:-0}}"\n')
    av = tmp_path / "bin" / "archdsp-virt"
    av.parent.mkdir()
    stand_in(av, f'''echo "archdsp-virt $*" >>{log}
case "$*" in
  "check "*) echo "12 ok, 0 warn, 0 fail" ;;
  "netjack status "*) echo "=== NETJACK Bridge ==="; echo "  master: 192.168.122.1:19123/udp   listening: ?" ;;
  "up "*) echo "KVM here is nested PVM: stock kernels cannot boot; running under TCG, software emulation" ;;
esac
''')
    shims = tmp_path / "shims"  # a python3 that records being called: the demo must not call it
    shims.mkdir()
    for py in ("python3", "python"):
        stand_in(shims / py, f'echo "{py} $*" >>{log}\nexit 1\n')
    env = {**os.environ, "ARCHDSP_BIN_LINK": str(av), "PATH": f"{shims}:{os.environ['PATH']}",
           "ARCHDSP_DEMO_PIPEWIRE_DIR": str(tmp_path / "pw")}

    def run(*args: str, **extra: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        r = subprocess.run(["bash", str(root / "scripts" / "demo"), *args], capture_output=True, text=True,
                           timeout=60, env={**env, **extra})
        return r, log.read_text().splitlines() if log.exists() else []

    return run


def test_the_pipewire_demo_runs_the_package_through_archdsp_virt_only(demo):
    r, calls = demo("--pipewire")
    assert r.returncode == 0, r.stderr
    assert not [c for c in calls if c.startswith("python")], calls
    assert any(c.startswith("archdsp-virt netjack headless start ") for c in calls), calls
    assert "archdsp-virt netjack start --audio-server pipewire domains/demo-dsp.toml" in calls
    assert "port 19123" in r.stdout or "sport = :19123" in r.stdout, r.stdout


def test_the_jack_demo_reports_the_bridge_s_port(demo):
    r, calls = demo()
    assert r.returncode == 0, r.stderr
    assert "sport = :19123" in r.stdout and "sport = :1'" not in r.stdout
    assert not [c for c in calls if c.startswith("python")], calls


def test_the_demo_shows_up_s_tcg_fallback_line_once(demo):
    r, calls = demo()
    assert r.returncode == 0, r.stderr
    assert "archdsp-virt up domains/demo-dsp.toml" in calls
    assert r.stdout.count("KVM here is nested PVM: stock kernels cannot boot; running under TCG") == 1, r.stdout


def test_the_demo_config_leaves_the_accelerator_to_auto():
    from archdsp_libvirt import load_config

    assert load_config(REPO / "domains" / "demo-dsp.toml", files_here=False).domain_type == "auto"


def test_down_stops_the_headless_pipewire_through_archdsp_virt(demo, tmp_path):
    (tmp_path / "pw").mkdir()  # the folder alone: what was started there is recorded in the run folder
    r, calls = demo("--down")
    assert r.returncode == 0, r.stderr
    assert f"archdsp-virt netjack headless stop {tmp_path / 'pw'}" in calls
    assert not [c for c in calls if c.startswith("python")], calls


def test_a_host_services_error_stops_the_demo_with_a_clear_message(demo):
    r, calls = demo(HS_EXIT="1")
    assert r.returncode != 0
    assert "scripts/host-services start failed (exit 1): the host is not ready" in r.stderr, r.stderr
    assert "host-services start" in calls
    assert not [c for c in calls if c.startswith(("build-dsp-guest", "archdsp-virt"))], calls
