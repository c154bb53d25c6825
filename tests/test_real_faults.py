"""Faults against a real libvirtd: each ends with a clear message, in bounded time, the definition unchanged."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from archdsp_libvirt.virt import threads
from conftest import archdsp, virsh

pytestmark = pytest.mark.real


def test_qemu_killed_under_a_running_domain(kvm_config):
    cfg, name = kvm_config
    assert archdsp("-c", "qemu:///system", "up", str(cfg)).returncode == 0
    before = virsh("dumpxml", "--inactive", "--security-info", name)
    pid = threads.qemu_pid(name)
    os.kill(pid, signal.SIGKILL)  # the QEMU this test's up started
    deadline = time.monotonic() + 30
    while virsh("domstate", name) != "shut off" and time.monotonic() < deadline:
        time.sleep(0.5)
    info = json.loads(archdsp("-c", "qemu:///system", "status", "--json", str(cfg)).stdout)
    assert info["state"] == "shut off"
    assert info["reason"] == "crashed (QEMU exited unexpectedly)"
    assert "crashed" in archdsp("-c", "qemu:///system", "status", str(cfg)).stdout
    assert virsh("dumpxml", "--inactive", "--security-info", name) == before
    # up brings it back with the same definition.
    assert archdsp("-c", "qemu:///system", "up", str(cfg)).returncode == 0
    assert virsh("domstate", name) == "running"


def test_exhausted_hugepage_pool_is_stopped_before_define(kvm_config):
    cfg, name = kvm_config
    free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    want = free + 16
    big = cfg.parent / "big.toml"
    big.write_text(cfg.read_text().replace("memory_mb = 128", f"memory_mb = {want * 2}")
                   .replace("hugepages = 64", f"hugepages = {want}"))
    t0 = time.monotonic()
    r = archdsp("-c", "qemu:///system", "up", str(big))
    assert r.returncode == 1
    assert "preflight hugepages.free failed" in r.stderr and "nothing was defined" in r.stderr
    assert "Traceback" not in r.stderr and time.monotonic() - t0 < 60
    assert name not in virsh("list", "--all", "--name").split()


def test_forwarded_host_port_in_use(kvm_config):
    cfg, name = kvm_config
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fwd = cfg.parent / "fwd.toml"
        fwd.write_text(cfg.read_text().replace(
            "[network]\nenable = false",
            f'[network]\nenable = true\nmode = "user"\nhostfwd = {{ "{port}" = 22 }}\nport_forward_backend = "hostfwd"'))
        r = archdsp("-c", "qemu:///system", "up", str(fwd))
    assert r.returncode == 1
    assert "forwarded host port is already in use" in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    # A new domain that failed to start leaves no half-made definition.
    assert name not in virsh("list", "--all", "--name").split()
