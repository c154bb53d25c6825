"""The contract of a bridge backend, and what every backend shares: the wait for the link and the
systemd unit.

A backend is the host side of the NETJACK2 link on one audio server (``jack2/``: JACK2's netmanager
in a jackd; ``pipewire/``: PipeWire's own manager). :mod:`.servers` holds the registry; nothing
else outside the backend packages names one. Each backend:

- ``start``\\s the master for a config's link and leaves a supervisor running, writing a
  :class:`~.records.BridgeState`; ``stop`` stops what it started, by PID;
- reports ``status`` (a dict: ``netjack status --json`` prints it) from that state and the
  supervisor's :class:`~.records.Seen`; ``listening`` is where the master's socket is bound as the
  kernel says (``/proc/PID/net/udp`` and the process's descriptors), never what it was asked;
- describes its ``unit`` (:class:`Unit`), which :func:`render_unit` writes;
- predicts (``budget``) and ``measure``\\s the round trip through the VM.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec
from msgspec import Struct

from ..errors import BridgeError, UsageError
from .link import Link

if TYPE_CHECKING:
    from types import ModuleType

    from ..config import DspConfig
    from ..host.model import HostModel
    from .budget import Budget
    from .records import BridgeState


class StartOptions(Struct, frozen=True, kw_only=True):
    """How ``netjack start`` / ``restart`` was asked to run; each backend takes what concerns it."""

    user: str | None = None           # whose audio server to join (PipeWire: --pipewire-user)
    remote: str | None = None         # the exact server socket to join again (a restart)
    allow_any_address: bool = False   # a master on every address behind a firewall rule
    server: str | None = None         # the audio server's name (JACK: --jack-server)
    start_server: str | None = None   # start one with this driver when none runs (JACK: --server)
    device: str = "hw:0"
    nperiods: int = 2


class Unit(Struct, frozen=True, kw_only=True):
    """What a backend's systemd unit says beyond what every bridge unit says."""

    description: str                  # after "NETJACK bridge to the DSP VM NAME"
    after: tuple[str, ...] = ()       # units besides libvirtd.service
    options: tuple[tuple[str, str | None], ...] = ()  # `netjack start` options: (flag, value or None)
    restart_on_failure: bool = False
    comment: str = ""                 # lines above [Unit], without their '# '


class Backend(Protocol):
    """A bridge backend (see the module's docstring)."""

    name: str   # the registry's key, and the state file's ``audio_server``
    label: str  # its name for people

    def start(self, cfg: DspConfig, options: StartOptions, model: HostModel, wait: float, say) -> dict: ...

    def stop(self, domain: str, say) -> bool: ...

    def restart_options(self, state: BridgeState | None, overrides: dict) -> StartOptions:
        """The options of a restart: the last start's (``state``, when it ran on this backend), then
        the ``overrides`` given now."""
        ...

    def read_state(self, domain: str) -> BridgeState | None: ...

    def status(self, domain: str) -> dict: ...

    def format_status(self, info: dict) -> list[str]: ...

    def listening(self, state: BridgeState) -> list[str]: ...

    def forget_slave(self, domain: str, say) -> list[str]: ...

    def missing_slave(self, state: BridgeState | None, timeout: float) -> str:
        """The words of a wait for the link that ran out."""
        ...

    def unit(self, cfg: DspConfig, options: StartOptions) -> Unit: ...

    def budget(self, cfg: DspConfig, host_backend: str, host_nperiods: int, target_ms: float | None) -> Budget: ...

    def measure(self, cfg: DspConfig, model: HostModel, seconds: float, channel: int) -> dict: ...

    def set_period(self, domain: str, frames: int) -> None:
        """Set the host graph's period (``tune``), or :class:`BridgeError` saying why it cannot."""
        ...


class ModuleBackend:
    """The part of a backend that is its bridge module's own: an adapter sets :attr:`bridge` (the module
    with ``start``, ``stop``, ``read_state``, ``status``, ``format_status``, ``listening`` and
    ``forget_slave``) and adds the rest of :class:`Backend`."""

    bridge: ModuleType

    def start(self, cfg: DspConfig, options: StartOptions, model: HostModel, wait: float = 0.0, say=print) -> dict:
        link = Link.of(cfg)
        state, fresh = self.bridge.start(link, options, model, say=say)
        if wait:
            wait_for_link(self, link.domain, wait)
            if fresh:
                say(f"link up: slave '{link.slave}' joined")
        return msgspec.to_builtins(state)

    def stop(self, domain: str, say=print) -> bool:
        return self.bridge.stop(domain, say=say)

    def read_state(self, domain: str) -> BridgeState | None:
        return self.bridge.read_state(domain)

    def status(self, domain: str) -> dict:
        return self.bridge.status(domain)

    def format_status(self, info: dict) -> list[str]:
        return self.bridge.format_status(info)

    def listening(self, state: BridgeState) -> list[str]:
        return self.bridge.listening(state)

    def forget_slave(self, domain: str, say=print) -> list[str]:
        return self.bridge.forget_slave(domain, say=say)


# --- one wait --------------------------------------------------------------------------------------

def wait_until(ready: Callable[[], object], timeout: float, step: float = 0.25) -> object:
    """Poll ``ready`` until it returns something true, at most ``timeout`` s: the last answer."""
    deadline = time.monotonic() + timeout
    answer = ready()
    while not answer and time.monotonic() < deadline:
        time.sleep(step)
        answer = ready()
    return answer


def wait_for_link(backend: Backend, domain: str, timeout: float) -> dict:
    """Block until the VM's slave has joined, or :class:`BridgeError` after ``timeout`` s (at once when
    the bridge is not running)."""
    info: dict = {}

    def joined() -> bool:
        nonlocal info
        info = backend.status(domain)
        return info.get("link") == "up" or not info.get("running")

    wait_until(joined, timeout)
    if info.get("link") == "up":
        return info
    if info.get("running"):
        raise BridgeError(f"the guest side of the link is missing: {backend.missing_slave(backend.read_state(domain), timeout)} "
                          "(is the VM up and its JACK running? archdsp-virt status / console)")
    raise BridgeError(f"the bridge for {domain} is not running: {info.get('problem', 'stopped')}")


# --- one unit writer -------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unit_word(what: str, value: str, quote: bool = True) -> str:
    """``value`` as one word of a unit's command line, quoted as systemd.syntax(7) and systemd.service(5)
    read it: inside ``"..."`` with ``\\`` and ``"`` escaped, ``%`` as ``%%`` (no specifier) and ``$`` as
    ``$$`` (no variable). A control character (a newline would start a directive of its own) or text
    that is not UTF-8 (systemd drops such a line) is refused with :class:`UsageError` naming ``what``."""
    if _CONTROL.search(value):
        raise UsageError(f"{what} {value!r} holds a control character, which a systemd unit cannot carry; "
                         "use a path without one")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} {value!r} is not UTF-8, which a systemd unit cannot carry; "
                         "use a path in UTF-8") from None
    if not quote:
        return value.replace("%", "%%")
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def render_unit(cfg: DspConfig, config_path: Path, unit: Unit, exe: str | None = None) -> str:
    """The systemd unit that runs a config's bridge at boot (the original design's
    dsp-netjack-bridge.service), from what its backend says (:class:`Unit`)."""
    exe_word = unit_word("the archdsp-virt path", exe or shutil.which("archdsp-virt") or "archdsp-virt")
    cfg_word = unit_word("the config path", str(Path(config_path).resolve()))
    words = ["netjack", "start"]
    for flag, value in unit.options:
        if not re.fullmatch(r"--[a-z][a-z-]*", flag):
            raise ValueError(f"not an option: {flag!r}")
        words += [flag] if value is None else [flag, unit_word(flag, value)]
    start = " ".join([*words, cfg_word])
    description = unit_word("the description", f"NETJACK bridge to the DSP VM {cfg.name}{unit.description}",
                            quote=False)
    comment = "".join(f"# {unit_word('a comment', line, quote=False)}\n" for line in unit.comment.splitlines())
    restart = "Restart=on-failure\nRestartSec=10\n" if unit.restart_on_failure else ""
    return (
        comment + "[Unit]\n"
        f"Description={description}\n"
        f"After={' '.join(('libvirtd.service', *unit.after))}\n"
        "Wants=libvirtd.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart={exe_word} {start}\n"
        f"ExecStop={exe_word} netjack stop {cfg_word}\n"
        f"ExecReload={exe_word} netjack restart {cfg_word}\n"
        + restart +
        "# `netjack start` exits once the bridge runs; the supervisor and the processes it started stay in\n"
        "# this unit's cgroup (detached into sessions of their own, which does not take them out of it).\n"
        "# ExecStop stops them by PID, the NETJACK master first; KillMode=process leaves the rest of the\n"
        "# cgroup to it instead of SIGTERMing a server mid-unload.\n"
        "KillMode=process\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
