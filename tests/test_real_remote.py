"""Real tier: every command over qemu+ssh describes the remote host, from libvirt alone.

The remote host is this machine behind a private sshd on 127.0.0.1 (see conftest ``remote_uri``):
libvirt's ssh transport, a real libvirtd and QEMU at the far end. Host facts therefore must come
from libvirt's API, and nothing of "this" machine's /proc and /sys may be read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import libvirt
import pytest

from conftest import archdsp, virsh

pytestmark = pytest.mark.real

# Files that hold host facts: reading any of them over a remote URI describes the wrong machine.
HOST_FACT_FILES = re.compile(
    r'"(/proc/cmdline|/proc/meminfo|/proc/mounts|/proc/self/limits|/proc/cpuinfo|/proc/net/route'
    # (cpu/possible is read by the C library's thread set-up in every process, this tool's or not)
    r"|/sys/devices/system/cpu/(?!possible\b)[^\"]*|/sys/kernel/mm/hugepages[^\"]*|/sys/bus/pci/[^\"]*"
    r'|/sys/kernel/iommu_groups[^"]*|/etc/libvirt/qemu.conf|/run/libvirt/qemu/[^"]*|/dev/kvm)"'
)


def _json(result: subprocess.CompletedProcess):
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_check_takes_the_remote_hosts_facts_from_libvirt(remote_uri, kvm_config, tmp_path):
    cfg, _name = kvm_config
    empty = tmp_path / "no-host-here"  # a host root with nothing in it: a local read would find nothing
    empty.mkdir()
    remote = {f["id"]: f for f in _json(archdsp("-c", remote_uri, "check", "--json", "--host-root", str(empty),
                                                str(cfg)))}
    local = {f["id"]: f for f in _json(archdsp("-c", "qemu:///system", "check", "--json", "--host-root",
                                               str(empty), str(cfg)))}

    # The same empty host root: read locally it knows no CPU; over ssh, libvirt's CPU map answers.
    assert local["cpu.online"]["status"] == "fail" and "unreadable" in local["cpu.online"]["observed"]
    conn = libvirt.openReadOnly("qemu:///system")
    try:
        _n, cpumap, _online = conn.getCPUMap()
        free = conn.getFreePages([2048], 0, 1)[0][2048]
    finally:
        conn.close()
    online = ",".join(str(i) for i, up in enumerate(cpumap) if up)
    assert remote["cpu.online"]["status"] == "ok", remote["cpu.online"]
    assert remote["cpu.online"]["observed"].replace("-", ",") in (f"online {online}", f"online {online.replace(',', '-')}")
    assert remote["libvirt.reachable"]["status"] == "ok" and "qemu+ssh" in remote["libvirt.reachable"]["observed"]
    assert remote["kvm.device"]["status"] == "ok" and "offers KVM guests" in remote["kvm.device"]["observed"]
    assert remote["hugepages.free"]["status"] in ("ok", "fail")
    assert remote["hugepages.free"]["observed"].startswith(f"{free} of ")
    # What only the host knows is a skip that says where to ask.
    for fid in ("iommu.param", "iommu.pt", "cpu.isolated", "cpu.nohz_full", "cpu.rcu_nocbs", "cpu.threadirqs",
                "cpu.governor", "hugepages.mount", "rt.cgroup", "rt.rtprio"):
        assert remote[fid]["status"] == "skip", remote[fid]
        assert "run 'archdsp-virt check CONFIG' on that host" in remote[fid]["observed"], remote[fid]


@pytest.mark.skipif(not shutil.which("strace"), reason="strace is not installed (scripts/install-test-deps installs it)")
@pytest.mark.parametrize("command", [["xml"], ["check"], ["status"]])
def test_nothing_of_this_machine_is_read_over_ssh(remote_uri, kvm_config, tmp_path, command):
    cfg, _name = kvm_config
    trace = tmp_path / "trace"
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,stat,newfstatat,access", "-o", str(trace),
                        sys.executable, "-m", "archdsp_libvirt", "-c", remote_uri, *command, str(cfg)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode in (0, 1), r.stderr
    opened = sorted(set(HOST_FACT_FILES.findall(trace.read_text())))
    assert opened == [], f"{command[0]} over {remote_uri} read this machine's host files: {opened}"
    # The same command on the local URI does read them: the trace would have caught a leak.
    local = subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat,stat,newfstatat,access", "-o",
                            str(trace), sys.executable, "-m", "archdsp_libvirt", "-c", "qemu:///system", *command,
                            str(cfg)], capture_output=True, text=True, timeout=180)
    assert local.returncode in (0, 1), local.stderr
    assert HOST_FACT_FILES.search(trace.read_text())


def test_up_status_down_over_ssh(remote_uri, kvm_config):
    cfg, name = kvm_config
    up = archdsp("-c", remote_uri, "up", "--no-autostart", str(cfg), timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"host: {remote_uri}" in up.stdout
    assert "vCPU 0: on CPU 1, affinity 1, scheduler fifo priority 1 (from libvirt)" in up.stdout
    assert "not set (libvirt has no call for it" in up.stdout
    assert virsh("domstate", name) == "running"

    again = archdsp("-c", remote_uri, "up", "--no-autostart", str(cfg), timeout=240)
    assert again.returncode == 0 and f"{name} is already running" in again.stdout

    st = archdsp("-c", remote_uri, "status", "--json", str(cfg))
    assert st.returncode == 0, st.stderr
    info = json.loads(st.stdout)
    assert info["state"] == "running" and info["host"] == "libvirt"
    v = info["vcpus"][0]
    assert (v["pinned"], v["affinity"], v["policy"], v["rt_priority"], v["source"]) == ("1", "1", "FIFO", 1, "libvirt")
    assert info["isolation"]["host_isolated"] == "unknown"
    assert "run 'archdsp-virt check CONFIG' on that host" in info["isolation"]["source"]
    assert info["qemu_pid"] == "unknown" and info["drift"] == []
    assert info["network_thread"] == {"threads": [], "reason": "remote host: unknown (run 'archdsp-virt status' on that host)"}
    text = archdsp("-c", remote_uri, "status", str(cfg)).stdout
    assert "None" not in text
    assert "QEMU runs on the remote host: its pid and uptime are unknown here" in text
    assert "(as libvirt reports it)" in text
    assert "  network data path: remote host: unknown" in text

    down = archdsp("-c", remote_uri, "down", "--force", "--undefine", str(cfg))
    assert down.returncode == 0, down.stderr
    assert virsh("list", "--all", "--name").split().count(name) == 0
