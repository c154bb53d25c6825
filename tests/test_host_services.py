"""scripts/host-services: `stop` undoes exactly what `start` changed (qemu.conf, the hugepage pool,
/dev/kvm's mode and group), and only while it is still what `start` made it.

The script is sourced by bash with its paths pointed at a tree of the test's own, and its setup and
undo steps are called one by one: nothing on the machine is touched, no daemon is started or stopped.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "host-services"

pytestmark = pytest.mark.skipif(not shutil.which("bash") or not shutil.which("sha256sum"), reason="needs bash")

STOCK = "# stock qemu.conf\n#cgroup_controllers = [ \"cpu\", \"devices\", \"memory\", \"blkio\", \"cpuset\", \"cpuacct\" ]\nuser = \"libvirt-qemu\"\n"


@pytest.fixture
def tree(tmp_path):
    try:
        grp.getgrnam("kvm")
    except KeyError:
        pytest.skip("no 'kvm' group on this machine")
    (tmp_path / "state").mkdir()
    (tmp_path / "hp").mkdir()
    (tmp_path / "hp" / "nr_hugepages").write_text("10\n")
    (tmp_path / "hp" / "free_hugepages").write_text("10\n")
    (tmp_path / "qemu.conf").write_text(STOCK)
    kvm = tmp_path / "kvm"
    kvm.write_text("")
    os.chown(kvm, -1, 0)
    kvm.chmod(0o600)
    return tmp_path


def run(tree: Path, steps: str) -> subprocess.CompletedProcess:
    script = f"""
source {SCRIPT}
STATE_DIR={tree}/state STATE_FILE={tree}/state/host-services.state LOCK_FILE={tree}/state/lock
QEMU_CONF={tree}/qemu.conf QEMU_CONF_BACKUP={tree}/qemu.conf.archdsp-orig
HUGEPAGE_DIR={tree}/hp KVM_DEV={tree}/kvm HUGETLBFS_MNT={tree}/no-such-mount
machine_lacks_rt_budget() {{ return 0; }}   # as on a cgroup v1 host with RT group scheduling
daemon_running() {{ return 1; }}
load_state
{steps}
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ARCHDSP_HUGEPAGES": "300"})


def mode_group(path: Path) -> tuple[int, str]:
    st = path.stat()
    return stat.S_IMODE(st.st_mode), grp.getgrgid(st.st_gid).gr_name


def test_stop_undoes_exactly_what_start_changed(tree):
    started = run(tree, "setup_kvm; setup_hugepages; setup_qemu_conf")
    assert started.returncode == 0, started.stderr
    assert mode_group(tree / "kvm") == (0o660, "kvm")
    assert (tree / "hp" / "nr_hugepages").read_text().strip() == "300"
    assert 'cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ]' in (tree / "qemu.conf").read_text()
    state = (tree / "state" / "host-services.state").read_text()
    assert "hugepages=10:300" in state and "kvm_mode=600:root" in state and "qemu_conf=sha256:" in state

    stopped = run(tree, "undo_changes")
    assert stopped.returncode == 0, stopped.stderr
    assert (tree / "qemu.conf").read_text() == STOCK
    assert not (tree / "qemu.conf.archdsp-orig").exists()
    assert (tree / "hp" / "nr_hugepages").read_text().strip() == "10"
    assert mode_group(tree / "kvm") == (0o600, "root")
    assert not (tree / "state" / "host-services.state").exists()
    out = stopped.stdout
    assert "qemu.conf: restored the original" in out
    assert "hugepages: pool back to 10 x 2 MiB (was raised to 300)" in out
    assert f"{tree}/kvm: back to mode 600 group root" in out


def test_stop_leaves_what_was_changed_again_after_start_and_says_why(tree):
    assert run(tree, "setup_kvm; setup_hugepages; setup_qemu_conf").returncode == 0
    with open(tree / "qemu.conf", "a") as fh:
        fh.write("max_files = 4096\n")  # an admin's edit after ours
    (tree / "hp" / "nr_hugepages").write_text("512\n")  # someone raised the pool further
    stopped = run(tree, "undo_changes")
    assert stopped.returncode == 0, stopped.stderr
    assert "max_files = 4096" in (tree / "qemu.conf").read_text()
    assert "qemu.conf: left as it is: it was changed after this script edited it" in stopped.stdout
    assert (tree / "hp" / "nr_hugepages").read_text().strip() == "512"
    assert "hugepages: pool left at 512" in stopped.stdout
    assert mode_group(tree / "kvm") == (0o600, "root")  # that one was still ours: undone


def test_start_on_a_prepared_host_records_nothing_to_undo(tree):
    (tree / "hp" / "nr_hugepages").write_text("400\n")
    os.chown(tree / "kvm", -1, grp.getgrnam("kvm").gr_gid)
    (tree / "kvm").chmod(0o660)
    (tree / "qemu.conf").write_text('cgroup_controllers = [ "cpuset", "memory" ]\n')
    assert run(tree, "setup_kvm; setup_hugepages; setup_qemu_conf").returncode == 0
    assert not (tree / "state" / "host-services.state").exists()
    stopped = run(tree, "undo_changes")
    assert stopped.returncode == 0 and stopped.stdout == ""
    assert (tree / "hp" / "nr_hugepages").read_text().strip() == "400"


def test_a_second_start_keeps_the_first_original(tree):
    assert run(tree, "setup_hugepages").returncode == 0
    (tree / "hp" / "nr_hugepages").write_text("100\n")  # something lowered it meanwhile
    assert run(tree, "setup_hugepages").returncode == 0
    assert "hugepages=10:300" in (tree / "state" / "host-services.state").read_text()
