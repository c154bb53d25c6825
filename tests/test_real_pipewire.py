"""The bridge on a real PipeWire 1.4.2 (a headless pipewire + WirePlumber of this test's own) with a real
NETJACK2 slave (jackd -d net) in a network namespace of the test's own, joined by a veth pair.

SAFETY: the slave always names the master's unicast address (-a); the netns has no route out.
"""

from __future__ import annotations

import json
import os
import signal
import pwd
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from archdsp_libvirt.audio.pipewire import headless, rxqueue
from archdsp_libvirt.audio.pipewire import server as pw
from archdsp_libvirt.procs import Owned, spawn_detached
from conftest import DOMAINS, archdsp

pytestmark = [pytest.mark.real,
              pytest.mark.skipif(not pw.module_installed() or not shutil.which("wireplumber"),
                                 reason="PipeWire >= 1.2 with the netjack2 manager and WirePlumber are not "
                                        "installed (scripts/install-test-deps installs them)")]

TAG = uuid.uuid4().hex[:5]
NS = f"apwt{TAG}"
SUBNET = random.randint(1, 250)
MASTER = f"10.216.{SUBNET}.1"
PORT = random.randint(19100, 19900)


def run(*argv, check=True, timeout=30, **kw):
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A headless PipeWire (own XDG_RUNTIME_DIR), a netns linked by veth, and a config pointing at it."""
    base = tmp_path_factory.mktemp("pw")
    xdg, state = base / "xdg", base / "run"
    state.mkdir(mode=0o700)  # root's own state folder: ARCHDSP_RUN_DIR is taken as root only for such a one
    run("ip", "netns", "add", NS)
    try:
        run("ip", "link", "add", f"{NS}h", "type", "veth", "peer", "name", f"{NS}n")
        run("ip", "link", "set", f"{NS}n", "netns", NS)
        run("ip", "addr", "add", f"{MASTER}/24", "dev", f"{NS}h")
        run("ip", "link", "set", f"{NS}h", "up")
        run("ip", "netns", "exec", NS, "ip", "addr", "add", f"10.216.{SUBNET}.2/24", "dev", f"{NS}n")
        run("ip", "netns", "exec", NS, "ip", "link", "set", f"{NS}n", "up")
        run("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        headless.start(xdg, say=lambda _m: None)
        text = (DOMAINS / "demo-dsp.toml").read_text()
        for old, new in (('name = "archdsp-demo"', f'name = "archdsp-pwt-{TAG}"'),
                         ("source_port = 19000", f"source_port = {PORT}"),
                         ('master_ip = "192.168.122.1"', f'master_ip = "{MASTER}"'),
                         ("dsp_client", "# dsp_client")):
            text = text.replace(old, new)
        text = text.replace('client_name = "dsp"', 'client_name = "dsp"\ndsp_client = false')
        cfg = base / "pwt.toml"
        cfg.write_text(text)
        e = {"XDG_RUNTIME_DIR": str(xdg), "ARCHDSP_RUN_DIR": str(state)}
        shared = {"cfg": cfg, "xdg": xdg, "env": e, "state": state, "name": f"archdsp-pwt-{TAG}", "base": base}
        yield shared
        archdsp("netjack", "stop", str(cfg), env=e, timeout=60)
        if "slave" in shared:
            shared["slave"].stop()
    finally:
        headless.stop(xdg, say=lambda _m: None)
        # Whatever still runs in the test's own namespace was started by the test (a slave that outlived its
        # wrapper): stopped by PID before the namespace goes.
        left = subprocess.run(["ip", "netns", "pids", NS], capture_output=True, text=True, timeout=30).stdout.split()
        for pid in left:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"{NS}h"], capture_output=True, timeout=30)


class Slave:
    """``jackd -d net -a MASTER`` in the netns, looping its capture_1 to playback_1 (a direct loop)."""

    def __init__(self, base: Path, latency: int = 0):
        self.server = "archdsp-pwt-slave"  # a fixed name: JACK reclaims a stale registry slot only for the same name
        self.log = base / "slave.log"
        self.proc = spawn_detached(["ip", "netns", "exec", NS, "timeout", "-s", "KILL", "600", "jackd", "-n",
                                    self.server, "-d", "net", "-a", MASTER, "-p", str(PORT), "-C", "2", "-P", "2",
                                    "-i", "0", "-o", "0", "-l", str(latency), "-n", "dsp"], self.log,
                                   env={**os.environ, "JACK_NO_AUDIO_RESERVATION": "1"})

    def loop(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(["ip", "netns", "exec", NS, "jack_connect", "system:capture_1", "system:playback_1"],
                               capture_output=True, text=True, timeout=10,
                               env={**os.environ, "JACK_DEFAULT_SERVER": self.server, "JACK_NO_START_SERVER": "1"})
            if r.returncode == 0 or "already" in (r.stdout + r.stderr):
                return
            time.sleep(0.5)
        raise AssertionError(f"the slave's loop could not be connected: {self.log.read_text()[-500:]}")

    def stop(self):
        self.proc.stop(timeout=5)  # SIGTERM, SIGKILL after 5 s (a slave once ignored SIGTERM)
        # `ip netns exec` runs `timeout`, whose child is jackd: when the wrapper is killed, a jackd that
        # ignored SIGTERM would live on (spinning at FIFO priority). The whole session is ours: kill it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def status(env):
    return json.loads(archdsp("netjack", "status", "--json", str(env["cfg"]), env=env["env"], timeout=60).stdout)


def wait(env, pred, timeout=40):
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        info = status(env)
        if pred(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"not reached within {timeout} s: {info}")


def graph_nodes(env):
    t = pw.Target(str(env["xdg"]), "pipewire-0", None, None, "test")
    return [o for o in pw.dump(t) if o.get("type") == "PipeWire:Interface:Node"]


def netjack_node_count(env):
    return sum(str((o.get("info", {}).get("props") or {}).get("node.name", "")).startswith("netjack-")
               for o in graph_nodes(env))


def listening(port):
    return [ln for ln in run("ss", "-Huln").stdout.splitlines() if f":{port} " in ln]


def test_auto_picks_pipewire_and_binds_master_ip_only(env):
    env["before"] = {o["id"] for o in graph_nodes(env)}
    r = archdsp("netjack", "start", str(env["cfg"]), env=env["env"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert "PipeWire 1.4" in r.stdout and f"at {env['xdg']}/pipewire-0 (found by XDG_RUNTIME_DIR)" in r.stdout
    # What ss shows: PipeWire's manager on MASTER only (it asked for 0.0.0.0; the bridge's hook bound it),
    # and no firewall table was needed for that.
    assert [ln.split()[3] for ln in listening(PORT)] == [f"{MASTER}:{PORT}"]
    assert run("nft", "list", "table", "inet", pw.nft_table(env["name"]), check=False).returncode != 0
    log = (env["state"] / f"netjack-{env['name']}.log").read_text()
    assert f"bind 0.0.0.0:{PORT}: rebound to {MASTER}:{PORT}" in log
    screen = archdsp("netjack", "status", str(env["cfg"]), env=env["env"]).stdout
    assert f"listening: {MASTER}:{PORT}/udp (bound by the bridge)" in screen


def test_slave_joins_with_the_names_documented(env):
    env["slave"] = slave = Slave(env["base"])
    info = wait(env, lambda i: i["link"] == "up" and any(q["bound"] for q in i["queues"]))
    # The supervisor bounded the manager's socket to the slave, and did not restart the manager for it.
    assert info["manager_restarts"] == 0 and len(info["queues"]) == 1, info
    q = info["queues"][0]  # a veth copies: its packets cost more than a tap's; steady loss raises the bound
    assert q["bound"] == rxqueue.bound_for(128, 2, 0, rxqueue.COPY_PACKET) + q["raised"] * rxqueue.COPY_PACKET // 2
    slave.loop()
    info = wait(env, lambda i: len(i["ports"]) == 4)
    assert info["audio_server"] == "pipewire" and info["server"].startswith("PipeWire 1.4") and info["slave"] == "dsp"
    assert info["ports"] == {"netjack:capture_1": "netjack-capture:send_AUX0",
                             "netjack:capture_2": "netjack-capture:send_AUX1",
                             "netjack:playback_1": "netjack-playback:receive_AUX0",
                             "netjack:playback_2": "netjack-playback:receive_AUX1"}
    screen = archdsp("netjack", "status", str(env["cfg"]), env=env["env"]).stdout
    assert "server: PipeWire 1.4" in screen and "link: up (slave 'dsp')" in screen and "xruns since start:" in screen
    # pw-link and jack_lsp (through pw-jack) show the same names.
    e = {**os.environ, **env["env"], "PIPEWIRE_PROPS": pw.JACK_PROPS}
    assert "netjack-capture:send_AUX0" in run("pw-link", "-i", env=e).stdout
    assert "netjack-playback:receive_AUX1" in run("pw-link", "-o", env=e).stdout
    lsp = run("pw-jack", "jack_lsp", env=e).stdout
    assert "netjack-capture:send_AUX0" in lsp and "netjack-playback:receive_AUX0" in lsp


def test_no_multicast_group_joined(env):
    assert "225.3.19.154" not in run("ip", "maddr", "show").stdout
    assert "E6031399" not in Path("/proc/net/igmp").read_text().upper()  # 230.3.19.154 nor 225.3.19.154 in hex


def measure(env, seconds=4, latency=0):
    r = archdsp("latency", "--measure", "--json", "--seconds", str(seconds), str(env["cfg"]), env=env["env"],
                timeout=150)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["audio_server"] == "pipewire" and rep["graph_period"] == 128 and rep["graph_rate"] == 96000
    lo, hi = 128 * (latency + 1), 128 * (latency + 1 + 5 + latency)  # direct loop: c = 0 (README, PipeWire)
    assert (rep["predicted_frames"], rep["predicted_max_frames"]) == (lo, hi)
    assert rep["matches_prediction"] is (lo <= rep["measured_frames"] <= hi), rep
    return rep


def test_round_trip_is_within_the_pipewire_range(env):
    """A cold join (the slave joined a manager that was waiting for it) measures inside the budget's range:
    the join's burst is cut to the bound, with no restart of the manager."""
    rep = measure(env)
    print(f"PipeWire round trip at L=0, direct loop: {rep['measured_frames']} frames, "
          f"readings {sorted(set(rep['readings']))}")
    assert rep["matches_prediction"], rep
    assert status(env)["manager_restarts"] == 0


HOG = """
import os, sys, time
cpu, times, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
os.sched_setaffinity(0, {cpu})
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
for _ in range(times):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    time.sleep(0.1)
"""


def stall(slave_pid, times=40, seconds=0.01):
    """Starve the slave's jackd of its CPU for ``seconds``, ``times`` times (a FIFO 50 spinner on the core it
    is pinned to, above its FIFO 10): it catches up on the cycles it missed in a burst, as a guest whose
    vCPU stalls does. Signals would not do: a JACK slave stopped and continued rejoins its master."""
    cpu = max(os.sched_getaffinity(0))
    for tid in os.listdir(f"/proc/{slave_pid}/task"):
        os.sched_setaffinity(int(tid), {cpu})
    subprocess.run([sys.executable, "-c", HOG, str(cpu), str(times), str(seconds)], check=True,
                   timeout=times * (seconds + 0.1) + 30)


def jackd_of(slave):
    """The slave's jackd: the child of `timeout`, which `ip netns exec` became."""
    children = Path(f"/proc/{slave.proc.pid}/task/{slave.proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def stalled_round_trips(env):
    """Round trips after stalls of the slave, first with PipeWire's own receive buffer, then with the bound."""
    info = status(env)
    q = info["queues"][0]
    mgr_pid, pid = info["manager_pid"], jackd_of(env["slave"])
    fd, inode = next((s.fd, s.inode) for s in rxqueue.data_sockets(mgr_pid, PORT))
    try:
        rxqueue.set_receive_buffer(mgr_pid, fd, 151440)  # what PipeWire 1.4.2 sets (the kernel's doubling)
        stall(pid)
        unbounded = measure(env, 3)
    finally:
        try:
            rxqueue.set_receive_buffer(mgr_pid, fd, q["bound"])
        except OSError:
            pass  # the manager was restarted meanwhile: the caller sees it
    time.sleep(2)  # the backlog drains at a cycle per period once the bound is back
    stall(pid)
    return (mgr_pid, inode), unbounded, measure(env, 3)


def test_a_stalling_slave_does_not_grow_the_round_trip(env):
    """The cause and the cure, on the same link: with PipeWire's own receive buffer (30 cycles) every stall
    of the slave leaves cycles queued in the manager's socket for good (here the round trip went to 7
    periods in 12 of 16 runs, 6 in 3, 8 in 1: at least a period more than with the bound, whose figure
    depends on the join, 4 to 6); with the bridge's bound the round trip stays in the range and the kernel
    counts the late packets it dropped. A starved JACK slave now and then times out and rejoins (a new
    pair, a new socket): that run says nothing about the queue; and the stalls' effect varies (three times
    in 16 runs the buffer's round trip was no longer than the bound's). The scenario is run again after
    either, at most three times in all, and the last run must show it."""
    attempts = 3
    for attempt in range(attempts):
        try:
            (mgr_pid, inode), unbounded, bounded = stalled_round_trips(env)
        except AssertionError:
            mgr_pid, inode, unbounded, bounded = None, None, None, None
        rejoined = mgr_pid is None or [s.inode for s in rxqueue.data_sockets(mgr_pid, PORT)] != [inode]
        if rejoined:
            assert attempt < attempts - 1, "the starved slave rejoined in the last run"
            wait(env, lambda i: i["link"] == "up" and any(q["bound"] for q in i["queues"]), timeout=60)
            env["slave"].loop()
            wait(env, lambda i: len(i["ports"]) == 4)
            continue
        print(f"after 40 stalls of 10 ms: {unbounded['measured_frames']} frames with PipeWire's buffer, "
              f"{bounded['measured_frames']} with the bound ({bounded['dropped_packets']} late packets dropped)")
        assert bounded["matches_prediction"], bounded
        if unbounded["measured_frames"] >= bounded["measured_frames"] + 128:
            break
    assert unbounded["measured_frames"] >= bounded["measured_frames"] + 128, (unbounded, bounded)


def test_ten_slave_restarts_leave_the_nodes_of_one_live_link(env):
    """A restarted guest's slave joins from the same address and port as the one it replaces, whose pair
    the manager keeps and goes on sending to. Ten restarts a second apart (some in the middle of the
    previous join): the bridge lets the old pair go as the new slave joins and refuses the join packets a
    slave repeats, without restarting the manager. At the end: the two nodes of one live link, and a
    loop through it inside the budget's range."""
    before = status(env)
    log = env["state"] / f"netjack-{env['name']}.log"
    seen = len(log.read_text())
    for _ in range(10):
        env["slave"].stop()
        env["slave"] = Slave(env["base"])
        time.sleep(1)
    wait(env, lambda i: i["link"] == "up" and i["pairs"] == 1, timeout=60)
    time.sleep(2)  # a pair left over would show by now
    info = status(env)
    assert info["pairs"] == 1 and netjack_node_count(env) == 2, info
    assert info["manager_restarts"] == before["manager_restarts"] and info["manager_pid"] == before["manager_pid"]
    joins = {k: info["joins"][k] - before["joins"][k] for k in ("new", "let_go", "refused")}
    print(f"ten restarts: {joins}; the supervisor said: {log.read_text()[seen:][-600:]}")
    assert joins["new"] >= 10 and joins["let_go"] >= 1, joins
    screen = archdsp("netjack", "status", str(env["cfg"]), env=env["env"]).stdout
    assert f"old pairs let go {info['joins']['let_go']}" in screen
    env["slave"].loop()
    wait(env, lambda i: len(i["ports"]) == 4)
    rep = measure(env, 3)
    assert rep["matches_prediction"], rep


def test_stop_removes_what_the_bridge_added_and_nothing_else(env):
    state = json.loads((env["state"] / f"netjack-{env['name']}.json").read_text())
    seen = json.loads((env["state"] / f"netjack-{env['name']}.status.json").read_text())
    sup, mgr = Owned(**state["supervisor"]), Owned(**seen["manager"])
    assert sup.alive() and mgr.alive()
    r = archdsp("netjack", "stop", str(env["cfg"]), env=env["env"], timeout=60)
    assert r.returncode == 0
    assert not sup.alive() and not mgr.alive()
    time.sleep(1)
    assert netjack_node_count(env) == 0
    assert {o["id"] for o in graph_nodes(env)} == env["before"]  # the daemon's own nodes are all still there
    assert listening(PORT) == []
    assert run("nft", "list", "table", "inet", pw.nft_table(env["name"]), check=False).returncode != 0
    env["slave"].stop()


@pytest.fixture
def desktop_user(tmp_path):
    """A user of the test's own with a PipeWire in /run/user/UID, as on a desktop (removed afterwards)."""
    name = f"apwu{TAG}"
    run("useradd", "--create-home", "--shell", "/usr/sbin/nologin", name)
    uid = pwd.getpwnam(name).pw_uid
    rundir = Path(f"/run/user/{uid}")
    try:
        headless.start(rundir, user=name, say=lambda _m: None)
        yield name, uid, rundir
    finally:
        headless.stop(rundir, say=lambda _m: None)
        shutil.rmtree(rundir, ignore_errors=True)
        subprocess.run(["userdel", "--remove", name], capture_output=True, timeout=30)


def test_root_through_sudo_joins_the_users_pipewire(env, desktop_user):
    name, uid, rundir = desktop_user
    e = {"SUDO_UID": str(uid), "SUDO_USER": name, "ARCHDSP_RUN_DIR": str(env["state"])}
    base = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PIPEWIRE_REMOTE",
                                                             "PIPEWIRE_RUNTIME_DIR")}
    cmd = lambda *a: subprocess.run([os.sys.executable, "-m", "archdsp_libvirt", "netjack", *a, str(env["cfg"])],
                                    capture_output=True, text=True, timeout=60, env={**base, **e})
    r = cmd("start")
    try:
        assert r.returncode == 0, r.stderr
        assert f"of user {name} at {rundir}/pipewire-0 (found by sudo (SUDO_UID))" in r.stdout
        seen = json.loads((env["state"] / f"netjack-{env['name']}.status.json").read_text())
        t = pw.Target(str(rundir), "pipewire-0", name, uid, "test")
        clients = [o for o in pw.dump(t) if o.get("type") == "PipeWire:Interface:Client"]
        assert any(str((c["info"]["props"] or {}).get("application.process.id")) == str(seen["manager"]["pid"])
                   for c in clients), "the manager is not a client of the user's PipeWire"
        st = json.loads(cmd("status", "--json").stdout)
        assert st["pipewire"]["user"] == name and st["pipewire"]["how"] == "sudo (SUDO_UID)"
    finally:
        assert cmd("stop").returncode == 0
