"""Round trip through the VM on PipeWire, measured with two JACK clients (run under ``pw-jack``).

jack_iodelay cannot measure it: any path from the manager's source back into its sink inside one
PipeWire graph deadlocks the link (the sink runs only after data arrived, data arrives only after
the sink ran), so PipeWire stops it. Two separate clients break that cycle: one writes an impulse
every ``EVERY`` periods into netjack-capture:send_AUXn (host -> VM), the other finds it again on
netjack-playback:receive_AUXn (VM -> host); the round trip is the frame-time difference.

``python -P -m archdsp_libvirt.audio.pipewire.measure SEND_PORT RECEIVE_PORT SECONDS`` prints JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..budget import Budget, frames_to_ms
from .state import NAME

if TYPE_CHECKING:
    from ...config import DspConfig

EVERY = 100  # periods between impulses: longer than any round trip seen (47 periods, with no bound on the queue)
POLL_STATUS = 1.2  # the bridge's supervisor reads the manager's socket once a second


def measure(send_port: str, receive_port: str, seconds: float) -> dict:
    import jack

    jack.set_error_function(lambda _m: None)
    jack.set_info_function(lambda _m: None)
    gen = jack.Client("archdsp-rt-gen", no_start_server=True)
    rec = jack.Client("archdsp-rt-rec", no_start_server=True)
    out = gen.outports.register("out")
    inp = rec.inports.register("in")
    sent: list[tuple[int, float]] = []  # (frame time, seconds since the start)
    got: list[int] = []
    xrun_times: list[float] = []
    lock = threading.Lock()
    count = 0
    t0 = time.monotonic()

    @gen.set_process_callback
    def _gen(frames):
        nonlocal count
        buf = memoryview(out.get_buffer()).cast("B").cast("f")
        for i in range(len(buf)):
            buf[i] = 0.0
        count += 1
        if count % EVERY == 0:
            buf[0] = 1.0
            sent.append((gen.last_frame_time, time.monotonic() - t0))

    prev: tuple[int, int] | None = None  # (frame time, offset) of the last cycle that held an impulse
    stale = 0

    @rec.set_process_callback
    def _rec(frames):
        nonlocal prev, stale
        buf = memoryview(inp.get_buffer()).cast("B").cast("f")
        hit = next((i for i, v in enumerate(buf) if v > 0.5), None)
        now = rec.last_frame_time
        if hit is None:
            prev = None
            return
        if prev is not None and prev == (now - frames, hit):
            stale += 1  # the same buffer again: no cycle came from the slave, PipeWire replayed the last one
        else:
            got.append(now + hit)
        prev = (now, hit)

    def on_xrun(_delay):
        with lock:
            xrun_times.append(round(time.monotonic() - t0, 3))

    gen.set_xrun_callback(on_xrun)
    with gen, rec:
        gen.connect(out, send_port)
        rec.connect(receive_port, inp)
        period, rate = gen.blocksize, gen.samplerate
        t0 = time.monotonic()
        sent.clear()
        time.sleep(seconds)
        with lock:
            xruns = [t for t in xrun_times if 0 <= t <= seconds]
    readings, times = [], []
    for t, when in sent:
        later = [x - t for x in got if 0 < x - t < EVERY * period]  # through a network: never the same frame
        if later:
            readings.append(min(later))
            times.append(round(when, 3))
    return {"readings": readings, "reading_times": times, "impulses": len(sent), "xruns": len(xruns),
            "xrun_times": xruns, "period": period, "rate": rate, "replayed_cycles": stale}


# PipeWire's manager: from JACK2's figure, (L + 1 + c) periods, up to PIPEWIRE_SLACK + L periods more (the
# cycles its bounded receive queue may hold: L it leaves queued by design, one standing after a late cycle,
# and where the slave's packets cost more than the bound's estimate, more). Measured at 96 kHz / 128, L = 0,
# 1, 2 (README, PipeWire).
PIPEWIRE_SLACK = 5
PIPEWIRE_MEASURED = ("direct loop through veth, 5 cold joins each: L=0 4..5 periods, L=1 5..6, L=2 7..8; "
                     "the TCG guest's tap with jack_thru, L=0: 3")


def budget(cfg: DspConfig, host_backend: str = "dummy", host_nperiods: int = 2,
           target_ms: float | None = None) -> Budget:
    """The round trip range the config predicts on PipeWire's manager (its own graph: no host backend
    periods), and whether its upper end meets ``target_ms``."""
    nj = cfg.netjack
    period, rate = nj.buffer_size, nj.sample_rate
    c = 1 if nj.dsp_client and not nj.sync else 0
    el = nj.network_latency
    lo, hi = (el + 1 + c) * period, (el + 1 + c + PIPEWIRE_SLACK + el) * period
    notes = [
        f"one period = {period} / {rate} Hz = {frames_to_ms(period, rate):.3f} ms",
        f"PipeWire's NETJACK2 manager: round trip = (L + 1 + {c}) .. (L + 1 + {c} + {PIPEWIRE_SLACK} + L) x period "
        f"with L = {el}: {lo}..{hi} frames = {frames_to_ms(lo, rate):.3f}..{frames_to_ms(hi, rate):.3f} ms; it "
        f"varies from one join of the slave to the next with the cycles its bounded receive queue holds "
        f"(measured: {PIPEWIRE_MEASURED})",
        "JACK2's netmanager for comparison: (L + 1 + client) x period, the same on every join",
    ]
    meets = None
    if target_ms is not None:
        meets = frames_to_ms(hi, rate) <= target_ms + 1e-9
        if not meets:
            notes.append(f"target {target_ms:g} ms is not always met: up to {frames_to_ms(hi, rate):.3f} ms")
    return Budget(
        sample_rate=rate, buffer_size=period, network_latency=nj.network_latency, sync_slave=nj.sync,
        dsp_client=nj.dsp_client, host_backend="pipewire", host_nperiods=0,
        period_ms=round(frames_to_ms(period, rate), 4), bridge_frames=lo, host_frames=0, predicted_frames=lo,
        predicted_ms=round(frames_to_ms(lo, rate), 4), target_ms=target_ms, meets_target=meets, notes=tuple(notes),
        audio_server=NAME, predicted_max_frames=hi)




def run(domain: str, wait_for_link: Callable[[str, float], dict], seconds: float, channel: int = 1) -> dict:
    """Measure through the running PipeWire bridge of ``domain`` (a subprocess under pw-jack)."""
    import subprocess
    from collections import Counter

    from ...errors import BridgeError
    from . import server as pw
    from .bridge import status

    info = status(domain)
    if not info.get("running"):
        raise BridgeError(f"the bridge is not running ({info.get('problem')}): archdsp-virt netjack start CONFIG")
    wait_for_link(domain, 30)
    deadline = time.monotonic() + 30  # the join's backlog drains once the supervisor bounded the queue
    while time.monotonic() < deadline:
        info = status(domain)
        if (info.get("link") == "up" and time.time() - (info.get("link_changed") or 0) > 3
                and any(q.get("bound") for q in info.get("queues", []))):
            break
        time.sleep(0.5)
    drops_before = sum(q.get("drops", 0) for q in info.get("queues", []))
    target = pw.find_target(env={"PIPEWIRE_REMOTE": info["pipewire"]["remote"]})
    send, receive = f"{pw.CAPTURE_NODE}:send_AUX{channel - 1}", f"{pw.PLAYBACK_NODE}:receive_AUX{channel - 1}"
    env = {**pw.pw_env(target), "JACK_NO_START_SERVER": "1"}
    argv = ["pw-jack", sys.executable, "-P", "-m", "archdsp_libvirt.audio.pipewire.measure", send, receive, str(seconds)]
    for attempt in range(3):  # a guest re-makes a loop lost in a manager restart within ~10 s
        r = None
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, env=env)
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            raise BridgeError("the PipeWire round-trip measurement failed: "
                              f"{(r.stderr if r else 'timed out')[-300:]}") from None
        readings = out["readings"]
        if readings:
            break
        time.sleep(6)
    if not readings:
        raise BridgeError(f"no impulse came back through {receive} in {seconds:g} s: is the DSP loop in the VM "
                          "connected? (archdsp-virt console)")
    time.sleep(POLL_STATUS)  # the supervisor's next look at the manager's socket
    after = status(domain)
    dropped = (sum(q.get("drops", 0) for q in after.get("queues", [])) - drops_before
               if after.get("manager_pid") == info.get("manager_pid") else None)
    if dropped is not None and dropped < 0:  # a pair came or went meanwhile: its counter is not comparable
        dropped = None
    settled = readings[len(readings) // 2:]
    return {"measured_frames": Counter(settled).most_common(1)[0][0], "readings": readings,
            "reading_times": out["reading_times"], "xruns": out["xruns"], "xrun_times": out["xrun_times"],
            "xruns_per_minute": round(out["xruns"] * 60.0 / seconds, 2), "dropped_packets": dropped,
            "replayed_cycles": out["replayed_cycles"],
            "seconds": seconds, "server": info["server"], "method": "two JACK clients through pw-jack (impulse)", "reading_label": "impulse reading (pw-jack)",
            "graph_period": out["period"], "graph_rate": out["rate"]}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], float(sys.argv[3]))))
