"""Host-critical PCI devices on fake host trees: the storage of /, /boot, /usr, /var, swap and the
libvirt image store (through /dev/root, ZFS, device mapper), and NICs carrying SSH without the
default route. ``vfio bind`` and the vfio.critical check refuse them."""

from __future__ import annotations

from pathlib import Path

import pytest

from archdsp_libvirt.errors import HostError
from archdsp_libvirt.host.critical import critical_devices, ssh_interfaces, storage_devices
from archdsp_libvirt.host.vfio import bind
from test_hostcheck import FakeHost, check

NVME = "0000:01:00.0"  # the default tree's root disk controller
SATA = "0000:03:00.0"
SATA2 = "0000:04:00.0"
NIC2 = "0000:05:00.0"


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    f = FakeHost(tmp_path / "host")
    f.path("/sys/bus/pci/drivers/vfio-pci").mkdir(parents=True, exist_ok=True)
    f.file("/sys/bus/pci/drivers_probe", "")
    for addr in (SATA, SATA2):
        f.pci(addr, cls=0x010601, vd="1022:7901", driver="ahci", group=addr[5:7])
    return f


def disk(fake: FakeHost, ctrl: str, name: str, majmin: str, part: str | None = None, part_majmin: str | None = None):
    base = f"{ctrl}/ata1/host0/target0:0:0/0:0:0:0/block/{name}"
    fake.block(name, base)
    fake.file(f"/sys/class/block/{name}/dev", majmin + "\n")
    fake.link(f"/sys/dev/block/{majmin}", f"/sys/devices/pci0000:00/{base}")
    if part:
        fake.block(part, f"{base}/{part}")
        fake.file(f"/sys/class/block/{part}/dev", part_majmin + "\n")
        fake.link(f"/sys/dev/block/{part_majmin}", f"/sys/devices/pci0000:00/{base}/{part}")


def test_boot_usr_and_var_on_other_controllers_are_critical(fake):
    disk(fake, SATA, "sda", "8:0", "sda1", "8:1")
    disk(fake, SATA2, "sdb", "8:16", "sdb1", "8:17")
    fake.add_mount("/dev/sda1 /boot ext4 rw 0 0")
    fake.add_mount("/dev/sdb1 /var ext4 rw 0 0")
    found = storage_devices(fake.host)
    assert found[SATA] == "storage controller of /boot (/dev/sda1)"
    assert found[SATA2] == "storage controller of /var (/dev/sdb1)"
    assert found[NVME] == "storage controller of the root filesystem (/dev/nvme0n1p2)"
    with pytest.raises(HostError, match=r"refusing to bind 0000:03:00.0 to vfio-pci: it is the storage controller of /boot"):
        bind(fake.host, SATA)


def test_swap_partitions_and_swap_files_are_critical(fake):
    disk(fake, SATA, "sda", "8:0", "sda2", "8:2")
    fake.file("/proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n"
                             "/dev/sda2                               partition\t8388604\t0\t-2\n"
                             "/swapfile                               file\t\t1048572\t0\t-3\n")
    found = storage_devices(fake.host)
    assert found[SATA] == "storage controller of swap (/dev/sda2)"
    assert NVME in found  # the root filesystem's, which also holds /swapfile


def test_a_swap_file_on_its_own_filesystem(fake):
    disk(fake, SATA, "sda", "8:0", "sda1", "8:1")
    fake.add_mount("/dev/sda1 /srv ext4 rw 0 0")
    fake.file("/proc/swaps", "Filename\tType\tSize\tUsed\tPriority\n/srv/swap file 1048572 0 -2\n")
    assert storage_devices(fake.host)[SATA] == "storage controller of swap (/srv/swap)"


def test_the_libvirt_image_store_is_critical(fake):
    disk(fake, SATA, "sda", "8:0", "sda1", "8:1")
    fake.add_mount("/dev/sda1 /var/lib/libvirt ext4 rw 0 0")  # the store lives below this mount
    found = storage_devices(fake.host)
    assert found[SATA] == "storage controller of the libvirt image store /var/lib/libvirt/images (/dev/sda1)"
    assert SATA2 not in found


def test_dev_root_is_resolved_through_mountinfo(fake):
    disk(fake, SATA, "sda", "8:0", "sda3", "8:3")
    fake.mounts("/dev/root / ext4 rw 0 0")
    fake.file("/proc/self/mountinfo", "27 1 8:3 / / rw,relatime - ext4 /dev/root rw\n"
                                      "22 27 0:21 / /proc rw,relatime - proc proc rw\n")
    assert storage_devices(fake.host) == {SATA: "storage controller of the root filesystem (/dev/root)"}


def test_dev_root_is_resolved_through_the_kernel_command_line(fake):
    disk(fake, SATA, "sda", "8:0", "sda3", "8:3")
    fake.mounts("/dev/root / ext4 rw 0 0")
    fake.cmdline("BOOT_IMAGE=/vmlinuz root=PARTUUID=4f68bce3-03 ro quiet")
    fake.file("/dev/sda3", "")
    fake.link("/dev/disk/by-partuuid/4f68bce3-03", "/dev/sda3")
    assert set(storage_devices(fake.host)) == {SATA}


def zfs_member(fake: FakeHost, majmin: str, pool: str) -> None:
    fake.file(f"/run/udev/data/b{majmin}", f"S:disk/by-id/x\nE:ID_FS_TYPE=zfs_member\nE:ID_FS_LABEL={pool}\n")


def test_root_on_zfs_finds_the_pools_disks(fake):
    disk(fake, SATA, "sda", "8:0", "sda2", "8:2")
    disk(fake, SATA2, "sdb", "8:16", "sdb1", "8:17")
    zfs_member(fake, "8:2", "rpool")
    zfs_member(fake, "8:17", "tank")  # another pool: not the root's
    fake.mounts("rpool/ROOT/debian / zfs rw,xattr,posixacl 0 0")
    found = storage_devices(fake.host)
    assert found == {SATA: "storage controller of the root filesystem (rpool/ROOT/debian)"}


def test_root_on_zfs_without_udev_data_keeps_every_storage_controller(fake):
    disk(fake, SATA, "sda", "8:0")
    fake.mounts("rpool/ROOT/debian / zfs rw 0 0")
    found = storage_devices(fake.host)
    assert set(found) == {NVME, SATA}
    assert "ZFS pool rpool" in found[SATA]


# --- NICs carrying SSH --------------------------------------------------------------------------------

ROUTES = ("Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
          "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
          "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
          "eth1\t0000000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n")
TCP_HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def second_nic(fake: FakeHost) -> None:
    fake.pci("0000:00:05.0", cls=0x060400, vd="1022:14ee", driver="pcieport", group="12")
    fake.pci(NIC2, cls=0x020000, vd="8086:15b8", driver="e1000e", group="13", parent="0000:00:05.0")
    fake.net("eth1", "0000:00:05.0/0000:05:00.0/net/eth1")
    fake.file("/proc/net/route", ROUTES)


def test_a_nic_with_an_ssh_session_and_no_default_route_is_critical(fake):
    second_nic(fake)
    fake.file("/proc/net/tcp", TCP_HEAD +
              "   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 100 1\n"  # listening
              "   1: 0500000A:0016 0200000A:D431 01 00000000:00000000 02:0009E1A8 00000000 0 0 101 4\n")
    assert ssh_interfaces(fake.host) == ["eth1"]
    assert critical_devices(fake.host)[NIC2] == "NIC carrying an SSH session (eth1)"
    with pytest.raises(HostError, match="it is the NIC carrying an SSH session"):
        bind(fake.host, NIC2)


def test_ssh_over_ipv6_and_ipv4_mapped(fake):
    second_nic(fake)
    fake.file("/proc/net/if_inet6", "20010db8000000000000000000000005 03 40 00 80     eth1\n"
                                    "00000000000000000000000000000001 01 80 10 80       lo\n")
    fake.file("/proc/net/tcp6", TCP_HEAD +
              "   0: B80D0120000000000000000005000000:0016 B80D0120000000000000000009000000:C350 01 0 0 0 0 0 1\n")
    assert ssh_interfaces(fake.host) == ["eth1"]
    fake.file("/proc/net/tcp6", TCP_HEAD +
              "   0: 0000000000000000FFFF00000500000A:0016 0000000000000000FFFF00000200000A:C350 01 0 0 0 0 0 1\n")
    assert ssh_interfaces(fake.host) == ["eth1"]


def test_no_ssh_session_leaves_the_second_nic_free(fake):
    second_nic(fake)
    fake.file("/proc/net/tcp", TCP_HEAD +
              "   0: 0500000A:1F90 0200000A:D431 01 00000000:00000000 00:00000000 00000000 0 0 101 4\n")  # port 8080
    assert NIC2 not in critical_devices(fake.host)


def test_the_check_refuses_a_group_holding_the_boot_controller(fake):
    disk(fake, SATA, "sda", "8:0", "sda1", "8:1")
    fake.add_mount("/dev/sda1 /boot ext4 rw 0 0")
    fake.set_group(SATA, "7")  # the audio device's group
    f = check(fake)["vfio.critical"]
    assert f.status == "fail" and "storage controller of /boot (/dev/sda1)" in f.observed
