"""The second guest: a systemd disk image built from Debian packages (scripts/build-dsp-guest --disk),
booted from its disk, joins the link with nothing of it on its kernel command line: its slave is the
unit of `archdsp-virt guest unit`, reading the link from the domain's SMBIOS OEM string.

One such guest boots per session (a systemd guest under TCG takes a minute or two), after every other
test and with the initramfs guest of tests/conftest.py's demo_domain paused meanwhile, on an overlay of
the built image: the image itself stays as built, for the next session and for scripts/demo --guest disk.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree

from archdsp_libvirt import load_config
from archdsp_libvirt.domain import contract
from conftest import (DOMAINS, SESSION_GUESTS, SYSTEM_URI, archdsp, busy_cores, disk_build_result, disk_guest_wanted,
                      free_jack_server_name, free_udp_port, pick_guest_cores, remove_domain, virsh)

# It goes last in the session (tests/conftest.py's LAST_MODULES), with the session guest paused meanwhile
# (two TCG guests side by side on 2 cores starve each other's audio). With its image's build on a fresh
# machine it adds about three minutes; ARCHDSP_DISK_GUEST=0 leaves it out (its tests then skip and say so).
pytestmark = [pytest.mark.real]

# Words of mmdebstrap's (apt's) output when the Debian mirror cannot be reached.
MIRROR_UNREACHABLE = ("Temporary failure resolving", "Could not resolve", "Failed to fetch", "Network is unreachable",
                      "Connection timed out", "Could not connect", "is not reachable")


@pytest.fixture(scope="session")
def disk_guest_files(system_libvirt):
    """disk.qcow2, vmlinuz and initrd.img of the disk guest (built once, while the fast tier ran: see
    tests/conftest.py; cached between sessions)."""
    why = disk_guest_wanted()
    if why:
        pytest.skip(why)
    rc, out, err, seconds = disk_build_result()
    if rc != 0:
        if any(word in err for word in MIRROR_UNREACHABLE):
            pytest.skip(f"the Debian mirror cannot be reached to build the disk guest: {err.strip()[-300:]}")
        pytest.fail(f"scripts/build-dsp-guest --disk failed:\n{out[-2000:]}\n{err[-4000:]}")
    paths = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    paths["seconds"] = seconds
    return paths


def session_disk_guest_text(text: str, *, name: str, slave: str, port: int, core: int, fifo: bool,
                            kernel: str, initrd: str, disk: str) -> str:
    """domains/demo-disk.toml's ``text`` as this session's guest: its own domain name, slave name and
    port, its vCPU core (realtime only where the core is its own), the built kernel and initrd, its
    overlay disk, and no hugepages (the initramfs session guest may hold the pool)."""
    for old, new in (('name = "archdsp-demo-disk"', f'name = "{name}"'),
                     ("source_port = 19000", f"source_port = {port}"),
                     ('client_name = "dsp"', f'client_name = "{slave}"'),
                     ("isolated_cores = [1]", f"isolated_cores = [{core}]"),
                     ("hugepages = 256", "hugepages = 0"),
                     ("[realtime]\nenable = true", f"[realtime]\nenable = {'true' if fifo else 'false'}"),
                     ("emulator_priority = 3", f"emulator_priority = {3 if fifo else 0}"),
                     ("/var/lib/archdsp-libvirt/disk-guest/vmlinuz", kernel),
                     ("/var/lib/archdsp-libvirt/disk-guest/initrd.img", initrd),
                     ("/var/lib/archdsp-libvirt/disk-guest/disk.qcow2", disk)):
        assert old in text, old
        text = text.replace(old, new)
    return text


def agent(name: str, command: str, arguments: dict | None = None) -> dict:
    """One QEMU guest agent command through libvirt (bounded by virsh's own timeout)."""
    request = {"execute": command, **({"arguments": arguments} if arguments else {})}
    return json.loads(virsh("qemu-agent-command", name, "--timeout", "20", json.dumps(request)))["return"]


def wait_agent(name: str, timeout: float = 90) -> None:
    """The guest's qemu-guest-agent answers (udev starts it when its virtio port appears)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            agent(name, "guest-ping")
            return
        except AssertionError as exc:
            if time.monotonic() > deadline:
                raise AssertionError(f"the disk guest's agent did not answer within {timeout} s: {exc}") from None
            time.sleep(2)


def guest_exec(name: str, path: str, *argv: str, timeout: float = 60) -> tuple[int, str]:
    """(exit code, stdout) of ``path argv...`` run in the guest by its agent (guest-exec, polled)."""
    pid = agent(name, "guest-exec", {"path": path, "arg": list(argv), "capture-output": True})["pid"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = agent(name, "guest-exec-status", {"pid": pid})
        if st["exited"]:
            return st.get("exitcode", -1), base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        time.sleep(0.5)
    raise AssertionError(f"{path} {' '.join(argv)} did not end in the guest within {timeout} s")


def link_status(cfg) -> dict:
    return json.loads(archdsp("netjack", "status", "--json", str(cfg), timeout=60).stdout)


@pytest.fixture(scope="module")
def disk_domain(disk_guest_files, tmp_path_factory):
    """The disk guest (one boot for this module, removed after it), up and joined to a host JACK server of
    the test's own through the bridge, with the session guest paused meanwhile (a second TCG guest beside
    it would starve both on a small machine):
    yields (config path, domain name, server name, seconds from `up` to the link)."""
    import uuid

    from archdsp_libvirt.cpuset import parse_cpuset

    tag = uuid.uuid4().hex[:6]
    name = f"archdsp-test-disk-{tag}"
    # The overlay lives beside the image (O_DIRECT, cache='none', needs a real filesystem, not tmpfs).
    work = Path(disk_guest_files["disk"]).parent.with_name(f"disk-guest-run-{tag}")
    work.mkdir(mode=0o755)
    overlay = work / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", disk_guest_files["disk"],
                    str(overlay)], check=True, timeout=60)
    server = free_jack_server_name()
    port = free_udp_port(19100, 19900)
    online = parse_cpuset(Path("/sys/devices/system/cpu/online").read_text())
    core, fifo = pick_guest_cores(online, busy_cores(ours=name))
    text = session_disk_guest_text((DOMAINS / "demo-disk.toml").read_text(), name=name, slave=f"dsk-{tag}",
                                   port=port, core=core, fifo=fifo, kernel=disk_guest_files["vmlinuz"],
                                   initrd=disk_guest_files["initrd"], disk=str(overlay))
    path = tmp_path_factory.mktemp("disk") / "disk.toml"
    path.write_text(text)

    paused = list(SESSION_GUESTS)
    for guest in paused:
        virsh("suspend", guest)

    def teardown() -> None:
        remove_domain(name)
        for guest in paused:
            virsh("resume", guest, check=False)
        archdsp("netjack", "stop", str(path))
        for leftover in Path("/run/archdsp-libvirt").glob(f"netjack-{name}.*"):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)

    bridge = archdsp("netjack", "start", "--jack-server", server, "--server", "dummy", str(path), timeout=120)
    if bridge.returncode != 0:
        teardown()
        pytest.fail(f"archdsp-virt netjack start failed:\n{bridge.stdout}\n{bridge.stderr}")
    started = time.monotonic()
    r = archdsp("-c", SYSTEM_URI, "up", str(path))
    if r.returncode != 0:
        teardown()
        pytest.fail(f"archdsp-virt up of the disk guest failed:\n{r.stdout}\n{r.stderr}")
    joined = archdsp("netjack", "start", "--wait", "300", str(path), timeout=360)
    boot_to_link = time.monotonic() - started
    if joined.returncode != 0:
        log = Path(f"/var/log/libvirt/qemu/{name}-console.log")
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no console log)"
        teardown()
        pytest.fail(f"the disk guest did not join the link within 300 s:\n{joined.stdout}\n{joined.stderr}\n"
                    f"console:\n{tail}")
    yield path, name, server, boot_to_link
    teardown()


def test_the_disk_guest_joins_the_link_with_no_link_setting_on_its_command_line(disk_domain, disk_guest_files,
                                                                                   record_property):
    cfg, name, server, boot_to_link = disk_domain
    record_property("disk_guest_build_seconds", round(disk_guest_files["seconds"]))
    record_property("disk_guest_boot_to_link_seconds", round(boot_to_link))
    print(f"disk guest: build (or cache check) {disk_guest_files['seconds']:.0f} s, boot to link {boot_to_link:.0f} s")
    config = load_config(cfg)
    live = etree.fromstring(virsh("dumpxml", name).encode())
    # Booted from its disk: a virtio disk, root=/dev/vda, and no archdsp.* word on the command line.
    assert live.find("devices/disk/target").get("dev") == "vda"
    cmdline = (live.findtext("os/cmdline") or "").split()
    assert "root=/dev/vda" in cmdline, cmdline
    assert not [w for w in cmdline if w.startswith("archdsp.")], cmdline
    entries = [e.text for e in live.iterfind("sysinfo[@type='smbios']/oemStrings/entry")]
    assert contract.from_oem_strings(entries) == contract.settings(config), entries
    # The master sees the guest's slave: the link is up with its ports.
    info = link_status(cfg)
    assert info["server"] == server and info["link"] == "up", info
    want = config.archibaldos.netjack.client_name
    slave = info["slave"]
    assert slave == want or (slave.startswith(f"{want}-") and slave[len(want) + 1:].isdigit()), slave
    assert info["ports"] == {
        "netjack:capture_1": f"{slave}:to_slave_1", "netjack:capture_2": f"{slave}:to_slave_2",
        "netjack:playback_1": f"{slave}:from_slave_1", "netjack:playback_2": f"{slave}:from_slave_2",
    }


def test_the_disk_guest_runs_systemd_on_its_rt_kernel_from_its_disk(disk_domain):
    """The console log shows a systemd boot of Debian's PREEMPT_RT kernel with its root on the disk."""
    _cfg, name, _server, _t = disk_domain
    log = Path(f"/var/log/libvirt/qemu/{name}-console.log").read_text(errors="replace")
    assert "PREEMPT_RT" in log, log[-2000:]
    assert "systemd" in log and "Debian GNU/Linux 12" in log, log[-2000:]
    assert "EXT4-fs (vda)" in log, log[-2000:]


def test_the_disk_guest_s_slave_unit_runs_on_the_credential_systemd_imported(disk_domain):
    """Through the guest agent: systemd took the OEM string as the system credential archdsp.netjack,
    and the unit of `archdsp-virt guest unit` is active."""
    cfg, name, _server, _t = disk_domain
    wait_agent(name)
    live = etree.fromstring(virsh("dumpxml", name).encode())
    entry = next(e.text for e in live.iterfind("sysinfo[@type='smbios']/oemStrings/entry")
                 if e.text.startswith("io.systemd.credential:archdsp.netjack="))
    code, value = guest_exec(name, "/bin/cat", "/run/credentials/@system/archdsp.netjack")
    assert code == 0 and value.strip() == entry.split("=", 1)[1], (code, value)
    code, state = guest_exec(name, "/bin/systemctl", "is-active", "archdsp-netjack.service")
    assert (code, state.strip()) == (0, "active")
    code, kernel = guest_exec(name, "/bin/uname", "-v")
    assert code == 0 and "PREEMPT_RT" in kernel, kernel


def test_cyclictest_runs_in_the_disk_guest_through_its_agent(disk_domain):
    """rt-tests is in the image, and the agent runs it (a 2 s run, its figures not judged here)."""
    _cfg, name, _server, _t = disk_domain
    wait_agent(name)
    code, out = guest_exec(name, "/usr/bin/cyclictest", "-q", "-m", "-p", "80", "-i", "1000", "-D", "2")
    assert code == 0 and "Max:" in out, (code, out)


def test_status_shows_the_disk_guest_s_section_through_its_agent(disk_domain):
    cfg, name, _server, _t = disk_domain
    wait_agent(name)
    r = archdsp("-c", SYSTEM_URI, "status", "--json", str(cfg), timeout=120)
    assert r.returncode == 0, r.stderr
    guest = json.loads(r.stdout)["guest"]
    assert guest["agent"] == "connected", guest
    assert "-rt-" in guest["kernel"] and guest["preempt_rt"] is True, guest
    want = load_config(cfg).archibaldos.netjack
    assert guest["slave"] and guest["slave"]["settings"]["latency"] == str(want.network_latency), guest
    assert guest["xruns_source"] == "journal archdsp-netjack.service", guest


def test_guest_check_runs_in_the_disk_guest(disk_domain):
    cfg, name, _server, _t = disk_domain
    wait_agent(name)
    r = archdsp("-c", SYSTEM_URI, "guest", "check", "--json", str(cfg), timeout=120)
    found = {f["id"]: f for f in json.loads(r.stdout)}
    assert found["guest.agent"]["status"] == "ok", found
    assert found["guest.kernel"]["status"] == "ok", found["guest.kernel"]  # PREEMPT_RT
    assert found["guest.slave"]["status"] == "ok", found["guest.slave"]
    assert found["guest.jackd"]["status"] == found["guest.cyclictest"]["status"] == "ok", found


def test_rt_test_and_one_tune_step_run_through_the_disk_guest_s_agent(disk_domain):
    cfg, _name, _server, _t = disk_domain
    r = archdsp("rt-test", "--json", "--seconds", "3", str(cfg), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    rt = json.loads(r.stdout)
    assert rt["channel"] == "guest-agent" and rt["samples"] > 0, rt
    before = cfg.read_text()
    r = archdsp("tune", "--json", "--buffer-sizes", "128", "--latencies", "1", "--sync", "off", "--seconds", "5",
                str(cfg), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    step = json.loads(r.stdout)["steps"][0]
    # the unit's slave restarted through the agent, at L = 1: (L + 2) x 128 with jack_thru in the loop
    assert step["channel"] == "guest-agent" and step["measured_frames"] == 384, step
    assert cfg.read_text() == before
