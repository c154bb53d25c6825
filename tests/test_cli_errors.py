"""Exceptions that are not ours become one line at the CLI boundary, never a traceback.

Each is made to happen for real where the machine allows: a state folder the user may not write,
a program missing from PATH, a half-written state file.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

import archdsp_libvirt.audio.jack2.bridge as bridge
import archdsp_libvirt.audio.link as link
import archdsp_libvirt.config  # noqa: F401  (imported before any euid switch)
from archdsp_libvirt.cli import cli, describe_os_error, unexpected

NOBODY = 65534


def one_line_error(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


@pytest.fixture
def run_dir(monkeypatch):
    """A bridge state folder (world-readable, root-owned) with a minimal config beside it."""
    d = Path(tempfile.mkdtemp(prefix="archdsp-test-run-", dir="/tmp"))
    d.chmod(0o755)
    monkeypatch.setattr(link, "RUN_DIR", d)
    config = d / "cfg.toml"
    config.write_text('name = "archdsp-test-err"\nisolated_cores = [1]\nmemory_mb = 256\n')
    config.chmod(0o644)
    yield d, config
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@contextlib.contextmanager
def as_nobody():
    if os.geteuid() != 0:
        yield  # already unprivileged
        return
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_permission_denied_on_the_state_folder_is_one_line_with_a_fix(run_dir):
    d, config = run_dir
    state = d / "netjack-archdsp-test-err.json"
    state.write_text(json.dumps({"server": "archdsp-test-none", "supervisor": None,
                                 "server_process": {"pid": 2**22 + 7, "start": 1}}))
    state.chmod(0o644)
    with as_nobody():
        result = CliRunner().invoke(cli, ["netjack", "stop", str(config)])
    line = one_line_error(result)
    # The first file it cannot write in the root-owned state folder (the bridge's lock, then its state).
    assert f"{d}/netjack-archdsp-test-err." in line and "Permission denied" in line and "run as root" in line
    assert state.exists()


def test_a_program_missing_from_path_is_one_line_naming_it(run_dir, tmp_path, monkeypatch):
    import archdsp_libvirt.procs as procs

    d, config = run_dir
    (d / "netjack-archdsp-test-err.json").write_text(json.dumps(
        {"domain": "archdsp-test-err", "server": "archdsp-test-none", "supervisor": None, "server_process": None,
         "master_ip": "127.0.0.1", "port": 19000, "slave": "dsp", "channels": 2, "started": 0}))
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(procs, "SAFE_PATH", str(empty))  # as root children get SAFE_PATH, never the caller's
    result = CliRunner(env={"PATH": str(empty)}).invoke(cli, ["netjack", "stop", str(config)])
    line = one_line_error(result)
    assert "cannot run jack_unload: not found on PATH (apt-get install jackd2)" in line


def test_a_partial_state_file_is_one_line_naming_the_file(run_dir, monkeypatch):
    d, config = run_dir
    state = d / "netjack-archdsp-test-err.json"
    state.write_text(json.dumps({"supervisor": None}))  # no "server"
    monkeypatch.delenv("ARCHDSP_DEBUG", raising=False)
    for verb in ("status", "stop"):
        line = one_line_error(CliRunner().invoke(cli, ["netjack", verb, str(config)]))
        assert line.startswith(f"Error: {state}: not a bridge state this version reads") and "missing required field" in line
        assert "internal error" not in line and "remove the file" in line


def test_an_unexpected_error_is_an_internal_error_line_and_a_traceback_with_debug(run_dir, monkeypatch):
    _d, config = run_dir

    def broken(_name):
        return {}["server"]

    monkeypatch.setattr(bridge, "status", broken)
    (_d / "netjack-archdsp-test-err.json").write_text(json.dumps({"audio_server": "jack"}))
    monkeypatch.delenv("ARCHDSP_DEBUG", raising=False)
    line = one_line_error(CliRunner().invoke(cli, ["netjack", "status", str(config)]))
    assert line.startswith("Error: internal error: KeyError: 'server'") and "please report" in line
    debug = CliRunner(env={"ARCHDSP_DEBUG": "1"}).invoke(cli, ["netjack", "status", str(config)])
    assert isinstance(debug.exception, KeyError)


def test_ctrl_c_in_a_command_exits_130(monkeypatch, run_dir):
    _d, config = run_dir

    def interrupted(_name):
        raise KeyboardInterrupt

    monkeypatch.setattr(bridge, "status", interrupted)
    result = CliRunner().invoke(cli, ["netjack", "status", str(config)])
    assert result.exit_code == 130 and "Traceback" not in result.stderr


def test_process_gone_is_one_line():
    import signal

    # The signal goes through a pidfd of our own child, taken before it was reaped: it can reach that
    # process only, never another one that got its PID since.
    child = subprocess.Popen(["true"])
    pidfd = os.pidfd_open(child.pid)
    try:
        child.wait()
        with pytest.raises(ProcessLookupError) as exc:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    finally:
        os.close(pidfd)
    assert describe_os_error(exc.value) == "no such process (the process exited meanwhile; run the command again)"


def test_jack_errors_are_one_line_only_when_jack_is_loaded(monkeypatch):
    jack = pytest.importorskip("jack")
    err = jack.JackError("Error connecting ports")
    failure = unexpected(err)
    assert failure is not None and failure.message == "JACK: Error connecting ports" and failure.exit_code == 1
    import sys

    monkeypatch.delitem(sys.modules, "jack")
    failure = unexpected(err)  # without jack imported, it is not recognised (and never imported for it)
    assert "jack" not in sys.modules
    assert failure.message.startswith("internal error: JackError")


def test_os_error_lines_name_both_files_and_quote_control_characters():
    try:
        os.rename("/nonexistent/a\nb", "/nonexistent/c")
    except OSError as exc:
        text = describe_os_error(exc)
    assert text == "'/nonexistent/a\\nb' -> /nonexistent/c: No such file or directory (check that it exists)"
