"""A latency budget as data: the round trip a link's settings predict (each backend computes its own,
:mod:`.latency` shows and compares them)."""

from __future__ import annotations

from msgspec import Struct, structs


class Budget(Struct, frozen=True, kw_only=True):
    sample_rate: int
    buffer_size: int
    network_latency: int
    sync_slave: bool
    dsp_client: bool
    host_backend: str
    host_nperiods: int
    period_ms: float
    bridge_frames: int
    host_frames: int
    predicted_frames: int
    predicted_ms: float
    target_ms: float | None
    meets_target: bool | None
    notes: tuple[str, ...]
    audio_server: str  # the backend whose model this is (:mod:`.servers`)
    predicted_max_frames: int | None = None  # a backend whose round trip varies between joins: a range

    def as_dict(self) -> dict:
        d = structs.asdict(self)
        d["notes"] = list(self.notes)
        return d


def frames_to_ms(frames: float, rate: int) -> float:
    return frames * 1000.0 / rate
