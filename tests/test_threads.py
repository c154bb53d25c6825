"""QEMU's PID and uptime: the pid file is checked against the process it names; uptime comes from
the process's start time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archdsp_libvirt.procs import age, boot_time, start_time
from archdsp_libvirt.virt.threads import _guest_name, qemu_pid


@pytest.fixture
def fake_qemu():
    """A real process that looks like libvirt's QEMU of domain archdsp-test-q (argv[0] and -name)."""
    argv = ["qemu-system-x86_64", "-c", "import time; time.sleep(60)", "-name", "guest=archdsp-test-q,debug-threads=on"]
    proc = subprocess.Popen(argv, executable=sys.executable)
    yield proc
    proc.kill()
    proc.wait()


def pid_file(tmp_path: Path, name: str, pid: int) -> str:
    (tmp_path / f"{name}.pid").write_text(f"{pid}\n")
    return str(tmp_path)


def test_qemu_pid_accepts_the_qemu_of_that_domain(tmp_path, fake_qemu):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b"-name" not in Path(f"/proc/{fake_qemu.pid}/cmdline").read_bytes():
        time.sleep(0.02)
    assert qemu_pid("archdsp-test-q", pid_file(tmp_path, "archdsp-test-q", fake_qemu.pid)) == fake_qemu.pid


def test_qemu_pid_refuses_another_domains_qemu(tmp_path, fake_qemu):
    assert qemu_pid("archdsp-test-other", pid_file(tmp_path, "archdsp-test-other", fake_qemu.pid)) is None


def test_qemu_pid_refuses_a_pid_reused_by_another_program(tmp_path):
    assert qemu_pid("archdsp-test-q", pid_file(tmp_path, "archdsp-test-q", os.getpid())) is None


def test_qemu_pid_refuses_a_stale_pid_file(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert qemu_pid("archdsp-test-q", pid_file(tmp_path, "archdsp-test-q", gone.pid)) is None
    assert qemu_pid("archdsp-test-q", pid_file(tmp_path, "archdsp-test-q", 0)) is None
    (tmp_path / "archdsp-test-q.pid").write_text("garbage")
    assert qemu_pid("archdsp-test-q", str(tmp_path)) is None


def test_guest_name_of_qemus_name_option():
    assert _guest_name("guest=dsp,debug-threads=on") == "dsp"
    assert _guest_name("guest=a,,b,debug-threads=on") == "a,b"
    assert _guest_name("dsp,process=qemu:dsp") == "dsp"


def test_uptime_is_from_the_process_start_time(fake_qemu):
    mine = age(fake_qemu.pid)
    assert mine is not None and 0 <= mine < 10
    init = age(1)
    assert init is not None and init > mine
    # And it is not the mtime of /proc/PID, which is when /proc first looked at the process.
    assert boot_time() is not None and start_time(fake_qemu.pid) is not None


def test_uptime_from_a_fake_proc_tree(tmp_path):
    tck = os.sysconf("SC_CLK_TCK")
    (tmp_path / "stat").write_text("cpu  1 2 3\nbtime 1000\nprocesses 5\n")
    (tmp_path / "42").mkdir()
    fields = ["S"] + ["0"] * 18 + [str(100 * tck)] + ["0"] * 30  # field 22: start time in ticks
    (tmp_path / "42" / "stat").write_text("42 (qemu-system-x86) " + " ".join(fields) + "\n")
    os.utime(tmp_path / "42", (1, 1))  # an mtime that would say "up for 50 years"
    assert age(42, str(tmp_path), now=1200.0) == pytest.approx(100.0)
    assert age(43, str(tmp_path), now=1200.0) is None
