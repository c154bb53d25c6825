"""Host preflight on fake host trees: the pass and the fail case of every check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.config import parse_config
from archdsp_libvirt.errors import UsageError
from archdsp_libvirt.host.checks import (
    CHECK_IDS,
    MEMLOCK_FIX,
    Finding,
    failures,
    findings_json,
    format_findings,
    preflight,
    run_checks,
)
from archdsp_libvirt.host.critical import root_storage_devices
from archdsp_libvirt.host.files import Host, split_cmdline

GOOD_CMDLINE = ("BOOT_IMAGE=/vmlinuz root=/dev/nvme0n1p2 ro amd_iommu=on iommu=pt isolcpus=2-3 "
                "nohz_full=2-3 rcu_nocbs=2,3 threadirqs hugepagesz=2M hugepages=1024 skew_tick=1 irqaffinity=0-1 -- single")
ALL_CAPS = "000001ffffffffff"
NO_RESOURCE = "000001fffeffffff"  # every capability but CAP_SYS_RESOURCE (24), as on the CI machine
NO_NICE_NO_RESOURCE = "000001fffe7fffff"


class FakeHost:
    """A fake host tree under ``root``: sysfs, procfs, /dev and /etc as plain files and relative links.

    The default tree is a 4-core AMD host (SMT pairs 0-1 and 2-3, cores 2-3 isolated) on which
    every check passes for :data:`GOOD`: IOMMU on, 1024 free 2 MiB pages, cgroup v2, unlimited
    memlock, an HD audio controller 0000:00:1b.0 alone in IOMMU group 7 and a second one for the host;
    no RT throttling, ksoftirqd and rcuc of cores 2-3 at FIFO 2 and 4, a vfio-msi IRQ thread at FIFO 50,
    device IRQs on 0-1, KVM (kvm_amd) tuned as tuned's realtime-virtual-host does, THP never, KSM off,
    deep C-states of 2-3 disabled, no timer migration, no NMI watchdog, no tuned, no irqbalance.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = Host(root)
        self.file("/proc/cpuinfo", "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD Ryzen 7 7840U\n")
        self.cmdline(GOOD_CMDLINE)
        self.file("/sys/devices/system/cpu/online", "0-3\n")
        self.file("/sys/devices/system/cpu/possible", "0-3\n")
        self.file("/sys/devices/system/cpu/isolated", "2-3\n")
        self.file("/sys/devices/system/cpu/smt/control", "on\n")
        for cpu, siblings in ((0, "0-1"), (1, "0-1"), (2, "2-3"), (3, "2-3")):
            self.file(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", siblings + "\n")
            self.file(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor", "performance\n")
        self.file("/dev/kvm", "")
        os.chmod(self.path("/dev/kvm"), 0o660)
        gid = os.stat(self.path("/dev/kvm")).st_gid
        self.file("/etc/group", f"kvm:x:{gid}:libvirt-qemu\n")
        self.file("/etc/passwd", "libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n")
        self.file("/etc/libvirt/qemu.conf", '# stock\n#user = "libvirt-qemu"\n')
        self.file("/var/lib/libvirt/images/archibaldos-dsp.qcow2", "QFI\xfb")  # the default disk image
        self.file("/proc/meminfo", "MemTotal:       16318372 kB\nHugepagesize:       2048 kB\n")  # 15935 MiB
        self.hugepages(2048, nr=1024, free=1024)
        self.mounts(
            "/dev/nvme0n1p2 / ext4 rw,relatime 0 0",
            "proc /proc proc rw 0 0",
            "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0",
            "hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0",
        )
        self.limits(memlock="unlimited", rtprio="0")
        self.caps(ALL_CAPS)
        self.file("/proc/net/route",
                  "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
                  "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
                  "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
                  "virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n")
        # Devices: root bridge ports, the NVMe with /, the NIC with the default route, two audio controllers.
        self.pci("0000:00:01.0", cls=0x060400, vd="1022:14ee", driver="pcieport", group="1")
        self.pci("0000:01:00.0", cls=0x010802, vd="144d:a808", driver="nvme", group="2", parent="0000:00:01.0")
        self.block("nvme0n1p2", "0000:00:01.0/0000:01:00.0/nvme/nvme0/nvme0n1/nvme0n1p2")
        self.pci("0000:00:02.0", cls=0x060400, vd="1022:14ee", driver="pcieport", group="3")
        self.pci("0000:02:00.0", cls=0x020000, vd="10ec:8168", driver="r8169", group="4", parent="0000:00:02.0")
        self.net("eth0", "0000:00:02.0/0000:02:00.0/net/eth0")
        self.pci("0000:00:1b.0", cls=0x040300, vd="1022:15e3", driver="snd_hda_intel", group="7")
        self.pci("0000:0a:00.1", cls=0x040300, vd="1002:1640", driver="snd_hda_intel", group="9")
        self.file("/proc/sys/kernel/sched_rt_runtime_us", "-1\n")
        self.file("/proc/sys/kernel/sched_rt_period_us", "1000000\n")
        for cpu in range(4):
            self.proc(10 + cpu, f"ksoftirqd/{cpu}", policy=1 if cpu >= 2 else 0, prio=2 if cpu >= 2 else 0,
                      allowed=str(cpu))
            self.proc(20 + cpu, f"rcuc/{cpu}", policy=1, prio=4 if cpu >= 2 else 1, allowed=str(cpu))
        self.proc(30, "irq/45-vfio-msi", policy=1, prio=50, allowed="0-1")
        self.irq(24, "ahci", "0-1")
        self.irq(25, "eth0", "0-1")
        self.irq(26, None, "0-3")  # no handler: no device uses it
        for name, value in (("halt_poll_ns", "0"), ("kvmclock_periodic_sync", "N"), ("nx_huge_pages", "N")):
            self.file(f"/sys/module/kvm/parameters/{name}", value + "\n")
        self.file("/sys/module/kvm_amd/parameters/pause_filter_count", "0\n")
        self.file("/sys/devices/system/cpu/vulnerabilities/itlb_multihit", "Not affected\n")
        self.file("/sys/kernel/mm/transparent_hugepage/enabled", "always madvise [never]\n")
        self.file("/sys/kernel/mm/ksm/run", "0\n")
        self.file("/proc/sys/kernel/timer_migration", "0\n")
        self.file("/proc/sys/kernel/nmi_watchdog", "0\n")
        for cpu in range(4):
            for state, (name, latency) in enumerate((("POLL", 0), ("C1", 1), ("C6", 100))):
                self.cstate(cpu, state, name, latency, disabled=cpu >= 2 and latency > 10)

    # --- building blocks -----------------------------------------------------

    def proc(self, pid: int, comm: str, policy: int = 0, prio: int = 0, allowed: str = "0-3", nice: int = 0,
             start: int = 100) -> None:
        """A process as /proc shows it: comm, stat (nice, start time, RT priority and policy), status."""
        fields = ["0"] * 53
        fields[1], fields[2], fields[3] = str(pid), f"({comm})", "S"
        fields[19], fields[22], fields[40], fields[41] = str(nice), str(start), str(prio), str(policy)
        self.file(f"/proc/{pid}/comm", comm + "\n")
        self.file(f"/proc/{pid}/stat", " ".join(fields[1:]) + "\n")
        self.file(f"/proc/{pid}/status", f"Name:\t{comm}\nCpus_allowed_list:\t{allowed}\n")

    def irq(self, n: int, handler: str | None, cpus: str) -> None:
        self.file(f"/proc/irq/{n}/smp_affinity_list", cpus + "\n")
        self.file(f"/proc/irq/{n}/node", "0\n")
        if handler:
            self.path(f"/proc/irq/{n}/{handler}").mkdir(parents=True, exist_ok=True)

    def cstate(self, cpu: int, state: int, name: str, latency: int, disabled: bool = False) -> None:
        base = f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state{state}"
        self.file(f"{base}/name", name + "\n")
        self.file(f"{base}/latency", f"{latency}\n")
        self.file(f"{base}/disable", f"{int(disabled)}\n")

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    @property
    def model(self):
        """The host model of this tree, as a command on this machine builds it (libvirt not asked)."""
        from archdsp_libvirt.virt.hostfacts import gather

        return gather(None, files=self.host)

    def file(self, p: str, text: str) -> None:
        path = self.path(p)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def remove(self, p: str) -> None:
        path = self.path(p)
        if path.is_symlink() or path.is_file():
            path.unlink()

    def link(self, p: str, target: str) -> None:
        """A relative symlink at ``p`` to the tree's ``target`` (as sysfs makes them)."""
        path = self.path(p)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        os.symlink(os.path.relpath(self.path(target), path.parent), path)

    def cmdline(self, text: str) -> None:
        self.file("/proc/cmdline", text + "\n")

    def mounts(self, *lines: str) -> None:
        self.file("/proc/mounts", "".join(line + "\n" for line in lines))

    def add_mount(self, line: str) -> None:
        self.file("/proc/mounts", (self.path("/proc/mounts").read_text()) + line + "\n")

    def hugepages(self, kib: int, nr: int, free: int) -> None:
        self.file(f"/sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages", f"{nr}\n")
        self.file(f"/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages", f"{free}\n")

    def limits(self, memlock: str, rtprio: str) -> None:
        self.file("/proc/self/limits",
                  "Limit                     Soft Limit           Hard Limit           Units     \n"
                  f"Max locked memory         {memlock:<20} {memlock:<20} bytes     \n"
                  f"Max realtime priority     {rtprio:<20} {rtprio:<20}           \n")

    def caps(self, eff: str) -> None:
        self.file("/proc/self/status", f"Name:\tpython3\nCapPrm:\t{eff}\nCapEff:\t{eff}\n")

    def pci(self, addr: str, cls: int, vd: str, driver: str | None, group: str | None,
            parent: str | None = None) -> None:
        dev = f"/sys/devices/pci0000:00/{parent + '/' if parent else ''}{addr}"
        if parent and self.path(f"/sys/bus/pci/devices/{parent}").exists():
            dev = f"/sys/devices/pci0000:00/{self._devpath(parent)}/{addr}"
        vendor, device = vd.split(":")
        self.file(f"{dev}/vendor", f"0x{vendor}\n")
        self.file(f"{dev}/device", f"0x{device}\n")
        self.file(f"{dev}/class", f"0x{cls:06x}\n")
        self.file(f"{dev}/driver_override", "(null)\n")
        self.link(f"/sys/bus/pci/devices/{addr}", dev)
        self.set_driver(addr, driver)
        self.set_group(addr, group)

    def _devpath(self, addr: str) -> str:
        real = os.path.realpath(self.path(f"/sys/bus/pci/devices/{addr}"))
        return os.path.relpath(real, self.path("/sys/devices/pci0000:00"))

    def dev(self, addr: str) -> str:
        return f"/sys/devices/pci0000:00/{self._devpath(addr)}"

    def set_driver(self, addr: str, driver: str | None) -> None:
        self.remove(f"{self.dev(addr)}/driver")
        if driver:
            self.path(f"/sys/bus/pci/drivers/{driver}").mkdir(parents=True, exist_ok=True)
            self.link(f"{self.dev(addr)}/driver", f"/sys/bus/pci/drivers/{driver}")

    def set_group(self, addr: str, group: str | None) -> None:
        old = self.host.link_name(f"{self.dev(addr)}/iommu_group")
        if old:
            self.remove(f"/sys/kernel/iommu_groups/{old}/devices/{addr}")
        self.remove(f"{self.dev(addr)}/iommu_group")
        if group:
            self.link(f"{self.dev(addr)}/iommu_group", f"/sys/kernel/iommu_groups/{group}")
            self.link(f"/sys/kernel/iommu_groups/{group}/devices/{addr}", self.dev(addr))

    def no_iommu(self) -> None:
        """The IOMMU off: no groups, no iommu_group links."""
        for group in self.host.listdir("/sys/kernel/iommu_groups"):
            for member in self.host.listdir(f"/sys/kernel/iommu_groups/{group}/devices"):
                self.set_group(member, None)
            os.rmdir(self.path(f"/sys/kernel/iommu_groups/{group}/devices"))
            os.rmdir(self.path(f"/sys/kernel/iommu_groups/{group}"))

    def block(self, name: str, below: str) -> None:
        target = f"/sys/devices/pci0000:00/{below}"
        self.path(target).mkdir(parents=True, exist_ok=True)
        self.link(f"/sys/class/block/{name}", target)

    def net(self, iface: str, below: str) -> None:
        target = f"/sys/devices/pci0000:00/{below}"
        self.path(target).mkdir(parents=True, exist_ok=True)
        self.link(f"/sys/class/net/{iface}", target)


GOOD = {
    "isolated_cores": [2, 3],
    "memory_mb": 2048,
    "hugepages": 1024,
    "audio_device": {"enable": True, "pci_id": "0000:00:1b.0", "vendor_device": "1022:15e3"},
    "archibaldos": {"netjack": {"enable": True}},
}


def cfg(**over):
    data = json.loads(json.dumps(GOOD))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    return parse_config(data)


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


def by_id(findings: list[Finding]) -> dict[str, Finding]:
    return {f.id: f for f in findings}


def check(fake: FakeHost, config=None, reachable: bool | None = True) -> dict[str, Finding]:
    return by_id(run_checks(config or cfg(), fake.model, reachable))


def test_the_good_host_passes_every_check(fake):
    found = run_checks(cfg(), fake.model, True)
    assert [f.id for f in found] == list(CHECK_IDS)
    assert {f.id: f.status for f in found} == {i: "ok" for i in CHECK_IDS}
    assert all(f.fix == "" for f in found)
    assert failures(found) == []


def test_every_finding_that_is_not_ok_says_how_to_fix_it(fake):
    fake.cmdline("quiet")
    fake.file("/sys/devices/system/cpu/isolated", "\n")
    found = run_checks(cfg(), fake.model, False)
    for f in found:
        if f.status in ("warn", "fail"):
            assert f.fix, f


# --- kvm and libvirt --------------------------------------------------------


def test_kvm_missing_fails_with_the_vendor_module(fake):
    fake.remove("/dev/kvm")
    f = check(fake, cfg(domain_type="kvm"))["kvm.device"]
    assert f.status == "fail" and "modprobe kvm_amd" in f.fix


def test_auto_without_kvm_picks_tcg_and_says_why(fake):
    fake.remove("/dev/kvm")
    found = check(fake)  # domain_type = "auto", the default
    assert found["kvm.device"].status == "skip"
    accel = found["kvm.accel"]
    assert accel.status == "warn" and accel.fix
    assert accel.observed.startswith("auto picks TCG: no KVM here (no /dev/kvm); running under TCG")


def test_auto_on_nested_pvm_picks_tcg_and_says_why(fake):
    fake.file("/sys/module/kvm_pvm/refcnt", "0\n")  # the module is loaded: /dev/kvm is PVM
    found = check(fake)
    assert found["kvm.device"].status == "skip"
    assert found["kvm.accel"].status == "warn"
    assert ("auto picks TCG: KVM here is nested PVM: stock kernels cannot boot; running under TCG, software "
            "emulation: expect xruns") in found["kvm.accel"].observed


def test_auto_on_hardware_kvm_picks_kvm(fake):
    found = check(fake)
    assert found["kvm.device"].status == "ok"
    assert found["kvm.accel"].status == "ok"
    assert found["kvm.accel"].observed == "auto picks KVM: /dev/kvm present, not nested PVM (no kvm_pvm module)"


def test_explicit_kvm_on_nested_pvm_warns_but_stays_kvm(fake):
    fake.file("/sys/module/kvm_pvm/refcnt", "0\n")
    found = check(fake, cfg(domain_type="kvm"))
    assert found["kvm.device"].status == "ok"  # the device is there; what boots under it is the warning
    assert found["kvm.accel"].status == "warn" and "nested PVM" in found["kvm.accel"].observed
    assert "domain_type = \"auto\"" in found["kvm.accel"].fix


def test_kvm_root_only_fails_with_chmod(fake):
    os.chmod(fake.path("/dev/kvm"), 0o600)
    f = check(fake)["kvm.device"]
    assert f.status == "fail"
    assert f.fix == "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"
    assert "0600" in f.observed


def test_kvm_group_not_kvm_but_world_rw_is_ok(fake):
    fake.file("/etc/group", "")
    os.chmod(fake.path("/dev/kvm"), 0o666)
    assert check(fake)["kvm.device"].status == "ok"


def test_kvm_group_rw_for_another_group_fails_unless_qemu_user_is_a_member(fake):
    gid = os.stat(fake.path("/dev/kvm")).st_gid
    fake.file("/etc/group", f"video:x:{gid}:\n")
    assert check(fake)["kvm.device"].status == "fail"
    fake.file("/etc/group", f"video:x:{gid}:someone,libvirt-qemu\n")
    assert check(fake)["kvm.device"].status == "ok"


def test_kvm_is_skipped_for_tcg(fake):
    fake.remove("/dev/kvm")
    assert check(fake, cfg(domain_type="qemu"))["kvm.device"].status == "skip"


def test_libvirt_reachable_is_the_callers_verdict(fake):
    assert check(fake, reachable=True)["libvirt.reachable"].status == "ok"
    f = check(fake, reachable=False)["libvirt.reachable"]
    assert f.status == "fail" and "libvirtd" in f.fix
    assert check(fake, reachable=None)["libvirt.reachable"].status == "skip"


# --- IOMMU ------------------------------------------------------------------


def test_iommu_off_fails_with_passthrough(fake):
    fake.cmdline("quiet isolcpus=2-3 nohz_full=2-3 rcu_nocbs=2-3 threadirqs")
    fake.no_iommu()
    found = check(fake)
    assert found["iommu.param"].status == "fail" and found["iommu.param"].fix == "kernel parameter amd_iommu=on"
    assert found["iommu.groups"].status == "fail"
    assert found["iommu.pt"].status == "warn" and found["iommu.pt"].fix == "kernel parameter iommu=pt"
    assert found["vfio.group"].status == "fail" and "no iommu_group" in found["vfio.group"].observed
    # Without passthrough the same host only warns.
    quiet = check(fake, cfg(audio_device={"enable": False}))
    assert quiet["iommu.param"].status == "warn" and quiet["iommu.groups"].status == "warn"


def test_iommu_param_follows_the_cpu_vendor(fake):
    fake.file("/proc/cpuinfo", "vendor_id\t: GenuineIntel\n")
    fake.no_iommu()
    f = check(fake)["iommu.param"]
    assert f.status == "fail" and f.expected == "intel_iommu=on"
    fake.cmdline(GOOD_CMDLINE.replace("amd_iommu=on", "intel_iommu=on,sm_on"))
    assert check(fake)["iommu.param"].status == "ok"


def test_amd_iommu_active_without_the_parameter_is_ok(fake):
    fake.cmdline(GOOD_CMDLINE.replace("amd_iommu=on ", ""))
    f = check(fake)["iommu.param"]
    assert f.status == "ok" and "active" in f.observed


# --- CPU isolation ----------------------------------------------------------


def test_a_core_that_does_not_exist_fails(fake):
    f = check(fake, cfg(isolated_cores=[3, 7]))["cpu.online"]
    assert f.status == "fail"
    assert "no core 7" in f.observed and "0-3" in f.fix


def test_an_offline_core_fails_with_the_command_to_online_it(fake):
    fake.file("/sys/devices/system/cpu/online", "0-2\n")
    f = check(fake)["cpu.online"]
    assert f.status == "fail"
    assert f.fix == "echo 1 > /sys/devices/system/cpu/cpu3/online"


def test_emulator_cores_must_exist_too(fake):
    assert check(fake, cfg(emulator_cores=[9]))["cpu.online"].status == "fail"


def test_vhost_cores_must_exist_too(fake):
    f = check(fake, cfg(realtime={"vhost_cores": [9]}))["cpu.online"]
    assert f.status == "fail" and "no core 9" in f.observed and "realtime.vhost_cores" in f.fix


def test_cores_not_isolated_by_the_kernel_warn(fake):
    fake.file("/sys/devices/system/cpu/isolated", "\n")
    f = check(fake)["cpu.isolated"]
    assert f.status == "warn" and f.fix == "kernel parameter isolcpus=2-3"


def test_nohz_full_rcu_nocbs_and_threadirqs_must_cover_the_cores(fake):
    fake.cmdline("root=/dev/nvme0n1p2 amd_iommu=on iommu=pt nohz_full=2 rcu_nocbs=1-3")
    found = check(fake)
    assert found["cpu.nohz_full"].status == "warn"
    assert found["cpu.nohz_full"].fix == "kernel parameter nohz_full=2-3"
    assert found["cpu.rcu_nocbs"].status == "ok"
    assert found["cpu.threadirqs"].status == "warn" and found["cpu.threadirqs"].fix == "kernel parameter threadirqs"


def test_parameters_after_the_double_dash_belong_to_init(fake):
    fake.cmdline("root=/dev/nvme0n1p2 -- threadirqs")
    assert check(fake)["cpu.threadirqs"].status == "warn"
    assert split_cmdline('a="b c" d -- e') == ["a=b c", "d"]


def test_no_housekeeping_core_fails_with_realtime_and_warns_without(fake):
    fake.file("/sys/devices/system/cpu/isolated", "\n")
    every = cfg(isolated_cores=[0, 1, 2, 3])
    f = check(fake, every)["cpu.housekeeping"]
    assert f.status == "fail" and "leave at least one" in f.fix
    no_rt = cfg(isolated_cores=[0, 1, 2, 3], realtime={"enable": False})
    assert check(fake, no_rt)["cpu.housekeeping"].status == "warn"


def test_kernel_isolated_cores_do_not_count_as_housekeeping(fake):
    fake.file("/sys/devices/system/cpu/isolated", "0-3\n")
    assert check(fake)["cpu.housekeeping"].status == "fail"


def test_smt_siblings_not_isolated_warn(fake):
    # Cores pair up 0+2 and 1+3: the VM's cores 2-3 share with the host's 0-1.
    for cpu, siblings in ((0, "0,2"), (1, "1,3"), (2, "0,2"), (3, "1,3")):
        fake.file(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", siblings + "\n")
    f = check(fake)["cpu.smt"]
    assert f.status == "warn"
    assert "core 2 shares with 0" in f.observed and "core 3 shares with 1" in f.observed
    assert "isolcpus=0-3" in f.fix and "smt/control" in f.fix


def test_smt_off_is_ok_whatever_the_siblings(fake):
    for cpu in (2, 3):
        fake.file(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", "0-3\n")
    fake.file("/sys/devices/system/cpu/smt/control", "off\n")
    assert check(fake)["cpu.smt"].status == "ok"


def test_governor_warns_unless_performance(fake):
    fake.file("/sys/devices/system/cpu/cpu3/cpufreq/scaling_governor", "powersave\n")
    f = check(fake)["cpu.governor"]
    assert f.status == "warn" and "cpu3 powersave" in f.observed
    assert f.fix.startswith("for c in 3; do echo performance >")


def test_governor_skipped_without_cpufreq(fake):
    for cpu in (2, 3):
        fake.remove(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_governor")
    assert check(fake)["cpu.governor"].status == "skip"


# --- the host's RAM ----------------------------------------------------------


def test_memory_mb_beyond_the_hosts_ram_fails(fake):
    f = check(fake, cfg(memory_mb=16 * 1024 * 1024, hugepages=0))["memory.size"]  # 16 TiB on a 16 GiB host
    assert f.status == "fail"
    assert f.observed == "memory_mb = 16777216 of 15935 MiB on this host: more than the host has"
    assert f.fix == "set memory_mb <= 14911"


def test_memory_mb_leaving_the_host_too_little_warns(fake):
    f = check(fake, cfg(memory_mb=15000, hugepages=0))["memory.size"]
    assert f.status == "warn" and "the host keeps 935 MiB" in f.observed and f.fix


def test_memory_size_reads_memtotal_from_the_tree(fake):
    fake.file("/proc/meminfo", "MemTotal:        1048576 kB\n")  # a 1 GiB host
    assert check(fake)["memory.size"].status == "fail"  # GOOD asks 2048 MiB
    fake.file("/proc/meminfo", "Hugepagesize:       2048 kB\n")
    f = check(fake)["memory.size"]
    assert f.status == "skip" and "MemTotal" in f.observed


# --- hugepages --------------------------------------------------------------


def test_too_few_free_hugepages_fail_with_the_pool_size_to_set(fake):
    fake.hugepages(2048, nr=1024, free=100)
    f = check(fake)["hugepages.free"]
    assert f.status == "fail" and "100 of 1024 free" in f.observed
    # 924 pages are taken; 1024 more must be free.
    assert f.fix == "echo 1948 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"


def test_hugetlbfs_must_be_mounted_for_the_page_size(fake):
    fake.mounts("/dev/nvme0n1p2 / ext4 rw 0 0", "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0")
    f = check(fake)["hugepages.mount"]
    assert f.status == "fail" and "mount -t hugetlbfs -o pagesize=2M hugetlbfs /dev/hugepages" in f.fix
    fake.add_mount("hugetlbfs /dev/hugepages1G hugetlbfs rw,pagesize=1024M 0 0")
    assert check(fake)["hugepages.mount"].status == "fail"
    fake.add_mount("hugetlbfs /mnt/huge hugetlbfs rw,relatime 0 0")  # default page size (2M)
    assert check(fake)["hugepages.mount"].status == "ok"


def test_1g_pages_without_a_pool_fail(fake):
    f = check(fake, cfg(hugepages=2, hugepage_size="1G"))["hugepages.free"]
    assert f.status == "fail" and "not supported" in f.observed


def test_hugepages_skipped_when_not_asked(fake):
    fake.hugepages(2048, nr=0, free=0)
    found = check(fake, cfg(hugepages=0))
    assert found["hugepages.free"].status == found["hugepages.mount"].status == "skip"


# --- locked memory and real-time ---------------------------------------------


def test_memlock_fails_like_on_the_ci_machine(fake):
    fake.limits(memlock="8388608", rtprio="0")
    fake.caps(NO_RESOURCE)
    f = check(fake)["memlock.limit"]
    assert f.status == "fail"
    assert f.fix == MEMLOCK_FIX
    assert "8 MiB" in f.observed and "3072 MiB" in f.expected


def test_memlock_ok_with_cap_sys_resource_or_a_high_limit(fake):
    fake.limits(memlock="8388608", rtprio="0")
    assert check(fake)["memlock.limit"].status == "ok"  # CAP_SYS_RESOURCE
    fake.caps(NO_RESOURCE)
    fake.limits(memlock=str(3072 * 1024 * 1024), rtprio="0")
    assert check(fake)["memlock.limit"].status == "ok"
    fake.limits(memlock="8388608", rtprio="0")
    assert check(fake, cfg(realtime={"mlock": False}))["memlock.limit"].status == "skip"


def cgroup_v1(fake: FakeHost, machine: str | None) -> None:
    fake.mounts("/dev/nvme0n1p2 / ext4 rw 0 0",
                "tmpfs /sys/fs/cgroup tmpfs rw 0 0",
                "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0",
                "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0",
                "hugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0")
    fake.file("/sys/fs/cgroup/cpu,cpuacct/cpu.rt_runtime_us", "950000\n")
    if machine is not None:
        fake.file("/sys/fs/cgroup/cpu,cpuacct/machine/cpu.rt_runtime_us", machine + "\n")


def test_cgroup_v1_without_rt_budget_fails(fake):
    cgroup_v1(fake, machine="0")
    f = check(fake)["rt.cgroup"]
    assert f.status == "fail"
    assert "machine/cpu.rt_runtime_us = 0" in f.observed
    assert 'cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ]' in f.fix


def test_cgroup_v1_machine_cgroup_not_created_yet_fails(fake):
    cgroup_v1(fake, machine=None)
    f = check(fake)["rt.cgroup"]
    assert f.status == "fail" and "not created yet" in f.observed


def test_cgroup_v1_with_budget_only_warns(fake):
    cgroup_v1(fake, machine="500000")
    assert check(fake)["rt.cgroup"].status == "warn"


def test_cgroup_v1_fixed_by_leaving_cpu_out_of_libvirts_controllers(fake):
    cgroup_v1(fake, machine="0")
    fake.file("/etc/libvirt/qemu.conf",
              '#cgroup_controllers = [ "cpu", "devices" ]\n'
              'cgroup_controllers = [ "cpuset", "memory",\n   "devices", "blkio", "cpuacct" ]\n')
    assert check(fake)["rt.cgroup"].status == "ok"
    # A commented-out line changes nothing.
    fake.file("/etc/libvirt/qemu.conf", '# cgroup_controllers = [ "cpuset" ]\n')
    assert check(fake)["rt.cgroup"].status == "fail"


def test_cgroup_v1_without_rt_group_scheduling_is_ok(fake):
    cgroup_v1(fake, machine=None)
    fake.remove("/sys/fs/cgroup/cpu,cpuacct/cpu.rt_runtime_us")
    assert check(fake)["rt.cgroup"].status == "ok"


def test_rtprio_needs_cap_sys_nice_or_a_limit(fake):
    fake.caps(NO_NICE_NO_RESOURCE)
    fake.limits(memlock="unlimited", rtprio="0")
    f = check(fake)["rt.rtprio"]
    assert f.status == "warn" and "ulimit -r 1" in f.fix
    fake.limits(memlock="unlimited", rtprio="99")
    assert check(fake)["rt.rtprio"].status == "ok"


def test_realtime_checks_skipped_without_realtime(fake):
    cgroup_v1(fake, machine="0")
    found = check(fake, cfg(realtime={"enable": False}))
    assert found["rt.cgroup"].status == found["rt.rtprio"].status == "skip"


# --- PCI passthrough --------------------------------------------------------


def test_missing_device_fails_and_skips_the_rest(fake):
    found = check(fake, cfg(audio_device={"pci_id": "0000:00:1f.3"}))
    assert found["vfio.device"].status == "fail"
    assert [found[i].status for i in ("vfio.vendor", "vfio.group", "vfio.driver")] == ["skip"] * 3


def test_vendor_mismatch_fails_naming_what_is_there(fake):
    f = check(fake, cfg(audio_device={"vendor_device": "8086:a348"}))["vfio.vendor"]
    assert f.status == "fail"
    assert f.observed == "0000:00:1b.0 is 1022:15e3"
    assert 'vendor_device = "1022:15e3"' in f.fix


def test_iommu_group_with_a_bridge_is_refused(fake):
    fake.pci("0000:00:1c.0", cls=0x060400, vd="1022:1483", driver="pcieport", group="7")
    found = check(fake)
    assert found["vfio.critical"].status == "fail"
    assert "0000:00:1c.0 (PCI bridge)" in found["vfio.critical"].observed
    assert "0000:00:1c.0" in found["vfio.group"].observed  # every member is listed
    assert found["vfio.group"].status == "ok"  # a bridge does not make the group unviable


def test_iommu_group_with_the_root_filesystems_controller_is_refused(fake):
    fake.set_group("0000:01:00.0", "7")
    f = check(fake)["vfio.critical"]
    assert f.status == "fail" and "root filesystem (/dev/nvme0n1p2)" in f.observed


def test_iommu_group_with_the_default_route_nic_is_refused(fake):
    fake.set_group("0000:02:00.0", "7")
    f = check(fake)["vfio.critical"]
    assert f.status == "fail" and "default route (eth0)" in f.observed


def test_default_route_through_a_bridge_finds_its_port(fake):
    fake.file("/proc/net/route", "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                                 "br0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\n")
    fake.path("/sys/devices/virtual/net/br0/brif/eth0").mkdir(parents=True)
    fake.link("/sys/class/net/br0", "/sys/devices/virtual/net/br0")
    assert fake.host.default_route_nics() == {"0000:02:00.0": "NIC of the default route (br0)"}


def test_root_on_device_mapper_finds_the_disk_below(fake):
    fake.mounts("/dev/mapper/vg-root / ext4 rw 0 0")
    fake.path("/dev/mapper").mkdir(parents=True)
    fake.file("/dev/dm-0", "")
    fake.link("/dev/mapper/vg-root", "/dev/dm-0")
    fake.path("/sys/devices/virtual/block/dm-0/slaves").mkdir(parents=True)
    fake.link("/sys/class/block/dm-0", "/sys/devices/virtual/block/dm-0")
    fake.link("/sys/devices/virtual/block/dm-0/slaves/nvme0n1p2",
              fake.dev("0000:01:00.0") + "/nvme/nvme0/nvme0n1/nvme0n1p2")
    assert set(root_storage_devices(fake.host)) == {"0000:01:00.0"}


def test_group_member_in_use_by_the_host_makes_the_group_unviable(fake):
    fake.pci("0000:00:1b.1", cls=0x0c0330, vd="1022:15b9", driver="xhci_hcd", group="7")
    f = check(fake)["vfio.group"]
    assert f.status == "fail" and f.fix.startswith("archdsp-virt vfio bind 0000:00:1b.1")


def test_unmanaged_device_must_be_bound_already(fake):
    f = check(fake, cfg(audio_device={"managed": False}))["vfio.driver"]
    assert f.status == "fail" and f.fix == "archdsp-virt vfio bind 0000:00:1b.0"
    fake.set_driver("0000:00:1b.0", "vfio-pci")
    assert check(fake, cfg(audio_device={"managed": False}))["vfio.driver"].status == "ok"


def test_the_hosts_only_audio_controller_in_use_is_refused(fake):
    fake.set_driver("0000:0a:00.1", None)
    fake.remove("/sys/bus/pci/devices/0000:0a:00.1")
    f = check(fake)["vfio.host-audio"]
    assert f.status == "fail" and "only audio controller" in f.observed
    fake.set_driver("0000:00:1b.0", "vfio-pci")  # already given away: nothing left to lose
    assert check(fake)["vfio.host-audio"].status == "ok"


def test_passthrough_checks_skipped_when_disabled(fake):
    found = check(fake, cfg(audio_device={"enable": False}))
    assert all(found[i].status == "skip" for i in CHECK_IDS if i.startswith("vfio."))


# --- preflight, formats, CLI ------------------------------------------------


def test_preflight_turns_skipped_ids_into_recorded_skips(fake):
    fake.hugepages(2048, nr=1024, free=0)
    found = by_id(preflight(cfg(), fake.model, True, skip={"hugepages.free", "cpu"}))
    f = found["hugepages.free"]
    assert f.status == "skip" and f.observed.startswith("skipped on request (was fail:")
    assert found["cpu.online"].status == "skip"
    assert failures(found.values()) == []


def test_preflight_rejects_unknown_ids(fake):
    with pytest.raises(UsageError, match="hugepage.free"):
        preflight(cfg(), fake.model, True, skip={"hugepage.free"})


def test_format_and_json(fake):
    fake.hugepages(2048, nr=1024, free=0)
    found = run_checks(cfg(), fake.model, True)
    text = format_findings(found)
    assert text.splitlines()[0].split()[:2] == ["STATUS", "ID"]
    assert "fail    hugepages.free" in text
    assert "fix: echo 2048 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages" in text
    assert text.rstrip().endswith(f"{len(CHECK_IDS) - 1} ok, 0 warn, 1 fail, 0 skip")
    data = json.loads(json.dumps(findings_json(found)))
    assert data[0] == {"id": "kvm.device", "status": "ok", "observed": data[0]["observed"],
                       "expected": data[0]["expected"], "fix": ""}


def test_finding_status_is_checked():
    with pytest.raises(ValueError):
        Finding("x", "bad", "", "")  # type: ignore[arg-type]


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dsp.toml"
    path.write_text(text)
    return path


GOOD_TOML = """
isolated_cores = [2, 3]
memory_mb = 2048
hugepages = 1024
[audio_device]
enable = true
pci_id = "0000:00:1b.0"
vendor_device = "1022:15e3"
"""


def test_cli_check_exit_codes(fake, tmp_path):
    config = write_config(tmp_path, GOOD_TOML)
    run = CliRunner().invoke
    ok = run(cli, ["-c", "test:///default", "check", str(config), "--host-root", str(fake.root)])
    assert ok.exit_code == 0, ok.output
    assert "fail " not in ok.output
    fake.hugepages(2048, nr=1024, free=0)
    bad = run(cli, ["-c", "test:///default", "check", "--json", str(config), "--host-root", str(fake.root)])
    assert bad.exit_code == 1
    assert {d["id"]: d["status"] for d in json.loads(bad.output)}["hugepages.free"] == "fail"
    broken = write_config(tmp_path, "isolated_cores = [2]\n")
    res = run(cli, ["check", str(broken), "--host-root", str(fake.root)])
    assert res.exit_code == 2 and "memory_mb" in res.output


@pytest.mark.parametrize("machine, needs_fix", [("0", True), (None, True), ("500000", True), ("fixed", False),
                                                ("v2", False)])
def test_host_services_asks_the_same_rt_verdict_as_check(fake, machine, needs_fix):
    """scripts/host-services applies the qemu.conf fix on the package's own verdict, never on a copy of it."""
    import subprocess
    import sys

    if machine == "v2":
        pass  # the default fake host: cgroup v2
    else:
        cgroup_v1(fake, machine="0" if machine == "fixed" else machine)
    if machine == "fixed":
        fake.file("/etc/libvirt/qemu.conf", 'cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ]\n')
    r = subprocess.run([sys.executable, "-m", "archdsp_libvirt", "host", "prepare", "rt-budget", "--host-root",
                        str(fake.root)], capture_output=True, text=True, timeout=60)
    status = check(fake)["rt.cgroup"].status
    assert r.returncode == (0 if needs_fix else 3), (r.stdout, r.stderr)  # 3 is "no": never an error's 1 or 2
    assert (r.returncode == 0) is needs_fix is (status != "ok"), (r.stdout, r.stderr, status)
    assert r.stdout.startswith(f"{status}: ")


def _audio_server(fake: FakeHost, pid: int, comm: str, tasks: dict[int, str]) -> None:
    fake.file(f"/proc/{pid}/comm", comm + "\n")
    for tid, allowed in tasks.items():
        fake.file(f"/proc/{pid}/task/{tid}/status", f"Name:\t{comm}\nCpus_allowed_list:\t{allowed}\n")


def test_audio_threads_on_a_vcpu_core_are_a_warn_with_the_taskset_fix(fake):
    vcpu = cfg().isolated_cores[0]
    _audio_server(fake, 4242, "jackd", {4242: f"0-{vcpu}", 4243: "0"})
    _audio_server(fake, 77, "bash", {77: f"0-{vcpu}"})  # not an audio server
    f = check(fake)["audio.threads"]
    assert f.status == "warn"
    assert "jackd 4242: 1 of 2 threads may run on" in f.observed
    assert "taskset -a -p -c" in f.fix and "4242" in f.fix and "77" not in f.fix


def test_audio_threads_on_housekeeping_cores_are_ok(fake):
    _audio_server(fake, 99, "pipewire", {99: "0", 100: "0"})
    f = check(fake)["audio.threads"]
    assert f.status == "ok" and "pipewire 99" in f.observed


# --- the NETJACK master's address ---------------------------------------------------------------

ROUTES = ("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
          "eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\n"
          "eth0\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\n"
          "virbr0\t007AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
          "br1\t000AA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
          "br1\t800AA8C0\t00000000\t0001\t0\t0\t0\t80FFFFFF\n"
          "virbr9\t800AA8C0\t00000000\t0001\t0\t0\t0\tC0FFFFFF\n")


def _master(ip, **nj):
    return cfg(archibaldos={"netjack": {"enable": True, "master_ip": ip, **nj}})


def _with_lan_bridge(fake):
    fake.file("/proc/net/route", ROUTES)
    fake.pci("0000:00:1c.0", cls=0x020000, vd="8086:15b8", driver="e1000e", group="11")
    fake.net("eth1", "0000:00:1c.0/net/eth1")
    fake.path("/sys/devices/virtual/net/br1/brif/eth1").mkdir(parents=True)
    fake.link("/sys/class/net/br1", "/sys/devices/virtual/net/br1")


@pytest.mark.parametrize(("ip", "nj", "status", "words"), [
    ("192.168.122.1", {}, "ok", "192.168.122.1 on virbr0"),
    ("127.0.0.1", {}, "ok", "127.0.0.1 on lo"),
    ("192.168.2.10", {}, "fail", "192.168.2.10 is on eth0, which carries the default route"),
    ("192.168.10.5", {}, "fail", "192.168.10.5 is on br1, a LAN interface (NIC 0000:00:1c.0)"),
    ("192.168.10.130", {}, "ok", "on virbr9"),  # the longest prefix wins: a /26 on a bridge of VMs alone
    ("192.168.10.200", {}, "fail", "on br1"),
    ("192.168.2.10", {"allow_lan": True}, "warn", "default route (allow_lan = true)"),
    ("10.9.8.7", {}, "warn", "10.9.8.7 is on no interface of this host now"),
])
def test_master_ip_must_be_on_a_network_only_vms_reach(fake, ip, nj, status, words):
    _with_lan_bridge(fake)
    f = check(fake, _master(ip, **nj))["netjack.master"]
    assert f.status == status and words in f.observed, f
    if status == "fail":
        assert "archibaldos.netjack.master_ip" in f.fix and "allow_lan = true" in f.fix


def test_master_ip_check_is_skipped_without_netjack_and_on_a_remote_host(fake):
    from archdsp_libvirt.host.model import HostModel

    assert check(fake, cfg(archibaldos={"netjack": {"enable": False}}))["netjack.master"].status == "skip"
    remote = by_id(run_checks(cfg(), HostModel(source="libvirt", uri="qemu+ssh://far/system"), True))
    assert remote["netjack.master"].status == "skip" and "192.168.122.1" in remote["netjack.master"].observed


def _udp_row(local: str, port: int, inode: int) -> str:
    ip = "".join(reversed([f"{int(o):02X}" for o in local.split(".")]))
    return (f"  12: {ip}:{port:04X} 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 "
            f"{inode} 2 0000000000000000 0\n")


UDP_HEAD = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"


@pytest.mark.parametrize(("rows", "v6", "status", "words"), [
    ([("192.168.122.1", 19000)], "", "ok", "listening on 192.168.122.1:19000/udp (virbr0; the kernel's table)"),
    ([("0.0.0.0", 19000)], "", "warn", "listens on 0.0.0.0:19000/udp (every address, the kernel's table)"),
    ([], "   0: 00000000000000000000000000000000:4A38 00000000000000000000000000000000:0000 07 00000000:00000000 "
         "00:00000000 00000000     0        0 77 2 0000000000000000 0\n", "warn", "[::]:19000/udp (every address"),
    ([("127.0.0.1", 19000)], "", "warn", "listens on 127.0.0.1:19000/udp, not 192.168.122.1:19000/udp"),
    ([("0.0.0.0", 5353)], "", "ok", "nothing listens on 19000/udp now"),  # another port: not the master's
])
def test_master_row_says_where_the_port_is_bound_as_the_kernel_says(fake, rows, v6, status, words):
    """Not the address the master was asked for: the one its socket holds (/proc/net/udp, udp6)."""
    fake.file("/proc/net/udp", UDP_HEAD + "".join(_udp_row(a, p, 100 + k) for k, (a, p) in enumerate(rows)))
    fake.file("/proc/net/udp6", UDP_HEAD + v6)
    f = check(fake, _master("192.168.122.1", source_port=19000))["netjack.master"]
    assert f.status == status and words in f.observed, f
    if status == "warn":
        assert "--jack-server NAME --server dummy" in f.fix and "--allow-any-address" in f.fix
