"""The real-time KVM host's rows on fake host trees (RT throttling, the kernel threads above the vCPUs, IRQs,
KVM's and the host's latency knobs, tuned), and ``host prepare apply`` / ``undo`` on them: undo leaves the
tree byte for byte as it was."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_hostcheck import GOOD_TOML, FakeHost, cfg, check

from archdsp_libvirt.cli import cli
from archdsp_libvirt.host.prepare import apply, plan, undo

OTHER, FIFO = 0, 1


@pytest.fixture
def fake(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host")


def untuned(fake: FakeHost) -> FakeHost:
    """The tree as a stock host has it: every new row warns (isolated cores 2-3)."""
    fake.file("/proc/sys/kernel/sched_rt_runtime_us", "950000\n")
    fake.proc(12, "ksoftirqd/2", policy=OTHER, prio=0, allowed="2", nice=0, start=7)
    fake.proc(23, "rcuc/3", policy=FIFO, prio=1, allowed="3", start=8)
    fake.proc(40, "rcub/0", policy=FIFO, prio=1, allowed="0-3", start=9)
    fake.proc(30, "irq/45-vfio-msi", policy=FIFO, prio=1, allowed="0-1", start=10)
    fake.irq(24, "ahci", "0-3")
    fake.file("/sys/module/kvm/parameters/halt_poll_ns", "200000\n")
    fake.file("/sys/module/kvm/parameters/kvmclock_periodic_sync", "Y\n")
    fake.file("/sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n")
    fake.file("/sys/kernel/mm/ksm/run", "1\n")
    fake.file("/proc/sys/kernel/timer_migration", "1\n")
    fake.file("/proc/sys/kernel/nmi_watchdog", "1\n")
    fake.cstate(2, 2, "C6", 100, disabled=False)
    return fake


def snapshot(root: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            out[rel] = ("-> " + os.readlink(p)) if p.is_symlink() else p.read_bytes() if p.is_file() else "dir"
    return out


# --- rows ------------------------------------------------------------------------------------------------

def test_rt_throttling(fake):
    assert check(fake)["rt.throttling"].status == "ok"
    fake.file("/proc/sys/kernel/sched_rt_runtime_us", "950000\n")
    f = check(fake)["rt.throttling"]
    assert f.status == "warn" and "stopped 50 ms every 1 s" in f.observed
    assert f.fix.startswith("sysctl -w kernel.sched_rt_runtime_us=-1")
    assert check(fake, cfg(realtime={"enable": False}))["rt.throttling"].status == "skip"
    fake.remove("/proc/sys/kernel/sched_rt_runtime_us")
    assert "no RT throttling" in check(fake)["rt.throttling"].observed


def test_kernel_threads_of_the_vcpu_cores_must_run_above_the_vcpus(fake):
    assert check(fake)["rt.kthreads"].observed == "ksoftirqd/2 FIFO 2, ksoftirqd/3 FIFO 2, rcuc/2 FIFO 4, rcuc/3 FIFO 4"
    untuned(fake)
    f = check(fake)["rt.kthreads"]
    assert f.status == "warn"
    assert f.observed.startswith("ksoftirqd/2 (pid 12) SCHED_OTHER, rcuc/3 (pid 23) FIFO 1, rcub/0 (pid 40) FIFO 1")
    assert f.fix.startswith("chrt -f -p 2 12; chrt -f -p 4 23; chrt -f -p 4 40")  # tuned's 2 and 4 over FIFO 1
    five = check(fake, cfg(realtime={"priority": 5}))["rt.kthreads"]
    assert "rcuc/2 (pid 22) FIFO 4" in five.observed and "chrt -f -p 8 22" in five.fix
    for pid in (10, 11, 12, 13, 20, 21, 22, 23, 40):
        fake.remove(f"/proc/{pid}/comm")
    assert check(fake)["rt.kthreads"].status == "skip"


def test_device_irqs_and_irqaffinity(fake):
    assert check(fake)["irq.affinity"].observed == "2 device IRQs off 2-3; irqaffinity=0-1"
    fake.irq(24, "ahci", "0-3")
    fake.cmdline("quiet")
    f = check(fake)["irq.affinity"]
    assert f.status == "warn" and "24 (ahci: 0-3)" in f.observed and "no irqaffinity=" in f.observed
    assert "echo 0-1 > /proc/irq/N/smp_affinity_list" in f.fix and "irqaffinity=0-1" in f.fix


def test_irqbalance_ban_list(fake):
    fake.proc(50, "irqbalance")
    f = check(fake)["irq.balance"]
    assert f.status == "warn" and "no banned CPUs" in f.observed and "IRQBALANCE_BANNED_CPULIST=2-3" in f.fix
    fake.file("/etc/default/irqbalance", "#IRQBALANCE_BANNED_CPULIST=1\nIRQBALANCE_BANNED_CPUS=\"4\"\n")
    assert check(fake)["irq.balance"].observed.endswith("banned from 2 only (/etc/default/irqbalance)")
    fake.file("/etc/default/irqbalance", "IRQBALANCE_BANNED_CPUS=00000000,0000000c\n")
    assert check(fake)["irq.balance"].status == "ok"
    fake.file("/proc/50/environ", "PATH=/bin\0IRQBALANCE_BANNED_CPULIST=3\0")  # the running one's own wins
    assert "banned from 3 only (its environment)" in check(fake)["irq.balance"].observed


def test_vfio_irq_threads_above_the_vcpus(fake):
    assert check(fake)["irq.vfio"].observed == "irq/45-vfio-msi FIFO 50"
    assert check(fake, cfg(audio_device={"enable": False}))["irq.vfio"].status == "skip"
    fake.proc(30, "irq/45-vfio-msi", policy=FIFO, prio=1, allowed="0-1")
    f = check(fake)["irq.vfio"]
    assert f.status == "warn" and f.fix.startswith("chrt -f -p 2 30")
    fake.remove("/proc/30/comm")
    assert "no vfio IRQ thread runs" in check(fake)["irq.vfio"].observed


def test_kvm_knobs(fake):
    untuned(fake)
    found = check(fake)
    assert found["kvm.halt_poll"].status == "warn" and "SEAPATH" in found["kvm.halt_poll"].expected
    assert found["kvm.halt_poll"].fix.startswith("echo 50000 > /sys/module/kvm/parameters/halt_poll_ns")
    assert found["kvm.kvmclock_sync"].fix.startswith("kernel parameter kvm.kvmclock_periodic_sync=0")
    fake.file("/sys/module/kvm_amd/parameters/pause_filter_count", "3000\n")
    assert check(fake)["kvm.ple"].fix.startswith("kernel parameter kvm_amd.pause_filter_count=0")
    fake.file("/sys/module/kvm/parameters/nx_huge_pages", "Y\n")
    nx = check(fake)["kvm.nx_huge_pages"]
    assert nx.status == "ok" and "trusted guests only" in nx.observed  # a security trade: said, not pushed


def test_kvm_knobs_skip_without_kvm(fake):
    for p in ("halt_poll_ns", "kvmclock_periodic_sync", "nx_huge_pages"):
        fake.remove(f"/sys/module/kvm/parameters/{p}")
    fake.remove("/sys/module/kvm_amd/parameters/pause_filter_count")
    os.rmdir(fake.path("/sys/module/kvm/parameters"))
    os.rmdir(fake.path("/sys/module/kvm"))
    found = check(fake)
    for fid in ("kvm.halt_poll", "kvm.kvmclock_sync", "kvm.nx_huge_pages"):
        assert found[fid].status == "skip" and found[fid].observed == "no kvm module loaded (/sys/module/kvm)"
    assert found["kvm.ple"].status == "skip" and "neither kvm_intel nor kvm_amd" in found["kvm.ple"].observed


def test_memory_and_cpu_knobs(fake):
    untuned(fake)
    fake.cmdline("quiet")
    found = check(fake)
    assert found["mm.thp"].status == "warn" and found["mm.thp"].fix.startswith("echo never >")
    assert found["mm.ksm"].fix.startswith("echo 2 > /sys/kernel/mm/ksm/run")
    assert found["cpu.cstates"].observed == "enabled: cpu2 C6 (100 us)"
    assert found["cpu.cstates"].fix.startswith("echo 1 > /sys/devices/system/cpu/cpu2/cpuidle/state2/disable")
    assert "/dev/cpu_dma_latency" in found["cpu.cstates"].expected and "keeps it open" in found["cpu.cstates"].expected
    assert found["cpu.timer_migration"].fix.startswith("sysctl -w kernel.timer_migration=0")
    assert found["cpu.nmi_watchdog"].status == "warn"
    assert found["cpu.skew_tick"].fix.startswith("kernel parameter skew_tick=1")
    for cpu in range(4):
        for state in range(3):
            for name in ("name", "latency", "disable"):
                fake.remove(f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state{state}/{name}")
            os.rmdir(fake.path(f"/sys/devices/system/cpu/cpu{cpu}/cpuidle/state{state}"))
    assert "no cpuidle on 2-3" in check(fake)["cpu.cstates"].observed


def test_tuned_profile_row(fake):
    fake.proc(60, "tuned")
    fake.file("/etc/tuned/active_profile", "balanced\n")
    f = check(fake)["tuned.profile"]
    assert f.status == "warn" and "tuned runs profile balanced" in f.observed and "tuned-adm profile" in f.fix
    fake.file("/etc/tuned/active_profile", "realtime-virtual-host\n")
    fake.file("/etc/tuned/realtime-virtual-host-variables.conf", "isolated_cores=1-3\n")
    assert check(fake)["tuned.profile"].status == "warn"
    fake.file("/etc/tuned/realtime-virtual-host-variables.conf", "# x\nisolated_cores=2,3\nisolate_managed_irq=Y\n")
    assert check(fake)["tuned.profile"].status == "ok"


def test_tuned_profile_command(tmp_path):
    config = tmp_path / "dsp.toml"
    config.write_text(GOOD_TOML)
    res = CliRunner().invoke(cli, ["host", "tuned-profile", str(config)])
    assert res.exit_code == 0
    lines = [ln for ln in res.output.splitlines() if not ln.startswith("#")]
    assert lines == ["isolated_cores=2-3", "isolate_managed_irq=Y"]


# --- host prepare apply / undo ---------------------------------------------------------------------------

def run(*args: str):
    return CliRunner().invoke(cli, ["host", "prepare", *args])


def test_apply_fixes_every_runtime_row_and_undo_restores_the_tree_byte_for_byte(fake, tmp_path):
    untuned(fake)
    config = tmp_path / "dsp.toml"
    config.write_text(GOOD_TOML)
    state = tmp_path / "prepare.json"
    before = snapshot(fake.root)
    root = ["--host-root", str(fake.root), "--state", str(state)]

    dry = run("apply", "--dry-run", str(config), *root)
    assert dry.exit_code == 0 and "would run: echo -1 > /proc/sys/kernel/sched_rt_runtime_us" in dry.output
    assert snapshot(fake.root) == before and not state.exists()

    res = run("apply", str(config), *root)
    assert res.exit_code == 0, res.output
    assert "chrt -f -p 2 12 (was SCHED_OTHER)" in res.output
    found = check(fake)
    for fid in ("rt.throttling", "rt.kthreads", "irq.affinity", "irq.vfio", "kvm.halt_poll", "mm.thp", "mm.ksm",
                "cpu.cstates", "cpu.timer_migration", "cpu.nmi_watchdog"):
        assert found[fid].status == "ok", found[fid]
    assert fake.path("/sys/kernel/mm/transparent_hugepage/enabled").read_text() == "always madvise [never]\n"
    assert run("apply", str(config), *root).exit_code == 1  # once: undo first

    res = run("undo", *root)
    assert res.exit_code == 0, res.output
    assert "ksoftirqd/2 (pid 12): back to SCHED_OTHER" in res.output
    assert snapshot(fake.root) == before
    assert not state.exists()
    assert "nothing to undo" in run("undo", *root).output


def test_undo_leaves_what_changed_since(fake, tmp_path):
    untuned(fake)
    state = tmp_path / "prepare.json"
    apply(cfg(), fake.host, state, say=lambda _m: None)
    fake.file("/proc/sys/kernel/timer_migration", "1\n")  # someone set it back meanwhile
    fake.proc(12, "ksoftirqd/2", policy=OTHER, allowed="2", start=99)  # another process under that PID
    said: list[str] = []
    assert undo(fake.host, state, say=said.append)
    assert any("timer_migration: left at 1" in m for m in said)
    assert any("ksoftirqd/2 (pid 12): gone" in m for m in said)
    assert fake.path("/proc/sys/kernel/sched_rt_runtime_us").read_text() == "950000\n"


def test_prepare_leaves_realtime_virtual_host_its_knobs(fake):
    untuned(fake)
    fake.proc(60, "tuned")
    fake.file("/etc/tuned/active_profile", "realtime-virtual-host\n")
    changes, notes = plan(cfg(), fake.host)
    assert [c.command for c in changes] == ["chrt -f -p 2 30", "echo 50000 > /sys/module/kvm/parameters/halt_poll_ns"]
    assert notes and notes[0].startswith("left to tuned (active profile realtime-virtual-host, which sets them): "
                                         "echo -1 > /proc/sys/kernel/sched_rt_runtime_us; chrt -f -p 2 12")
