"""Which host audio server the bridge runs on (``--audio-server auto|pipewire|jack``), and dispatch.

JACK2: :mod:`.jack2.bridge` (netmanager loaded into jackd). PipeWire: :mod:`.pipewire.bridge` (PipeWire's own
NETJACK2 manager). A running bridge's state file says which one it is; stop/status/restart follow it.
"""

from __future__ import annotations

from .jack2 import bridge
from .pipewire import bridge as pwbridge
from .pipewire import server as pw
from .link import owned, read_json, state_paths


def _kind(domain: str) -> str:
    state = read_json(state_paths(domain)[0]) or {}
    return state.get("audio_server", "jack")


def pick(audio_server: str, pipewire_user: str | None, jack_options: bool) -> str:
    """The server to use now: auto asks whether the user's PipeWire answers."""
    answers = False
    if audio_server == "auto" and not jack_options:
        target = pw.find_target(pipewire_user)
        answers = target is not None and pw.probe(target) is not None
    return pw.choose_server(audio_server, answers, jack_options)


def start(cfg, audio_server: str = "auto", pipewire_user: str | None = None, allow_any_address: bool = False,
          server: str | None = None, start_server: str | None = None, device: str = "hw:0", nperiods: int = 2,
          wait: float = 0.0, say=print) -> dict:
    state = read_json(state_paths(cfg.name)[0]) or {}
    running = state and (sup := owned(state.get("supervisor"))) and sup.alive()
    kind = state.get("audio_server", "jack") if running and audio_server == "auto" else \
        pick(audio_server, pipewire_user, jack_options=bool(server or start_server))
    if kind == "pipewire":
        return pwbridge.start(cfg, user=pipewire_user, allow_any_address=allow_any_address, wait=wait, say=say)
    say("audio server: JACK")
    return bridge.start(cfg, server=server, start_server=start_server, device=device, nperiods=nperiods,
                        wait=wait, say=say)


def stop(domain: str, say=print) -> bool:
    return (pwbridge.stop if _kind(domain) == "pipewire" else bridge.stop)(domain, say=say)


def restart(cfg, wait: float = 0.0, say=print, audio_server: str = "auto", **overrides) -> dict:
    state = read_json(state_paths(cfg.name)[0]) or {}
    if audio_server == "auto" and not any(overrides.get(k) for k in ("server", "start_server")) and state:
        audio_server = state.get("audio_server", "jack")
    if state.get("audio_server") == "pipewire" or audio_server == "pipewire":
        user = overrides.get("pipewire_user")
        remote = None if user else (state.get("pipewire") or {}).get("remote")  # the server it joined
        allow = overrides.get("allow_any_address") or state.get("allow_any_address", False)
        stop(cfg.name, say=say)
        if audio_server == "jack":
            return bridge.start(cfg, wait=wait, say=say, server=overrides.get("server"),
                                start_server=overrides.get("start_server"))
        return pwbridge.start(cfg, user=user, allow_any_address=allow, wait=wait, say=say, remote=remote)
    jack_over = {k: v for k, v in overrides.items() if k in ("server", "start_server")}
    if state.get("audio_server", "jack") == "jack" and audio_server in ("jack", "auto"):
        return bridge.restart(cfg, wait=wait, say=say, **jack_over)
    stop(cfg.name, say=say)
    return start(cfg, audio_server=audio_server, wait=wait, say=say, **overrides)


def status(domain: str) -> dict:
    if _kind(domain) == "pipewire":
        return pwbridge.status(domain)
    info = bridge.status(domain)
    if "server" in info:
        info["audio_server"] = "jack"
    return info


def format_status(info: dict) -> list[str]:
    return (pwbridge.format_status if info.get("audio_server") == "pipewire" else bridge.format_status)(info)


def forget_slave(domain: str, say=print) -> list[str]:
    return (pwbridge.forget_slave if _kind(domain) == "pipewire" else bridge.forget_slave)(domain, say=say)


def wait_for_link(domain: str, timeout: float) -> dict:
    return (pwbridge.wait_for_link if _kind(domain) == "pipewire" else bridge.wait_for_link)(domain, timeout)
