"""What root keeps for the bridges and the headless PipeWire: where it lives, how big it grows, and who may
start or stop at the same time. Fast: state folders under tmp_path, stand-in processes (`sleep`) this test
starts itself and stops by PID, no audio server."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from archdsp_libvirt.audio import link
from archdsp_libvirt.errors import BridgeError
from archdsp_libvirt.procs import Owned, spawn_detached, start_time


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    monkeypatch.setattr(link, "RUN_DIR", d)
    return d


@pytest.fixture
def sleeper():
    """A process of this test's own (``sleep 30``), stopped by its PID at the end."""
    procs: list[subprocess.Popen] = []

    def make() -> subprocess.Popen:
        p = subprocess.Popen(["sleep", "30"])
        procs.append(p)
        for _ in range(100):  # /proc has it
            if start_time(p.pid) is not None:
                break
            time.sleep(0.01)
        return p

    yield make
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=5)


# --- item 7: the headless PipeWire's log and its record of PIDs -------------------------------------------

def _fake_servers(monkeypatch, headless, started: list[Owned]):
    """pipewire and wireplumber stand-ins: a `sleep 30` each (through the real spawn_detached, into the real
    log path), and a probe that answers at once."""
    def spawn(argv, log, env=None, pass_fds=()):
        proc = spawn_detached(["sleep", "30"], log)
        started.append(proc)
        return proc

    monkeypatch.setattr(headless, "spawn_detached", spawn)
    monkeypatch.setattr(headless.pw, "probe", lambda _t, timeout=5.0: {"version": "test"})


def test_the_headless_log_is_not_followed_through_a_link_planted_in_tmp(run_dir, tmp_path, monkeypatch):
    from archdsp_libvirt.audio.pipewire import headless

    directory = tmp_path / f"pw-{uuid.uuid4().hex[:8]}"
    old_log = Path("/tmp") / f"archdsp-pw-{directory.name}.log"  # the name it had: anyone may plant it
    victim = tmp_path / "victim"  # stands for /etc/something root must not create or append to
    old_log.symlink_to(victim)
    started: list[Owned] = []
    try:
        _fake_servers(monkeypatch, headless, started)
        headless.start(directory, say=lambda _m: None)
        assert not victim.exists(), "root followed the planted link"
        log = headless.log_path(directory)
        assert log.parent == run_dir and log.is_file() and not log.is_symlink()
        assert log.stat().st_uid == os.geteuid() and log.stat().st_mode & 0o077 == 0
        assert not (directory / "pids.json").exists()  # nothing root keeps lives in the user's folder
        assert headless.stop(directory, say=lambda _m: None)
        assert not any(p.alive() for p in started)
    finally:
        old_log.unlink(missing_ok=True)
        for p in started:
            p.stop(timeout=2)


def test_a_link_or_a_foreign_file_at_the_headless_log_is_refused(run_dir, tmp_path, monkeypatch):
    from archdsp_libvirt.audio.pipewire import headless

    directory = tmp_path / "pw"
    victim = tmp_path / "victim"
    headless.log_path(directory).symlink_to(victim)
    started: list[Owned] = []
    _fake_servers(monkeypatch, headless, started)
    with pytest.raises(BridgeError, match="cannot open the headless PipeWire's log"):
        headless.start(directory, say=lambda _m: None)
    assert not victim.exists() and started == []  # refused before anything ran
    headless.log_path(directory).unlink()
    headless.log_path(directory).mkdir()  # not a regular file
    with pytest.raises(BridgeError):
        headless.start(directory, say=lambda _m: None)
    assert started == []


def test_a_pids_file_in_the_users_folder_is_never_signalled(run_dir, tmp_path, sleeper):
    from archdsp_libvirt.audio.pipewire import headless

    directory = tmp_path / "pw"  # the user's: they write what they like here
    directory.mkdir()
    victim = sleeper()
    planted = {"pid": victim.pid, "start": start_time(victim.pid)}  # the right start time too
    (directory / "pids.json").write_text(json.dumps({"pipewire": planted, "wireplumber": planted}))
    assert headless.stop(directory, say=lambda _m: None) is False
    time.sleep(0.1)
    assert victim.poll() is None, "stop signalled a PID the user's folder named"


def test_the_record_in_the_run_folder_is_keyed_by_the_directory_and_checked_by_start_time(run_dir, tmp_path,
                                                                                           sleeper):
    from archdsp_libvirt.audio.pipewire import headless
    from archdsp_libvirt.audio.records import write_record

    a, b = tmp_path / "one" / "pw", tmp_path / "two" / "pw"  # the same last name
    assert headless.record_path(a) != headless.record_path(b)
    assert headless.record_path(a).parent == run_dir

    reused = sleeper()  # a record whose PID is now someone else's process (another start time)
    write_record(headless.record_path(a), headless.Headless(
        directory=str(a), pipewire=Owned(reused.pid, start_time(reused.pid) - 1)))
    assert headless.stop(a, say=lambda _m: None) is True
    assert reused.poll() is None and not headless.record_path(a).exists()

    ours = sleeper()  # the record of what start started: stop stops it
    write_record(headless.record_path(b), headless.Headless(directory=str(b), pipewire=Owned.of(ours.pid)))
    said: list[str] = []
    assert headless.stop(b, say=said.append) is True
    assert said == [f"stopped pipewire (pid {ours.pid})"]
    assert start_time(ours.pid) is None  # gone (and reaped by stop)


# --- item 8: one bound on every bridge log -------------------------------------------------------------------

def test_a_log_cut_in_place_goes_on_at_its_start_for_the_writer(tmp_path):
    log = tmp_path / "netjack-x.log"
    with open(log, "ab", buffering=0) as writer:  # as spawn_detached gives a child its output
        writer.write(b"a" * 2000)
        assert link.bound_log(log, max_bytes=1000)
        assert log.stat().st_size == 0 and (tmp_path / "netjack-x.log.1").read_bytes() == b"a" * 2000
        writer.write(b"after\n")
    assert log.read_bytes() == b"after\n"  # not 2000 zero bytes and then the line


def test_bound_log_leaves_a_symbolic_link_alone(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"z" * 5000)
    (tmp_path / "netjack-x.log").symlink_to(target)
    assert not link.bound_log(tmp_path / "netjack-x.log", max_bytes=10)
    assert target.read_bytes() == b"z" * 5000 and not (tmp_path / "netjack-x.log.1").exists()


def test_the_jack2_start_passes_its_log_to_the_supervisor_which_bounds_it(tmp_path, monkeypatch, capsys):
    import inspect

    from archdsp_libvirt.audio.jack2 import bridge, supervisor

    assert '"--log", str(log)' in inspect.getsource(bridge._start_owned)
    log = tmp_path / "netjack-x.log"
    log.write_bytes(b"j" * 3000)
    monkeypatch.setattr(link, "LOG_MAX_BYTES", 1000)
    supervisor._bound(log)
    assert log.stat().st_size == 0 and "passed its bound" in capsys.readouterr().err


# --- items 8 and 9: the PipeWire supervisor's loop ------------------------------------------------------------

def _run_supervisor(monkeypatch, tmp_path, write, periods: int) -> tuple[int, list[Owned]]:
    """The PipeWire supervisor's loop with a `sleep 30` for the manager, no PipeWire and no JACK; ``write``
    stands for the status write; SIGTERM after ``periods`` writes."""
    from archdsp_libvirt.audio.pipewire import supervisor

    managers: list[Owned] = []

    def spawn(argv, log, env=None, pass_fds=()):
        proc = spawn_detached(["sleep", "30"], log)
        managers.append(proc)
        return proc

    calls = {"n": 0}

    def write_record(path, seen):
        calls["n"] += 1
        if calls["n"] >= periods:
            os.kill(os.getpid(), signal.SIGTERM)
        write(calls["n"], path, seen)

    monkeypatch.setattr(supervisor.pw, "find_target", lambda *a, **k: None)
    monkeypatch.setattr(supervisor.pw, "pw_env", lambda _t, base=None: None)
    monkeypatch.setattr(supervisor, "_jack_client", lambda: None)
    monkeypatch.setattr(supervisor, "spawn_detached", spawn)
    monkeypatch.setattr(supervisor, "write_record", write_record)
    monkeypatch.setattr(supervisor, "POLL", 0.02)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        rc = supervisor.supervise("x", tmp_path / "conf", tmp_path / "status.json", tmp_path / "netjack-x.log",
                                  tmp_path / "restart")
    finally:
        signal.signal(signal.SIGTERM, handlers[0])
        signal.signal(signal.SIGINT, handlers[1])
        for m in managers:
            m.stop(timeout=2)
    assert calls["n"] >= periods
    return rc, managers


def test_the_pipewire_supervisor_survives_a_full_run_folder(tmp_path, monkeypatch, capsys):
    from archdsp_libvirt.audio.records import write_record

    def write(n, path, seen):
        if n <= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write_record(path, seen)

    rc, managers = _run_supervisor(monkeypatch, tmp_path, write, periods=6)
    assert rc == 0 and len(managers) == 1  # one manager all along: the loop went on
    out = capsys.readouterr().out
    assert out.count("cannot write") == 1, out  # said once, not every period
    assert out.count(" again\n") == 1 and (tmp_path / "status.json").exists()  # and once it works again


def test_the_pipewire_supervisor_bounds_its_log(tmp_path, monkeypatch):
    log = tmp_path / "netjack-x.log"
    log.write_bytes(b"p" * 5000)
    monkeypatch.setattr(link, "LOG_MAX_BYTES", 1000)
    _run_supervisor(monkeypatch, tmp_path, lambda *_a: None, periods=3)
    assert (tmp_path / "netjack-x.log.1").read_bytes().startswith(b"p" * 5000)
    assert log.stat().st_size < 1000


# --- item 9: one start or stop of a domain at a time, on both backends ----------------------------------------

def _overlap(monkeypatch, module, first: str, second: str, args_first: tuple, args_second: tuple) -> list:
    """Run module.{first,second} in two threads with the work behind the lock stubbed by a 0.3 s sleep; the
    (name, enter, leave) of each."""
    spans: list[tuple[str, float, float]] = []

    def slow(name):
        def work(*_a, **_k):
            t0 = time.monotonic()
            time.sleep(0.3)
            spans.append((name, t0, time.monotonic()))
            return (None, True) if name.startswith("_start") else True
        return work

    monkeypatch.setattr(module, "_start", slow("_start"))
    monkeypatch.setattr(module, "_stop", slow("_stop"))
    threads = [threading.Thread(target=getattr(module, first), args=args_first),
               threading.Thread(target=getattr(module, second), args=args_second)]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    return sorted(spans, key=lambda s: s[1])


def _link(domain="lockme"):
    return link.Link(domain, "dsp", "127.0.0.1", 19011, 48000, 128, 2)


@pytest.mark.parametrize("pair", [("start", "start"), ("start", "stop"), ("stop", "start")])
def test_pipewire_starts_and_stops_of_a_domain_take_turns(run_dir, monkeypatch, pair):
    from archdsp_libvirt.audio.backend import StartOptions
    from archdsp_libvirt.audio.pipewire import bridge

    args = {"start": (_link(), StartOptions(), None, lambda _m: None), "stop": ("lockme", lambda _m: None)}
    spans = _overlap(monkeypatch, bridge, pair[0], pair[1], args[pair[0]], args[pair[1]])
    assert len(spans) == 2 and spans[1][1] >= spans[0][2], f"the second ran inside the first: {spans}"
    assert (run_dir / "netjack-lockme.lock").exists()


def test_the_two_backends_share_one_lock(run_dir, monkeypatch):
    from archdsp_libvirt.audio.backend import StartOptions
    from archdsp_libvirt.audio.jack2 import bridge as jack2
    from archdsp_libvirt.audio.pipewire import bridge as pipewire

    held = threading.Event()
    release = threading.Event()

    def hold():
        with link.bridge_lock("lockme"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(5)
    real = link.bridge_lock
    try:
        for module in (jack2, pipewire):
            monkeypatch.setattr(module, "_start", lambda *_a, **_k: pytest.fail("ran while the lock was held"))
            monkeypatch.setattr(module, "bridge_lock", lambda d, timeout=60.0: real(d, timeout=0.2))
            with pytest.raises(BridgeError, match="another 'netjack start' or 'stop' of lockme still runs"):
                module.start(_link(), StartOptions(), None, lambda _m: None)
    finally:
        release.set()
        t.join(timeout=5)


def test_a_link_planted_at_the_headless_directory_is_not_chmodded(run_dir, tmp_path, monkeypatch):
    from archdsp_libvirt.audio.pipewire import headless

    target = tmp_path / "precious"
    target.mkdir(mode=0o755)
    (tmp_path / "pw").symlink_to(target)
    started: list[Owned] = []
    _fake_servers(monkeypatch, headless, started)
    with pytest.raises(BridgeError, match="not a directory of its own"):
        headless.start(tmp_path / "pw", say=lambda _m: None)
    assert target.stat().st_mode & 0o777 == 0o755 and started == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the folder to another uid")
def test_a_headless_directory_of_someone_else_is_refused(run_dir, tmp_path, monkeypatch):
    from archdsp_libvirt.audio.pipewire import headless

    other = tmp_path / "theirs"
    other.mkdir(mode=0o755)
    os.chown(other, 65534, 65534)
    started: list[Owned] = []
    _fake_servers(monkeypatch, headless, started)
    with pytest.raises(BridgeError, match="owned by uid 65534"):
        headless.start(other, say=lambda _m: None)
    assert other.stat().st_mode & 0o777 == 0o755 and started == []
