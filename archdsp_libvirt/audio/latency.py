"""The latency budget of the NETJACK bridge, and the round trip measured through the VM.

Each backend predicts its own round trip from the link's settings (``budget``) and measures it
(``measure``); this module asks the one :mod:`.servers` names, compares the two and shows them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import DspConfig
from ..errors import ConfigError
from . import servers
from .budget import Budget, frames_to_ms

if TYPE_CHECKING:
    from ..host.model import HostModel

__all__ = ["Budget", "budget", "format_budget", "format_report", "frames_to_ms", "measure", "report"]


def budget(cfg: DspConfig, host_backend: str = "dummy", host_nperiods: int = 2,
           target_ms: float | None = None, audio_server: str | None = None) -> Budget:
    """The round trip the config predicts on ``audio_server`` (the registry's default when None), and
    whether it meets ``target_ms``."""
    if not cfg.netjack.enable:
        raise ConfigError("archibaldos.netjack.enable: the latency budget is for the NETJACK link; set enable = true")
    return servers.get(audio_server).budget(cfg, host_backend, host_nperiods, target_ms)


def measure(cfg: DspConfig, model: HostModel, seconds: float = 6.0, channel: int = 1) -> dict:
    """The round trip host -> VM -> host through the running bridge, measured by its backend: the
    measured frames (the most frequent reading of the settled second half), every reading, the xruns."""
    return servers.of_domain(cfg.name).measure(cfg, model, seconds, channel)


def format_budget(b: Budget) -> str:
    lines = [
        f"NETJACK2 link: {b.sample_rate} Hz, {b.buffer_size}-frame periods, network latency {b.network_latency}, "
        f"{'sync' if b.sync_slave else 'async'} slave{' with a DSP client' if b.dsp_client else ''}, "
        f"host backend {b.host_backend}",
        f"predicted round trip: {b.predicted_frames} frames = {b.predicted_ms:.3f} ms" if b.predicted_max_frames is None
        else f"predicted round trip: {b.predicted_frames}..{b.predicted_max_frames} frames = {b.predicted_ms:.3f}.."
             f"{frames_to_ms(b.predicted_max_frames, b.sample_rate):.3f} ms ({servers.get(b.audio_server).label})",
    ]
    if b.target_ms is not None:
        lines.append(f"target {b.target_ms:g} ms: {'met' if b.meets_target else 'NOT met'}")
    lines.extend(f"  {n}" for n in b.notes)
    return "\n".join(lines) + "\n"


def report(cfg: DspConfig, b: Budget, measured: dict | None) -> dict:
    out = b.as_dict()
    out["predicted_frames"] = b.predicted_frames
    if measured is not None:
        out.update(measured)
        out["measured_ms"] = round(frames_to_ms(measured["measured_frames"], b.sample_rate), 4)
        out["difference_frames"] = measured["measured_frames"] - b.predicted_frames
        out["matches_prediction"] = abs(out["difference_frames"]) <= 1
        if b.predicted_max_frames is not None:  # a range
            out["matches_prediction"] = b.predicted_frames - 1 <= measured["measured_frames"] <= b.predicted_max_frames + 1
    return out


def format_report(rep: dict, b: Budget) -> str:
    text = format_budget(b)
    if "measured_frames" in rep:
        if rep.get("predicted_max_frames") is not None:  # a range
            verdict = f"{'within' if rep['matches_prediction'] else 'OUTSIDE'} the predicted range"
        else:
            verdict = (f"{'matches' if rep['matches_prediction'] else 'DIFFERS FROM'} the prediction, "
                       f"{rep['difference_frames']:+d} frames")
        text += (f"measured round trip: {rep['measured_frames']} frames = {rep['measured_ms']:.3f} ms "
                 f"({verdict}); {rep['xruns']} xruns in {rep['seconds']:g} s\n")
        if "xruns_per_minute" in rep:
            from .soak import format_soak

            text += format_soak(rep)
    return text
