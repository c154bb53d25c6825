"""``rt-test`` and ``tune``: whether this host and guest hold a period, and which setting does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from ..service import rt_test_command, tune_command
from .options import Finite, config_argument, json_option, plot_file

plot_option = click.option("--plot", "plot_path", type=plot_file,
                           help="Draw the result into this PNG (matplotlib: the [plot] extra).")


def _ints(text: str, what: str, lo: int, hi: int) -> list[int]:
    try:
        parts = [v.strip() for v in text.split(",") if v.strip()]
        if any(not re.fullmatch(r"[0-9]{1,6}", v) for v in parts):  # int() also takes other scripts' digits
            raise ValueError(text)
        vals = sorted({int(v) for v in parts})
    except ValueError:
        raise click.BadParameter(f"{text!r}: a comma-separated list of whole numbers is expected", param_hint=what)
    if not vals or any(not lo <= v <= hi for v in vals):
        raise click.BadParameter(f"{text!r}: each value must be from {lo} to {hi}", param_hint=what)
    return vals


@click.command("rt-test")
@config_argument
@click.option("--seconds", type=Finite(1, 3600), default=10.0, show_default=True,
              help="How long cyclictest runs in the guest.")
@json_option("Print JSON (samples, min_us, avg_us, max_us, histogram, ...).")
@plot_option
@click.option("--force", is_flag=True, help="Take over a console another session holds.")
@click.pass_obj
def rt_test(obj, config: Path, seconds: float, as_json: bool, plot_path: Path | None, force: bool) -> None:
    """In-guest scheduling latency: cyclictest on the vCPU while the audio runs, against the period."""
    r, text = rt_test_command(config, getattr(obj, "uri", None), seconds, force=force, plot_path=plot_path)
    click.echo(json.dumps(r, indent=2, sort_keys=True) if as_json else text, nl=as_json)


@click.command()
@config_argument
@click.option("--buffer-sizes", default="64,128,256", show_default=True, help="Periods (frames) to try.")
@click.option("--latencies", default="0,1,2", show_default=True, help="NETJACK network latencies to try.")
@click.option("--sync", "sync_modes", type=click.Choice(["both", "on", "off"]), default="both", show_default=True,
              help="Slave modes to try.")
@click.option("--seconds", type=Finite(5, 3600), default=20.0, show_default=True,
              help="Soak per step: a step holds when it has zero xruns for this long.")
@click.option("--all", "every", is_flag=True, help="Run every step, not only up to the first that holds.")
@click.option("--apply", "do_apply", is_flag=True,
              help="Write the chosen values into CONFIG (comments kept); it says what it changed.")
@json_option("Print JSON (steps, best).")
@plot_option
@click.pass_obj
def tune(obj, config: Path, buffer_sizes: str, latencies: str, sync_modes: str, seconds: float, every: bool,
         do_apply: bool, as_json: bool, plot_path: Path | None) -> None:
    """Sweep buffer_size, network_latency and sync on the running VM; report the lowest round trip
    that held zero xruns."""
    sizes = _ints(buffer_sizes, "--buffer-sizes", 16, 4096)
    lats = _ints(latencies, "--latencies", 0, 16)
    syncs = {"both": [False, True], "on": [True], "off": [False]}[sync_modes]
    say = (lambda m: click.echo(m, err=True)) if as_json else click.echo
    rep, text = tune_command(config, getattr(obj, "uri", None), sizes, lats, syncs, seconds, every=every,
                             do_apply=do_apply, plot_path=plot_path, say=say)
    click.echo(json.dumps(rep, indent=2, sort_keys=True) if as_json else text, nl=as_json)
