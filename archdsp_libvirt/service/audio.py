"""The audio commands: the NETJACK bridge on JACK2 or PipeWire, the latency budget and soak,
rt-test (cyclictest in the guest) and tune."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, DspConfig, load_config
from ..host.model import HostModel


def _local_model(cfg: DspConfig) -> HostModel:
    """The host model of an audio command: the bridge runs on this machine, so this machine's files."""
    from .domain import host_model

    return host_model(cfg, None)


def netjack_start(config: Path, say, **options) -> None:
    """``netjack start``: join the host's audio server and start the NETJACK master for CONFIG's VM."""
    from ..audio.link import Link
    from ..audio.servers import start

    cfg = load_config(config)
    Link.of(cfg)  # netjack.enable, before the host is read
    start(cfg, _local_model(cfg), say=say, **options)


def netjack_stop(config: Path, say) -> None:
    from ..audio.servers import stop

    stop(load_config(config).name, say=say)


def netjack_restart(config: Path, say, wait: float = 0.0, **options) -> None:
    from ..audio.link import Link
    from ..audio.servers import restart

    cfg = load_config(config)
    Link.of(cfg)
    restart(cfg, _local_model(cfg), wait=wait, say=say, **options)


def netjack_status(config: Path, as_json: bool) -> str:
    from ..audio.servers import format_status, status

    info = status(load_config(config).name)
    return json.dumps(info, indent=2, sort_keys=True) + "\n" if as_json else "\n".join(format_status(info)) + "\n"


def netjack_unit(config: Path, audio_server: str, pipewire_user: str | None, jack_server: str | None,
                 start_server: str | None) -> str:
    """A systemd unit that runs the bridge at boot, on the backend ``audio_server`` names."""
    from ..audio import servers
    from ..audio.backend import StartOptions, render_unit
    from ..audio.link import Link

    cfg = load_config(config)
    Link.of(cfg)
    options = StartOptions(user=pipewire_user, server=jack_server, start_server=start_server)
    return render_unit(cfg, config, servers.get(audio_server).unit(cfg, options))


def netjack_dropin(config: Path, nixos: bool, allow_any_address: bool, note) -> str:
    """The PipeWire drop-in (or its NixOS form) that loads the NETJACK2 manager with the config's link."""
    from ..audio.link import Link
    from ..audio.servers import dropin

    cfg = load_config(config)
    Link.of(cfg)
    return dropin(cfg, _local_model(cfg) if nixos else None, nixos, allow_any_address, note)


def latency_command(config: Path, measure: bool, seconds: float, target_ms: float | None, host_backend: str,
                    nperiods: int, audio_server: str, as_json: bool, plot_path: Path | None,
                    uri: str | None = None) -> str:
    """``latency``: the budget, and with ``measure`` the real round trip (a soak), optionally plotted."""
    from ..audio.latency import budget, format_report, measure as do_measure, report

    cfg = load_config(config)
    if audio_server == "auto":  # the running bridge's backend (the default where none runs)
        from ..audio.servers import of_domain

        audio_server = of_domain(cfg.name).name if cfg.netjack.enable else None
    b = budget(cfg, host_backend=host_backend, host_nperiods=nperiods, target_ms=target_ms, audio_server=audio_server)
    rep = report(cfg, b, do_measure(cfg, _local_model(cfg), seconds=seconds) if measure else None)
    if measure:  # what the figures were measured under: the running domain's accelerator
        rep["accelerator"] = _running_accelerator(cfg, uri)
        bad = not rep.get("matches_prediction", True) or rep.get("xruns", 0) > 0
        if bad and rep["accelerator"] == "tcg":
            from ..host.accel import TCG_CAUSE

            rep["cause"] = TCG_CAUSE
    if plot_path:
        from ..audio.soak import plot

        rep["plot"] = str(plot(rep, plot_path))
    if as_json:
        return json.dumps(rep, indent=2, sort_keys=True) + "\n"
    text = format_report(rep, b)
    if measure:
        text += f"accelerator: {rep['accelerator'] or 'unknown (libvirt did not say)'}\n"
        if rep.get("cause"):
            text += f"cause: {rep['cause']}\n"
    return text + (f"plot: {plot_path}\n" if plot_path else "")


def _running_accelerator(cfg: DspConfig, uri: str | None) -> str | None:
    """The accelerator CONFIG's domain runs under ("kvm" or "tcg"), from its live definition; None when
    libvirt cannot say (not defined, or not answering: the measurement itself does not need it)."""
    from ..errors import ArchdspError
    from ..virt.connection import Session
    from ..virt.inspect import accelerator

    try:
        with Session(uri, readonly=True, attempts=1) as session:
            return accelerator(session, cfg.name)
    except ArchdspError:
        return None


def rt_test_command(config: Path, uri: str | None, seconds: float, force: bool = False,
                    plot_path: Path | None = None) -> tuple[dict, str]:
    """cyclictest in CONFIG's running guest: (the result as data, the text report)."""
    from ..virt.connection import Session
    from ..virt.console import ensure_event_loop
    from ..virt.rttest import format_result, plot, run

    cfg = load_config(config)
    if not cfg.netjack.enable:
        raise ConfigError(f"{config}: archibaldos.netjack.enable: rt-test sets the guest's latency against the "
                          "link's period; set enable = true")
    ensure_event_loop()
    with Session(uri) as session:
        r = run(cfg, session, seconds, force=force)
    out = r.as_dict()
    text = format_result(r)
    if plot_path:
        out["plot"] = plot(r, plot_path)
        text += f"plot: {plot_path}\n"
    return out, text


def tune_command(config: Path, uri: str | None, sizes, latencies, syncs, seconds: float, every: bool = False,
                 do_apply: bool = False, plot_path: Path | None = None, say=print) -> tuple[dict, str]:
    """Sweep the link's settings on the running VM (audio/tune.py); with ``do_apply`` write the best."""
    from ..audio.tune import apply, format_tune, plot, tune
    from ..virt.connection import Session
    from ..virt.console import ensure_event_loop

    cfg = load_config(config)
    if not cfg.netjack.enable:
        raise ConfigError(f"{config}: archibaldos.netjack.enable: tune sweeps the NETJACK link; set enable = true")
    ensure_event_loop()
    with Session(uri) as session:
        rep = tune(cfg, session, _local_model(cfg), sizes, latencies, syncs, seconds, every=every, say=say)
    text = format_tune(rep)
    rep["applied"] = None  # the config is written only with --apply
    if plot_path and rep["steps"]:
        rep["plot"] = plot(rep, plot_path)
        text += f"plot: {plot_path}\n"
    if rep["best"] and do_apply:
        rep["applied"] = apply(config, rep["best"], say=say)
        load_config(config)  # what was written still loads
    elif rep["best"]:
        text += "the config was not changed (--apply writes these values into it)\n"
    return rep, text
