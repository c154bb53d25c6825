"""The real tier: libvirtd killed and restarted under a running command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, virsh

pytestmark = pytest.mark.real
STATE = Path("/run/archdsp-libvirt/host-services.state")


def our_libvirtd() -> int:
    """The PID of the libvirtd that scripts/host-services started (only that one may be killed)."""
    if not STATE.exists():
        pytest.skip("libvirtd was not started by scripts/host-services: not ours to kill")
    entries = dict(line.split("=", 1) for line in STATE.read_text().splitlines() if "=" in line)
    val = entries.get("libvirtd", "")
    if not val.startswith("pid:"):
        pytest.skip(f"libvirtd is not a process scripts/host-services started ({val or 'absent'}): not ours to kill")
    _, pid, start = val.split(":")
    stat = Path(f"/proc/{pid}/stat").read_text()
    assert stat[stat.rindex(")") + 2 :].split()[19] == start, "the recorded libvirtd PID was reused"
    return int(pid)


def kill_libvirtd() -> None:
    pid = our_libvirtd()
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


def restart_libvirtd() -> None:
    proc = subprocess.run(["bash", str(REPO / "scripts/host-services"), "start"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def cli(*args):
    return subprocess.Popen([sys.executable, "-m", "archdsp_libvirt", "-c", "qemu:///system", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_up_retries_while_libvirtd_restarts(system_libvirt, kvm_config):
    cfg, name = kvm_config
    kill_libvirtd()
    try:
        proc = cli("up", str(cfg))
        time.sleep(2)
    finally:
        restart_libvirtd()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    assert virsh("domstate", name) == "running"
    assert virsh("list", "--all", "--name").split().count(name) == 1


def test_status_retries_while_libvirtd_restarts(system_libvirt, kvm_config):
    cfg, name = kvm_config
    kill_libvirtd()
    try:
        proc = cli("status", "--json", str(cfg))
        time.sleep(2)
    finally:
        restart_libvirtd()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["name"] == name


def test_libvirtd_gone_fails_clearly_within_the_bound(system_libvirt, kvm_config):
    cfg, _name = kvm_config
    kill_libvirtd()
    try:
        t0 = time.monotonic()
        proc = cli("status", str(cfg))
        out, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        restart_libvirtd()
    assert proc.returncode == 1
    assert "libvirtd is not running" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert elapsed < 60
