"""The real-time KVM host's rows and ``host prepare`` on this machine, for real.

``check`` on the demo's config: each verdict is computed here from the machine's own files. Then
``host prepare apply`` changes the real /proc/sys, kernel threads' priorities, IRQ affinities and KVM
knobs, and ``undo`` must leave every one of them exactly as it was (a finalizer puts back anything
undo missed, from the snapshot taken before).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.config import load_config
from archdsp_libvirt.host.files import Host
from archdsp_libvirt.host.findings import Resched, Write
from archdsp_libvirt.host.prepare import plan

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(os.geteuid() != 0, reason="changing kernel settings and thread priorities needs root")]

DEMO = Path(__file__).resolve().parent.parent / "domains" / "demo-dsp.toml"
RT_RUNTIME = Path("/proc/sys/kernel/sched_rt_runtime_us")


def stat_sched(pid: int) -> tuple[int, int, int] | None:
    """(policy, RT priority, nice) as the kernel reports them."""
    try:
        return os.sched_getscheduler(pid), os.sched_getparam(pid).sched_priority, os.getpriority(os.PRIO_PROCESS, pid)
    except OSError:
        return None


def snapshot(changes) -> dict:
    out: dict = {}
    for c in changes:
        if isinstance(c, Write):
            out[c.path] = Path(c.path).read_text()
        else:
            out[c.pid] = stat_sched(c.pid)
    return out


def current(snap: dict) -> dict:
    return {k: (Path(k).read_text() if isinstance(k, str) else stat_sched(k)) for k in snap}


def put_back(snap: dict) -> None:
    """What undo should have done, from the snapshot: the finalizer's last resort."""
    host = Host()
    for k, v in snap.items():
        try:
            if isinstance(k, str):
                if Path(k).read_text() != v:
                    m = re.search(r"\[([^\]]*)\]", v)
                    host.write(k, m.group(1) if m else v.strip())
            elif v is not None and stat_sched(k) != v:
                os.sched_setscheduler(k, v[0], os.sched_param(v[1]))
        except OSError:
            pass


@pytest.fixture
def demo_check():
    res = CliRunner().invoke(cli, ["-c", "test:///default", "check", "--json", str(DEMO)])
    return {d["id"]: d for d in json.loads(res.stdout)}


def test_check_shows_the_machine_as_it_is(demo_check):
    cfg = load_config(DEMO)
    vcpus = set(cfg.isolated_cores)
    runtime = int(RT_RUNTIME.read_text())
    assert demo_check["rt.throttling"]["status"] == ("ok" if runtime < 0 else "warn")
    if runtime >= 0:
        assert f"stopped {(1_000_000 - runtime) / 1000:g} ms" in demo_check["rt.throttling"]["observed"]

    ksoftirqd = [int(p) for p in os.listdir("/proc") if p.isdigit()
                 and Path(f"/proc/{p}/comm").read_text().strip() in {f"ksoftirqd/{c}" for c in vcpus}]
    assert ksoftirqd, "every kernel has a ksoftirqd per CPU"
    below = [p for p in ksoftirqd if not (os.sched_getscheduler(p) in (os.SCHED_FIFO, os.SCHED_RR)
                                          and os.sched_getparam(p).sched_priority > cfg.realtime.priority)]
    row = demo_check["rt.kthreads"]
    assert row["status"] == ("warn" if below else "ok")
    for p in below:
        assert f"(pid {p})" in row["observed"] and f" {p}" in row["fix"]

    reach = []
    for irq in os.listdir("/proc/irq"):
        d = Path("/proc/irq") / irq
        if irq.isdigit() and any(e.is_dir() for e in d.iterdir()):
            cpus = (d / "smp_affinity_list").read_text().strip()
            if any(c in vcpus for c in _cpus(cpus)):
                reach.append(irq)
    assert demo_check["irq.affinity"]["status"] == ("warn" if reach or "irqaffinity=" not in
                                                    Path("/proc/cmdline").read_text() else "ok")

    thp = re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    assert demo_check["mm.thp"]["status"] == ("warn" if thp == "always" else "ok")
    ksm = Path("/sys/kernel/mm/ksm/run").read_text().strip()
    assert demo_check["mm.ksm"]["status"] == ("warn" if ksm == "1" else "ok")


def _cpus(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        a, _, b = part.partition("-")
        out |= set(range(int(a), int(b or a) + 1))
    return out


def test_prepare_applies_and_undo_restores_exactly(tmp_path, demo_check):
    cfg = load_config(DEMO)
    changes, _ = plan(cfg, Host())
    if not changes:
        pytest.skip("this host needs no runtime change for the demo's config")
    before = snapshot(changes)
    state = tmp_path / "prepare.json"
    try:
        res = CliRunner().invoke(cli, ["host", "prepare", "apply", str(DEMO), "--state", str(state)])
        assert res.exit_code == 0, res.output
        applied = [line for line in res.output.splitlines() if " (was " in line]
        assert applied, res.output
        if any(isinstance(c, Write) and c.path == str(RT_RUNTIME) for c in changes):
            assert RT_RUNTIME.read_text().strip() == "-1"
        for c in changes:
            if isinstance(c, Resched) and f"{c.command} (was" in res.output:
                assert stat_sched(c.pid)[:2] == (os.SCHED_FIFO, c.priority)
        after = CliRunner().invoke(cli, ["-c", "test:///default", "check", "--json", str(DEMO)])
        rows = {d["id"]: d for d in json.loads(after.stdout)}
        assert rows["rt.throttling"]["status"] in ("ok", "skip")
        assert rows["rt.kthreads"]["status"] in ("ok", "skip")

        res = CliRunner().invoke(cli, ["host", "prepare", "undo", "--state", str(state)])
        assert res.exit_code == 0, res.output
        assert current(before) == before
        assert not state.exists()
        again = CliRunner().invoke(cli, ["-c", "test:///default", "check", "--json", str(DEMO)])
        statuses = {d["id"]: d["status"] for d in json.loads(again.stdout)}
        assert statuses == {k: v["status"] for k, v in demo_check.items()}
    finally:
        if state.exists():
            CliRunner().invoke(cli, ["host", "prepare", "undo", "--state", str(state)])
        put_back(before)
        assert current(before) == before
