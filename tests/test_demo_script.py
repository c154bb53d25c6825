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
    stand_in(root / "scripts" / "install-test-deps", f'echo "install-test-deps $*" >>{log}\n')
    manifest = tmp_path / "disk-manifest"  # a cached disk image's: the build that made it took 95 s
    manifest.write_text("# archdsp disk guest manifest\n# built in 95s: kernel 6.1.0-rt-amd64\nformat 1\n")
    stand_in(root / "scripts" / "build-dsp-guest", f'''echo "build-dsp-guest $*" >>{log}
if [ "${{1:-}}" = --disk ]; then echo "disk=/x/disk.qcow2"; echo "manifest={manifest}"; echo "build_seconds=0"; fi
''')
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


def test_the_disk_demo_builds_and_runs_the_disk_guest(demo):
    r, calls = demo("--guest", "disk")
    assert r.returncode == 0, r.stderr
    assert "build-dsp-guest --disk" in calls
    assert "archdsp-virt up domains/demo-disk.toml" in calls
    assert "archdsp-virt netjack start --server dummy domains/demo-disk.toml" in calls
    assert "archdsp-virt netjack start --wait 300 domains/demo-disk.toml" in calls
    assert not [c for c in calls if c.startswith(("archdsp-virt up ", "archdsp-virt netjack start ", "archdsp-virt latency "))
                and "demo-disk.toml" not in c], calls
    assert not [c for c in calls if c.startswith("python")], calls
    assert "disk guest build time: 95 s (this run: 0 s)" in r.stdout, r.stdout
    assert "boot to link: " in r.stdout and "(disk guest," in r.stdout, r.stdout


def test_the_initramfs_demo_prints_its_boot_to_link_time(demo):
    r, calls = demo()
    assert r.returncode == 0, r.stderr
    assert "build-dsp-guest " in calls  # no --disk
    assert "(initramfs guest," in r.stdout, r.stdout


def test_the_guest_may_be_given_with_pipewire(demo):
    r, calls = demo("--pipewire", "--guest=disk")
    assert r.returncode == 0, r.stderr
    assert "archdsp-virt netjack start --audio-server pipewire domains/demo-disk.toml" in calls


@pytest.mark.parametrize("args", [("--guest", "nixos"), ("--guest",), ("--bogus",)])
def test_a_wrong_argument_is_refused_before_anything_runs(demo, args):
    r, calls = demo(*args)
    assert r.returncode == 2
    assert "scripts/demo" in r.stderr or "usage" in r.stderr
    assert calls == []


def test_down_removes_both_demo_guests(demo):
    r, calls = demo("--down")
    assert r.returncode == 0, r.stderr
    for config in ("domains/demo-dsp.toml", "domains/demo-disk.toml"):
        assert f"archdsp-virt down --force --undefine {config}" in calls
        assert f"archdsp-virt netjack stop {config}" in calls


def test_the_disk_demo_removes_the_initramfs_guest_holding_the_link(demo, tmp_path):
    # The stand-in's bridge status names a master for every config: the initramfs demo's link is up.
    (tmp_path / "repo" / "domains" / "demo-disk.toml").write_text("source_port = 1\n")
    r, calls = demo("--guest", "disk")
    assert r.returncode == 0, r.stderr
    assert "archdsp-virt down --force --undefine domains/demo-dsp.toml" in calls
    assert calls.index("archdsp-virt down --force --undefine domains/demo-dsp.toml") < calls.index(
        "archdsp-virt up domains/demo-disk.toml")


def test_the_disk_demo_config_carries_the_demo_s_link_and_no_link_on_its_command_line():
    from archdsp_libvirt import load_config

    disk = load_config(REPO / "domains" / "demo-disk.toml", files_here=False)
    initramfs = load_config(REPO / "domains" / "demo-dsp.toml", files_here=False)
    assert disk.netjack == initramfs.netjack
    assert disk.name != initramfs.name
    assert disk.domain_type == "auto"
    assert "root=/dev/vda" in disk.boot.cmdline.split()
    assert not [w for w in disk.boot.cmdline.split() if w.startswith("archdsp.")]
    # Where scripts/build-dsp-guest --disk puts its image, kernel and initrd by default.
    build = (REPO / "scripts" / "build-disk-guest").read_text()
    out_dir = build.split("OUT_DIR=${ARCHDSP_DISK_GUEST_DIR:-", 1)[1].split("}", 1)[0]
    assert disk.disk_image == f"{out_dir}/disk.qcow2"
    assert (disk.boot.kernel, disk.boot.initrd) == (f"{out_dir}/vmlinuz", f"{out_dir}/initrd.img")
