"""The NETJACK bridge against real JACK servers on loopback (no VM): link, aliases, faults.

The 'VM' here is a second jackd running JACK2's net backend on 127.0.0.1: the same slave the
demo guest runs, without the boot.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from conftest import archdsp, free_udp_port

from archdsp_libvirt import parse_config
from archdsp_libvirt.audio.jack2.state import slave_clients
from archdsp_libvirt.audio.jack2.supervisor import choose_slave
from archdsp_libvirt.errors import BridgeError
from archdsp_libvirt.procs import Owned, spawn_detached

def private_run(tmp_path: Path) -> dict[str, str]:
    """The environment giving a bridge command a state folder of this test's own (root-owned, 0700), never
    the real /run/archdsp-libvirt where a user's bridge keeps its state."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return {"ARCHDSP_RUN_DIR": str(run)}


def state_of(cfg: Path) -> dict:
    """The loopback bridge's state file, in the fixture's private state folder."""
    return json.loads((cfg.parent / "run" / "netjack-archdsp-test-lb.json").read_text())


def test_slave_clients_are_the_name_or_jacks_renamed_copies():
    names = ["system:capture_1", "dsp:to_slave_1", "dsp:from_slave_1", "dsp-01:to_slave_1", "dspx:to_slave_1",
             "other:to_slave_1", "dsp-7:to_slave_1", "dsp-01x:to_slave_1"]
    assert set(slave_clients(names, "dsp")) == {"dsp", "dsp-01"}


@pytest.mark.parametrize(("present", "stale", "current", "chosen", "ignored"), [
    # the VM's own slave, alone
    ({"dsp"}, set(), None, "dsp", []),
    # defect: a second guest joining as dsp-99 (or renamed to dsp-01) beside the live dsp gets nothing
    ({"dsp", "dsp-99"}, set(), "dsp", "dsp", ["dsp-99"]),
    ({"dsp", "dsp-01"}, set(), None, "dsp", ["dsp-01"]),
    # the VM restarted (up --restart marked the old slave stale): its new slave, renamed by JACK, takes over
    ({"dsp", "dsp-01"}, {"dsp"}, "dsp", "dsp-01", []),
    ({"dsp", "dsp-01", "dsp-02"}, {"dsp"}, None, "dsp-01", ["dsp-02"]),
    # ... and keeps the link after the stale one left, also when a newcomer then takes the free exact name
    ({"dsp-01"}, set(), "dsp-01", "dsp-01", []),
    ({"dsp", "dsp-01"}, set(), "dsp-01", "dsp-01", ["dsp"]),
    # restarted twice: dsp and dsp-01 stale, dsp-02 is the VM
    ({"dsp", "dsp-01", "dsp-02"}, {"dsp", "dsp-01"}, "dsp-01", "dsp-02", []),
    # a restart outside the tool (no stale mark): the renamed slave waits until JACK drops the old one
    ({"dsp", "dsp-01"}, set(), "dsp", "dsp", ["dsp-01"]),
    ({"dsp-01"}, set(), "dsp", "dsp-01", []),
    # nothing live
    ({"dsp"}, {"dsp"}, "dsp", None, []),
    (set(), set(), "dsp", None, []),
])
def test_choose_slave(present, stale, current, chosen, ignored):
    assert choose_slave(present, "dsp", stale, current) == (chosen, ignored)


def test_status_names_ignored_slaves(tmp_path, monkeypatch):
    from archdsp_libvirt.audio import link
    from archdsp_libvirt.audio.jack2 import bridge
    from archdsp_libvirt.audio.jack2.state import JackSeen, JackState
    from archdsp_libvirt.audio.records import write_record

    monkeypatch.setattr(link, "RUN_DIR", tmp_path)
    me = Owned.of(os.getpid())
    state_file, status_file, _log = link.state_paths("dsp1")
    write_record(state_file, JackState(domain="dsp1", server="s", supervisor=me, master_ip="192.168.122.1",
                                       port=19000, slave="dsp", channels=2, started=0))
    write_record(status_file, JackSeen(link="up", slave="dsp", ignored=["dsp-99"], updated=time.time()))
    info = bridge.status("dsp1")
    assert info["ignored"] == ["dsp-99"]
    assert "'dsp-99' ignored: the link follows 'dsp'" in info["problem"]
    assert "archibaldos.netjack.client_name" in info["problem"]
    assert any(line.startswith("  problem: NETJACK slave 'dsp-99' ignored") for line in bridge.format_status(info))


def _netjack_cfg(name="dsp1"):
    return parse_config({"name": name, "isolated_cores": [1], "memory_mb": 256,
                         "archibaldos": {"netjack": {"enable": True}}})


def test_systemd_unit_refuses_a_path_with_a_newline(tmp_path):
    from click.testing import CliRunner

    from archdsp_libvirt.cli import cli

    evil = tmp_path / "dsp.toml\nExecStartPre=touch pwned"
    evil.write_text("isolated_cores = [1]\nmemory_mb = 256\n[archibaldos.netjack]\nenable = true\n")
    result = CliRunner().invoke(cli, ["netjack", "unit", str(evil)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "control character" in lines[0] and "Traceback" not in result.stderr
    assert "ExecStartPre" not in result.stdout


def test_bridge_commands_need_netjack_enabled(tmp_path):
    cfg = tmp_path / "nonet.toml"
    cfg.write_text(f'name = "archdsp-test-{os.getpid()}-nonet"\nisolated_cores = [1]\nmemory_mb = 256\n')
    r = archdsp("netjack", "start", str(cfg), env=private_run(tmp_path))
    assert r.returncode == 2 and "archibaldos.netjack.enable" in r.stderr


def test_master_ip_must_be_ours(tmp_path):
    cfg = tmp_path / "far.toml"
    cfg.write_text(f'name = "archdsp-test-{os.getpid()}-far"\nisolated_cores = [1]\nmemory_mb = 256\n'
                   "[archibaldos.netjack]\nenable = true\nmaster_ip = \"192.0.2.1\"\n")
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-far", "--server", "dummy", str(cfg),
                env=private_run(tmp_path))
    assert r.returncode == 1 and "not an address of this host" in r.stderr


def _lan_address() -> str | None:
    """An IPv4 address of this host on the interface of its default route, if it has one."""
    from archdsp_libvirt.host.files import Host

    host = Host()
    out = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    for link in json.loads(out or "[]"):
        if link.get("ifname") in host.default_route_interfaces():
            for a in link.get("addr_info", []):
                if host.lan_exposure(a["local"]):
                    return a["local"]
    return None


def test_a_master_the_lan_reaches_is_refused_unless_allowed(tmp_path):
    from archdsp_libvirt.audio.link import check_master_address

    ip = _lan_address()
    if ip is None:
        pytest.skip("this host has no IPv4 address on a default-route interface to try")
    cfg = tmp_path / "lan.toml"
    cfg.write_text(f"name = \"archdsp-test-lan\"\nisolated_cores = [1]\nmemory_mb = 256\n"
                   f"[archibaldos.netjack]\nenable = true\nmaster_ip = \"{ip}\"\n")
    env = private_run(tmp_path)
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-lan", "--server", "dummy", str(cfg), env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"archibaldos.netjack.master_ip: {ip} is on " in r.stderr and "allow_lan = true" in r.stderr
    assert "Traceback" not in r.stderr and "started jackd" not in r.stdout
    assert not json.loads(archdsp("netjack", "status", "--json", str(cfg), env=env).stdout).get("running")
    # allow_lan turns the refusal into the words a start prints (no socket is opened beyond a bind test)
    from archdsp_libvirt.host.files import Host
    from archdsp_libvirt.host.model import HostModel

    model = HostModel(source="local", files=Host())
    assert "which carries the default route" in check_master_address(ip, True, model)
    with pytest.raises(BridgeError):
        check_master_address(ip, False, model)


@pytest.fixture
def loopback(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("writes the bridge state under /run: needs root")
    if not shutil.which("jackd"):
        pytest.skip("jackd is not installed (apt-get install jackd2)")
    port = free_udp_port(20000, 20900)
    for key, value in private_run(tmp_path).items():  # every archdsp() of the test: the private state folder
        monkeypatch.setenv(key, value)
    cfg = tmp_path / "lb.toml"
    cfg.write_text(f"""
name = "archdsp-test-lb"
isolated_cores = [1]
memory_mb = 256
[boot]
kernel = "/k"
[archibaldos.netjack]
enable = true
source_port = {port}
master_ip = "127.0.0.1"
client_name = "lbslave"
network_latency = 0
""")
    slaves: list[Owned] = []

    def start_slave(name="lbslave", server=None):
        env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1", "JACK_NO_START_SERVER": "1"}
        proc = spawn_detached(["jackd", "-n", server or f"archdsp-test-{name}", "-d", "net", "-a", "127.0.0.1", "-p", str(port),
                               "-n", name, "-l", "0", "-C", "2", "-P", "2", "-i", "0", "-o", "0"],
                              tmp_path / f"{server or name}.log", env=env)
        slaves.append(proc)
        return proc

    yield cfg, start_slave
    for s in slaves:
        s.stop()
    archdsp("netjack", "stop", str(cfg))


def status(cfg):
    return json.loads(archdsp("netjack", "status", "--json", str(cfg)).stdout)


def linked(loopback):
    """The bridge on its own jackd, and the slave joined."""
    cfg, start_slave = loopback
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-lb", "--server", "dummy", str(cfg))
    assert r.returncode == 0, r.stderr
    start_slave()
    assert archdsp("netjack", "start", "--wait", "30", str(cfg)).returncode == 0
    return cfg, start_slave


@pytest.mark.real
@pytest.mark.jack
def test_guest_side_missing_is_reported_within_the_timeout(loopback):
    cfg, _start_slave = loopback
    t0 = time.monotonic()
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-lb", "--server", "dummy", "--wait", "3", str(cfg))
    assert r.returncode == 1
    assert "the guest side of the link is missing: no NETJACK slave 'lbslave' joined 127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30
    st = status(cfg)
    assert st["running"] and st["link"] == "down"


@pytest.mark.real
@pytest.mark.jack
def test_link_aliases_and_recovery_after_the_host_server_dies(loopback):
    cfg, _start_slave = linked(loopback)
    st = status(cfg)
    assert st["link"] == "up" and st["slave"] == "lbslave"
    assert st["ports"]["netjack:capture_1"] == "lbslave:to_slave_1"
    assert st["ports"]["netjack:playback_2"] == "lbslave:from_slave_2"
    # Users connect by the stable names.
    env = {**os.environ, "JACK_NO_START_SERVER": "1"}
    c = subprocess.run(["jack_connect", "-s", "archdsp-test-lb", "system:capture_1", "netjack:capture_1"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert c.returncode == 0, c.stderr

    # The host JACK server dies: status says so, restart recovers the link.
    state = state_of(cfg)
    Owned(**state["server_process"]).stop()
    deadline = time.monotonic() + 20
    while status(cfg)["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    st = status(cfg)
    assert not st["running"] and "went away" in st["problem"]
    r = archdsp("netjack", "restart", "--wait", "60", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert status(cfg)["link"] == "up"


@pytest.mark.real
@pytest.mark.jack
def test_a_second_guest_joining_under_the_slave_name_gets_no_host_audio(loopback):
    cfg, start_slave = linked(loopback)
    start_slave("lbslave-99")  # what the highest-number rule once handed the aliases to
    deadline = time.monotonic() + 30
    while "lbslave-99" not in status(cfg).get("ignored", []) and time.monotonic() < deadline:
        time.sleep(0.5)
    st = status(cfg)
    assert st["ignored"] == ["lbslave-99"], st
    assert st["link"] == "up" and st["slave"] == "lbslave"
    assert st["ports"]["netjack:capture_1"] == "lbslave:to_slave_1"
    assert "'lbslave-99' ignored: the link follows 'lbslave'" in st["problem"]
    env = {**os.environ, "JACK_NO_START_SERVER": "1"}
    lsp = subprocess.run(["jack_lsp", "-s", "archdsp-test-lb", "-A"], capture_output=True, text=True, timeout=30,
                         env=env).stdout
    aliases: dict[str, list[str]] = {}
    port = ""
    for line in lsp.splitlines():
        if line[:1].isspace():
            aliases[port].append(line.strip())
        else:
            port = line
            aliases[port] = []
    second = {p: a for p, a in aliases.items() if p.startswith("lbslave-99:")}
    assert second, lsp  # the second slave did join the master ...
    assert not any(a for a in second.values()), second  # ... and carries no alias
    assert aliases["lbslave:to_slave_1"] == ["netjack:capture_1"]


@pytest.mark.real
@pytest.mark.jack
def test_a_restarting_vm_marks_the_slave_the_server_holds_stale_even_before_the_supervisor_saw_it(loopback,
                                                                                                 monkeypatch):
    """``up --restart`` marks the old slave stale before the VM starts again. The supervisor's report is up
    to a second old: a slave that joined since (it rejoined after a lost link) must be marked all the same,
    or the aliases stay on its dead ports while the VM's new slave joins as NAME-01."""
    from archdsp_libvirt.audio import link
    from archdsp_libvirt.audio.jack2.bridge import forget_slave

    cfg, start_slave = loopback
    monkeypatch.setattr(link, "RUN_DIR", Path(os.environ["ARCHDSP_RUN_DIR"]))  # this process reads the test's folder
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-lb", "--server", "dummy", str(cfg))
    assert r.returncode == 0, r.stderr
    sup = Owned(**state_of(cfg)["supervisor"])
    env = {**os.environ, "JACK_NO_START_SERVER": "1"}
    os.kill(sup.pid, signal.SIGSTOP)  # its report now lags behind the server
    try:
        old = start_slave()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            lsp = subprocess.run(["jack_lsp", "-s", "archdsp-test-lb"], capture_output=True, text=True, timeout=30,
                                 env=env).stdout
            if "lbslave:to_slave_1" in lsp.splitlines():
                break
            time.sleep(0.3)
        assert "lbslave:to_slave_1" in lsp.splitlines(), lsp
        said: list[str] = []
        assert forget_slave("archdsp-test-lb", say=said.append) == ["lbslave"]
        assert said == ["bridge: the old NETJACK slave lbslave is stale; the VM's new slave takes the aliases"]
    finally:
        os.kill(sup.pid, signal.SIGCONT)
    os.kill(old.pid, signal.SIGKILL)  # the VM is destroyed: its slave says no goodbye, JACK keeps its ports a while
    start_slave(server="archdsp-test-lbslave-new")  # the VM's new slave: lbslave-01 while the old ports are there
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and status(cfg).get("link") != "up":
        time.sleep(0.5)
    st = status(cfg)
    assert st["link"] == "up", st
    assert st["ports"]["netjack:capture_1"] == f"{st['slave']}:to_slave_1", st


@pytest.mark.real
@pytest.mark.jack
def test_concurrent_starts_make_one_bridge_and_a_dead_supervisor_takes_its_hooked_jackd_along(loopback):
    cfg, _start_slave = loopback
    args = [sys.executable, "-m", "archdsp_libvirt", "netjack", "start", "--jack-server", "archdsp-test-lb",
            "--server", "dummy", str(cfg)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    said = "".join(o for o, _e in outs)
    assert said.count("bridge supervisor pid") == 1 and "already running" in said, said
    state = state_of(cfg)
    sup, srv = Owned(**state["supervisor"]), Owned(**state["server_process"])
    assert sup.alive() and srv.alive() and state["hooked"]

    # The supervisor dies: it answered the bind hook of the jackd the bridge started, so that jackd can bind
    # nothing any more (a master could not be loaded into it again). The next start stops it, by PID, and
    # starts another: one jackd, on the record, nothing left behind.
    sup.stop()
    again = archdsp("netjack", "start", "--jack-server", "archdsp-test-lb", "--server", "dummy", str(cfg))
    assert again.returncode == 0, again.stderr
    assert f"(pid {srv.pid}) it started ran under its bind hook: stopped" in again.stdout
    assert not srv.alive()
    now = Owned(**state_of(cfg)["server_process"])
    assert now.pid != srv.pid and now.alive()
    assert status(cfg)["listening"] == f"127.0.0.1:{state['port']}/udp"
    assert archdsp("netjack", "stop", str(cfg)).returncode == 0
    assert not now.alive()  # stop stopped it


def _kernel_listeners(port: int) -> list[str]:
    """Every unconnected UDP socket on ``port``, as ``ss`` prints the kernel's table (not our parser)."""
    out = subprocess.run(["ss", "-Hulnp", f"sport = :{port}"], capture_output=True, text=True, timeout=30).stdout
    return sorted(line.split()[3] for line in out.splitlines() if line.strip())


@pytest.mark.real
@pytest.mark.jack
def test_the_bridges_own_jackd_listens_on_master_ip_alone(loopback):
    """JACK2's netmanager binds every address whatever -a says; the bind hook lands it on master_ip."""
    cfg, _start_slave = linked(loopback)
    port = state_of(cfg)["port"]
    assert _kernel_listeners(port) == [f"127.0.0.1:{port}"]  # was 0.0.0.0:PORT
    st = status(cfg)
    assert st["listening"] == f"127.0.0.1:{port}/udp" and "problem" not in st, st
    assert st["link"] == "up"  # the slave joins the rebound port
    log = Path(st["log"]).read_text(errors="replace")
    assert f"bind 0.0.0.0:{port}: rebound to 127.0.0.1:{port}" in log


@pytest.fixture
def own_jackd(loopback, tmp_path):
    """A JACK server the bridge did not start (the user's own), at the config's rate and period."""
    cfg, start_slave = loopback
    env = {**os.environ, "JACK_NO_AUDIO_RESERVATION": "1", "JACK_NO_START_SERVER": "1"}
    proc = spawn_detached(["jackd", "-n", "archdsp-test-own", "-d", "dummy", "-r", "96000", "-p", "128"],
                          tmp_path / "own.log", env=env)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        r = subprocess.run(["jack_lsp", "-s", "archdsp-test-own"], capture_output=True, text=True, timeout=10,
                           env=env)
        if r.returncode == 0:
            break
        time.sleep(0.3)
    yield cfg, start_slave
    archdsp("netjack", "stop", str(cfg))
    proc.stop()


@pytest.mark.real
@pytest.mark.jack
def test_a_jack_server_the_bridge_did_not_start_is_refused_while_its_master_is_on_every_address(own_jackd):
    cfg, _start_slave = own_jackd
    port = tomllib.loads(cfg.read_text())["archibaldos"]["netjack"]["source_port"]
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-own", str(cfg))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"listens on 0.0.0.0:{port}/udp (every address, the kernel's table)" in r.stderr, r.stderr
    assert "--jack-server NAME --server dummy" in r.stderr and "--allow-any-address" in r.stderr
    assert _kernel_listeners(port) == []  # the master was unloaded again
    assert not status(cfg)["running"]  # and no bridge is left


@pytest.mark.real
@pytest.mark.jack
def test_allow_any_address_keeps_a_joined_servers_master_behind_an_nftables_table(own_jackd):
    if not shutil.which("nft"):
        pytest.skip("nft is not installed (apt-get install nftables)")
    cfg, start_slave = own_jackd
    port = tomllib.loads(cfg.read_text())["archibaldos"]["netjack"]["source_port"]
    r = archdsp("netjack", "start", "--jack-server", "archdsp-test-own", "--allow-any-address", str(cfg))
    assert r.returncode == 0, r.stderr
    table = "archdsp_netjack_archdsp_test_lb"
    assert f"nftables table inet {table}: port {port}/udp only on lo to 127.0.0.1" in r.stdout
    rules = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True, timeout=15)
    assert rules.returncode == 0 and f"udp dport {port} iifname != \"lo\" drop" in rules.stdout
    st = status(cfg)
    assert st["listening"] == f"0.0.0.0:{port}/udp" and st["guard"].startswith(f"nftables table inet {table}")
    assert "problem" not in st, st
    start_slave()
    assert archdsp("netjack", "start", "--wait", "30", str(cfg)).returncode == 0  # the link still comes up
    assert archdsp("netjack", "stop", str(cfg)).returncode == 0
    gone = subprocess.run(["nft", "list", "table", "inet", table], capture_output=True, text=True, timeout=15)
    assert gone.returncode != 0  # stop removed the table
    assert _kernel_listeners(port) == []  # and unloaded the master from the user's server


def test_the_bridge_log_is_rotated_when_it_grows(tmp_path):
    from archdsp_libvirt.audio.link import bound_log

    log = tmp_path / "netjack-x.log"
    log.write_bytes(b"x" * 100)
    assert not bound_log(log, max_bytes=1000)
    assert log.exists() and not (tmp_path / "netjack-x.log.1").exists()  # small: kept
    log.write_bytes(b"y" * 2000)
    (tmp_path / "netjack-x.log.1").write_bytes(b"old")
    assert bound_log(log, max_bytes=1000)
    assert log.read_bytes() == b"" and (tmp_path / "netjack-x.log.1").read_bytes() == b"y" * 2000
    assert not bound_log(tmp_path / "missing.log")  # nothing to rotate is fine


def test_the_supervisor_survives_a_status_file_it_cannot_write(tmp_path, capsys):
    from archdsp_libvirt.audio.jack2.supervisor import _report

    (tmp_path / "a-file").write_text("")
    from archdsp_libvirt.audio.jack2.state import JackSeen

    _report(tmp_path / "a-file" / "status.json", JackSeen(link="up"))  # an OSError, as ENOSPC would be
    assert "bridge supervisor: cannot write" in capsys.readouterr().err
