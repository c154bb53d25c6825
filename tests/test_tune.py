"""tune: the order of its steps, its table, and --apply keeping the config's comments."""

from __future__ import annotations

import tomllib
from pathlib import Path

from click.testing import CliRunner

from archdsp_libvirt import parse_config
from archdsp_libvirt.audio.tune import apply, format_tune, plan_steps
from archdsp_libvirt.cli import cli

DEMO = Path(__file__).parent.parent / "domains/demo-dsp.toml"


def demo():
    return parse_config(tomllib.loads(DEMO.read_text()))


def test_steps_run_from_the_lowest_predicted_round_trip_up():
    steps = plan_steps(demo(), [64, 128], [0, 1], [False, True])
    frames = [s.predicted_frames for s in steps]
    assert frames == sorted(frames)
    first = steps[0]
    assert (first.buffer_size, first.network_latency, first.sync, first.predicted_frames) == (64, 0, True, 64)
    # async with the DSP client: (L + 2) periods
    assert next(s for s in steps if s.buffer_size == 128 and s.network_latency == 1 and not s.sync).predicted_frames == 384


def _rep(held_at: int | None):
    steps = []
    for i, s in enumerate(plan_steps(demo(), [64, 128], [0], [True])):
        d = s.as_dict()
        d.update(measured_frames=d["predicted_frames"], measured_ms=d["predicted_ms"], xruns=0 if i == held_at else 7,
                 xruns_per_minute=0.0 if i == held_at else 21.0, held=i == held_at)
        steps.append(d)
    return {"steps": steps, "best": steps[held_at] if held_at is not None else None, "seconds_per_step": 20,
            "sample_rate": 96000}


def test_the_table_names_the_lowest_round_trip_that_held():
    text = format_tune(_rep(1))
    assert "lowest round trip with 0 xruns over 20 s: 1.333 ms (buffer_size = 128, network_latency = 0, sync = true)" \
        in text
    assert "no step held" in format_tune(_rep(None))


def test_apply_writes_the_values_and_keeps_comments(tmp_path):
    cfg = tmp_path / "demo.toml"
    cfg.write_text(DEMO.read_text())
    said = []
    changed = apply(cfg, {"buffer_size": 256, "network_latency": 1, "sync": True}, say=said.append)
    text = cfg.read_text()
    assert "# The demo DSP VM" in text and "# Locked memory needs" in text
    assert changed == ["archibaldos.netjack.buffer_size: 128 -> 256", "archibaldos.netjack.network_latency: 0 -> 1",
                       "archibaldos.netjack.sync: (default) -> true"]
    assert all(str(cfg) in line for line in said)
    nj = tomllib.loads(text)["archibaldos"]["netjack"]
    assert (nj["buffer_size"], nj["network_latency"], nj["sync"]) == (256, 1, True)
    assert apply(cfg, {"buffer_size": 256, "network_latency": 1, "sync": True}, say=said.append) == []
    assert "nothing written" in said[-1]


def test_tune_refuses_bad_lists_before_touching_anything(tmp_path):
    r = CliRunner().invoke(cli, ["tune", "--buffer-sizes", "128,abc", str(DEMO)])
    assert r.exit_code == 2 and "--buffer-sizes" in r.output and "whole numbers" in r.output
    r = CliRunner().invoke(cli, ["tune", "--latencies", "99", str(DEMO)])
    assert r.exit_code == 2 and "from 0 to 16" in r.output


# --- --apply never loses the config ---------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from archdsp_libvirt.errors import ConfigError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TUNED = {"buffer_size": 256, "network_latency": 1, "sync": True}


def _demo_copy(tmp_path, data: bytes | None = None) -> Path:
    cfg = tmp_path / "demo.toml"
    cfg.write_bytes(DEMO.read_bytes() if data is None else data)
    return cfg


@pytest.mark.parametrize(("best", "key", "why"), [
    ({"buffer_size": 100, "network_latency": 1, "sync": True}, "archibaldos.netjack.buffer_size", "power of two"),
    ({"buffer_size": 128, "network_latency": 12, "sync": True}, "archibaldos.netjack.network_latency", "<= 10"),
])
def test_apply_refuses_what_the_config_refuses_before_writing(tmp_path, best, key, why):
    cfg = _demo_copy(tmp_path)
    old = cfg.read_bytes()
    with pytest.raises(ConfigError) as err:
        apply(cfg, best, say=lambda _m: None)
    assert key in err.value.message and why in err.value.message and "unchanged" in err.value.message
    assert cfg.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.toml"]  # no temporary file left


def test_a_write_that_fails_half_way_leaves_the_old_file_whole(tmp_path):
    # A file size limit of 100 bytes: the write stops there, as a full disk would stop it.
    cfg = _demo_copy(tmp_path)
    old = cfg.read_bytes()
    assert len(old) > 100
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "from archdsp_libvirt.audio.tune import apply\n"
            f"apply({str(cfg)!r}, {TUNED!r}, say=print)\n")
    r = subprocess.run([sys.executable, "-B", "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0, r.stdout
    assert "the file is unchanged" in r.stderr, r.stderr
    assert cfg.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.toml"]


def test_apply_refuses_a_symlinked_config_and_leaves_its_target(tmp_path):
    target = _demo_copy(tmp_path)
    old = target.read_bytes()
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    with pytest.raises(ConfigError) as err:
        apply(link, TUNED, say=lambda _m: None)
    assert "symbolic link" in err.value.message and str(target) in err.value.message
    assert target.read_bytes() == old and link.is_symlink()


def test_apply_keeps_the_bom_and_crlf_line_endings(tmp_path):
    from archdsp_libvirt import load_config

    crlf = b"\xef\xbb\xbf" + DEMO.read_bytes().replace(b"\n", b"\r\n")
    cfg = _demo_copy(tmp_path, crlf)
    apply(cfg, TUNED, say=lambda _m: None)
    new = cfg.read_bytes()
    assert new.startswith(b"\xef\xbb\xbf") and new.count(b"\n") == new.count(b"\r\n") > 10
    assert b"# The demo DSP VM" in new and b"sync = true\r\n" in new
    nj = load_config(cfg).netjack
    assert (nj.buffer_size, nj.network_latency, nj.sync) == (256, 1, True)


def test_apply_replaces_the_file_and_keeps_its_mode_and_owner(tmp_path):
    cfg = _demo_copy(tmp_path)
    cfg.chmod(0o640)
    if os.geteuid() == 0:
        os.chown(cfg, 1234, 2345)
    before = cfg.stat()
    apply(cfg, TUNED, say=lambda _m: None)
    after = cfg.stat()
    assert after.st_ino != before.st_ino  # a new file renamed over the old name, not a write in place
    assert (after.st_mode, after.st_uid, after.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.toml"]
