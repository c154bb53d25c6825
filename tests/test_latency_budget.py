"""The latency budget arithmetic, including the original design's own figures."""

from __future__ import annotations

import pytest

from archdsp_libvirt import parse_config
from archdsp_libvirt.errors import ConfigError
from archdsp_libvirt.audio.latency import budget, format_budget


def cfg(**netjack):
    nj = {"enable": True, **netjack}
    return parse_config({"isolated_cores": [1], "memory_mb": 256, "archibaldos": {"netjack": nj}})


@pytest.mark.parametrize("latency, frames", [(0, 128), (1, 256), (2, 384)])
def test_measured_round_trips_direct_loop(latency, frames):
    b = budget(cfg(network_latency=latency, dsp_client=False))
    assert b.predicted_frames == frames
    assert b.predicted_ms == pytest.approx(frames / 96.0, abs=1e-3)


@pytest.mark.parametrize("latency, frames", [(0, 256), (1, 384)])
def test_measured_round_trips_with_a_dsp_client(latency, frames):
    assert budget(cfg(network_latency=latency)).predicted_frames == frames


def test_design_figures():
    # "bufferSize = 128; # 1.33ms @ 96kHz": one period.
    assert budget(cfg()).period_ms == pytest.approx(1.333, abs=1e-3)
    # "Round-trip latency = (128 / 96000) x 2 = 2.67ms": two periods: the bridge at L=1 with a direct
    # loop, or at L=0 with a DSP client in an async slave's loop.
    assert budget(cfg(network_latency=1, dsp_client=False)).predicted_ms == pytest.approx(2.667, abs=1e-3)
    assert budget(cfg(network_latency=0)).predicted_ms == pytest.approx(2.667, abs=1e-3)
    # "Actual 1.33ms" round trip: only at L=0 with a direct loop or a synchronous slave.
    assert budget(cfg(network_latency=0, dsp_client=False)).predicted_ms == pytest.approx(1.333, abs=1e-3)
    assert budget(cfg(network_latency=0, sync=True)).predicted_ms == pytest.approx(1.333, abs=1e-3)
    # "bufferSize = 64; # 1.33ms round-trip": true at L=1 with a direct loop (2 x 64 frames at 96 kHz).
    assert budget(cfg(buffer_size=64, network_latency=1, dsp_client=False)).predicted_ms == pytest.approx(1.333, abs=1e-3)


def test_64_frame_periods_at_l1_are_128_frames():
    assert budget(cfg(buffer_size=64, network_latency=1, dsp_client=False)).predicted_frames == 128


def test_sync_slave_saves_the_client_period():
    assert budget(cfg(network_latency=1, sync=True)).predicted_frames == 256
    assert budget(cfg(network_latency=1)).predicted_frames == 384


def test_alsa_host_adds_its_periods():
    b = budget(cfg(network_latency=0, dsp_client=False), host_backend="alsa", host_nperiods=2)
    assert b.predicted_frames == 128 + 256 and b.host_frames == 256


def test_unreachable_target_is_pointed_out_with_a_way_out():
    b = budget(cfg(network_latency=1, dsp_client=False), target_ms=2.0)
    assert b.meets_target is False
    text = format_budget(b)
    assert "target 2 ms cannot be met: 2.667 ms predicted" in text
    assert "network_latency = 0" in text and "buffer_size = 64" in text
    assert budget(cfg(network_latency=0, dsp_client=False), target_ms=2.0).meets_target is True
    with_client = format_budget(budget(cfg(network_latency=0), target_ms=2.0))
    assert "sync = true" in with_client


def test_two_periods_are_not_the_bridge_round_trip_note():
    text = format_budget(budget(cfg(network_latency=0, dsp_client=False)))
    assert "'2 x buffer / rate' = 2.667 ms is two periods" in text


def test_budget_needs_netjack():
    with pytest.raises(ConfigError, match="archibaldos.netjack.enable"):
        budget(parse_config({"isolated_cores": [1], "memory_mb": 256}))
