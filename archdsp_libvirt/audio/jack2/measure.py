"""The round trip on JACK2's netmanager: the budget its settings predict, and the measurement through
the VM with jack_iodelay.

One period is ``buffer_size / sample_rate``. A round trip through the bridge
(host -> VM -> host) takes ``(L + 1 + c)`` periods, where L is the NETJACK
network latency in periods and c = 1 when the guest's slave runs
asynchronously (JACK2's default) with a DSP client in its loop, else 0.
Measured with jack_iodelay at 96 kHz / 128 frames through the demo guest:
a direct loop gives 128 frames at L=0, 256 at L=1, 384 at L=2; with
jack_thru in the loop 256 at L=0 and 384 at L=1; a synchronous slave
(``jackd -d net -S``) with jack_thru 128 at L=0.

A host backend with real hardware adds its own periods on top (JACK's ALSA
backend: ``nperiods`` periods of playback buffering); the dummy backend adds none.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...config import DspConfig
from ...errors import BridgeError
from ..budget import Budget, frames_to_ms
from .state import NAME

if TYPE_CHECKING:
    from ...host.model import HostModel


def budget(cfg: DspConfig, host_backend: str = "dummy", host_nperiods: int = 2,
           target_ms: float | None = None) -> Budget:
    """The round trip the config predicts on JACK2's netmanager, and whether it meets ``target_ms``."""
    nj = cfg.netjack
    period = nj.buffer_size
    rate = nj.sample_rate
    a = 1 + (1 if nj.dsp_client and not nj.sync else 0)
    bridge = (nj.network_latency + a) * period
    host = host_nperiods * period if host_backend == "alsa" else 0
    total = bridge + host
    total_ms = frames_to_ms(total, rate)
    period_ms = frames_to_ms(period, rate)
    notes = [
        f"one period = {period} / {rate} Hz = {period_ms:.3f} ms (one way through JACK's cycle)",
        f"bridge round trip = (L + {a}) x period ({'sync' if nj.sync else 'async'} slave, "
        f"{'a DSP client' if nj.dsp_client else 'no client'} in the guest's loop)"
        f": ({nj.network_latency} + {a}) x {period} = {bridge} frames "
        f"= {frames_to_ms(bridge, rate):.3f} ms",
        f"'2 x buffer / rate' = {frames_to_ms(2 * period, rate):.3f} ms is two periods (a JACK host's own "
        f"capture + playback), not the bridge's round trip",
    ]
    if host:
        notes.append(f"host ALSA backend: + {host_nperiods} x {period} = {host} frames of playback buffering")
    meets = None
    if target_ms is not None:
        meets = total_ms <= target_ms + 1e-9
        if not meets:
            notes.append(f"target {target_ms:g} ms cannot be met: {total_ms:.3f} ms predicted; "
                         + _what_would_meet(cfg, target_ms, a, host_backend, host_nperiods))
    return Budget(
        sample_rate=rate, buffer_size=period, network_latency=nj.network_latency, sync_slave=nj.sync,
        dsp_client=nj.dsp_client,
        host_backend=host_backend, host_nperiods=host_nperiods, period_ms=round(period_ms, 4),
        bridge_frames=bridge, host_frames=host, predicted_frames=total, predicted_ms=round(total_ms, 4),
        target_ms=target_ms, meets_target=meets, notes=tuple(notes), audio_server=NAME,
    )


def _what_would_meet(cfg: DspConfig, target_ms: float, a: int, backend: str, nperiods: int) -> str:
    nj = cfg.netjack
    host_periods = nperiods if backend == "alsa" else 0
    options = []
    if a == 2 and frames_to_ms((nj.network_latency + 1 + host_periods) * nj.buffer_size, nj.sample_rate) <= target_ms:
        options.append("sync = true (a synchronous slave)")
    for latency in range(nj.network_latency - 1, -1, -1):
        if frames_to_ms((latency + a + host_periods) * nj.buffer_size, nj.sample_rate) <= target_ms:
            options.append(f"network_latency = {latency}")
            break
    size = nj.buffer_size // 2
    while size >= 16:
        if frames_to_ms((nj.network_latency + a + host_periods) * size, nj.sample_rate) <= target_ms:
            options.append(f"buffer_size = {size}")
            break
        size //= 2
    return ("try " + " or ".join(options)) if options else "no buffer size or network latency reaches it"



SETTLE_S = 30.0  # how long the loop may take to answer before the measurement's clock starts
_IODELAY_LINE = re.compile(r"^\s*([\d.]+) frames\s+([\d.]+) ms total roundtrip latency", re.M)


def measure(cfg: DspConfig, model: HostModel, wait_for_link: Callable[[str, float], dict], seconds: float = 6.0,
            channel: int = 1) -> dict:
    """Round trip host -> netjack:capture_N -> DSP in the VM -> netjack:playback_N -> host, with jack_iodelay.

    Needs the bridge up (``archdsp-virt netjack start``). Returns the measured frames (the most frequent
    reading of the second half of the run, when the loop has settled), every reading, and the xruns the
    server reported meanwhile.
    """
    import os
    import selectors
    import subprocess
    import threading
    from collections import Counter

    from ...procs import Owned
    from ..placement import confine_self
    from ..soak import count_link_events
    from .bridge import ALIAS_CLIENT, jack_env, open_client, status

    info = status(cfg.name)
    if not info.get("running"):
        raise BridgeError(f"the bridge is not running ({info.get('problem')}): archdsp-virt netjack start CONFIG")
    wait_for_link(cfg.name, 30)
    server = info["server"]
    confine_self(model, cfg.isolated_cores)  # our JACK client and jack_iodelay are real-time threads: not on a vCPU's core
    client = open_client(server, "archdsp-latency")
    xruns = 0
    xrun_times: list[float] = []
    t0 = time.monotonic()
    counting = True  # off once the soak's time is up: stopping jack_iodelay is no part of the soak
    lock = threading.Lock()

    def on_xrun(_delay):
        nonlocal xruns
        with lock:
            if counting:
                xruns += 1
                xrun_times.append(time.monotonic() - t0)

    client.set_xrun_callback(on_xrun)
    client.activate()
    proc = subprocess.Popen(["stdbuf", "-oL", "jack_iodelay"],  # line-buffered: it prints with printf
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=jack_env(server), text=True, start_new_session=True)
    owned = Owned.of(proc.pid)
    readings: list[float] = []
    reading_times: list[float] = []
    log = info.get("log") if info.get("server_started_by_bridge") else None  # jackd's own output is there
    log_start = os.path.getsize(log) if log and os.path.exists(log) else 0
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = {p.name for p in client.get_ports()}
            if {"jack_delay:out", "jack_delay:in"} <= names:
                break
            time.sleep(0.1)
        else:
            raise BridgeError("jack_iodelay did not register its ports within 10 s")
        _connect_loop(client, channel, timeout=20)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        os.set_blocking(proc.stdout.fileno(), False)
        buf = ""

        def read_for(until: float, stop_at_first: bool) -> list[float]:
            """jack_iodelay's readings until ``until``; the loop is made again after 3 s without one."""
            nonlocal buf
            got: list[float] = []
            last = time.monotonic()
            while time.monotonic() < until and proc.poll() is None:
                if sel.select(timeout=0.2):
                    buf += proc.stdout.read() or ""
                    for m in _IODELAY_LINE.finditer(buf):
                        got.append(float(m.group(1)))
                        reading_times.append(round(time.monotonic() - t0, 3))
                        last = time.monotonic()
                    buf = buf[buf.rfind("\n") + 1:]
                    if got and stop_at_first:
                        break
                if time.monotonic() - last > 3:  # a rejoined slave took the aliases: our connections went with the old one
                    _connect_loop(client, channel, timeout=2, fatal=False)
                    last = time.monotonic()
            return got

        # the soak's clock starts once the loop answers: right after `up` or a rejoin it may take a while
        if not read_for(time.monotonic() + SETTLE_S, stop_at_first=True):
            raise BridgeError(f"jack_iodelay saw no signal come back through {ALIAS_CLIENT}:playback_{channel} in "
                              f"{SETTLE_S:g} s: is the DSP loop in the VM connected? (archdsp-virt console)")
        reading_times.clear()
        with lock:
            xruns = 0
            xrun_times.clear()
            t0 = time.monotonic()
        readings = read_for(t0 + seconds, stop_at_first=False)
    finally:
        with lock:
            counting = False
        owned.stop()
        proc.wait(timeout=10)
        try:
            client.deactivate()
            client.close()
        except Exception:  # noqa: BLE001
            pass
    if not readings:
        raise BridgeError(f"jack_iodelay's signal stopped coming back through {ALIAS_CLIENT}:playback_{channel} "
                          f"during the {seconds:g} s: did the VM's slave leave? (archdsp-virt netjack status)")
    settled = readings[len(readings) // 2:]
    measured = Counter(round(r) for r in settled).most_common(1)[0][0]
    with lock:
        times = [round(t, 3) for t in xrun_times]
    return {"measured_frames": measured, "readings": readings, "reading_times": reading_times, "xruns": xruns,
            "xrun_times": times, "seconds": seconds, "xruns_per_minute": round(xruns * 60.0 / seconds, 2),
            "server": server, "reading_label": "jack_iodelay reading",
            **count_link_events(log, log_start, cfg.netjack.client_name)}


def _connect_loop(client, channel: int, timeout: float, fatal: bool = True) -> None:
    """Connect jack_iodelay through the VM; the aliases may be re-made a moment after a VM rejoins."""
    import errno

    import jack

    from .bridge import ALIAS_CLIENT

    pairs = [("jack_delay:out", f"{ALIAS_CLIENT}:capture_{channel}"),
             (f"{ALIAS_CLIENT}:playback_{channel}", "jack_delay:in")]
    deadline = time.monotonic() + timeout
    pending = list(pairs)
    while pending:
        src, dst = pending[0]
        try:
            client.connect(src, dst)
        except jack.JackError as exc:
            if getattr(exc, "code", None) != errno.EEXIST:  # already connected is done
                if time.monotonic() > deadline:
                    if not fatal:
                        return
                    raise BridgeError(f"cannot connect jack_iodelay through the VM within {timeout:g} s: {exc}") from None
                time.sleep(0.5)
                continue
        pending.pop(0)
