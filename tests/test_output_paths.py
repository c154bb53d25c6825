"""Files the commands write for the user (``--plot``): refused while the options are read, before any
soak, cyclictest or sweep, by the config paths' rules; and written without following a link.

Every command that names an output file is here: ``rt-test --plot``, ``tune --plot``,
``latency --measure --plot`` (the ``--json`` options print to stdout and name no file).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import archdsp_libvirt.service.audio as service_audio
from archdsp_libvirt.cli import cli
from archdsp_libvirt.config.paths import output_file, write_output
from archdsp_libvirt.errors import Invalid

GOOD = 'name = "archdsp-test-out"\nisolated_cores = [1]\nmemory_mb = 256\n[archibaldos.netjack]\nenable = true\n'

# command -> (its arguments before the plot path, the service function that does the work)
COMMANDS = {
    "rt-test": (["rt-test", "--seconds", "1"], "rt_test_command", ({"samples": 0}, "done\n")),
    "tune": (["tune", "--seconds", "5"], "tune_command", ({"steps": [], "best": None}, "done\n")),
    "latency": (["latency", "--measure", "--seconds", "2"], "latency_command", "done\n"),
}


@pytest.fixture
def work(monkeypatch, tmp_path):
    """The work each command would start, replaced by a recorder: a refused path must never reach it."""
    calls = []
    for _args, name, result in COMMANDS.values():
        def record(*args, _name=name, _result=result, **kwargs):
            calls.append((_name, kwargs.get("plot_path", args[-1] if _name == "latency_command" else None)))
            return _result
        monkeypatch.setattr(service_audio, name, record)
    config = tmp_path / "cfg.toml"
    config.write_text(GOOD)
    return calls, config


def run(command: str, plot: str, config: Path):
    args, _name, _result = COMMANDS[command]
    return CliRunner().invoke(cli, [*args, "--plot", plot, str(config)])


def refused(result) -> str:
    """Exit 2, one line naming --plot, no traceback."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: --plot "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def _shared(tmp_path: Path) -> Path:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp: every user may write, sticky
    return shared


# (id, how the bad target is made from tmp_path -> the --plot value, what the line must say)
def _missing(t):
    return str(t / "no-such-folder" / "out.png")


def _extension(t):
    return str(t / "out.txt")


def _fifo(t):
    os.mkfifo(t / "fifo.png")
    return str(t / "fifo.png")


def _etc(_t):
    return "/etc/archdsp-test-plot.png"


def _dev(_t):
    return "/dev/null"


def _folder(t):
    (t / "dir.png").mkdir()
    return str(t / "dir.png")


def _linked_folder_in_shared(t):
    real = t / "real"
    real.mkdir()
    (_shared(t) / "link").symlink_to(real)
    return str(t / "shared" / "link" / "out.png")


def _link_target(t):
    victim = t / "victim.png"
    victim.write_bytes(b"keep")
    (t / "plot.png").symlink_to(victim)
    return str(t / "plot.png")


def _link_to_etc(t):
    (t / "etc-link").symlink_to("/etc")
    return str(t / "etc-link" / "out.png")


def _dotdot(t):
    return str(t / "a" / ".." / "out.png")


def _newline(t):
    return str(t / "a\nb.png")


def _file_as_folder(t):
    (t / "file").write_text("x")
    return str(t / "file" / "out.png")


BAD = [
    ("missing-folder", _missing, "does not exist; create it"),
    ("extension", _extension, "ending in .png"),
    ("fifo", _fifo, "a FIFO or socket; a regular file is expected"),
    ("etc", _etc, "is under /etc"),
    ("device", _dev, "is under /dev"),
    ("folder", _folder, "is a folder"),
    ("link-in-shared-folder", _linked_folder_in_shared, "symlink"),
    ("target-is-a-link", _link_target, "is a symlink to"),
    ("link-into-etc", _link_to_etc, "resolves to a folder under /etc"),
    ("dotdot", _dotdot, "'..' segments"),
    ("newline", _newline, "control characters"),
    ("file-as-folder", _file_as_folder, "is not a folder; name a file in an existing folder"),
]


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("make, needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_plot_target_is_refused_before_the_work(work, tmp_path, command, make, needle):
    calls, config = work
    line = refused(run(command, make(tmp_path), config))
    assert needle in line, line
    assert calls == [], "the measurement started although its plot could not be written"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_good_plot_target_reaches_the_work_as_an_absolute_path(work, tmp_path, monkeypatch, command):
    calls, config = work
    (tmp_path / "old.png").write_bytes(b"old")  # an existing regular file is replaced
    monkeypatch.chdir(tmp_path)
    for plot in ("new.png", "old.png"):
        result = run(command, plot, config)
        assert result.exit_code == 0, (result.output, result.exception)
        assert calls[-1][1] == tmp_path / plot and calls[-1][1].is_absolute()
    assert len(calls) == 2


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_plotting_without_matplotlib_names_the_extra_before_the_work(work, tmp_path, monkeypatch, command):
    """``pip install .`` without the [plot] extra: a None entry in sys.modules is how Python spells
    "this module cannot be imported" (find_spec answers None, import raises ModuleNotFoundError)."""
    calls, config = work
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = refused(run(command, str(tmp_path / "out.png"), config))
    assert "needs matplotlib" in line and "pip install 'archdsp-libvirt[plot]'" in line, line
    assert calls == []
    args, _name, _result = COMMANDS[command]
    result = CliRunner().invoke(cli, [*args, str(config)])  # without --plot, the command runs as before
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(calls) == 1


# --- the writer: no link followed, even one planted after the check ---

def test_a_link_planted_after_the_check_is_replaced_not_written_through(tmp_path):
    shared = _shared(tmp_path)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    target = output_file(str(shared / "out.png"), (".png",))  # checked: nothing there yet
    (shared / "out.png").symlink_to(victim)  # another user plants a link meanwhile
    assert write_output(target, lambda f: f.write(b"\x89PNG plot")) == target
    assert victim.read_bytes() == b"root's file"
    st = os.lstat(target)
    assert stat.S_ISREG(st.st_mode) and Path(target).read_bytes() == b"\x89PNG plot"
    assert sorted(p.name for p in shared.iterdir()) == ["out.png"]  # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    old = tmp_path / "out.png"
    old.write_bytes(b"old plot")

    def broken(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_output(old, broken)
    assert old.read_bytes() == b"old plot"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_a_new_file_gets_the_umask_s_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        write_output(tmp_path / "out.png", lambda f: f.write(b"x"))
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "out.png").st_mode) == 0o640


def test_the_plots_are_written_through_the_writer_as_png(tmp_path):
    pytest.importorskip("matplotlib")
    from archdsp_libvirt.audio import soak

    rep = {"sample_rate": 48000, "readings": [480, 482], "reading_times": [1.0, 2.0], "seconds": 4.0,
           "xruns": 0, "xruns_per_minute": 0.0, "xrun_times": [], "predicted_ms": 10.0}
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "soak.png").symlink_to(victim)
    out = soak.plot(rep, tmp_path / "soak.png", title="t")
    assert victim.read_bytes() == b"keep"
    assert not out.is_symlink() and out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_output_file_rules_are_the_config_paths_rules():
    for bad in ("/proc/x.png", "/sys/x.png", "/run/x.png", "/home/u/.ssh/x.png", "~root/x.png"):
        with pytest.raises(Invalid):
            output_file(bad, (".png",))
