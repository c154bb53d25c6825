"""VFIO helpers on fake host trees: show, bind, unbind, with and without --dry-run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.errors import HostError, UsageError
from archdsp_libvirt.host.vfio import LOCK_FILE, STATE_FILE, SysfsWrite, bind, show, unbind
from archdsp_libvirt.virt.hostfacts import domains_holding
from test_hostcheck import FakeHost

AUDIO = "0000:00:1b.0"
DEV = f"/sys/bus/pci/devices/{AUDIO}"


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    f = FakeHost(tmp_path / "host")
    f.path("/sys/bus/pci/drivers/vfio-pci").mkdir(parents=True, exist_ok=True)
    for name in ("drivers_probe",):
        f.file(f"/sys/bus/pci/{name}", "")
    for drv in ("snd_hda_intel", "vfio-pci"):
        f.file(f"/sys/bus/pci/drivers/{drv}/bind", "")
        f.file(f"/sys/bus/pci/drivers/{drv}/unbind", "")
    return f


def text(fake: FakeHost, p: str) -> str:
    return fake.path(p).read_text()


BIND = [
    SysfsWrite(f"{DEV}/driver_override", "vfio-pci"),
    SysfsWrite("/sys/bus/pci/drivers/snd_hda_intel/unbind", AUDIO),
    SysfsWrite("/sys/bus/pci/drivers_probe", AUDIO),
]


def test_show_lists_driver_class_and_every_group_member(fake):
    fake.pci("0000:00:1b.1", cls=0x0c0330, vd="1022:15b9", driver=None, group="7")
    info = show(fake.host, "00:1B.0")
    assert info.device.driver == "snd_hda_intel"
    assert info.device.vendor_device == "1022:15e3"
    assert info.device.class_code == 0x040300
    assert [m.address for m in info.members] == [AUDIO, "0000:00:1b.1"]
    out = info.format()
    assert "iommu group:  7" in out and "member 0000:00:1b.1 [0c0330] 1022:15b9 driver=none" in out


def test_show_missing_device_and_bad_address(fake):
    with pytest.raises(HostError, match="no PCI device 0000:00:1f.3"):
        show(fake.host, "0000:00:1f.3")
    with pytest.raises(UsageError, match="not a PCI address"):
        show(fake.host, "1b.0")


def test_bind_dry_run_writes_nothing(fake):
    assert bind(fake.host, AUDIO, dry_run=True) == BIND
    assert text(fake, f"{DEV}/driver_override") == "(null)\n"
    assert text(fake, "/sys/bus/pci/drivers_probe") == ""
    assert not fake.path(STATE_FILE).exists()


def test_bind_writes_sysfs_and_remembers_the_driver(fake):
    assert bind(fake.host, AUDIO) == BIND
    assert text(fake, f"{DEV}/driver_override") == "vfio-pci"
    assert text(fake, "/sys/bus/pci/drivers/snd_hda_intel/unbind") == AUDIO
    assert text(fake, "/sys/bus/pci/drivers_probe") == AUDIO
    assert json.loads(text(fake, STATE_FILE)) == {AUDIO: "snd_hda_intel"}


def test_bind_is_a_no_op_when_already_bound(fake):
    fake.set_driver(AUDIO, "vfio-pci")
    assert bind(fake.host, AUDIO) == []


def test_bind_without_a_driver_skips_the_unbind(fake):
    fake.set_driver(AUDIO, None)
    assert [w.path for w in bind(fake.host, AUDIO, dry_run=True)] == [
        f"{DEV}/driver_override", "/sys/bus/pci/drivers_probe"]


def test_bind_refuses_host_critical_devices(fake):
    with pytest.raises(HostError, match="root filesystem"):
        bind(fake.host, "0000:01:00.0", dry_run=True)
    with pytest.raises(HostError, match="default route"):
        bind(fake.host, "0000:02:00.0", dry_run=True)
    with pytest.raises(HostError, match="PCI bridge"):
        bind(fake.host, "0000:00:01.0", dry_run=True)


def test_bind_needs_the_iommu_and_the_vfio_driver(fake):
    fake.path("/sys/bus/pci/drivers/vfio-pci/bind").unlink()
    fake.path("/sys/bus/pci/drivers/vfio-pci/unbind").unlink()
    fake.path("/sys/bus/pci/drivers/vfio-pci").rmdir()
    with pytest.raises(HostError, match="modprobe vfio-pci"):
        bind(fake.host, AUDIO)
    fake.set_group(AUDIO, None)
    with pytest.raises(HostError, match="no IOMMU group"):
        bind(fake.host, AUDIO)


def test_unbind_restores_the_remembered_driver(fake, test_uri):
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")  # what the kernel did after drivers_probe
    expected = [
        SysfsWrite(f"{DEV}/driver_override", "\n"),
        SysfsWrite("/sys/bus/pci/drivers/vfio-pci/unbind", AUDIO),
        SysfsWrite("/sys/bus/pci/drivers/snd_hda_intel/bind", AUDIO),
    ]
    assert unbind(fake.host, AUDIO, dry_run=True) == expected
    assert fake.path(STATE_FILE).exists()
    assert unbind(fake.host, AUDIO, uri=test_uri, in_use=domains_holding) == expected
    assert text(fake, f"{DEV}/driver_override") == "\n"
    assert text(fake, "/sys/bus/pci/drivers/snd_hda_intel/bind") == AUDIO
    assert not fake.path(STATE_FILE).exists()


def test_unbind_without_a_record_lets_the_kernel_probe(fake):
    fake.set_driver(AUDIO, "vfio-pci")
    assert unbind(fake.host, AUDIO, dry_run=True)[-1] == SysfsWrite("/sys/bus/pci/drivers_probe", AUDIO)


def test_unbind_of_a_device_that_had_no_driver_leaves_it_without(fake, test_uri):
    fake.set_driver(AUDIO, None)
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")
    assert [w.path for w in unbind(fake.host, AUDIO, uri=test_uri, in_use=domains_holding)] == [
        f"{DEV}/driver_override", "/sys/bus/pci/drivers/vfio-pci/unbind"]


def test_unbind_of_a_device_not_bound_does_nothing(fake):
    assert unbind(fake.host, AUDIO) == []


def test_cli_dry_run_and_errors(fake):
    run = CliRunner().invoke
    root = ["--host-root", str(fake.root)]
    res = run(cli, ["vfio", "bind", AUDIO, "--dry-run", *root])
    assert res.exit_code == 0, res.output
    assert f"echo vfio-pci > {DEV}/driver_override" in res.output
    assert f"echo {AUDIO} > /sys/bus/pci/drivers_probe" in res.output
    assert not fake.path(STATE_FILE).exists()
    shown = run(cli, ["vfio", "show", AUDIO, *root])
    assert shown.exit_code == 0 and "driver:       snd_hda_intel" in shown.output
    refused = run(cli, ["vfio", "bind", "0000:02:00.0", *root])
    assert refused.exit_code == 1 and refused.output.startswith("Error: refusing to bind 0000:02:00.0")
    bad = run(cli, ["vfio", "unbind", "nonsense", *root])
    assert bad.exit_code == 2 and "not a PCI address" in bad.output


# --- the state file: atomic, under a lock; a failed bind is undone ---------------------------------


def test_the_state_file_is_replaced_not_rewritten_in_place(fake):
    state = fake.path(STATE_FILE)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"0000:0a:00.1": "snd_hda_intel"}))
    reader = fake.root / "a-reader-holds-the-old-file"
    os.link(state, reader)  # a reader that opened the old file sees it whole
    bind(fake.host, AUDIO)
    assert json.loads(reader.read_text()) == {"0000:0a:00.1": "snd_hda_intel"}
    assert json.loads(state.read_text()) == {"0000:0a:00.1": "snd_hda_intel", AUDIO: "snd_hda_intel"}
    assert [p.name for p in state.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_bind_waits_for_the_lock_and_gives_up_within_the_bound(fake, monkeypatch):
    import fcntl

    from archdsp_libvirt.host import vfio

    monkeypatch.setattr(vfio, "LOCK_WAIT", 0.3)
    lock = fake.path(LOCK_FILE)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as other:  # another vfio bind in progress
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(HostError, match="holds .*vfio.lock"):
            bind(fake.host, AUDIO)
    assert text(fake, f"{DEV}/driver_override") == "(null)\n"  # nothing was written meanwhile
    assert not fake.path(STATE_FILE).exists()
    assert bind(fake.host, AUDIO) == BIND  # the lock is free again


def test_concurrent_binds_keep_both_records(fake):
    import threading

    fake.pci("0000:0b:00.0", cls=0x040300, vd="1022:15e3", driver="snd_hda_intel", group="11")
    errors = []

    def run(addr):
        try:
            bind(fake.host, addr)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(a,)) for a in (AUDIO, "0000:0b:00.0")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert json.loads(text(fake, STATE_FILE)) == {AUDIO: "snd_hda_intel", "0000:0b:00.0": "snd_hda_intel"}


def test_a_failed_bind_is_undone(fake):
    probe = fake.path("/sys/bus/pci/drivers_probe")
    probe.unlink()
    probe.mkdir()  # the probe write fails (EISDIR) after the override and the unbind were made
    with pytest.raises(HostError) as exc:
        bind(fake.host, AUDIO)
    msg = exc.value.message
    assert msg.startswith(f"writing '{AUDIO}' to /sys/bus/pci/drivers_probe failed: Is a directory")
    assert f"undone: echo > {DEV}/driver_override, echo {AUDIO} > /sys/bus/pci/drivers/snd_hda_intel/bind" in msg
    assert text(fake, f"{DEV}/driver_override") == "\n"
    assert text(fake, "/sys/bus/pci/drivers/snd_hda_intel/bind") == AUDIO
    assert not fake.path(STATE_FILE).exists()


def test_a_failed_first_write_has_nothing_to_undo_and_keeps_earlier_records(fake):
    fake.path(STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
    fake.path(STATE_FILE).write_text(json.dumps({"0000:0a:00.1": "snd_hda_intel"}))
    override = fake.path(f"{DEV}/driver_override")
    override.unlink()
    override.mkdir()
    with pytest.raises(HostError, match="nothing to undo"):
        bind(fake.host, AUDIO)
    assert text(fake, "/sys/bus/pci/drivers/snd_hda_intel/unbind") == ""
    assert json.loads(text(fake, STATE_FILE)) == {"0000:0a:00.1": "snd_hda_intel"}


# --- unbind asks libvirt whether a running domain has the device -----------------------------------


SHARED = "test:///default"  # one in-process test node shared by every connection (a test:///FILE node is not)


def _domain_with_hostdev(uri, name, addr=AUDIO):
    import libvirt

    dom_, bus, slot_fn = addr.split(":")
    slot, fn = slot_fn.split(".")
    conn = libvirt.open(uri)
    dom = conn.defineXML(
        f"<domain type='test'><name>{name}</name><memory>262144</memory><vcpu>1</vcpu><os><type>hvm</type></os>"
        "<devices><hostdev mode='subsystem' type='pci' managed='yes'><source>"
        f"<address domain='0x{dom_}' bus='0x{bus}' slot='0x{slot}' function='0x{fn}'/></source></hostdev>"
        "</devices></domain>")
    return conn, dom


def test_unbind_refuses_while_a_running_domain_has_the_device(fake, unique_name):
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")
    conn, dom = _domain_with_hostdev(SHARED, unique_name)
    try:
        dom.create()
        with pytest.raises(HostError, match=f"the running domain {unique_name} has it"):
            unbind(fake.host, AUDIO, uri=SHARED, in_use=domains_holding)
        assert text(fake, f"{DEV}/driver_override") == "vfio-pci"
        assert json.loads(text(fake, STATE_FILE)) == {AUDIO: "snd_hda_intel"}
        dom.destroy()  # shut off: the device is free
        assert unbind(fake.host, AUDIO, uri=SHARED, in_use=domains_holding)[-1].path == "/sys/bus/pci/drivers/snd_hda_intel/bind"
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        conn.close()


def test_unbind_refuses_when_libvirt_cannot_be_asked_unless_forced(fake, tmp_path):
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")
    nowhere = f"qemu+unix:///system?socket={tmp_path}/none.sock"
    with pytest.raises(HostError, match="cannot ask libvirt .*refusing.*--force"):
        unbind(fake.host, AUDIO, uri=nowhere, in_use=domains_holding)
    assert text(fake, f"{DEV}/driver_override") == "vfio-pci"
    said = []
    assert unbind(fake.host, AUDIO, uri=nowhere, force=True, in_use=domains_holding, say=said.append)
    assert said and said[0].startswith("warning: cannot ask libvirt")
    assert text(fake, f"{DEV}/driver_override") == "\n"


def test_cli_unbind_names_the_domain(fake, unique_name):
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")
    conn, dom = _domain_with_hostdev(SHARED, unique_name)
    try:
        dom.create()
        res = CliRunner().invoke(cli, ["-c", SHARED, "vfio", "unbind", AUDIO, "--host-root", str(fake.root)])
    finally:
        dom.destroy()
        dom.undefine()
        conn.close()
    assert res.exit_code == 1
    assert res.stderr.strip() == (f"Error: refusing to unbind {AUDIO}: the running domain {unique_name} has "
                                  f"it (virsh shutdown {unique_name}, then vfio unbind again)")
