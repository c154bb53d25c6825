"""The soak report: windows, xruns per minute, late cycles from the master's log, the plot."""

from __future__ import annotations

import pytest

from archdsp_libvirt.audio.soak import count_link_events, format_soak, plot, windows


def rep(seconds=40.0):
    times = [i * 0.5 for i in range(int(seconds * 2))]
    return {"seconds": seconds, "readings": [256.0 if t < 20 else 384.0 for t in times], "reading_times": times,
            "xruns": 3, "xrun_times": [1.0, 21.5, 22.0], "xruns_per_minute": 4.5, "sample_rate": 96000,
            "predicted_ms": 2.6667, "buffer_size": 128, "network_latency": 0, "sync_slave": False,
            "late_cycles": 2, "link_lost": 0}


def test_windows_count_xruns_and_readings_where_they_fell():
    ws = windows(rep(), width=10)
    assert [w["xruns"] for w in ws] == [1, 0, 2, 0]
    assert (ws[0]["min_frames"], ws[0]["mode_frames"], ws[2]["max_frames"]) == (256, 256, 384)
    assert sum(w["readings"] for w in ws) == 80


def test_format_soak_reports_rate_late_cycles_and_a_table():
    text = format_soak(rep())
    assert text.startswith("xruns per minute: 4.5 (3 in 40 s); late or lost NETJACK cycles (master's log): 2")
    assert "round trip frames" in text and "256/256/256" in text
    assert "not visible" in format_soak({**rep(), "late_cycles": None})


def test_late_cycles_are_counted_after_the_start_offset(tmp_path):
    log = tmp_path / "jackd.log"
    old = "NetMaster : missing last data packet from 'dsp'\n"
    log.write_text(old + "Packet(s) missing from... 3 5\nRecv connection lost error = x, 'dsp' exiting\n"
                   + "NetMaster : missing last data packet from 'dsp'\n"
                   + "JackEngine::XRun: client = dsp was not finished, state = Running\n"
                   + "JackEngine::XRun: client = jack_delay was not finished, state = Triggered\n")
    assert count_link_events(str(log), len(old)) == {"late_cycles": 3, "link_lost": 1}
    assert count_link_events(None, 0) == {"late_cycles": None, "link_lost": None}


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install archdsp-libvirt[plot])")
    out = plot(rep(), tmp_path / "soak.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def pipewire_rep():
    return {**rep(), "late_cycles": None, "link_lost": None, "dropped_packets": 15, "predicted_max_frames": 896,
            "reading_label": "impulse reading (pw-jack)"}  # as the PipeWire backend's measurement names its readings


def test_format_soak_on_pipewire_counts_the_packets_the_bounded_queue_dropped():
    text = format_soak(pipewire_rep())
    assert "late NETJACK packets the manager's bounded receive queue dropped: 15" in text
    assert "master's log" not in text
    assert "not counted (the manager restarted meanwhile)" in format_soak({**pipewire_rep(), "dropped_packets": None})


def test_plot_on_pipewire_draws_the_predicted_range(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install archdsp-libvirt[plot])")
    import matplotlib.pyplot as plt

    seen = {}
    real_close = plt.close

    def keep(fig=None):  # look at the figure before it is closed
        if fig is not None and hasattr(fig, "axes"):
            ax = fig.axes[0]
            seen["title"] = ax.get_title()
            seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        real_close(fig)

    plt.close = keep
    try:
        plot(pipewire_rep(), tmp_path / "pw.png")
    finally:
        plt.close = real_close
    assert "predicted 2.667..9.333 ms" in seen["labels"] and "impulse reading (pw-jack)" in seen["labels"]
    assert "15 late packets dropped" in seen["title"]
