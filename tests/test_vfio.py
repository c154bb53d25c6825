"""VFIO helpers on fake host trees: show, bind, unbind, with and without --dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.errors import HostError, UsageError
from archdsp_libvirt.host.vfio import STATE_FILE, SysfsWrite, bind, show, unbind
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


def test_unbind_restores_the_remembered_driver(fake):
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")  # what the kernel did after drivers_probe
    expected = [
        SysfsWrite(f"{DEV}/driver_override", "\n"),
        SysfsWrite("/sys/bus/pci/drivers/vfio-pci/unbind", AUDIO),
        SysfsWrite("/sys/bus/pci/drivers/snd_hda_intel/bind", AUDIO),
    ]
    assert unbind(fake.host, AUDIO, dry_run=True) == expected
    assert fake.path(STATE_FILE).exists()
    assert unbind(fake.host, AUDIO) == expected
    assert text(fake, f"{DEV}/driver_override") == "\n"
    assert text(fake, "/sys/bus/pci/drivers/snd_hda_intel/bind") == AUDIO
    assert not fake.path(STATE_FILE).exists()


def test_unbind_without_a_record_lets_the_kernel_probe(fake):
    fake.set_driver(AUDIO, "vfio-pci")
    assert unbind(fake.host, AUDIO, dry_run=True)[-1] == SysfsWrite("/sys/bus/pci/drivers_probe", AUDIO)


def test_unbind_of_a_device_that_had_no_driver_leaves_it_without(fake):
    fake.set_driver(AUDIO, None)
    bind(fake.host, AUDIO)
    fake.set_driver(AUDIO, "vfio-pci")
    assert [w.path for w in unbind(fake.host, AUDIO)] == [
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
