"""The JACK2 backend as the contract of :mod:`..backend` has it (:data:`BACKEND`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import BridgeError
from ..backend import ModuleBackend, StartOptions, Unit, wait_for_link
from . import bridge, measure
from .state import NAME, JackState

if TYPE_CHECKING:
    from ...config import DspConfig
    from ...host.model import HostModel
    from ..budget import Budget


class Jack2(ModuleBackend):
    """JACK2's ``netmanager`` loaded into a jackd (one it joins, or one it starts)."""

    bridge = bridge
    name = NAME
    label = "JACK"

    def start(self, cfg: DspConfig, options: StartOptions, model: HostModel, wait: float = 0.0, say=print) -> dict:
        say("audio server: JACK")
        return super().start(cfg, options, model, wait=wait, say=say)

    def restart_options(self, state: JackState | None, overrides: dict) -> StartOptions:
        last = {"server": state.server, "start_server": state.server_kind, "device": state.device,
                "nperiods": state.nperiods, "allow_any_address": state.allow_any_address} \
            if isinstance(state, JackState) else {}
        now = {k: overrides[k] for k in ("server", "start_server") if overrides.get(k) is not None}
        if overrides.get("allow_any_address"):
            now["allow_any_address"] = True
        return StartOptions(**{**last, **now})

    def missing_slave(self, state: JackState | None, timeout: float) -> str:
        if state is None:
            return f"no NETJACK slave joined within {timeout:g} s"
        return f"no NETJACK slave '{state.slave}' joined {state.master_ip}:{state.port} within {timeout:g} s"

    def unit(self, cfg: DspConfig, options: StartOptions) -> Unit:
        return Unit(description="", after=("sound.target",),
                    options=tuple((flag, value) for flag, value in (("--jack-server", options.server),
                                                                    ("--server", options.start_server)) if value)
                    + ((("--allow-any-address", None),) if options.allow_any_address else ()))

    def budget(self, cfg: DspConfig, host_backend: str, host_nperiods: int, target_ms: float | None) -> Budget:
        return measure.budget(cfg, host_backend, host_nperiods, target_ms)

    def measure(self, cfg: DspConfig, model: HostModel, seconds: float, channel: int) -> dict:
        return measure.measure(cfg, model, lambda domain, timeout: wait_for_link(self, domain, timeout), seconds,
                               channel)

    def set_period(self, domain: str, frames: int) -> None:
        state = bridge.read_state(domain)
        if state is None:
            raise BridgeError(f"the bridge for {domain} is not running: archdsp-virt netjack start CONFIG")
        client = bridge.open_client(state.server, "archdsp-tune")
        try:
            if client.blocksize != frames:
                client.blocksize = frames
        finally:
            client.close()


BACKEND = Jack2()
