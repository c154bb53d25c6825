"""The PipeWire backend as the contract of :mod:`..backend` has it (:data:`BACKEND`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...errors import BridgeError, UsageError
from ..backend import ModuleBackend, StartOptions, Unit, wait_for_link
from ..link import Link
from . import bridge, measure, sockhook
from .state import NAME, PipeWireState

if TYPE_CHECKING:
    from ...config import DspConfig
    from ...host.model import HostModel
    from ..budget import Budget


class PipeWire(ModuleBackend):
    """PipeWire's own NETJACK2 manager, in a ``pipewire -c`` client of the user's server."""

    bridge = bridge
    name = NAME
    label = "PipeWire"

    def restart_options(self, state: PipeWireState | None, overrides: dict) -> StartOptions:
        user = overrides.get("pipewire_user")
        ours = state if isinstance(state, PipeWireState) else None
        remote = ours.pipewire.remote if ours and not user else None  # the server it joined
        allow = bool(overrides.get("allow_any_address") or (ours and ours.allow_any_address))
        return StartOptions(user=user, remote=remote, allow_any_address=allow)

    def missing_slave(self, state: PipeWireState | None, timeout: float) -> str:
        where = f"{state.master_ip}:{state.port}" if state else "?"
        return f"no NETJACK slave joined PipeWire's manager at {where} within {timeout:g} s"

    def unit(self, cfg: DspConfig, options: StartOptions) -> Unit:
        return unit(cfg, options, sockhook.available())

    def budget(self, cfg: DspConfig, host_backend: str, host_nperiods: int, target_ms: float | None) -> Budget:
        return measure.budget(cfg, host_backend, host_nperiods, target_ms)

    def measure(self, cfg: DspConfig, model: HostModel, seconds: float, channel: int) -> dict:
        return measure.run(cfg.name, lambda domain, timeout: wait_for_link(self, domain, timeout), seconds, channel)

    def set_period(self, domain: str, frames: int) -> None:
        raise BridgeError("tune sets the host JACK server's period; PipeWire's graph period is PipeWire's own "
                          "(the manager forces the link's while a slave is joined): run tune on a JACK bridge "
                          "(archdsp-virt netjack restart --audio-server jack CONFIG)")


def unit(cfg: DspConfig, options: StartOptions, hook_missing: str | None) -> Unit:
    """The unit of a bridge on USER's PipeWire (which must run at boot: loginctl enable-linger USER). Where
    this host's kernel cannot bind the manager to master_ip (``hook_missing`` says why), it starts the
    manager behind the nftables rule (``--allow-any-address``) and says so."""
    user = options.user
    if not user:  # at boot there is no sudo user or XDG_RUNTIME_DIR to find a server by: it would restart forever
        raise UsageError("netjack unit --audio-server pipewire: --pipewire-user USER is needed (at boot no sudo "
                         "user or XDG_RUNTIME_DIR says whose PipeWire to join); USER's PipeWire must run at boot "
                         "too: loginctl enable-linger USER")
    import pwd

    try:
        uid = pwd.getpwnam(user).pw_uid
    except (KeyError, ValueError):
        raise BridgeError(f"--pipewire-user {user!r}: no such user on this host") from None
    why = (f"This kernel cannot bind the manager to {cfg.netjack.master_ip} ({hook_missing}): it listens on every\n"
           "address behind an nftables rule that keeps the port to the VM's bridge." if hook_missing else "")
    flags: list[tuple[str, str | None]] = [("--audio-server", NAME)]
    if hook_missing:
        flags.append(("--allow-any-address", None))
    flags += [("--pipewire-user", user), ("--wait", "0")]
    return Unit(description=f" (PipeWire of {user})", after=("network-online.target", f"user@{uid}.service"),
                options=tuple(flags), restart_on_failure=True, comment=why)


def dropin(cfg: DspConfig, model: HostModel | None, nixos: bool, allow_any_address: bool, note) -> str:
    """The PipeWire drop-in (or its NixOS form, with ``model`` for master_ip's interface) that loads the
    NETJACK2 manager with the config's link at login."""
    from . import conf

    link = Link.of(cfg)
    if not allow_any_address:
        raise BridgeError(f"PipeWire's netjack2 manager listens on 0.0.0.0:{link.port}/udp, not only on "
                          f"{link.master_ip}: pass --allow-any-address to print the drop-in anyway (and keep the "
                          "port to the VM's bridge with a firewall; the NixOS form opens it there only)")
    args = conf.manager_args(link.master_ip, link.port, link.rate, link.period, link.channels)
    latency = cfg.netjack.network_latency
    if nixos:
        files = model.files if model is not None else None
        return conf.nixos(link.domain, args, latency, (files.interface_of(link.master_ip) if files else None) or "virbr0")
    note(f"install as ~/.config/pipewire/pipewire.conf.d/{conf.dropin_name(link.domain)} "
         "(then: systemctl --user restart pipewire)")
    return conf.dropin(link.domain, args, latency)


BACKEND = PipeWire()
