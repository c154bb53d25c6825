"""The PipeWire side of the bridge, fast: which server, whose PipeWire, what is loaded, what it costs."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys

import pytest

from archdsp_libvirt import load_config, parse_config
from archdsp_libvirt.audio.pipewire import conf
from archdsp_libvirt.audio.pipewire import server as pw
from archdsp_libvirt.audio.latency import budget, format_budget, report
from archdsp_libvirt.errors import BridgeError


def cfg(**netjack):
    nj = {"enable": True, **netjack}
    return parse_config({"name": "pwtest", "isolated_cores": [1], "memory_mb": 256, "archibaldos": {"netjack": nj}})


ARGS = conf.manager_args("192.168.122.1", 19000, 96000, 128, 2)


# --- which server -------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, answers, jack_opts, chosen", [
    ("auto", True, False, "pipewire"),
    ("auto", False, False, "jack"),
    ("auto", True, True, "jack"),       # --jack-server / --server name a JACK server: auto means JACK
    ("pipewire", False, False, "pipewire"),
    ("jack", True, False, "jack"),
])
def test_server_choice(requested, answers, jack_opts, chosen):
    assert pw.choose_server(requested, answers, jack_opts) == chosen


def test_unknown_server_is_refused():
    with pytest.raises(BridgeError, match="auto, pipewire or jack"):
        pw.choose_server("pulse", True, False)


# --- whose PipeWire -----------------------------------------------------------------------------

def test_root_through_sudo_joins_the_invoking_users_server():
    t = pw.find_target(env={"SUDO_UID": "1000", "SUDO_USER": "alice", "XDG_RUNTIME_DIR": "/run/user/0"}, euid=0)
    assert (t.runtime_dir, t.remote, t.user, t.uid, t.how) == (
        "/run/user/1000", "/run/user/1000/pipewire-0", "alice", 1000, "sudo (SUDO_UID)")


def test_sudo_to_root_by_root_is_not_a_desktop_user():
    t = pw.find_target(env={"SUDO_UID": "0", "XDG_RUNTIME_DIR": "/nonexistent-xdg"}, euid=0)
    assert t.how == "XDG_RUNTIME_DIR" and t.runtime_dir == "/nonexistent-xdg"


def test_sudo_uid_is_ignored_when_not_root():
    t = pw.find_target(env={"SUDO_UID": "1000", "XDG_RUNTIME_DIR": "/nonexistent-xdg"}, euid=1000)
    assert t.how == "XDG_RUNTIME_DIR"


def test_xdg_then_pipewire_runtime_dir_then_nothing():
    assert pw.find_target(env={"PIPEWIRE_RUNTIME_DIR": "/srv/pw"}, euid=0).runtime_dir == "/srv/pw"
    assert pw.find_target(env={"XDG_RUNTIME_DIR": "/a", "PIPEWIRE_RUNTIME_DIR": "/b"}, euid=0).runtime_dir == "/a"
    assert pw.find_target(env={}, euid=0) is None


def test_pipewire_remote_names_the_socket():
    t = pw.find_target(env={"XDG_RUNTIME_DIR": "/a", "PIPEWIRE_REMOTE": "pipewire-1"}, euid=0)
    assert t.remote == "/a/pipewire-1"
    t = pw.find_target(env={"PIPEWIRE_REMOTE": "/tmp/x/pipewire-0"}, euid=0)
    assert (t.runtime_dir, t.how) == ("/tmp/x", "PIPEWIRE_REMOTE")


def test_pipewire_user_option_wins_and_unknown_user_is_one_line():
    root = pwd.getpwuid(0).pw_name
    t = pw.find_target(root, env={"SUDO_UID": "1000", "XDG_RUNTIME_DIR": "/x"}, euid=0)
    assert (t.runtime_dir, t.how) == ("/run/user/0", "--pipewire-user")
    with pytest.raises(BridgeError, match="no-such-user-xyz: no such user"):
        pw.find_target("no-such-user-xyz", env={}, euid=0)


def test_env_points_every_tool_at_that_server_only():
    t = pw.Target("/run/user/1000", "pipewire-0", "alice", 1000, "sudo")
    env = pw.pw_env(t, base={"PIPEWIRE_REMOTE": "elsewhere", "PATH": "/bin"})
    assert env["PIPEWIRE_REMOTE"] == "/run/user/1000/pipewire-0"
    assert env["PIPEWIRE_RUNTIME_DIR"] == env["XDG_RUNTIME_DIR"] == "/run/user/1000"
    assert "jack.short-name = true" in env["PIPEWIRE_PROPS"] and env["PATH"] == "/bin"


# --- what is loaded -----------------------------------------------------------------------------

def test_manager_args_carry_the_link_and_force_the_graph():
    assert ARGS["net.ip"] == "192.168.122.1" and ARGS["net.port"] == 19000
    assert ARGS["netjack2.sample-rate"] == 96000 and ARGS["netjack2.period-size"] == 128  # module defaults: 48000/1024
    for props, name in ((ARGS["sink.props"], "netjack-capture"), (ARGS["source.props"], "netjack-playback")):
        assert props["node.name"] == props["node.nick"] == name
        assert props["node.force-rate"] == 96000 and props["node.force-quantum"] == 128
        assert props["midi.ports"] == 0 and props["audio.position"] == ["AUX0", "AUX1"]


def test_client_conf_hosts_the_manager_and_nothing_else():
    text = conf.client_conf(ARGS)
    assert text.count("libpipewire-module-netjack2-manager") == 1
    assert 'net.ip = "192.168.122.1"' in text and "net.port = 19000" in text
    assert "netjack2.period-size = 128" in text and 'audio.position = [ "AUX0" "AUX1" ]' in text
    assert "module-protocol-native" in text and "module-client-node" in text
    assert "225.3.19.154" not in text  # never the multicast default


@pytest.mark.skipif(not os.path.exists("/usr/bin/pipewire"), reason="PipeWire is not installed here")
def test_client_conf_is_valid_spa_json(tmp_path):
    """PipeWire's own parser reads the file (pw-config resolves it without a server)."""
    path = tmp_path / "nj.conf"
    path.write_text(conf.client_conf(ARGS))
    r = subprocess.run(["pw-config", "-n", str(path), "list", "context.modules"], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 0, r.stderr
    assert "netjack2-manager" in r.stdout and "19000" in r.stdout


def test_dropin_says_what_it_cannot_promise():
    text = conf.dropin("archdsp-demo", ARGS, latency=1)
    assert text.startswith("# NETJACK2 master for the DSP VM archdsp-demo")
    assert "listens on 0.0.0.0:19000/udp" in text and "jackd -d net -l 1" in text
    assert text.count("libpipewire-module-netjack2-manager") == 1 and "context.modules = [" in text
    assert conf.dropin_name("archdsp-demo") == "60-archdsp-netjack-archdsp-demo.conf"


def test_nixos_form_is_the_same_module_and_opens_the_port_on_the_bridge_only():
    text = conf.nixos("archdsp-demo", ARGS, latency=0, ifname="virbr0")
    assert 'services.pipewire.extraConfig.pipewire."60-archdsp-netjack-archdsp-demo"' in text
    assert '"name" = "libpipewire-module-netjack2-manager";' in text
    assert '"net.ip" = "192.168.122.1";' in text and '"netjack2.sample-rate" = 96000;' in text
    assert 'networking.firewall.interfaces."virbr0".allowedUDPPorts = [ 19000 ];' in text
    assert text.count("{") == text.count("}") and text.count("[") == text.count("]")


def test_nixos_form_parses(tmp_path):
    nix = subprocess.run(["which", "nix-instantiate"], capture_output=True).returncode == 0
    if not nix:
        pytest.skip("nix-instantiate is not installed here: the NixOS text is checked for balance only")
    f = tmp_path / "x.nix"
    f.write_text(conf.nixos("d", ARGS, 0))
    assert subprocess.run(["nix-instantiate", "--parse", str(f)], capture_output=True).returncode == 0


def test_the_systemd_unit_binds_master_ip_where_the_kernel_can(tmp_path):
    from archdsp_libvirt.audio.pipewire import sockhook

    conf = tmp_path / "d.toml"
    conf.write_text('name = "pwunit"\nisolated_cores = [1]\nmemory_mb = 256\n[archibaldos]\nenable = true\n'
                    '[archibaldos.netjack]\nenable = true\nmaster_ip = "127.0.0.1"\nsource_port = 19008\n')
    from archdsp_libvirt.audio.backend import StartOptions, render_unit
    from archdsp_libvirt.audio.pipewire.backend import unit as pw_unit

    me = pwd.getpwuid(os.getuid()).pw_name
    r = subprocess.run([sys.executable, "-m", "archdsp_libvirt", "netjack", "unit", "--audio-server", "pipewire",
                        "--pipewire-user", me, str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    start = next(ln for ln in r.stdout.splitlines() if ln.startswith("ExecStart="))
    assert 'netjack start --audio-server "pipewire"' in start and f'--pipewire-user "{me}"' in start
    assert str(conf) in start
    assert ("--allow-any-address" in start) is (sockhook.available() is not None)
    # On a kernel without the hook the unit starts the manager behind the nftables rule, and says why.
    cfg = load_config(conf)
    unit = render_unit(cfg, conf, pw_unit(cfg, StartOptions(user=me), hook_missing="Linux 5.4 has none"))
    assert "--allow-any-address" in unit and unit.startswith("# This kernel cannot bind the manager to 127.0.0.1 "
                                                             "(Linux 5.4 has none)")


def test_dropin_cli_refuses_without_the_flag_and_prints_both_forms(tmp_path):
    conf = tmp_path / "d.toml"
    conf.write_text('name = "pwcli"\nisolated_cores = [1]\nmemory_mb = 256\n[archibaldos]\nenable = true\n'
                    '[archibaldos.netjack]\nenable = true\nmaster_ip = "127.0.0.1"\nsource_port = 19007\n')
    run = lambda *a: subprocess.run([sys.executable, "-m", "archdsp_libvirt", "netjack", "dropin", *a, str(conf)],
                                    capture_output=True, text=True, timeout=60)
    r = run()
    assert r.returncode == 1 and "listens on 0.0.0.0:19007/udp" in r.stderr and "Traceback" not in r.stderr
    r = run("--allow-any-address")
    assert r.returncode == 0 and 'net.ip = "127.0.0.1"' in r.stdout and "pipewire.conf.d/60-archdsp-netjack-pwcli.conf" in r.stderr
    r = run("--allow-any-address", "--nixos")
    assert r.returncode == 0 and "services.pipewire.extraConfig.pipewire" in r.stdout


# --- the graph as pw-dump shows it --------------------------------------------------------------

def _dump(pid, n_pairs, slave="dsp"):
    objs = [{"id": 50, "type": "PipeWire:Interface:Client", "info": {"props": {"application.process.id": pid}}},
            {"id": 51, "type": "PipeWire:Interface:Client", "info": {"props": {"application.process.id": 1}}},
            {"id": 99, "type": "PipeWire:Interface:Node",  # someone else's node of the same name
             "info": {"state": "running", "props": {"node.name": "netjack-capture", "client.id": 51}}}]
    for i in range(n_pairs):
        for name, way in (("netjack-capture", "to"), ("netjack-playback", "from")):
            objs.append({"id": 100 + 2 * i + (way == "from"), "type": "PipeWire:Interface:Node",
                         "info": {"state": "running", "props": {
                             "node.name": name, "client.id": 50,
                             "node.description": f"{slave} NETJACK2 {way} host"}}})
    return objs


def test_only_our_managers_nodes_count():
    nodes = pw.netjack_nodes(_dump(4242, 1), 4242)
    assert {n["name"] for n in nodes} == {"netjack-capture", "netjack-playback"} and pw.pairs(nodes) == 1
    assert {n["slave"] for n in nodes} == {"dsp"}
    assert pw.pairs(pw.netjack_nodes(_dump(4242, 3), 4242)) == 3
    assert pw.netjack_nodes(_dump(4242, 2), 777) == []


def test_only_the_vms_own_slave_makes_the_link_up():
    from archdsp_libvirt.audio.pipewire.supervisor import link_state

    own = pw.netjack_nodes(_dump(4242, 1, "dsp"), 4242)
    other = pw.netjack_nodes(_dump(4242, 1, "dsp-99"), 4242)
    assert link_state(own, "dsp") == ("up", "dsp", [])
    assert link_state(other, "dsp") == ("down", None, ["dsp-99"])  # a second guest alone is not the VM
    both = own + [{**n, "id": n["id"] + 10} for n in other]
    assert link_state(both, "dsp") == ("down", "dsp", ["dsp-99"])  # two pairs: down until the manager is alone
    assert link_state([], "dsp") == ("down", None, [])


def test_logical_port_names():
    ports = pw.logical_ports(["netjack-capture:send_AUX0", "netjack-capture:send_AUX1",
                              "netjack-playback:receive_AUX0", "netjack-playback:receive_AUX1",
                              "system:playback_1", "netjack-capture:receive_AUX0"])
    assert ports == {"netjack:capture_1": "netjack-capture:send_AUX0", "netjack:capture_2": "netjack-capture:send_AUX1",
                     "netjack:playback_1": "netjack-playback:receive_AUX0",
                     "netjack:playback_2": "netjack-playback:receive_AUX1"}


# --- the address promise ------------------------------------------------------------------------

def test_without_the_bind_hook_start_is_refused_by_default_in_one_line():
    why = "Linux 5.4 has no seccomp user notification with pidfd_getfd (5.6 or later)"
    with pytest.raises(BridgeError) as exc:
        pw.address_guard("d", "192.168.122.1", "virbr0", 19000, allow_any=False, hook_missing=why)
    msg = str(exc.value)
    assert "\n" not in msg and "0.0.0.0:19000/udp" in msg and "--allow-any-address" in msg and "--audio-server jack" in msg
    assert why in msg


def test_with_the_bind_hook_no_firewall_is_needed():
    # The hook binds the port to master_ip: no nftables table, with or without --allow-any-address.
    assert pw.address_guard("d", "192.168.122.1", "virbr0", 19000, allow_any=False, hook_missing=None) is None
    assert pw.address_guard("d", "192.168.122.1", "virbr0", 19000, allow_any=True, hook_missing=None) is None


def test_nft_rules_keep_the_port_to_the_bridge_and_master_ip():
    rules = pw.nft_rules("archdsp-demo", "virbr0", "192.168.122.1", 19000)
    assert "table inet archdsp_netjack_archdsp_demo" in rules
    assert 'udp dport 19000 iifname != "virbr0" drop' in rules
    assert "udp dport 19000 ip daddr != 192.168.122.1 drop" in rules and "meta nfproto ipv6 drop" in rules


# --- latency --------------------------------------------------------------------------------------

def test_pipewire_budget_is_the_measured_range_next_to_jack2s():
    b = budget(cfg(network_latency=0, dsp_client=False), audio_server="pipewire")
    assert (b.predicted_frames, b.predicted_max_frames, b.audio_server) == (128, 768, "pipewire")
    # L enters twice: the cycles the manager leaves queued, and JACK2's own L (measured: README, PipeWire)
    one = budget(cfg(network_latency=1, dsp_client=False), audio_server="pipewire")
    assert (one.predicted_frames, one.predicted_max_frames) == (256, 1024)
    two = budget(cfg(network_latency=2, dsp_client=False), audio_server="pipewire")
    assert (two.predicted_frames, two.predicted_max_frames) == (384, 1280)
    with_client = budget(cfg(network_latency=0), audio_server="pipewire")
    assert (with_client.predicted_frames, with_client.predicted_max_frames) == (256, 896)
    text = format_budget(with_client)
    assert "256..896 frames = 2.667..9.333 ms (PipeWire)" in text and "varies from one join" in text
    assert "L=2 7..8" in text
    # the floor is JACK2's figure for the same link
    for lat in (0, 1, 2):
        assert budget(cfg(network_latency=lat, dsp_client=False), audio_server="pipewire").predicted_frames == \
            budget(cfg(network_latency=lat, dsp_client=False)).predicted_frames
    jack = budget(cfg(network_latency=0))
    assert jack.predicted_max_frames is None and jack.predicted_frames == 256


@pytest.mark.parametrize("measured, within", [(128, True), (256, True), (768, True), (769, True), (896, False),
                                               (5888, False)])
def test_pipewire_measurement_is_judged_against_the_range(measured, within):
    c = cfg(network_latency=0, dsp_client=False)
    b = budget(c, audio_server="pipewire")
    assert report(c, b, {"measured_frames": measured, "readings": [measured], "xruns": 0, "seconds": 4})[
        "matches_prediction"] is within


def test_pipewire_target_judged_by_the_worst_case():
    b = budget(cfg(network_latency=0, dsp_client=False), audio_server="pipewire", target_ms=2.0)
    assert b.meets_target is False and "not always met" in format_budget(b)
    assert budget(cfg(network_latency=0, dsp_client=False), audio_server="pipewire", target_ms=8.0).meets_target
