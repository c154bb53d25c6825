"""Load: many lifecycle cycles without leaks, and concurrent `up` of one config ending in one domain.

The cycles run on libvirt's in-process test driver (fast, private, unmarked); what runs against
qemu:///system (ten real `archdsp-virt up` processes, sessions on libvirtd's socket) is marked real.
"""

from __future__ import annotations

import gc
import os
import re
import subprocess
import sys
import tracemalloc

import pytest

from archdsp_libvirt import parse_config
from archdsp_libvirt.virt.connection import Session
from archdsp_libvirt.domain.build import render_domain
from archdsp_libvirt.service.domain import host_model
from archdsp_libvirt.virt.lifecycle import down, up as lifecycle_up
from conftest import SYSTEM_URI, virsh

CYCLES = 200


def up(cfg, session, **kw):
    """``up`` as ``archdsp-virt up`` calls it: on the command's one host model, rendering for it."""
    model = host_model(cfg, session)
    return lifecycle_up(cfg, session, model, lambda uuid: render_domain(cfg, model, uuid=uuid), **kw)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def make_cfg(name: str, i: int):
    return parse_config({
        "name": name,
        "isolated_cores": [1 + i % 3],
        "memory_mb": 256 * (1 + i % 4),
        "boot": {"kernel": "/k", "cmdline": f"console=ttyS0 cycle={i}"},
        "network": {"hostfwd": {str(2000 + i % 50): 22}},
    })


def test_define_start_destroy_undefine_cycles_leak_nothing(test_uri, unique_name):
    def cycle(session: Session, i: int) -> None:
        name = f"{unique_name}-{i % 7}"
        r = up(make_cfg(name, i), session, autostart=i % 2 == 0)
        assert r.started and r.defined == "new"
        d = down(name, session, force=True, undefine=True)
        assert d.was == "running" and d.how == "destroy" and d.undefined

    with Session(test_uri) as session:
        for i in range(10):  # warm up: caches, the schema, the connection
            cycle(session, i)
        gc.collect()
        fds_before, rss_before = open_fds(), rss_kib()
        tracemalloc.start()
        # Two halves: a leak grows in each; a one-off (the interpreter's table of interned strings
        # doubling once its count crosses a threshold, ~2 MiB in one allocation) in one only.
        growths = []
        half = (CYCLES - 10) // 2
        for start in (10, 10 + half):
            traced_before = tracemalloc.get_traced_memory()[0]
            for i in range(start, start + half):
                cycle(session, i)
            gc.collect()
            growths.append(tracemalloc.get_traced_memory()[0] - traced_before)
        tracemalloc.stop()
        assert session.conn.listAllDomains() == [], "a cycle left a domain behind"
        assert open_fds() == fds_before, "file descriptors leaked"
    # Generous bounds: a leak of one rendered XML (a few KiB) per cycle would show in both.
    traced_growth = min(growths)
    assert traced_growth < 128 * 1024, f"Python memory grew by {growths} bytes over two runs of {half} cycles"
    assert rss_kib() - rss_before < 16 * 1024, "resident memory grew by more than 16 MiB"


@pytest.mark.parametrize("where", ["test driver", pytest.param("qemu:///system", marks=pytest.mark.real)])
def test_sessions_opened_and_closed_leak_no_descriptors(request, test_uri, unique_name, where):
    """What every CLI command does: open a connection, look something up, close it.

    The test driver holds no descriptor per connection; libvirtd's socket does.
    """
    uri = test_uri if where == "test driver" else request.getfixturevalue("system_libvirt")
    for _ in range(5):
        with Session(uri) as s:
            s.lookup(unique_name)
    fds_before = open_fds()
    for _ in range(CYCLES):
        with Session(uri) as s:
            assert s.lookup(unique_name) is None
    assert open_fds() == fds_before


UUID_RE = re.compile(r"uuid ([0-9a-f-]{36})")


@pytest.mark.real
def test_ten_concurrent_up_end_with_one_domain(kvm_config):
    cfg, name = kvm_config
    cmd = [sys.executable, "-m", "archdsp_libvirt", "-c", SYSTEM_URI, "up", "--no-check", "--no-autostart", str(cfg)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(10)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    uuids = set()
    for rc, out, err in results:
        assert "Traceback" not in err, err
        if rc == 0:
            uuids.update(UUID_RE.findall(out))
        else:
            # A conflict may be refused, but as one clear line.
            assert err.strip().count("\n") == 0, err
            assert err.startswith("Error: "), err
    assert sum(rc == 0 for rc, _o, _e in results) >= 1, results
    assert virsh("list", "--all", "--name").split().count(name) == 1
    assert virsh("domstate", name) == "running"
    assert uuids == {virsh("domuuid", name)}, uuids
    assert sum(bool(re.search(rf"^started {re.escape(name)}$", out, re.M)) for _rc, out, _e in results) == 1


def test_up_that_loses_the_define_race_takes_the_winners_uuid(test_uri, unique_name, monkeypatch):
    """The race the concurrent test found: two `up`s both see no domain; the second define must not fail."""
    with Session(test_uri) as session:
        first = up(make_cfg(unique_name, 0), session)
        real_lookup = session.lookup
        calls = []

        def stale_lookup(name):
            calls.append(name)
            return None if len(calls) == 1 else real_lookup(name)  # as if looked up before the other define

        monkeypatch.setattr(session, "lookup", stale_lookup)
        lines: list[str] = []
        again = up(make_cfg(unique_name, 0), session, say=lines.append)
        assert again.uuid == first.uuid and again.defined == "unchanged"
        assert any("defined meanwhile" in line for line in lines)
        assert [d.name() for d in session.conn.listAllDomains()] == [unique_name]
