"""``archdsp-virt check`` for real, on this machine.

Each expectation is computed here from the machine's own files (and the
process's own limits and capabilities), independently of hostcheck.py, so
the test says what is true on any host. On the CI machine (HOST-NOTES):
locked memory fails (hard memlock 8 MiB, no CAP_SYS_RESOURCE), the 2 MiB
hugepage pool exists, RT vCPUs need the qemu.conf cgroup fix.
"""

from __future__ import annotations

import grp
import json
import os
import re
import resource
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.cpuset import parse_cpuset
from archdsp_libvirt.host.checks import CHECK_IDS

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux procfs")

MEMORY_MB = 256
PAGES = 128  # 2 MiB pages for MEMORY_MB
POOL = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def online_cpus() -> frozenset[int]:
    return parse_cpuset(Path("/sys/devices/system/cpu/online").read_text())


def free_pages() -> int | None:
    try:
        return int((POOL / "free_hugepages").read_text())
    except OSError:
        return None


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """One real ``check --json`` run: (exit code, {id: finding}, free pages before, after)."""
    core = max(online_cpus())
    config = tmp_path_factory.mktemp("real") / "dsp.toml"
    config.write_text(
        f"isolated_cores = [{core}]\nmemory_mb = {MEMORY_MB}\nhugepages = {PAGES}\n"
        "domain_type = \"kvm\"\n"  # the /dev/kvm row is asked for; auto may pick TCG here (see kvm.accel)
        "[realtime]\nenable = true\nmlock = true\n"
    )
    before = free_pages()
    res = CliRunner().invoke(cli, ["-c", "test:///default", "check", "--json", str(config)])
    after = free_pages()
    findings = {d["id"]: d for d in json.loads(res.stdout)}
    return res.exit_code, findings, before, after


def test_json_lists_every_check_and_the_exit_code_follows_the_fails(real):
    code, findings, _, _ = real
    assert list(findings) == list(CHECK_IDS)
    assert all(set(f) == {"id", "status", "observed", "expected", "fix"} for f in findings.values())
    assert code == (1 if any(f["status"] == "fail" for f in findings.values()) else 0)


def test_libvirt_reachable_through_the_uri(real):
    assert real[1]["libvirt.reachable"]["status"] == "ok"


def test_libvirt_unreachable_fails_fast(tmp_path):
    config = tmp_path / "dsp.toml"
    config.write_text(f"isolated_cores = [{max(online_cpus())}]\nmemory_mb = 256\n")
    res = CliRunner().invoke(cli, ["-c", f"qemu+unix:///system?socket={tmp_path}/none.sock", "check", "--json",
                                   str(config)])
    found = {d["id"]: d for d in json.loads(res.stdout)}
    assert res.exit_code == 1
    assert found["libvirt.reachable"]["status"] == "fail"
    assert "Failed to connect socket" in found["libvirt.reachable"]["observed"]


def test_locked_memory_as_this_process_can_grant_it(real):
    cap_eff = int(re.search(r"^CapEff:\s*([0-9a-f]+)", Path("/proc/self/status").read_text(), re.M).group(1), 16)
    has_cap = bool(cap_eff >> 24 & 1)  # CAP_SYS_RESOURCE
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    enough = hard == resource.RLIM_INFINITY or hard >= (MEMORY_MB + 1024) * 1024 * 1024
    f = real[1]["memlock.limit"]
    if has_cap or enough:
        assert f["status"] == "ok"
    else:  # the CI machine: hard 8 MiB, no CAP_SYS_RESOURCE
        assert f["status"] == "fail"
        assert f["fix"] == ("set realtime.mlock = false, or run libvirtd with CAP_SYS_RESOURCE / "
                            "raise the hard memlock limit")


def test_hugepages_as_the_pool_says(real):
    _, findings, before, after = real
    if before is None:
        assert findings["hugepages.free"]["status"] == "fail"
        pytest.skip("no 2 MiB hugepage pool on this host")
    # The pool is there, so it can be sized; other tests may take pages meanwhile.
    allowed = {"ok" if n >= PAGES else "fail" for n in (before, after) if n is not None}
    assert findings["hugepages.free"]["status"] in allowed
    if findings["hugepages.free"]["status"] == "fail":
        assert f"{POOL}/nr_hugepages" in findings["hugepages.free"]["fix"]
    mounted = any(line.split()[2] == "hugetlbfs" for line in Path("/proc/mounts").read_text().splitlines())
    assert (findings["hugepages.mount"]["status"] == "ok") == mounted


def qemu_conf_user() -> str:
    try:
        text = Path("/etc/libvirt/qemu.conf").read_text()
    except OSError:
        return "libvirt-qemu"
    m = re.search(r'^\s*user\s*=\s*"([^"]*)"', text, re.M)
    return m.group(1) if m else "libvirt-qemu"


def test_kvm_accel_says_when_kvm_is_nested_pvm(real):
    f = real[1]["kvm.accel"]
    if Path("/sys/module/kvm_pvm").exists():  # this machine's kind: only PVM guest kernels boot under KVM
        assert f["status"] == "warn" and "nested PVM" in f["observed"] and "domain_type = \"auto\"" in f["fix"], f
    else:
        assert f["status"] == "ok" and f["observed"] == "domain_type = \"kvm\": as the config asks", f


def test_kvm_device_as_its_mode_says(real):
    f = real[1]["kvm.device"]
    try:
        st = os.stat("/dev/kvm")
    except OSError:
        assert f["status"] == "fail" and "modprobe" in f["fix"]
        return
    mode = stat.S_IMODE(st.st_mode)
    try:
        group = grp.getgrgid(st.st_gid)
    except KeyError:
        group = None
    user = qemu_conf_user()
    in_group = group is not None and (group.gr_name == "kvm" or user in group.gr_mem or _primary_gid(user) == st.st_gid)
    usable = user in ("root", "+0", "0") or mode & 0o006 == 0o006 or (mode & 0o060 == 0o060 and in_group)
    if usable:
        assert f["status"] == "ok", f
    else:
        assert f["status"] == "fail", f
        assert f["fix"] == "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm"


def _primary_gid(user: str) -> int | None:
    import pwd

    try:
        return pwd.getpwnam(user).pw_gid
    except KeyError:
        return None


def qemu_conf_controllers() -> list[str] | None:
    try:
        text = Path("/etc/libvirt/qemu.conf").read_text()
    except OSError:
        return None
    live = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    m = re.search(r"^\s*cgroup_controllers\s*=\s*\[([^\]]*)\]", live, re.M)
    return re.findall(r'"([^"]*)"', m.group(1)) if m else None


def test_realtime_cgroup_as_mounts_and_qemu_conf_say(real):
    f = real[1]["rt.cgroup"]
    cpu_v1 = [line.split() for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[2] == "cgroup" and "cpu" in line.split()[3].split(",")]
    controllers = qemu_conf_controllers()
    if not cpu_v1 or (controllers is not None and "cpu" not in controllers):
        assert f["status"] == "ok"
    elif not Path(cpu_v1[0][1], "cpu.rt_runtime_us").exists():
        assert f["status"] == "ok"
    else:  # cgroup v1 with RT group scheduling, libvirt using the cpu controller: the HOST-NOTES wall
        assert f["status"] in ("fail", "warn")
        assert "cgroup_controllers" in f["fix"]


def test_isolation_and_iommu_as_sysfs_says(real):
    findings = real[1]
    assert findings["cpu.online"]["status"] == "ok"
    isolated = parse_cpuset(Path("/sys/devices/system/cpu/isolated").read_text())
    core = max(online_cpus())
    assert findings["cpu.isolated"]["status"] == ("ok" if core in isolated else "warn")
    groups = os.listdir("/sys/kernel/iommu_groups") if os.path.isdir("/sys/kernel/iommu_groups") else []
    assert findings["iommu.groups"]["status"] == ("ok" if groups else "warn")  # no passthrough asked
    assert all(findings[i]["status"] == "skip" for i in CHECK_IDS if i.startswith("vfio."))


def test_text_table_on_this_machine(tmp_path):
    config = tmp_path / "dsp.toml"
    config.write_text(f"isolated_cores = [{max(online_cpus())}]\nmemory_mb = 256\n[realtime]\nmlock = false\n")
    res = CliRunner().invoke(cli, ["-c", "test:///default", "check", str(config)])
    lines = res.output.splitlines()
    assert lines[0].split()[:2] == ["STATUS", "ID"]
    assert re.fullmatch(r"\d+ ok, \d+ warn, \d+ fail, \d+ skip", lines[-1])
    assert any(line.startswith("skip    memlock.limit") for line in lines)
