"""The bridge backends' registry (``--audio-server auto|pipewire|jack``), and dispatch.

JACK2: :mod:`.jack2` (netmanager loaded into jackd). PipeWire: :mod:`.pipewire` (PipeWire's own NETJACK2
manager). Both implement :class:`.backend.Backend`; this is the one place outside their packages that
names them. A running bridge's state file says which one it is; stop/status/restart follow it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import BridgeError
from .backend import Backend, StartOptions
from .backend import wait_for_link as _wait_for_link
from .jack2.backend import BACKEND as JACK2
from .link import state_paths
from .pipewire import server as pw
from .pipewire.backend import BACKEND as PIPEWIRE
from .pipewire.backend import dropin  # noqa: F401  (`netjack dropin`: a drop-in is PipeWire's alone)
from .records import Kind, read_record

if TYPE_CHECKING:
    from ..host.model import HostModel

BACKENDS: dict[str, Backend] = {b.name: b for b in (JACK2, PIPEWIRE)}
DEFAULT = JACK2  # with no bridge running, and for a state file that names none (written before PipeWire's)
NAMES = ("auto", *BACKENDS)  # the choices of --audio-server


def get(name: str | None) -> Backend:
    """The backend called ``name`` (None: the default)."""
    if name is None:
        return DEFAULT
    try:
        return BACKENDS[name]
    except KeyError:
        raise BridgeError(f"--audio-server {name}: choose {', '.join(NAMES)}") from None


def of_domain(domain: str) -> Backend:
    """The backend whose bridge ``domain`` runs (or last ran): what its state file says."""
    kind = read_record(state_paths(domain)[0], Kind)
    return get(kind.audio_server if kind else None)


def pick(audio_server: str, user: str | None, jack_options: bool) -> Backend:
    """The backend to use now: auto asks whether the user's PipeWire answers."""
    answers = False
    if audio_server == "auto" and not jack_options:
        target = pw.find_target(user)
        answers = target is not None and pw.probe(target) is not None
    return get(pw.choose_server(audio_server, answers, jack_options))


def _options(overrides: dict) -> StartOptions:
    return StartOptions(user=overrides.get("pipewire_user"), allow_any_address=bool(overrides.get("allow_any_address")),
                        server=overrides.get("server"), start_server=overrides.get("start_server"),
                        device=overrides.get("device") or "hw:0", nperiods=overrides.get("nperiods") or 2)


def start(cfg, model: HostModel, audio_server: str = "auto", wait: float = 0.0, say=print, **overrides) -> dict:
    """Start the bridge on the backend asked for (auto: the running bridge's, else :func:`pick`)."""
    current = of_domain(cfg.name)
    state = current.read_state(cfg.name)
    running = state is not None and state.supervisor is not None and state.supervisor.alive()
    backend = current if running and audio_server == "auto" else \
        pick(audio_server, overrides.get("pipewire_user"),
             jack_options=bool(overrides.get("server") or overrides.get("start_server")))
    if running and backend is not current:
        raise BridgeError(f"the bridge for {cfg.name} runs on {current.label}, not {backend.label}: "
                          f"'archdsp-virt netjack restart --audio-server {backend.name} CONFIG' moves it "
                          "(or netjack stop CONFIG first)")
    return backend.start(cfg, _options(overrides), model, wait=wait, say=say)


def stop(domain: str, say=print) -> bool:
    return of_domain(domain).stop(domain, say=say)


def restart(cfg, model: HostModel, wait: float = 0.0, say=print, audio_server: str = "auto", **overrides) -> dict:
    """Stop and start again: on the backend asked for (auto: the one that ran), with the last start's
    options where it ran there, and the ones given now."""
    current = of_domain(cfg.name)
    state = current.read_state(cfg.name)
    backend = (current if state else DEFAULT) if audio_server == "auto" else get(audio_server)
    options = backend.restart_options(state, overrides)
    current.stop(cfg.name, say=say)
    return backend.start(cfg, options, model, wait=wait, say=say)


def status(domain: str) -> dict:
    return of_domain(domain).status(domain)


def format_status(info: dict) -> list[str]:
    return get(info.get("audio_server")).format_status(info)


def forget_slave(domain: str, say=print) -> list[str]:
    return of_domain(domain).forget_slave(domain, say=say)


def wait_for_link(domain: str, timeout: float) -> dict:
    return _wait_for_link(of_domain(domain), domain, timeout)
