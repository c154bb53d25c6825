"""The real tier: a Linux guest under TCG and its serial console through libvirt's stream."""

from __future__ import annotations

import time

import pytest

from conftest import archdsp, virsh

pytestmark = pytest.mark.real


def test_console_expect_reads_what_the_guest_prints(demo_domain):
    cfg, name, _server = demo_domain
    assert virsh("domstate", name) == "running"
    # The guest runs a shell on its console: have it compute something only it can answer.
    deadline = time.monotonic() + 240
    last = None
    for _ in range(12):
        if time.monotonic() > deadline:
            break
        last = archdsp("-c", "qemu:///system", "console", "--expect", r"ARCHDSP-CONSOLE-42", "--timeout", "15",
                       "--send", r"\necho ARCHDSP-CONSOLE-$((6*7))\n", str(cfg), timeout=60)
        if last.returncode == 0:
            break
    assert last is not None and last.returncode == 0, (last.stdout[-2000:], last.stderr)
    assert "ARCHDSP-CONSOLE-42" in last.stdout


def test_console_expect_times_out_with_a_clear_message(demo_domain):
    cfg, _name, _server = demo_domain
    t0 = time.monotonic()
    r = archdsp("-c", "qemu:///system", "console", "--expect", "THIS-NEVER-APPEARS", "--timeout", "2", str(cfg),
                timeout=60)
    assert r.returncode == 1
    assert "did not appear within 2 s" in r.stderr and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30


def test_busy_console_needs_force(demo_domain):
    import subprocess
    import sys

    cfg, name, _server = demo_domain
    holder = subprocess.Popen([sys.executable, "-m", "archdsp_libvirt", "-c", "qemu:///system", "console",
                               "--expect", "NEVER-SEEN", "--timeout", "30", str(cfg)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)
        busy = archdsp("-c", "qemu:///system", "console", "--expect", "x", "--timeout", "2", str(cfg), timeout=60)
        assert busy.returncode == 1
        assert "in use by another session: use --force" in busy.stderr
        taken = archdsp("-c", "qemu:///system", "console", "--force", "--expect", "ARCHDSP-CONSOLE-7",
                        "--send", r"\necho ARCHDSP-CONSOLE-$((3+4))\n", "--timeout", "20", str(cfg), timeout=60)
        assert taken.returncode == 0, taken.stderr
    finally:
        holder.kill()
        holder.wait(timeout=10)
