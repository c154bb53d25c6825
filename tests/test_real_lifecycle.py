"""The real tier: archdsp-virt against a real libvirtd with QEMU (KVM firmware-only domain)."""

from __future__ import annotations

from pathlib import Path

import pytest

from archdsp_libvirt.virt import threads
from conftest import archdsp, virsh

pytestmark = pytest.mark.real


def free_hugepages() -> int:
    return int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())


def test_kvm_domain_up_verify_idempotent_down(kvm_config):
    cfg, name = kvm_config
    free_before = free_hugepages()
    r = archdsp("-c", "qemu:///system", "up", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert virsh("domstate", name) == "running"
    assert f"started {name}" in r.stdout
    assert virsh("dominfo", name).count("Autostart:      enable") == 1

    # vCPU 0's thread: affinity {1}, SCHED_FIFO prio 1 (read from /proc, not from libvirt).
    pid = threads.qemu_pid(name)
    vcpus = threads.vcpu_threads(pid)
    assert set(vcpus) == {0}
    assert vcpus[0].affinity == frozenset({1})
    assert vcpus[0].policy == "FIFO" and vcpus[0].rt_priority == 1
    assert all(t.nice == -5 for t in threads.emulator_threads(pid))
    assert "vCPU 0: thread" in r.stdout and "class FIFO" in r.stdout

    # 128 MiB on 2 MiB pages: 64 pages left the pool.
    assert free_before - free_hugepages() == 64

    uuid = virsh("domuuid", name)
    again = archdsp("-c", "qemu:///system", "up", str(cfg))
    assert again.returncode == 0, again.stderr
    assert virsh("domuuid", name) == uuid
    assert f"{name} is already running" in again.stdout

    status = archdsp("-c", "qemu:///system", "status", "--json", str(cfg))
    assert status.returncode == 0, status.stderr
    import json

    info = json.loads(status.stdout)
    assert info["state"] == "running" and info["uuid"] == uuid and info["autostart"] is True
    assert info["vcpus"][0]["pinned"] == "1" and info["vcpus"][0]["policy"] == "FIFO"
    assert info["drift"] == []
    assert info["hugepages"]["free"] == free_hugepages()

    down = archdsp("-c", "qemu:///system", "down", "--timeout", "5", str(cfg))
    assert down.returncode == 0, down.stderr
    assert virsh("domstate", name) == "shut off"
    assert free_hugepages() == free_before


def test_status_reports_what_virsh_did(kvm_config):
    cfg, name = kvm_config
    assert archdsp("up", str(cfg), env={"LIBVIRT_DEFAULT_URI": "qemu:///system"}).returncode == 0
    virsh("destroy", name)
    info = archdsp("status", "--json", str(cfg), env={"LIBVIRT_DEFAULT_URI": "qemu:///system"})
    import json

    data = json.loads(info.stdout)
    assert data["state"] == "shut off" and data["reason"] == "destroyed"
    # virsh edit-style change: drift against the config.
    xml = virsh("dumpxml", "--inactive", name).replace("<vcpupin vcpu='0' cpuset='1'/>", "<vcpupin vcpu='0' cpuset='0'/>")
    path = cfg.parent / "edited.xml"
    path.write_text(xml)
    virsh("define", str(path))
    data = json.loads(archdsp("-c", "qemu:///system", "status", "--json", str(cfg)).stdout)
    assert any(d.startswith("vcpupin:") for d in data["drift"])
    # up puts the config back, keeping the UUID.
    uuid = virsh("domuuid", name)
    assert archdsp("-c", "qemu:///system", "up", str(cfg)).returncode == 0
    assert virsh("domuuid", name) == uuid
    assert "cpuset='1'" in virsh("dumpxml", "--inactive", name)


def test_rejected_change_leaves_the_definition_byte_for_byte(kvm_config):
    cfg, name = kvm_config
    assert archdsp("-c", "qemu:///system", "up", str(cfg)).returncode == 0
    before = virsh("dumpxml", "--inactive", "--security-info", name)
    bad = cfg.parent / "bad.toml"
    # 1 GiB of memory on a pool of 64 pages: the config itself is refused, nothing reaches libvirt.
    bad.write_text(cfg.read_text().replace("memory_mb = 128", "memory_mb = 1024"))
    r = archdsp("-c", "qemu:///system", "up", str(bad))
    assert r.returncode == 2 and "hugepages" in r.stderr and "Traceback" not in r.stderr
    assert virsh("dumpxml", "--inactive", "--security-info", name) == before


def test_change_libvirt_refuses_leaves_the_definition_byte_for_byte(kvm_config):
    import libvirt

    if libvirt.getVersion() >= 9_002_000:
        pytest.skip("this libvirt accepts the passt backend, so the change is not refused")
    cfg, name = kvm_config
    assert archdsp("-c", "qemu:///system", "up", str(cfg)).returncode == 0
    before = virsh("dumpxml", "--inactive", "--security-info", name)
    bad = cfg.parent / "passt.toml"
    bad.write_text(cfg.read_text().replace("[network]\nenable = false",
                                           '[network]\nenable = true\nmode = "user"\nhostfwd = { "22222" = 22 }\n'
                                           'port_forward_backend = "passt"'))
    r = archdsp("-c", "qemu:///system", "up", str(bad))
    assert r.returncode == 1, r.stdout
    assert "defining the domain failed" in r.stderr and "passt" in r.stderr and "Traceback" not in r.stderr
    assert virsh("dumpxml", "--inactive", "--security-info", name) == before
    assert virsh("domstate", name) == "running"


def test_up_refuses_on_a_failing_preflight_before_defining(kvm_config):
    cfg, name = kvm_config
    bad = cfg.parent / "nocore.toml"
    bad.write_text(cfg.read_text().replace("isolated_cores = [1]", "isolated_cores = [4000]"))
    r = archdsp("-c", "qemu:///system", "up", str(bad))
    assert r.returncode == 1
    assert "preflight cpu.online failed" in r.stderr and "nothing was defined" in r.stderr
    assert "Traceback" not in r.stderr
    assert name not in virsh("list", "--all", "--name").split()


def test_skip_check_is_recorded_in_the_output(kvm_config):
    cfg, name = kvm_config
    r = archdsp("-c", "qemu:///system", "up", "--skip-check", "cpu.isolated", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "preflight: cpu.isolated skipped on request" in r.stdout
    assert virsh("domstate", name) == "running"


def test_a_changed_link_port_is_drift_and_up_redefines_with_the_same_uuid(kvm_config):
    """The link's guest settings are the domain's OEM string on QEMU too: libvirt keeps it and the agent
    channel, `status` shows a changed port as drift, `up` redefines (same UUID) and `up --restart` runs it."""
    import json

    from lxml import etree

    cfg, name = kvm_config
    linked = cfg.parent / "linked.toml"
    text = cfg.read_text().replace("[network]\nenable = false", '[network]\nenable = true\nmode = "nat"\nsource = "default"')
    linked.write_text(text + "\n[archibaldos.netjack]\nenable = true\nsource_port = 19501\n")
    r = archdsp("-c", "qemu:///system", "up", str(linked))
    assert r.returncode == 0, r.stdout + r.stderr
    uuid = virsh("domuuid", name)
    live = etree.fromstring(virsh("dumpxml", name).encode())
    (entry,) = [e.text for e in live.iterfind("sysinfo[@type='smbios']/oemStrings/entry")]
    assert entry.startswith("io.systemd.credential:archdsp.netjack=v=1 ") and " port=19501 " in entry
    agent = live.find("devices/channel[@type='unix']/target[@name='org.qemu.guest_agent.0']")
    assert agent is not None and agent.get("type") == "virtio"
    assert live.find("devices/channel[@type='unix']/source").get("path")  # libvirt made the socket

    moved = cfg.parent / "moved.toml"
    moved.write_text(linked.read_text().replace("source_port = 19501", "source_port = 19502"))
    drift = json.loads(archdsp("-c", "qemu:///system", "status", "--json", str(moved)).stdout)["drift"]
    assert len(drift) == 1 and drift[0].startswith("oem_strings:") and "port=19502" in drift[0], drift
    again = archdsp("-c", "qemu:///system", "up", str(moved))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(updated, uuid " in again.stdout and "older definition" in again.stdout
    assert virsh("domuuid", name) == uuid
    restarted = archdsp("-c", "qemu:///system", "up", "--restart", str(moved))
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "restarting it" in restarted.stdout and virsh("domuuid", name) == uuid
    assert " port=19502 " in virsh("dumpxml", name)
    assert json.loads(archdsp("-c", "qemu:///system", "status", "--json", str(moved)).stdout)["drift"] == []
