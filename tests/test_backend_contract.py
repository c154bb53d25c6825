"""The bridge backends' one contract (audio/backend.py), run over every backend in the registry.

Fast: state folders under tmp_path, this test process standing in for the supervisor, no audio server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import msgspec
import pytest

from archdsp_libvirt import parse_config
from archdsp_libvirt.audio import link, servers
from archdsp_libvirt.audio.backend import StartOptions, render_unit, wait_for_link
from archdsp_libvirt.audio.budget import Budget
from archdsp_libvirt.audio.latency import format_budget
from archdsp_libvirt.errors import BridgeError, UsageError
from archdsp_libvirt.procs import Owned

BACKENDS = sorted(servers.BACKENDS)
ME = os.getpid()


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(link, "RUN_DIR", tmp_path)
    return tmp_path


def _cfg(name="contract"):
    return parse_config({"name": name, "isolated_cores": [1], "memory_mb": 256,
                         "archibaldos": {"netjack": {"enable": True, "master_ip": "127.0.0.1", "source_port": 19011}}})


def _state(name: str, domain="contract", port=19011, **extra) -> dict:
    """A state file as the backend's start writes it, with this process as the supervisor."""
    base = {"domain": domain, "audio_server": name, "server": "srv", "supervisor": Owned.of(ME),
            "master_ip": "127.0.0.1", "port": port, "slave": "dsp", "channels": 2, "started": time.time()}
    if name == "pipewire":
        base["pipewire"] = {"remote": "/run/user/1000/pipewire-0", "user": "alice", "how": "test", "version": "1.4.2"}
    return msgspec.to_builtins({**base, **extra})


def _write(run_dir, domain, state: dict | None = None, seen: dict | None = None) -> None:
    state_file, status_file, _log = link.state_paths(domain)
    if state is not None:
        state_file.write_bytes(msgspec.json.encode(state))
    if seen is not None:
        status_file.write_bytes(msgspec.json.encode(seen))


@pytest.mark.parametrize("name", BACKENDS)
def test_the_registry_follows_the_state_file(run_dir, name):
    backend = servers.get(name)
    assert backend.name == name and backend.label
    assert servers.of_domain("contract") is servers.DEFAULT  # nothing runs
    _write(run_dir, "contract", _state(name))
    assert servers.of_domain("contract") is backend
    assert isinstance(backend.read_state("contract"), msgspec.Struct)


def test_a_state_file_from_before_the_backends_were_named_is_the_default_one(run_dir):
    state = _state(servers.DEFAULT.name)
    del state["audio_server"]
    _write(run_dir, "contract", state)
    assert servers.of_domain("contract") is servers.DEFAULT
    assert servers.DEFAULT.read_state("contract").server == "srv"


def test_an_unknown_backend_is_one_line():
    with pytest.raises(BridgeError, match=r"--audio-server pulse: choose auto, "):
        servers.get("pulse")


BAD = [
    ("not JSON", b"{not json"),
    ("empty", b""),
    ("a list", b"[]"),
    ("a port that is text", None),
    ("no server", None),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("what,data", BAD, ids=[b[0] for b in BAD])
def test_a_malformed_state_file_is_one_line_naming_it(run_dir, name, what, data):
    state_file = link.state_paths("contract")[0]
    if data is None:
        state = _state(name)
        if what == "no server":
            del state["server"]
        else:
            state["port"] = "19011"
        data = msgspec.json.encode(state)
    state_file.write_bytes(data)
    for call in (lambda: servers.status("contract"), lambda: servers.stop("contract", say=lambda _m: None),
                 lambda: servers.get(name).status("contract")):
        with pytest.raises(BridgeError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"{state_file}: not a bridge ") and "\n" not in msg and "KeyError" not in msg
        assert "remove the file" in msg


@pytest.mark.parametrize("name", BACKENDS)
def test_a_malformed_status_file_is_one_line_naming_it(run_dir, name):
    _write(run_dir, "contract", _state(name), {"link": 1})
    with pytest.raises(BridgeError) as err:
        servers.status("contract")
    assert str(err.value).startswith(f"{link.state_paths('contract')[1]}: not a bridge status")
    assert "supervisor writes it again" in str(err.value)


@pytest.mark.parametrize("name", BACKENDS)
def test_status_and_its_screen(run_dir, name):
    _write(run_dir, "contract", _state(name), {"link": "up", "slave": "dsp", "updated": time.time(),
                                                "ports": {"netjack:capture_1": "dsp:to_slave_1"}})
    info = servers.status("contract")
    assert info["running"] is True and info["link"] == "up" and info["audio_server"] == name
    assert info["master"] == "127.0.0.1:19011/udp" and "listening" in info
    lines = servers.format_status(info)
    assert lines[0] == "=== NETJACK Bridge ===" and any("link: up (slave 'dsp')" in ln for ln in lines)
    assert not any("problem" in ln for ln in lines)


@pytest.mark.parametrize("name", BACKENDS)
def test_listening_is_what_the_kernel_says(run_dir, name):
    """The master's address as /proc shows the socket bound, never the one asked for (here 127.0.0.1 was
    asked, and the socket is on another address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.2", 0))
        port = s.getsockname()[1]
        if name == "pipewire":  # the supervisor reads the manager's sockets from /proc and writes them down
            from archdsp_libvirt.audio import sockets

            _write(run_dir, "contract", _state(name, port=port),
                   {"listening": sockets.listening(ME, port), "updated": time.time()})
        else:  # a jackd the bridge started: its sockets, by PID
            _write(run_dir, "contract", _state(name, port=port, server_process=Owned.of(ME)))
        backend = servers.get(name)
        assert backend.listening(backend.read_state("contract")) == [f"127.0.0.2:{port}"]
        assert servers.status("contract")["listening"].startswith(f"127.0.0.2:{port}/udp")


def test_listening_of_a_server_the_bridge_joined_reads_the_kernels_table(run_dir):
    from archdsp_libvirt.audio import sockets

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        port = s.getsockname()[1]
        assert f"0.0.0.0:{port}" in sockets.bound(port)


@pytest.mark.parametrize("name", BACKENDS)
def test_one_wait_for_the_link(run_dir, name):
    backend = servers.get(name)
    _write(run_dir, "contract", _state(name), {"link": "down", "updated": time.time()})
    t0 = time.monotonic()
    with pytest.raises(BridgeError) as err:
        wait_for_link(backend, "contract", 0.5)
    assert 0.4 < time.monotonic() - t0 < 5
    assert str(err.value).startswith("the guest side of the link is missing: no NETJACK slave ")
    assert "127.0.0.1:19011 within 0.5 s" in str(err.value)
    _write(run_dir, "contract", seen={"link": "up", "slave": "dsp", "updated": time.time()})
    assert servers.wait_for_link("contract", 0.5)["link"] == "up"
    _write(run_dir, "contract", _state(name, supervisor={"pid": ME, "start": 1}))  # not ours: not running
    t0 = time.monotonic()
    with pytest.raises(BridgeError, match="the bridge for contract is not running"):
        wait_for_link(backend, "contract", 30)
    assert time.monotonic() - t0 < 5  # at once


@pytest.mark.parametrize("name", BACKENDS)
def test_restart_keeps_the_last_start_s_options(name):
    backend = servers.get(name)
    raw = _state(name, server_kind="dummy", nperiods=3, allow_any_address=True)
    state = msgspec.json.decode(msgspec.json.encode(raw), type=_state_type(name))
    again = backend.restart_options(state, {})
    assert isinstance(again, StartOptions)
    if name == "pipewire":
        assert again.remote == "/run/user/1000/pipewire-0" and again.allow_any_address
        assert backend.restart_options(state, {"pipewire_user": "bob"}).remote is None  # another user: found again
    else:
        assert (again.server, again.start_server, again.nperiods) == ("srv", "dummy", 3)
        assert backend.restart_options(state, {"server": "other"}).server == "other"
    assert backend.restart_options(None, {}) == StartOptions()


def _state_type(name):
    from archdsp_libvirt.audio.jack2.state import JackState
    from archdsp_libvirt.audio.pipewire.state import PipeWireState

    return {"jack": JackState, "pipewire": PipeWireState}[name]


@pytest.mark.parametrize("name", BACKENDS)
def test_the_budget_is_the_backend_s(name):
    b = servers.get(name).budget(_cfg(), "dummy", 2, 1.0)
    assert isinstance(b, Budget) and b.audio_server == name and b.predicted_frames > 0
    assert "predicted round trip" in format_budget(b)


# --- the unit ----------------------------------------------------------------------------------------

def _options(name):
    import pwd

    return StartOptions(user=pwd.getpwuid(os.getuid()).pw_name, server="jack %i", start_server="dummy")


def _unit(name, cfg_path, exe=None):
    cfg = _cfg()
    return render_unit(cfg, cfg_path, servers.get(name).unit(cfg, _options(name)), exe=exe)


def _words(line: str) -> list[str]:
    """An Exec line's words as systemd reads them (systemd.syntax(7): quotes, \\-escapes, %% and $$)."""
    out, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        word = ""
        if line[i] == '"':
            i += 1
            while line[i] != '"':
                if line[i] == "\\":
                    i += 1
                word += line[i]
                i += 1
            i += 1
        else:
            while i < len(line) and line[i] != " ":
                word += line[i]
                i += 1
        out.append(word.replace("%%", "%").replace("$$", "$"))
    return out


@pytest.mark.parametrize("name", BACKENDS)
def test_every_unit_quotes_its_words_as_systemd_reads_them(tmp_path, name):
    odd = tmp_path / 'my dsp %n $HOME "q" back\\slash'
    odd.mkdir()
    cfg_path = odd / "dsp.toml"
    unit = _unit(name, cfg_path, exe=str(odd / "archdsp-virt"))
    assert "KillMode=none" not in unit and "KillMode=process" in unit
    execs = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("Exec")}
    assert set(execs) == {"ExecStart", "ExecStop", "ExecReload"}
    for key, verb in (("ExecStart", "start"), ("ExecStop", "stop"), ("ExecReload", "restart")):
        words = _words(execs[key])
        assert words[0] == str(odd / "archdsp-virt") and words[1:3] == ["netjack", verb]
        assert words[-1] == str(cfg_path)  # one word, nothing expanded
    if name == "jack":
        assert ["--jack-server", "jack %i"] == _words(execs["ExecStart"])[3:5]
    else:
        assert "Restart=on-failure" in unit
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed: the unit was parsed back here, not by systemd")
    unit_file = tmp_path / f"archdsp-test-{name}.service"
    unit_file.write_text(_unit(name, cfg_path, exe="/bin/true"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Unbalanced" not in r.stderr and "specifier" not in r.stderr, r.stderr


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bad", ["dsp.toml\nExecStartPre=/bin/touch /tmp/pwned", "dsp\x7f.toml", "dsp\udcff.toml"],
                         ids=["newline", "control", "not-utf8"])
def test_a_unit_refuses_a_path_it_cannot_carry(tmp_path, name, bad):
    with pytest.raises(UsageError) as err:
        _unit(name, tmp_path / bad)
    msg = str(err.value)
    assert msg.startswith("the config path ") and "\n" not in msg and "systemd unit cannot carry" in msg


def test_a_pipewire_unit_without_its_user_is_refused():
    cfg = _cfg()
    with pytest.raises(UsageError) as err:
        servers.get("pipewire").unit(cfg, StartOptions())
    assert "--pipewire-user USER is needed" in str(err.value) and "loginctl enable-linger" in str(err.value)


def test_the_unit_command_refuses_a_pipewire_unit_without_its_user(tmp_path):
    from click.testing import CliRunner

    from archdsp_libvirt.cli import cli

    conf = tmp_path / "d.toml"
    conf.write_text('name = "pwunit"\nisolated_cores = [1]\nmemory_mb = 256\n[archibaldos.netjack]\nenable = true\n'
                    'master_ip = "127.0.0.1"\n')
    r = CliRunner().invoke(cli, ["netjack", "unit", "--audio-server", "pipewire", str(conf)])
    assert r.exit_code == 2 and "--pipewire-user USER is needed" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "[Service]" not in r.stdout


# --- one host model, one master-address rule ---------------------------------------------------------

ROUTE = ("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
         "virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n")  # 192.168.122.0/24, no gateway
FIB = ("Main:\n  +-- 0.0.0.0/0 3 0 5\n     +-- 192.168.122.0/24 2 0 2\n        |-- 192.168.122.0\n"
       "           /24 link UNICAST\n        |-- 192.168.122.1\n           /32 host LOCAL\n")


def _host(tmp_path, fib=True):
    from archdsp_libvirt.host.files import Host
    from archdsp_libvirt.host.model import HostModel

    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/route").write_text(ROUTE)
    if fib:
        (tmp_path / "proc/net/fib_trie").write_text(FIB)
    return HostModel(source="local", files=Host(tmp_path))


def test_one_interface_of_for_the_check_and_the_bridges(tmp_path):
    """The routing table's answer, limited to this host's own addresses: a neighbour's address on the
    VM's network is not the master's (PipeWire's `ip addr` lookup and the check used to disagree)."""
    files = _host(tmp_path).files
    assert files.interface_of("192.168.122.1") == "virbr0"
    assert files.interface_of("192.168.122.5") is None  # on virbr0's network, but a guest's address
    assert files.interface_of("not an address") is None


def test_one_master_address_rule_for_check_and_start(tmp_path):
    from archdsp_libvirt.audio.link import check_master_address
    from archdsp_libvirt.host.checks.neighbours import check_netjack_master

    model = _host(tmp_path)
    assert check_master_address("192.168.122.1", False, model) is None
    with pytest.raises(BridgeError, match="192.168.122.5 is not an address of this host: start the VM's network"):
        check_master_address("192.168.122.5", False, model)
    cfg = parse_config({"name": "m", "isolated_cores": [1], "memory_mb": 256,
                        "archibaldos": {"netjack": {"enable": True, "master_ip": "192.168.122.5"}}})
    found = check_netjack_master(cfg, model)[0]
    assert found.status == "warn" and "on no interface of this host" in found.observed


@pytest.mark.parametrize(("running", "asked"), [("jack", "pipewire"), ("pipewire", "jack")])
def test_start_on_the_other_server_while_a_bridge_runs_is_refused_in_one_line(run_dir, running, asked):
    """It read the running bridge's state as the other backend's ("not a bridge state this version reads")."""
    from archdsp_libvirt.host.model import HostModel

    _write(run_dir, "contract", _state(running))
    with pytest.raises(BridgeError) as err:
        servers.start(_cfg(), HostModel.local(), audio_server=asked, say=lambda _m: None)
    msg = str(err.value)
    assert f"runs on {servers.get(running).label}, not {servers.get(asked).label}" in msg and "\n" not in msg
    assert f"netjack restart --audio-server {asked} CONFIG" in msg
    assert servers.of_domain("contract").name == running  # the running bridge's record is untouched
