"""``guest unit``'s helper as the slave of a real bridge on loopback (no VM): real jackd, jack_thru,
jack_evmon, jack_lsp and jack_connect, the link's settings from a credential as systemd passes it;
the loop made again after a broken connection (on JACK's notice) and a lost DSP client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from conftest import archdsp, free_jack_server_name
from test_bridge import loopback  # noqa: F401 - the bridge's loopback fixture

from archdsp_libvirt import load_config
from archdsp_libvirt.domain import contract
from archdsp_libvirt.guest import unit

THRU_LOOP = {("system:capture_1", "archdsp_thru:input_1"), ("archdsp_thru:output_1", "system:playback_1"),
             ("system:capture_2", "archdsp_thru:input_2"), ("archdsp_thru:output_2", "system:playback_2")}


def connections(server: str) -> set[tuple[str, str]]:
    """The output -> input connections on JACK server ``server`` (empty when it does not answer)."""
    env = {**os.environ, "JACK_NO_START_SERVER": "1"}
    proc = subprocess.run(["jack_lsp", "-s", server, "-c"], capture_output=True, text=True, timeout=30, env=env)
    out, port = set(), None
    for line in proc.stdout.splitlines():
        if not line[:1].isspace():
            port = line
        elif port is not None:
            out.add((port, line.strip()))
    return out


def wait_for_loop(server: str, seconds: float = 60) -> set[tuple[str, str]]:
    deadline = time.monotonic() + seconds
    while True:
        seen = connections(server)
        if THRU_LOOP <= seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.5)


def wait_for_log(path, text: str, seconds: float = 40) -> bool:
    """``text`` is in the log at ``path`` within ``seconds`` (the helper logs after it made the loop)."""
    deadline = time.monotonic() + seconds
    while text not in path.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def wait_for_evmon(folder, server: str, seconds: float = 30) -> bool:
    """The helper's jack_evmon listens: a client of ours (jack_lsp) opening on ``server`` shows in its log
    (in the helper's RUNTIME_DIRECTORY). The helper starts it once the loop is first made, so a change made
    right after "ready" can come before it is registered (the helper's periodic look then mends it)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        connections(server)  # a jack_lsp client registers and unregisters: a notice for jack_evmon
        if any(log.stat().st_size > 0 for log in folder.glob("archdsp-evmon.*")):
            return True
        time.sleep(0.5)
    return False


def thru_pids(session: int) -> list[int]:
    """The jack_thru processes of the helper's session."""
    out = subprocess.run(["pgrep", "-s", str(session), "-x", "jack_thru"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.real
@pytest.mark.jack
def test_the_helper_joins_a_real_master_and_keeps_its_loop(loopback, tmp_path):  # noqa: F811
    cfg, _start_slave = loopback
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-lb", "--server", "dummy", str(cfg))
    assert r.returncode == 0, r.stderr
    settings = contract.settings(load_config(cfg, files_here=False))
    assert settings is not None and settings["master"] == "127.0.0.1"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / contract.CREDENTIAL).write_text(contract.encode(settings))
    script = tmp_path / "netjack-slave"
    script.write_text(unit.helper_script())
    server = free_jack_server_name()
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds), "JACK_DEFAULT_SERVER": server,
           "ARCHDSP_DMI_ENTRIES": str(tmp_path / "none"), "RUNTIME_DIRECTORY": str(tmp_path)}
    log = open(tmp_path / "helper.log", "w")
    proc = subprocess.Popen(["sh", str(script)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        r = archdsp("netjack", "start", "--wait", "60", str(cfg))
        assert r.returncode == 0, r.stderr + (tmp_path / "helper.log").read_text()
        assert THRU_LOOP <= wait_for_loop(server), (tmp_path / "helper.log").read_text()
        # (jack_thru connects itself: the helper has the loop once it says so)
        assert wait_for_log(tmp_path / "helper.log", "archdsp-netjack: ready: "), (tmp_path / "helper.log").read_text()
        # A connection broken, then the DSP client gone: JACK's notices bring the helper to make them again.
        assert wait_for_evmon(tmp_path, server), (tmp_path / "helper.log").read_text()
        jack = {**os.environ, "JACK_NO_START_SERVER": "1"}
        subprocess.run(["jack_disconnect", "-s", server, "system:capture_1", "archdsp_thru:input_1"],
                       check=True, timeout=30, env=jack)
        assert THRU_LOOP <= wait_for_loop(server), (tmp_path / "helper.log").read_text()
        # ... by JACK's notice (jack_evmon's lines reach the helper one at a time), not a periodic look.
        assert wait_for_log(tmp_path / "helper.log", "DSP loop made again (after a JACK notice)"), \
            (tmp_path / "helper.log").read_text()
        old = thru_pids(proc.pid)
        assert len(old) == 1, old
        os.kill(old[0], signal.SIGTERM)
        assert THRU_LOOP <= wait_for_loop(server), (tmp_path / "helper.log").read_text()
        assert wait_for_log(tmp_path / "helper.log", "DSP loop made again (after the DSP client exited)"), \
            (tmp_path / "helper.log").read_text()
        new = thru_pids(proc.pid)
        assert len(new) == 1 and new != old, (old, new)
        assert proc.poll() is None
        # systemctl stop: SIGTERM to every process of the unit at once (its cgroup). The clients, whose jackd
        # went at the same moment, hang in their goodbye to it: the helper kills them, and ends on its own
        # (systemd would wait TimeoutStopSec, 90 s, then SIGKILL the lot).
        os.killpg(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=20)
        left = subprocess.run(["pgrep", "-a", "-s", str(proc.pid)], capture_output=True, text=True).stdout
        assert left == "", left
        assert rc == 0
        text = (tmp_path / "helper.log").read_text()
        assert "starting: jackd -R -P 70 -d net -a 127.0.0.1" in text and "ready: lbslave joined" in text, text
    finally:
        if proc.poll() is None:  # the helper stops its jackd (a process group of its own) on SIGTERM
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
