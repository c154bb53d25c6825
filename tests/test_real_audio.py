"""End to end: the demo guest boots, the bridge links, and the measured round trip equals the prediction."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from archdsp_libvirt import load_config
from archdsp_libvirt.domain import contract
from archdsp_libvirt.procs import Owned
from conftest import archdsp, virsh

pytestmark = pytest.mark.real
RUN = Path("/run/archdsp-libvirt")


def wait_link(cfg, timeout=180):
    deadline = time.monotonic() + timeout
    info = {}
    while time.monotonic() < deadline:
        r = archdsp("netjack", "status", "--json", str(cfg), timeout=60)
        info = json.loads(r.stdout)
        if info.get("link") == "up":
            return info
        time.sleep(2)
    raise AssertionError(f"the link did not come up within {timeout} s: {info}")


def bridge_xruns(cfg) -> int:
    info = json.loads(archdsp("netjack", "status", "--json", str(cfg), timeout=60).stdout)
    return info["xruns"]


def measure(cfg):
    r = archdsp("latency", "--measure", "--json", "--seconds", "6", str(cfg), timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_link_in_oem_strings_only(name, cfg):
    """The running domain's <cmdline> holds no link setting; its OEM string holds them all."""
    live = etree.fromstring(virsh("dumpxml", name).encode())
    cmdline = live.findtext("os/cmdline") or ""
    for key in ("master", "port", "name", "latency", "channels", "ip", "sync", "dsp"):
        assert f"archdsp.{key}=" not in cmdline, cmdline
    entries = [e.text for e in live.iterfind("sysinfo[@type='smbios']/oemStrings/entry")]
    assert contract.from_oem_strings(entries) == contract.settings(cfg), entries
    assert live.find("os/smbios").get("mode") == "sysinfo"


def test_link_comes_up_with_stable_port_names(demo_domain):
    cfg, name, server = demo_domain
    info = wait_link(cfg)
    assert info["server"] == server and info["running"]
    want = load_config(cfg).archibaldos.netjack.client_name  # the session guest's own slave name
    slave = info["slave"]  # the guest's slave, or NAME-01... when JACK still holds an earlier one
    assert slave == want or (slave.startswith(f"{want}-") and slave[len(want) + 1:].isdigit()), slave
    assert info["ports"] == {
        "netjack:capture_1": f"{slave}:to_slave_1", "netjack:capture_2": f"{slave}:to_slave_2",
        "netjack:playback_1": f"{slave}:from_slave_1", "netjack:playback_2": f"{slave}:from_slave_2",
    }
    # jack_lsp shows the aliases users connect with.
    lsp = subprocess.run(["jack_lsp", "-s", server, "-A"], capture_output=True, text=True, timeout=30,
                         env={"JACK_NO_START_SERVER": "1", "PATH": "/usr/bin:/bin"}).stdout
    assert "netjack:capture_1" in lsp and "netjack:playback_2" in lsp
    # The guest said it is ready on its serial console (logged by libvirt).
    log = Path(f"/var/log/libvirt/qemu/{name}-console.log")
    deadline = time.monotonic() + 60
    while "ARCHDSP-READY" not in log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(1)
    assert f"ARCHDSP-READY name={want} master=192.168.122.1" in log.read_text(errors="replace")
    # ...with no link setting on its kernel command line: the running domain carries them as its
    # SMBIOS OEM string, and the guest's init read them from there.
    assert_link_in_oem_strings_only(name, load_config(cfg))
    assert "link settings from the SMBIOS OEM string archdsp.netjack: v=1 " in log.read_text(errors="replace")
    # status --json shows the link up.
    st = json.loads(archdsp("-c", "qemu:///system", "status", "--json", str(cfg)).stdout)
    assert st["state"] == "running" and st["bridge"]["link"] == "up"


def test_no_multicast_group_joined(demo_domain):
    """With the master loaded and the link up (so there is a master that could have joined it), no
    interface has NETJACK's multicast group."""
    cfg, _name, _server = demo_domain
    info = wait_link(cfg)
    port = info["master"].removesuffix("/udp").rsplit(":", 1)[1]
    sockets = subprocess.run(["ss", "-Hunl", "sport", "=", f":{port}"], capture_output=True, text=True,
                             timeout=30).stdout
    assert f":{port}" in sockets, f"no NETJACK master listening on UDP port {port}: {sockets!r}"
    groups = subprocess.run(["ip", "maddr", "show"], capture_output=True, text=True, timeout=30).stdout
    assert "225.3.19.154" not in groups


def test_the_master_listens_on_master_ip_alone_as_the_kernel_says(demo_domain):
    """The kernel's socket table (``ss``, and /proc/PID/net/udp of the bridge's jackd), not the address the
    master was asked for: master_ip's port is bound there alone, never 0.0.0.0."""
    cfg, _name, _server = demo_domain
    info = wait_link(cfg)
    master = info["master"].removesuffix("/udp")
    port = int(master.rsplit(":", 1)[1])
    out = subprocess.run(["ss", "-Hulnp", f"sport = :{port}"], capture_output=True, text=True, timeout=30).stdout
    bound = sorted(line.split()[3] for line in out.splitlines() if line.strip())
    assert bound == [master], out  # was ['0.0.0.0:PORT'] owned by jackd
    assert f"pid={info['server_pid']}," in out  # the bridge's own jackd holds it
    rows = Path(f"/proc/{info['server_pid']}/net/udp").read_text().splitlines()[1:]
    assert not any(r.split()[1] == f"00000000:{port:04X}" for r in rows), rows
    assert info["listening"] == f"{master}/udp"
    found = {f["id"]: f for f in json.loads(archdsp("check", "--json", str(cfg)).stdout)}["netjack.master"]
    assert found["status"] == "ok" and f"listening on {master}/udp" in found["observed"], found


def test_round_trip_matches_prediction_at_l0(demo_domain):
    cfg, _name, _server = demo_domain
    wait_link(cfg)
    before = bridge_xruns(cfg)
    rep = measure(cfg)
    time.sleep(3)  # the supervisor writes its count once a second
    after = bridge_xruns(cfg)
    assert rep["predicted_frames"] == 256  # (0 + 1 + 1 client period) x 128
    assert abs(rep["measured_frames"] - rep["predicted_frames"]) <= 1, rep
    assert rep["readings"]
    # The measurement counts the server's xruns during its window: a part of what the bridge's
    # supervisor counted on the same server over a longer one.
    assert type(rep["xruns"]) is int and 0 <= rep["xruns"] <= after - before, (rep["xruns"], before, after)


def test_round_trip_matches_prediction_at_l1(demo_domain):
    cfg, name, _server = demo_domain
    text = cfg.read_text()
    l1 = cfg.parent / "demo-l1.toml"
    l1.write_text(text.replace("network_latency = 0", "network_latency = 1"))
    r = archdsp("-c", "qemu:///system", "up", "--restart", str(l1), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "restarting it" in r.stdout and "is stale; the VM's new slave takes the aliases" in r.stdout, r.stdout
    assert_link_in_oem_strings_only(name, load_config(l1))
    assert " latency=1 " in virsh("dumpxml", name)  # the new latency is in the OEM string the guest read
    try:
        wait_link(l1)
        rep = measure(l1)
        assert rep["predicted_frames"] == 384
        assert abs(rep["measured_frames"] - rep["predicted_frames"]) <= 1, rep
    finally:
        # The session guest goes back to the session's config (latency 0 in its OEM string), so that a later
        # reset of it (the PipeWire tests reset it) boots what every later test's config says.
        back = archdsp("-c", "qemu:///system", "up", "--restart", str(cfg), timeout=300)
        assert back.returncode == 0, back.stdout + back.stderr
        wait_link(cfg)


def test_bridge_stop_leaves_nothing_running(demo_domain):
    cfg, name, server = demo_domain
    state = json.loads((RUN / f"netjack-{name}.json").read_text())
    sup = Owned(**state["supervisor"])
    srv = Owned(**state["server_process"])
    assert sup.alive() and srv.alive()
    r = archdsp("netjack", "stop", str(cfg))
    assert r.returncode == 0
    assert not sup.alive() and not srv.alive()
    assert not (RUN / f"netjack-{name}.json").exists()
    st = json.loads(archdsp("netjack", "status", "--json", str(cfg)).stdout)
    assert st["running"] is False
    again = archdsp("netjack", "stop", str(cfg))
    assert again.returncode == 0 and "not running" in again.stdout
