"""``tune``: sweep buffer_size, network_latency and sync on the running VM, soaking each step, and
find the lowest round trip that held zero xruns.

Each step sets the host JACK server's period (JACK2's NETJACK master drops its slaves on a period
change; they rejoin at the new one) and restarts the guest's jackd with the step's network latency
and sync mode through the guest's console (the demo guest's init reads /run/archdsp-restart), waits
for the link and the DSP loop, then soaks with ``latency.measure``. Steps run from the lowest
predicted round trip up; the first that holds is the answer unless ``every`` asks for all of them.
Nothing is written to the config unless ``apply`` is asked for, and then it says what it changed.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING

from msgspec import Struct, structs

from ..config import DspConfig
from ..config.paths import write_output
from ..errors import ArchdspError, BridgeError, ConfigError
from . import servers
from .budget import frames_to_ms

if TYPE_CHECKING:
    from ..host.model import HostModel

READY = r"ARCHDSP-READY name="
FAILED = r"ARCHDSP-FAILED"
RESTART_DELAY = 6  # seconds the guest waits between stopping and starting its jackd


class Step(Struct, frozen=True):
    buffer_size: int
    network_latency: int
    sync: bool
    predicted_frames: int
    predicted_ms: float
    measured_frames: int | None = None
    measured_ms: float | None = None
    xruns: int | None = None
    xruns_per_minute: float | None = None
    late_cycles: int | None = None
    seconds: float = 0.0
    held: bool = False
    problem: str | None = None
    channel: str | None = None  # how the guest's slave was restarted: "guest-agent" or "console"

    def as_dict(self) -> dict:
        return structs.asdict(self)


def predicted(cfg: DspConfig, size: int, latency: int, sync: bool) -> int:
    a = 1 + (1 if cfg.netjack.dsp_client and not sync else 0)
    return (latency + a) * size


def plan_steps(cfg: DspConfig, sizes, latencies, syncs) -> list[Step]:
    """Every combination, lowest predicted round trip first (ties: the larger period, the safer)."""
    rate = cfg.netjack.sample_rate
    steps = []
    for size, lat, sync in itertools.product(sizes, latencies, syncs):
        p = predicted(cfg, size, lat, sync)
        steps.append(Step(size, lat, sync, p, round(frames_to_ms(p, rate), 4)))
    return sorted(steps, key=lambda s: (s.predicted_frames, -s.buffer_size, s.sync))


def _restart_guest(cfg: DspConfig, session, size: int, latency: int, sync: bool, timeout: float) -> str:
    """Restart the guest's jackd with ``latency``/``sync`` while the host runs at ``size`` frames; returns
    the channel used: "guest-agent", else "console".

    The guest stops its jackd and waits (a master still serving the old slave keeps sending audio to
    the slave's port, and a new slave bound to it meanwhile spins on those packets); the host's period
    is set once that master is gone. Then the guest starts jackd and says it is ready.
    """
    from ..errors import AgentUnavailable
    from ..virt import guest

    try:
        how = guest.request_restart(session, cfg.name, latency, sync, RESTART_DELAY)
    except AgentUnavailable:
        _restart_on_console(cfg, session, size, latency, sync, timeout)
        return "console"
    # The old jackd is stopped; the master for it notices within a few cycles and exits by itself.
    # Only then change the host's period (changing it while a master exits can hang JACK2 1.9.21).
    time.sleep(3)
    servers.of_domain(cfg.name).set_period(cfg.name, size)
    guest.start_slave(session, cfg.name, how)
    guest.wait_ready(session, cfg.name, how, latency, sync, timeout)
    return "guest-agent"


def _restart_on_console(cfg: DspConfig, session, size: int, latency: int, sync: bool, timeout: float) -> None:
    """:func:`_restart_guest` through a shell on the guest's serial console (a guest without an agent)."""
    from ..virt.console import expect

    line = f"echo 'LATENCY={latency} SYNC={int(sync)} DELAY={RESTART_DELAY}' > /run/archdsp-restart\n"
    asked, seen = expect(session, cfg.name, r"restart requested", 30, send=b"\n" + line.encode())
    if asked:
        time.sleep(3)
        servers.of_domain(cfg.name).set_period(cfg.name, size)
        matched, seen = expect(session, cfg.name, f"{READY}|{FAILED}", timeout)
    if not asked or not matched or FAILED in seen:
        tail = " / ".join(seen.strip().splitlines()[-2:]) or "(no output)"
        raise ArchdspError(f"the guest did not rejoin with latency {latency}, sync {int(sync)} within {timeout:g} s "
                           f"(last on its console: {tail}); tune needs the guest's QEMU guest agent, or the demo "
                           "guest's init (scripts/dsp-guest-init.sh) and a shell on its console")


def run_step(cfg: DspConfig, session, model: HostModel, step: Step, seconds: float, say) -> Step:
    from .latency import measure

    say(f"step: buffer_size {step.buffer_size}, network_latency {step.network_latency}, "
        f"sync {str(step.sync).lower()} (predicted {step.predicted_frames} frames = {step.predicted_ms:.3f} ms)")
    channel = _restart_guest(cfg, session, step.buffer_size, step.network_latency, step.sync, timeout=120)
    step = structs.replace(step, channel=channel)
    try:
        servers.wait_for_link(cfg.name, 60)
        time.sleep(2)  # the loop settles
        m = measure(_with(cfg, step), model, seconds=seconds)
    except BridgeError as err:
        return structs.replace(step, seconds=seconds, problem=str(err))
    held = m["xruns"] == 0
    out = structs.replace(step, measured_frames=m["measured_frames"],
                          measured_ms=round(frames_to_ms(m["measured_frames"], cfg.netjack.sample_rate), 4),
                          xruns=m["xruns"], xruns_per_minute=m["xruns_per_minute"], late_cycles=m.get("late_cycles"),
                          seconds=seconds, held=held)
    say(f"  measured {out.measured_frames} frames = {out.measured_ms:.3f} ms, {out.xruns} xruns in {seconds:g} s"
        f" -> {'HELD' if held else 'xruns'}")
    return out


def _with(cfg: DspConfig, step: Step) -> DspConfig:
    nj = structs.replace(cfg.netjack, buffer_size=step.buffer_size, network_latency=step.network_latency,
                         sync=step.sync)
    return structs.replace(cfg, archibaldos=structs.replace(cfg.archibaldos, netjack=nj))


def tune(cfg: DspConfig, session, model: HostModel, sizes, latencies, syncs, seconds: float, every: bool = False,
         max_steps: int = 24, say=print) -> dict:
    info = servers.status(cfg.name)
    if not info.get("running") or info.get("link") != "up":
        raise ArchdspError(f"tune needs the VM and the bridge up with the link joined (link: {info.get('link')}, "
                           f"{info.get('problem', '')}): archdsp-virt up CONFIG; archdsp-virt netjack start CONFIG")
    servers.of_domain(cfg.name).set_period(cfg.name, cfg.netjack.buffer_size)  # the link's own: refused where tune cannot run
    steps = plan_steps(cfg, sizes, latencies, syncs)[:max_steps]
    done: list[Step] = []
    best = None
    try:
        for step in steps:
            result = run_step(cfg, session, model, step, seconds, say)
            done.append(result)
            if result.held and best is None:
                best = result
                if not every:
                    break
    finally:  # leave the link as the config says
        nj = cfg.netjack
        say(f"restoring the config's settings: buffer_size {nj.buffer_size}, network_latency {nj.network_latency}, "
            f"sync {str(nj.sync).lower()}")
        try:
            _restart_guest(cfg, session, nj.buffer_size, nj.network_latency, nj.sync, timeout=120)
        except ArchdspError as err:
            say(f"warning: could not restore the link's settings: {err}")
    return {"steps": [s.as_dict() for s in done], "best": best.as_dict() if best else None,
            "seconds_per_step": seconds, "sample_rate": cfg.netjack.sample_rate,
            "current": {"buffer_size": cfg.netjack.buffer_size, "network_latency": cfg.netjack.network_latency,
                        "sync": cfg.netjack.sync}}


def format_tune(rep: dict) -> str:
    lines = [f"{'buffer':>6} {'L':>2} {'sync':>5} {'predicted':>10} {'measured':>10} {'xruns':>6} {'/min':>7}  result"]
    for s in rep["steps"]:
        meas = f"{s['measured_ms']:.3f}ms" if s["measured_ms"] is not None else "-"
        res = "HELD" if s["held"] else (s["problem"] or "xruns")
        lines.append(f"{s['buffer_size']:>6} {s['network_latency']:>2} {str(s['sync']).lower():>5} "
                     f"{s['predicted_ms']:>8.3f}ms {meas:>10} {s['xruns'] if s['xruns'] is not None else '-':>6} "
                     f"{s['xruns_per_minute'] if s['xruns_per_minute'] is not None else '-':>7}  {res}")
    b = rep["best"]
    if b:
        lines.append(f"lowest round trip with 0 xruns over {rep['seconds_per_step']:g} s: {b['measured_ms']:.3f} ms "
                     f"(buffer_size = {b['buffer_size']}, network_latency = {b['network_latency']}, "
                     f"sync = {str(b['sync']).lower()})")
    else:
        lines.append("no step held zero xruns: try larger buffer sizes or network latencies (--buffer-sizes, "
                     "--latencies), or longer periods; see archdsp-virt rt-test for the guest's own latency")
    return "\n".join(lines) + "\n"


def apply(config: Path, best: dict, say=print) -> list[str]:
    """Write the chosen values into the config file, keeping its comments and layout: through
    :func:`~archdsp_libvirt.config.write.update_config` (checked before writing, replaced atomically)."""
    from ..config.write import update_config

    path = Path(config)

    def edit(doc) -> list[str]:
        try:
            nj = doc["archibaldos"]["netjack"]
        except KeyError:
            raise ConfigError(f"{path}: archibaldos.netjack: no such table to write the tuned values into") from None
        changed = []
        for key in ("buffer_size", "network_latency", "sync"):
            old = nj.get(key)
            new = best[key]
            if old != new:
                nj[key] = new
                changed.append(f"archibaldos.netjack.{key}: {old if old is not None else '(default)'} -> "
                               f"{str(new).lower() if isinstance(new, bool) else new}")
        return changed

    changed = update_config(path, edit)
    if changed:
        for c in changed:
            say(f"{path}: {c}")
    else:
        say(f"{path}: already has the tuned values; nothing written")
    return changed


def plot(rep: dict, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = rep["steps"]
    labels = [f"{s['buffer_size']}/L{s['network_latency']}/{'sync' if s['sync'] else 'async'}" for s in steps]
    fig, ax = plt.subplots(figsize=(min(16, max(6, 0.75 * len(steps) + 2)), 6))
    xs = range(len(steps))
    ax.bar([x - 0.2 for x in xs], [s["predicted_ms"] for s in steps], width=0.4, color="lightgray",
           label="predicted")
    ax.bar([x + 0.2 for x in xs], [s["measured_ms"] or 0 for s in steps], width=0.4,
           color=["tab:green" if s["held"] else "tab:red" for s in steps], label="measured (green: 0 xruns; the number: xruns in the step)")
    for x, s in zip(xs, steps, strict=True):
        ax.annotate(f"{s['xruns'] if s['xruns'] is not None else '?'}", (x + 0.2, (s["measured_ms"] or 0)),
                    ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=9)
    ax.set_xlabel("buffer_size / network_latency / slave mode")
    ax.set_ylabel("round trip (ms)")
    ax.set_title(f"tune: {rep['seconds_per_step']:g} s soak per step at {rep['sample_rate']} Hz")
    top = max([s["predicted_ms"] for s in steps] + [s["measured_ms"] or 0 for s in steps] + [0.1])
    ax.set_ylim(0, top * 1.35)  # room above the bars for the legend, clear of the xrun counts
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    write_output(path, lambda f: fig.savefig(f, dpi=100, format="png"))  # never through a planted link
    plt.close(fig)
    return str(path)
