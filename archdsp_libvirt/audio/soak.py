"""A latency soak: xruns per minute, the round trip over time, late or lost NETJACK cycles, a plot.

``latency.measure`` records when each jack_iodelay reading and each xrun came; this module
turns that into windows, counts what JACK2's NETJACK master logged about late or lost
cycles, and draws it (matplotlib, Agg, imported only when a plot is asked for).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

# What JACK2's NETJACK master (netmanager, in the host jackd) prints when a cycle comes late or not at all.
LATE_CYCLE = r"missing last data packet|Packet\(s\) missing|client = (netmanager|{slave}(-\d+)?) was not finished"
LINK_LOST = re.compile(r"connection lost", re.I)


def count_link_events(log: str | None, start: int, slave: str = "dsp") -> dict:
    """Late/lost NETJACK cycles and lost connections the master logged after byte ``start`` of ``log``.

    ``None`` counts mean the server's output is not ours to read (a server the bridge did not start).
    """
    if not log or not os.path.exists(log):
        return {"late_cycles": None, "link_lost": None}
    with open(log, "rb") as fh:
        fh.seek(start)
        text = fh.read().decode("utf-8", "replace")
    late = re.compile(LATE_CYCLE.format(slave=re.escape(slave)))
    return {"late_cycles": sum(1 for _ in late.finditer(text)), "link_lost": len(LINK_LOST.findall(text))}


def windows(rep: dict, width: float | None = None) -> list[dict]:
    """The run cut into windows: xruns and the round trip (frames: min, most frequent, max) in each."""
    seconds = float(rep["seconds"])
    width = width or max(1.0, seconds / 20)
    n = max(1, int(-(-seconds // width)))
    out = []
    for i in range(n):
        lo, hi = i * width, min(seconds, (i + 1) * width)
        vals = [round(v) for v, t in zip(rep["readings"], rep.get("reading_times", ()), strict=False) if lo <= t < hi]
        xr = sum(1 for t in rep.get("xrun_times", ()) if lo <= t < hi)
        out.append({"start_s": round(lo, 3), "end_s": round(hi, 3), "xruns": xr, "readings": len(vals),
                    "min_frames": min(vals) if vals else None,
                    "mode_frames": Counter(vals).most_common(1)[0][0] if vals else None,
                    "max_frames": max(vals) if vals else None})
    return out


def format_soak(rep: dict) -> str:
    late = rep.get("late_cycles")
    if "dropped_packets" in rep:  # PipeWire: its manager logs nothing; the kernel counts what the queue dropped
        dropped = rep["dropped_packets"]
        seen = ("late NETJACK packets the manager's bounded receive queue dropped: "
                + (f"{dropped}" if dropped is not None else "not counted (the manager restarted meanwhile)"))
    else:
        seen = ("late or lost NETJACK cycles (master's log): "
                + (f"{late}, lost connections: {rep.get('link_lost')}" if late is not None
                   else "not visible (the JACK server was not started by the bridge)"))
    lines = [f"xruns per minute: {rep['xruns_per_minute']:g} ({rep['xruns']} in {rep['seconds']:g} s); " + seen]
    if rep["seconds"] >= 20:
        lines.append("  window (s)     xruns  round trip frames (min/mode/max)")
        for w in windows(rep):
            rt = (f"{w['min_frames']}/{w['mode_frames']}/{w['max_frames']}" if w["readings"] else "no signal")
            lines.append(f"  {w['start_s']:6.1f}-{w['end_s']:<6.1f} {w['xruns']:6d}  {rt}")
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: str | os.PathLike[str], title: str = "") -> Path:
    """Round trip (ms) and xruns over time, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from ..config.paths import write_output

    rate = rep["sample_rate"]
    ws = windows(rep)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, height_ratios=[3, 2])
    times = rep.get("reading_times", [])
    ms = [v * 1000.0 / rate for v in rep["readings"]]
    hi_ms = (rep["predicted_max_frames"] * 1000.0 / rate) if rep.get("predicted_max_frames") else None
    if hi_ms is not None and rep.get("predicted_ms") is not None:  # PipeWire: a range
        ax1.axhspan(rep["predicted_ms"], hi_ms, color="tab:green", alpha=0.15, zorder=1,
                    label=f"predicted {rep['predicted_ms']:.3f}..{hi_ms:.3f} ms")
    elif rep.get("predicted_ms") is not None:
        ax1.axhline(rep["predicted_ms"], color="tab:green", linestyle="--", zorder=1,
                    label=f"predicted {rep['predicted_ms']:.3f} ms")
    ax1.plot(times, ms, ".", markersize=4, color="tab:blue", zorder=2,
             label=rep.get("reading_label", "reading"))
    top = max(ms + [rep.get("predicted_ms") or 0.0, hi_ms or 0.0, 0.1])
    ax1.set_ylim(0, top * 1.25)
    ax1.set_ylabel("round trip (ms)")
    ax1.grid(True, alpha=0.3)
    ax1.legend(loc="upper right", fontsize=8)
    dropped = (f", {rep['dropped_packets']} late packets dropped" if rep.get("dropped_packets") is not None
               else "")
    ax1.set_title(title or (f"{rep.get('buffer_size')} frames @ {rate} Hz, L={rep.get('network_latency')}, "
                            f"{'sync' if rep.get('sync_slave') else 'async'}: {rep['xruns']} xruns in "
                            f"{rep['seconds']:g} s ({rep['xruns_per_minute']:g}/min){dropped}"))
    width = ws[0]["end_s"] - ws[0]["start_s"] if ws else 1.0
    ax2.bar([w["start_s"] for w in ws], [w["xruns"] for w in ws], width=width * 0.9, align="edge",
            color="tab:red")
    ax2.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.set_ylim(0, max([w["xruns"] for w in ws] + [1]) * 1.15)
    ax2.set_ylabel(f"xruns per {width:g} s")
    ax2.set_xlabel("time since the soak started (s)")
    ax2.set_xlim(0, float(rep["seconds"]))
    ax2.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    write_output(out, lambda f: fig.savefig(f, dpi=100, format="png"))  # never through a planted link
    plt.close(fig)
    return out
