"""The guest contract: the link's settings as the domain's SMBIOS OEM string (docs/guest-contract.md).

Rendering and libvirt's schema, the value format (Python's encoder and decoder, and the demo
guest's shell reader run by busybox on a fake /sys/firmware/dmi/entries), and drift on a real
libvirt driver (the in-process test driver).
"""

from __future__ import annotations

import copy
import shutil
import struct
import subprocess
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner
from lxml import etree

from archdsp_libvirt import HostFacts, load_config, parse_config, render_domain
from archdsp_libvirt.cli import cli
from archdsp_libvirt.domain import contract
from archdsp_libvirt.domain.schema import validate_domain
from archdsp_libvirt.errors import ConfigError, RenderError
from archdsp_libvirt.service.domain import host_model
from archdsp_libvirt.virt.connection import Session
from archdsp_libvirt.virt.drift import differences, managed_parts
from archdsp_libvirt.virt.lifecycle import up as lifecycle_up
from archdsp_libvirt.virt.status import status as status_of
from conftest import DOMAINS, REPO, assert_config_refused

HOST4 = HostFacts(online_cpus=frozenset(range(4)))
INIT = REPO / "scripts/dsp-guest-init.sh"
LINK = {"enable": True, "source_port": 19000, "client_name": "dsp", "network_latency": 0}


def make_cfg(name="archdsp-contract", boot=True, **netjack):
    data = {"name": name, "isolated_cores": [1], "memory_mb": 256,
            "archibaldos": {"netjack": {**LINK, **netjack}}}
    if boot:
        data["boot"] = {"kernel": "/k", "cmdline": "console=ttyS0 archdsp.shell=1"}
    return parse_config(data)


def root_of(cfg):
    return etree.fromstring(render_domain(cfg, HOST4).xml.encode())


def oem_entries(root):
    return [e.text for e in root.iterfind("sysinfo[@type='smbios']/oemStrings/entry")]


# --- rendering ------------------------------------------------------------------------------


def test_the_link_is_one_oem_string_in_systemds_credential_form():
    root = root_of(make_cfg())
    assert oem_entries(root) == [
        "io.systemd.credential:archdsp.netjack=v=1 master=192.168.122.1 port=19000 name=dsp latency=0 "
        "channels=2 sync=0 dsp=thru rate=96000 period=128"
    ]
    assert [s.get("mode") for s in root.iterfind("os/smbios")] == ["sysinfo"]
    # libvirt's order: sysinfo before os
    tags = [el.tag for el in root]
    assert tags.index("cputune") < tags.index("sysinfo") < tags.index("os")


@pytest.mark.parametrize("boot", [True, False], ids=["direct-kernel", "own-disk"])
def test_no_link_setting_on_the_kernel_command_line(boot):
    root = root_of(make_cfg(boot=boot, sync=True, dsp_client=False, guest_ip="192.168.122.50/24"))
    cmdline = root.findtext("os/cmdline") or ""
    for key in ("master", "port", "name", "latency", "channels", "ip", "sync", "dsp"):
        assert f"archdsp.{key}=" not in cmdline
    assert cmdline == ("console=ttyS0 archdsp.shell=1" if boot else "")
    # a guest booted from its own disk gets the same contract
    (entry,) = oem_entries(root)
    assert contract.decode(entry.removeprefix(contract.OEM_PREFIX)) == {
        "v": "1", "master": "192.168.122.1", "port": "19000", "name": "dsp", "latency": "0", "channels": "2",
        "sync": "1", "dsp": "direct", "rate": "96000", "period": "128", "ip": "192.168.122.50/24",
    }


def test_no_link_no_oem_string_but_the_guest_agent_channel_always():
    root = root_of(make_cfg(enable=False))
    assert root.find("sysinfo") is None and root.find("os/smbios") is None
    for cfg in (make_cfg(enable=False), make_cfg()):
        chans = [(c.get("type"), c.find("target").attrib) for c in root_of(cfg).iterfind("devices/channel")]
        assert chans == [("unix", {"type": "virtio", "name": "org.qemu.guest_agent.0"})]
    devices = [el.tag for el in root.find("devices")]
    assert devices.index("console") < devices.index("channel") < devices.index("memballoon")


@pytest.mark.parametrize("config", sorted(p.name for p in DOMAINS.glob("*.toml")))
def test_every_shipped_domain_has_the_agent_channel_and_its_link_as_oem_string(config):
    cfg = load_config(DOMAINS / config)
    root = root_of(cfg)
    assert root.find("devices/channel/target[@name='org.qemu.guest_agent.0']") is not None
    assert oem_entries(root) == ([contract.oem_string(cfg)] if cfg.netjack.enable else [])
    assert "archdsp.master=" not in (root.findtext("os/cmdline") or "")


def test_libvirts_schema_checks_the_new_elements():
    root = root_of(make_cfg())
    validate_domain(root)  # what render_domain did
    for path, attr, bad in (("os/smbios", "mode", "bogus"), ("sysinfo", "type", "nonsense"),
                            ("devices/channel", "type", "bogus")):
        broken = copy.deepcopy(root)
        broken.find(path).set(attr, bad)
        with pytest.raises(RenderError, match="not valid for libvirt's schema"):
            validate_domain(broken)


def test_link_settings_in_boot_cmdline_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"boot.cmdline.*archdsp.master=.*\[archibaldos.netjack\]"):
        parse_config({"isolated_cores": [1], "memory_mb": 256, "boot": {"kernel": "/k", "cmdline": "console=ttyS0 archdsp.master=10.0.0.1"}})
    path = tmp_path / "old.toml"
    path.write_text('isolated_cores = [1]\nmemory_mb = 256\n[boot]\nkernel = "/k"\ncmdline = "console=ttyS0 archdsp.port=19000"\n')
    result = CliRunner().invoke(cli, ["xml", "--host-cpus", "0-3", str(path)])
    assert_config_refused(result, path, ["boot.cmdline", "archdsp.port=", "[archibaldos.netjack]"])
    # the demo guest's own knobs stay
    assert parse_config({"isolated_cores": [1], "memory_mb": 256, "boot": {"kernel": "/k", "cmdline": "archdsp.shell=1 archdsp.debug=1"}})


# --- the value format -----------------------------------------------------------------------


def test_round_trip():
    values = contract.settings(make_cfg(guest_ip="192.168.122.50/24"))
    text = contract.encode(values)
    assert contract.decode(text) == values
    assert contract.encode(contract.decode(text)) == text
    assert text.startswith("v=1 ") and text.endswith(" ip=192.168.122.50/24")
    # unknown keys: kept by the decoder, written after the known ones (readers ignore them)
    assert contract.encode({**values, "later": "x"}).endswith(" later=x")


@pytest.mark.parametrize("value", ["my dsp", "a=b", "it's", 'x"y', "", "tab\there", "new\nline"])
def test_a_value_that_needs_escaping_is_refused_not_escaped(value):
    values = {**contract.settings(make_cfg()), "name": value}
    with pytest.raises(contract.ContractError, match="name="):
        contract.encode(values)


@pytest.mark.parametrize("name", ["my dsp", "a=b"])
def test_the_config_refuses_such_a_slave_name_first(name):
    with pytest.raises(ConfigError, match="archibaldos.netjack.client_name"):
        make_cfg(client_name=name)


@pytest.mark.parametrize("text,needle", [
    ("master=1.2.3.4 port=1", "version v=None"),
    ("v=2 master=1.2.3.4", "version v=2"),
    ("v=1 port=1 port=2", "port is given twice"),
    ("v=1 master", "'master' is not key=value"),
    ("v=1 Name=x", "'Name=x' is not key=value"),
    ("v=1 name=a'b", "is not key=value"),
])
def test_decode_refuses(text, needle):
    with pytest.raises(contract.ContractError, match=needle):
        contract.decode(text)


def test_from_oem_strings_picks_ours():
    ours = contract.oem_string(make_cfg())
    assert contract.from_oem_strings(["io.systemd.credential:other=1", ours]) == contract.settings(make_cfg())
    assert contract.from_oem_strings(["io.systemd.credential:other=1"]) is None


# --- the demo guest's reader: its own shell functions, run by busybox ------------------------


def type11(handle: int, strings: list[str]) -> bytes:
    """One SMBIOS type 11 structure as /sys/firmware/dmi/entries/11-N/raw holds it (SMBIOS 3.x, 7.12):
    type, length 5, handle, the string count, then the NUL-terminated strings and one more NUL."""
    body = b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    return struct.pack("<BBHB", 11, 5, handle, len(strings)) + body


def reader_functions() -> str:
    text = INIT.read_text()
    start = text.index("is_uint() {")
    end = text.index("# (end of the contract reader)")
    fns = text[start:end]
    assert "oem_contract()" in fns and "parse_contract()" in fns
    # is_uint comes first; the build-info line between it and the reader is no function: drop it
    return "\n".join(line for line in fns.splitlines() if not line.startswith("[ -r /etc/archdsp"))


@pytest.fixture
def applets(tmp_path, monkeypatch):
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox is not installed (scripts/install-test-deps installs busybox-static)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in ("busybox", "od", "tr", "tail", "head", "cat", "printf"):
        (bin_dir / applet).symlink_to(busybox)
    return bin_dir


def reader(entries: Path, applets: Path) -> tuple[int, str, str]:
    script = reader_functions() + f"""
MASTER='' IP='' PORT=unset NAME=unset LATENCY=unset CHANNELS=unset DSP=unset SYNC=unset
CONTRACT=$(oem_contract '{entries}')
parse_contract "$CONTRACT"; echo "rc=$?"
echo "MASTER=$MASTER IP=$IP PORT=$PORT NAME=$NAME LATENCY=$LATENCY CHANNELS=$CHANNELS DSP=$DSP SYNC=$SYNC"
echo "contract=$CONTRACT"
"""
    # busybox's applets only (links on PATH), as in the initramfs
    proc = subprocess.run([str(applets / "busybox"), "sh", "-c", script], capture_output=True, text=True,
                          timeout=30, env={"PATH": str(applets)}, cwd="/")
    assert proc.stderr == "", proc.stderr
    out = proc.stdout.splitlines()
    return int(out[0].removeprefix("rc=")), out[1], out[2].removeprefix("contract=")


def write_entries(tmp_path: Path, structures: dict[str, bytes]) -> Path:
    entries = tmp_path / "entries"
    for name, raw in structures.items():
        (entries / name).mkdir(parents=True)
        (entries / name / "raw").write_bytes(raw)
    return entries


def test_the_shell_reader_finds_our_string_among_others(tmp_path, applets):
    cfg = make_cfg(name="x", client_name="dsp-7", source_port=19123, network_latency=2, channels=4, sync=True,
                   dsp_client=False, guest_ip="192.168.122.50/24")
    ours = contract.oem_string(cfg)
    entries = write_entries(tmp_path, {
        "11-0": type11(0x0B00, ["io.systemd.credential:other=1", "vendor thing"]),
        "11-1": type11(0x0B01, ["first", ours, "last"]),
        "1-0": b"\x01\x1b" + b"\0" * 30,  # a type 1 entry: not looked at
    })
    rc, settings, value = reader(entries, applets)
    assert rc == 0
    assert value == ours.removeprefix(contract.OEM_PREFIX)
    assert contract.decode(value) == contract.settings(cfg)  # what Python wrote is what the shell read
    assert settings == ("MASTER=192.168.122.1 IP=192.168.122.50/24 PORT=19123 NAME=dsp-7 LATENCY=2 CHANNELS=4 "
                        "DSP=direct SYNC=1")


def test_the_shell_reader_refuses_another_version_and_finds_nothing_without_the_string(tmp_path, applets):
    v2 = contract.OEM_PREFIX + "v=2 master=10.0.0.1 port=1"
    rc, _settings, value = reader(write_entries(tmp_path / "a", {"11-0": type11(1, [v2])}), applets)
    assert rc == 1 and value == "v=2 master=10.0.0.1 port=1"
    rc, settings, value = reader(write_entries(tmp_path / "b", {"11-0": type11(1, ["something else"])}), applets)
    assert rc == 1 and value == "" and settings.startswith("MASTER= IP= PORT=unset")
    rc, _settings, value = reader(tmp_path / "no-such-dir", applets)
    assert rc == 1 and value == ""


# --- drift and redefinition on libvirt's test driver ----------------------------------------


@pytest.fixture
def session(test_uri):
    s = Session(test_uri)
    yield s
    s.close()


def up(cfg, session, **kw):
    model = host_model(cfg, session)
    return lifecycle_up(cfg, session, model, lambda uuid: render_domain(cfg, model, uuid=uuid), **kw)


def test_drift_covers_the_oem_strings_smbios_and_channel():
    xml = render_domain(make_cfg(), HOST4).xml
    parts = managed_parts(xml)
    assert parts["oem_strings"] == [contract.oem_string(make_cfg())]
    assert parts["smbios"] == [("sysinfo",)]
    assert parts["channels"] == [("unix", "virtio", "org.qemu.guest_agent.0")]
    other = render_domain(make_cfg(source_port=19001), HOST4).xml
    (line,) = differences(other, xml)
    assert line.startswith("oem_strings: config wants") and "port=19001" in line and "port=19000" in line
    no_agent = xml.replace('<target type="virtio" name="org.qemu.guest_agent.0"/>', '<target type="virtio" name="x"/>')
    assert [d.split(":")[0] for d in differences(xml, no_agent)] == ["channels"]
    no_smbios = xml.replace('<smbios mode="sysinfo"/>', "")
    assert [d.split(":")[0] for d in differences(xml, no_smbios)] == ["smbios"]


def test_changing_the_link_port_shows_drift_then_up_redefines_with_the_same_uuid(session, unique_name, tmp_path):
    cfg = make_cfg(name=unique_name)
    first = up(cfg, session)
    assert first.defined == "new"
    back = session.conn.lookupByName(unique_name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert managed_parts(back)["oem_strings"] == [contract.oem_string(cfg)]  # libvirt kept it
    assert status_of(cfg, session, host_model(cfg, session))["drift"] == []

    moved = make_cfg(name=unique_name, source_port=19001)
    drift = status_of(moved, session, host_model(moved, session))["drift"]
    assert len(drift) == 1 and drift[0].startswith("oem_strings:") and "port=19001" in drift[0]

    lines: list[str] = []
    again = up(moved, session, say=lines.append)
    assert again.defined == "updated" and again.uuid == first.uuid
    assert again.stale  # the running guest still has the old port
    assert status_of(moved, session, host_model(moved, session))["drift"] == []
    restarted = up(moved, session, restart=True)
    assert restarted.restarted and restarted.uuid == first.uuid
    assert up(moved, session).defined == "unchanged"


def test_the_suites_guest_image_is_keyed_on_its_init(monkeypatch, tmp_path):
    """Two trees whose guest init differs build (and boot) two images, never one over the other."""
    import conftest

    monkeypatch.delenv("ARCHDSP_GUEST_DIR", raising=False)
    here = conftest.guest_dir()
    assert here.parent == conftest.SHARED_GUEST_DIR.parent and here != conftest.SHARED_GUEST_DIR
    other = tmp_path / "repo"
    (other / "scripts").mkdir(parents=True)
    (other / "scripts/build-dsp-guest").write_bytes((REPO / "scripts/build-dsp-guest").read_bytes())
    (other / "scripts/dsp-guest-init.sh").write_text(INIT.read_text() + "# changed\n")
    monkeypatch.setattr(conftest, "REPO", other)
    assert conftest.guest_dir() != here
    monkeypatch.setenv("ARCHDSP_GUEST_DIR", str(tmp_path / "mine"))
    assert conftest.guest_dir() == tmp_path / "mine"
