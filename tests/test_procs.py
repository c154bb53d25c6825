"""Processes the package started: stopped by PID and start time, several at once with one grace."""

from __future__ import annotations

import subprocess
import time

from archdsp_libvirt.procs import Owned, start_time, stop_together


def _spawn(script: str) -> tuple[subprocess.Popen, Owned]:
    proc = subprocess.Popen(["bash", "-c", script])
    deadline = time.monotonic() + 5
    while start_time(proc.pid) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # the trap is set
    return proc, Owned.of(proc.pid)


def test_stop_together_shares_one_grace_then_kills_what_ignores_sigterm():
    stubborn, a = _spawn("trap '' TERM; for i in $(seq 300); do sleep 0.1; done")
    polite, b = _spawn("for i in $(seq 300); do sleep 0.1; done")
    try:
        t0 = time.monotonic()
        assert stop_together([a, b], timeout=1.0) == [True, True]
        took = time.monotonic() - t0
        assert not a.alive() and not b.alive()
        assert start_time(a.pid) != a.start and start_time(b.pid) != b.start  # both reaped, no zombie left
        # the stubborn one was killed after the grace, and the grace was one for both, not one each
        assert 1.0 <= took < 1.9, took
    finally:
        for p in (stubborn, polite):
            if p.poll() is None:
                p.kill()
                p.wait(5)


def test_stop_together_leaves_a_process_that_is_no_longer_ours_alone():
    proc, owned = _spawn("exit 0")
    proc.wait(5)
    assert stop_together([owned], timeout=0.5) == [False]
