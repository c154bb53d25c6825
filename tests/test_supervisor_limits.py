"""The PipeWire supervisor's restart policy (audio/pipewire/supervisor.py): a crowded manager's restarts
are rate-limited with a growing pause and said in status; a manager the kernel shows bound anywhere but
master_ip is stopped. The decisions run on a fake clock; the loop runs with fakes for PipeWire."""

from __future__ import annotations

import os
import subprocess

import pytest

from archdsp_libvirt.audio.pipewire import server, sockhook
from archdsp_libvirt.audio.pipewire import supervisor as sup
from archdsp_libvirt.audio.pipewire.state import PipeWireSeen
from archdsp_libvirt.errors import BridgeError
from archdsp_libvirt.procs import Owned


def test_restarts_are_limited_per_minute_then_held_back_longer_each_time():
    lim = sup.RestartLimit(most=3, per=60.0, longest=600.0)
    assert [lim.allow(t) for t in (0.0, 2.0, 4.0)] == [True, True, True]
    assert lim.text(5.0) is None
    assert lim.allow(6.0) is False  # a 4th within a minute: held back 60 s
    text = lim.text(7.0)
    assert text.startswith("restarts held back: 3 in 60 s") and text.endswith("next allowed in 59 s")
    assert [lim.allow(t) for t in (10.0, 30.0, 65.0)] == [False, False, False]
    assert lim.allow(66.0) is True   # the pause is over, and the oldest restart is out of the minute
    assert [lim.allow(t) for t in (68.0, 70.0)] == [True, True]
    assert lim.allow(72.0) is False  # out again: held back twice as long
    assert lim.allow(72.0 + 119.0) is False and lim.allow(72.0 + 120.0) is True
    assert lim.held == 6


def test_the_pause_never_grows_past_the_longest_and_a_quiet_spell_forgets_it():
    lim = sup.RestartLimit(most=1, per=60.0, longest=300.0)
    t, pauses = 0.0, []
    for _ in range(6):
        assert lim.allow(t)
        assert not lim.allow(t + 1)
        pauses.append(lim.until - (t + 1))
        t = lim.until
    assert pauses == [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]
    t += 300.0  # the longest pause again without being held back
    assert lim.allow(t) and not lim.allow(t + 1) and lim.until - (t + 1) == 60.0


@pytest.mark.parametrize(("where", "bad"), [
    ([], False),                                  # not bound yet
    (["127.0.0.1:19000"], False),
    (["0.0.0.0:19000"], True),
    (["127.0.0.1:19000", "[::]:19000"], True),
    (["[::ffff:0.0.0.0]:19000"], True),
    (["10.0.0.1:19000"], True),                   # one address, but not master_ip
])
def test_listening_problem(where, bad):
    got = sup.listening_problem(where, "127.0.0.1", 19000)
    assert (got is not None) == bad
    if bad:
        assert "not only 127.0.0.1:19000" in got and all(w in got for w in where if w != "127.0.0.1:19000")


def test_listening_problem_ipv6_master():
    assert sup.listening_problem(["[fd00::1]:19000"], "fd00::1", 19000) is None
    assert sup.listening_problem(["[::]:19000"], "fd00::1", 19000) is not None
    assert sup.listening_problem(["[fd00::1]:19000"], "FD00:0::1", 19000) is None  # as the kernel prints it


# ---- the loop, with fakes for PipeWire and the hooked manager ------------------------------------------

def _pair(first_id: int, slave: str) -> list[dict]:
    return [{"id": first_id, "name": server.CAPTURE_NODE, "slave": slave},
            {"id": first_id + 1, "name": server.PLAYBACK_NODE, "slave": slave}]


class FakeHook:
    def close(self, timeout: float = 2.0) -> None:
        pass

    def counts(self) -> dict:
        return {"new": 0, "let_go": 0, "refused": 0, "held": 0}


@pytest.fixture
def loop(tmp_path, monkeypatch):
    procs: list[subprocess.Popen] = []
    writes: list[PipeWireSeen] = []
    gone: list[bool] = []

    def spawn(argv, log, master_ip, port, env=None, say=print, **_k):
        p = subprocess.Popen(["sleep", "60"])
        procs.append(p)
        return Owned.of(p.pid), FakeHook()

    def run(nodes: list[dict], where: list[str], ticks: int = 30):
        def write(path, seen):
            writes.append(seen)
            gone.append(not os.path.exists(f"/proc/{procs[-1].pid}"))  # the manager of the time was stopped
            if len(writes) == ticks:
                raise BridgeError("enough")

        monkeypatch.setattr(sockhook, "spawn", spawn)
        monkeypatch.setattr(server, "find_target", lambda *a, **k: object())
        monkeypatch.setattr(server, "pw_env", lambda *a, **k: {})
        monkeypatch.setattr(server, "dump", lambda *a, **k: [])
        monkeypatch.setattr(server, "netjack_nodes", lambda objs, pid: list(nodes))
        monkeypatch.setattr(sup.sockets, "listening", lambda pid, port: list(where))
        monkeypatch.setattr(sup, "_jack_client", lambda: None)
        monkeypatch.setattr(sup, "write_record", write)
        monkeypatch.setattr(sup, "POLL", 0.01)
        monkeypatch.setattr(sup, "CROWDED_AFTER", -1.0)
        monkeypatch.setattr(sup.signal, "signal", lambda *_a: None)  # keep pytest's SIGTERM and SIGINT
        try:
            rc = sup.supervise("t", tmp_path / "c.conf", tmp_path / "s.json", tmp_path / "l.log",
                               tmp_path / "restart", vm_slave="dsp", port=19000, master_ip="127.0.0.1")
        finally:
            for p in procs:
                p.kill()
                p.wait()
        return rc, writes, procs, gone

    return run


def test_a_second_slaves_pair_restarts_the_manager_a_few_times_then_status_says_held_back(loop):
    rc, writes, procs, _gone = loop(_pair(1, "dsp") + _pair(3, "intruder"), ["127.0.0.1:19000"])
    assert rc == 1 and writes[-1].problem == "enough"
    assert len(procs) == 1 + sup.RESTARTS_MOST  # not one restart a tick
    last = writes[-2]
    assert last.restarts == sup.RESTARTS_MOST
    assert last.restarts_held and last.restarts_held.startswith("restarts held back:")


def test_a_manager_bound_elsewhere_than_master_ip_is_stopped(loop):
    rc, writes, procs, gone = loop(_pair(1, "dsp"), ["0.0.0.0:19000"])
    assert rc == 1 and len(writes) == 1 and len(procs) == 1
    assert "listens on 0.0.0.0:19000/udp" in writes[0].problem and writes[0].listening == ["0.0.0.0:19000"]
    assert gone == [True]  # stopped before the status said so


def test_a_manager_on_master_ip_runs_on(loop):
    rc, writes, procs, gone = loop(_pair(1, "dsp"), ["127.0.0.1:19000"], ticks=5)
    assert gone == [False] * len(writes) and rc == 1 and writes[-1].problem == "enough" and len(procs) == 1
    assert writes[-2].link == "up" and writes[-2].restarts_held is None


def test_status_says_restarts_held_back_and_let_gos_held(tmp_path, monkeypatch):
    import time

    import msgspec

    from archdsp_libvirt.audio import link, servers

    monkeypatch.setattr(link, "RUN_DIR", tmp_path)
    state_file, status_file, _log = link.state_paths("held")
    state_file.write_bytes(msgspec.json.encode({
        "domain": "held", "audio_server": "pipewire", "server": "srv", "supervisor": Owned.of(os.getpid()),
        "master_ip": "127.0.0.1", "port": 19011, "slave": "dsp", "channels": 2, "started": time.time(),
        "pipewire": {"remote": "/run/user/1000/pipewire-0", "user": "alice", "how": "test", "version": "1.4.2"}}))
    held = "restarts held back: 3 in 60 s already (a second slave's pair?); next allowed in 42 s"
    status_file.write_bytes(msgspec.json.encode({
        "link": "up", "slave": "dsp", "updated": time.time(), "restarts_held": held,
        "joins": {"new": 2, "let_go": 1, "refused": 4, "held": 7}}))
    info = servers.status("held")
    assert info["problem"] == held and info["joins"]["held"] == 7
    lines = "\n".join(servers.format_status(info))
    assert f"problem: {held}" in lines and "let-gos held back 7" in lines
