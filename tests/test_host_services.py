"""scripts/host-services: `stop` undoes exactly what `start` changed (qemu.conf, the hugepage pool,
/dev/kvm's mode and group), and only while it is still what `start` made it.

The script is sourced by bash with its paths pointed at a tree of the test's own, and its setup and
undo steps are called one by one: nothing on the machine is touched, no daemon is started or stopped.
The package is asked through a venv of the test's own (ARCHDSP_VENV) whose python runs this checkout's
package, as the installed one would be run: ``python -I -m archdsp_libvirt host prepare ...``.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "host-services"

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
    fake_venv(tmp_path / "venv", f"""[ "$1 $2 $3" = "-I -m archdsp_libvirt" ] || {{ echo "not isolated: $*" >&2; exit 99; }}
shift 3
exec {sys.executable} -I -c 'import sys; sys.path.insert(0, sys.argv.pop(1)); from archdsp_libvirt.cli import main; main(sys.argv[1:])' {REPO} "$@"
""")
    return tmp_path


def fake_venv(venv: Path, body: str) -> Path:
    """A venv as the script sees one: pyvenv.cfg, and a bin/python running ``body`` (sh)."""
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    py = venv / "bin" / "python"
    py.write_text("#!/bin/sh\n" + body)
    py.chmod(0o755)
    return venv


def run(tree: Path, steps: str, rt_budget: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    script = f"""
source {SCRIPT}
STATE_DIR={tree}/state STATE_FILE={tree}/state/host-services.state LOCK_FILE={tree}/state/lock
QEMU_CONF={tree}/qemu.conf QEMU_CONF_BACKUP={tree}/qemu.conf.archdsp-orig
HUGEPAGE_DIR={tree}/hp KVM_DEV={tree}/kvm HUGETLBFS_MNT={tree}/no-such-mount
{"machine_lacks_rt_budget() { return 0; }   # as on a cgroup v1 host with RT group scheduling" if rt_budget else ""}
daemon_running() {{ return 1; }}
load_state
{steps}
"""
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ARCHDSP_HUGEPAGES": "300", "ARCHDSP_VENV": str(tree / "venv"),
                               **(env or {})})


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


# --- asking the package: a crash is not an answer, and only a venv nobody else controls is asked ----------

LINE = 'cgroup_controllers = [ "cpuset", "memory", "devices", "blkio", "cpuacct" ]'


def helper(tree: Path, crash_on: str, exit_code: int = 1) -> None:
    """The venv's python answers qemu-conf-line, and exits ``exit_code`` (a traceback) when asked ``crash_on``."""
    fake_venv(tree / "venv", f"""case "$*" in
  *{crash_on}*) echo 'Traceback (most recent call last): ModuleNotFoundError' >&2; exit {exit_code} ;;
  *qemu-conf-line*) echo '{LINE}' ;;
  *) exit 3 ;;
esac
""")


def test_a_crash_of_the_rt_budget_helper_stops_start_instead_of_reading_as_nothing_to_fix(tree):
    helper(tree, "rt-budget")
    r = run(tree, "setup_qemu_conf; echo went on", rt_budget=False)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "went on" not in r.stdout and "left alone" not in r.stdout
    assert "cannot ask the package: archdsp-virt host prepare rt-budget failed (exit 1" in r.stderr
    assert (tree / "qemu.conf").read_text() == STOCK


def test_the_helper_s_no_is_its_own_exit_code(tree):
    helper(tree, "rt-budget", exit_code=3)  # the package's "no": nothing to fix
    r = run(tree, "setup_qemu_conf; echo went on", rt_budget=False)
    assert r.returncode == 0, r.stderr
    assert "cgroup_controllers left alone" in r.stdout and "went on" in r.stdout


def test_the_real_verdict_comes_through_the_installed_cli(tree):
    """This checkout's package, asked as the installed one is: the same answer as the CLI gives."""
    r = run(tree, 'ask qemu-conf-line && echo "line=$REPLY"; ask start-time $$ && echo started; '
                  'ask start-time 2147483647 || echo no-such-pid', rt_budget=False)
    assert r.returncode == 0, r.stderr
    assert f"line={LINE}" in r.stdout and "started" in r.stdout and "no-such-pid" in r.stdout


def test_a_crash_while_checking_a_recorded_daemon_keeps_the_record(tree):
    helper(tree, "owned")
    (tree / "state" / "host-services.state").write_text(f"libvirtd=pid:{os.getpid()}:12345\n")
    r = run(tree, "stop_daemon libvirtd")
    assert r.returncode == 1 and "no longer the process" not in r.stdout, (r.stdout, r.stderr)
    assert "host prepare owned libvirtd" in r.stderr
    assert (tree / "state" / "host-services.state").read_text() == f"libvirtd=pid:{os.getpid()}:12345\n"


def test_archdsp_python_is_never_run(tree):
    marker = tree / "ran"
    evil = tree / "evil-python"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\necho '{LINE}'\n")
    evil.chmod(0o755)
    r = run(tree, "setup_qemu_conf", env={"ARCHDSP_PYTHON": str(evil)})
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert "ARCHDSP_PYTHON is not read" in r.stderr


@pytest.mark.parametrize("spoil", ["world-writable venv", "group-writable file", "no pyvenv.cfg", "relative path"])
def test_a_venv_someone_else_controls_is_not_run(tree, spoil):
    marker = tree / "ran"
    venv = fake_venv(tree / "other", f"touch {marker}\necho '{LINE}'\n")
    where = str(venv)
    if spoil == "world-writable venv":
        venv.chmod(0o777)
    elif spoil == "group-writable file":
        (venv / "bin" / "python").chmod(0o775)
    elif spoil == "no pyvenv.cfg":
        (venv / "pyvenv.cfg").unlink()
    else:
        where = "other"
    r = subprocess.run(["bash", "-c", f"cd {tree} && source {SCRIPT} && ask qemu-conf-line; echo rc=$?"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "ARCHDSP_VENV": where})
    assert not marker.exists(), (r.stdout, r.stderr)
    assert "cannot ask the package" in r.stderr and "rc=" not in r.stdout


def test_the_venv_of_the_install_is_trusted_where_it_exists(tree):
    venv = Path(sys.prefix)
    if not (venv / "pyvenv.cfg").exists():
        pytest.skip("the suite does not run on a venv")
    r = subprocess.run(["bash", "-c", f"source {SCRIPT} && trusted_venv {venv} && echo trusted"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("trusted"), r.stdout
