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
