"""The QEMU guest agent: the one place that talks to it (``org.qemu.guest_agent.0``, virtio serial).

Every call goes through libvirt's ``qemuAgentCommand`` with a bounded timeout, and its errors are
translated here, once: a guest with no agent answering raises :class:`AgentUnavailable` saying what
is missing and how to add it; a command the agent ran but that failed raises
:class:`GuestAgentError`. ``guest-exec`` is polled with ``guest-exec-status`` a bounded number of
times, within a bounded time; its output comes back decoded.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import libvirt
from msgspec import Struct

from ..errors import AgentUnavailable, ArchdspError, GuestAgentError, shown
from .connection import Session, summary

CHANNEL = "org.qemu.guest_agent.0"
VIA = "guest-agent"
HOW_TO_ADD = ("install qemu-guest-agent in the guest (Debian: apt-get install qemu-guest-agent; "
              "NixOS: services.qemuGuest.enable = true)")
CALL_TIMEOUT = 5  # seconds libvirt waits for one agent answer
POLL_INTERVAL = 0.2  # seconds between two guest-exec-status calls
MAX_OUTPUT = 1 << 20  # characters kept of a command's output, each stream


class ExecResult(Struct, frozen=True):
    """What ``guest-exec`` returned: the exit code (None when a signal ended it), the signal, the output."""

    exitcode: int | None
    signal: int | None
    out: str
    err: str

    @property
    def ok(self) -> bool:
        return self.exitcode == 0


def _unavailable(name: str, why: str) -> AgentUnavailable:
    return AgentUnavailable(f"{name}: no QEMU guest agent answers ({why}): {HOW_TO_ADD}")


def translate(err: libvirt.libvirtError, name: str, cmd: str) -> ArchdspError:
    """A libvirt error of an agent call -> ours: unavailable (with the fix) or a failed command."""
    code = err.get_error_code()
    text = summary(err)
    if code == libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED or "not configured" in text:
        return AgentUnavailable(f"{name}: the domain has no {CHANNEL} channel ({text}): 'archdsp-virt up' renders "
                                f"one (a domain defined otherwise: add <channel type='unix'><target type='virtio' "
                                f"name='{CHANNEL}'/></channel>); then {HOW_TO_ADD}")
    if code in (libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_AGENT_UNSYNCED):
        return _unavailable(name, text)
    if code == libvirt.VIR_ERR_NO_SUPPORT:
        return AgentUnavailable(f"{name}: this libvirt driver cannot reach a guest agent ({text}): a QEMU domain "
                                "(qemu:///system) can")
    if code == libvirt.VIR_ERR_OPERATION_INVALID:
        return AgentUnavailable(f"{name}: {text}: the guest agent answers only in a running domain")
    if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
        return _unavailable(name, f"{cmd} timed out: {text}")
    return GuestAgentError(f"{name}: the guest agent's {cmd} failed: {text}")


def command(session: Session, name: str, cmd: str, arguments: dict | None = None,
            timeout: int = CALL_TIMEOUT) -> Any:
    """One agent command -> its ``return`` value. Not retried: a guest without an agent is told at once."""
    import libvirt_qemu

    payload = json.dumps({"execute": cmd, **({"arguments": arguments} if arguments else {})})
    dom = session.lookup(name)
    if dom is None:
        raise AgentUnavailable(f"{name}: no such domain: run 'archdsp-virt up CONFIG' to define it")
    try:
        raw = libvirt_qemu.qemuAgentCommand(dom, payload, max(1, int(timeout)), 0)
    except libvirt.libvirtError as err:
        raise translate(err, name, cmd) from None
    return decode_reply(raw, name, cmd)


def decode_reply(raw: str | None, name: str, cmd: str) -> Any:
    """The agent's JSON answer -> its ``return`` value (its ``error`` raised as :class:`GuestAgentError`)."""
    try:
        reply = json.loads(raw or "{}")
    except ValueError:
        raise GuestAgentError(f"{name}: the guest agent's answer to {cmd} is not JSON: {shown(raw or '', 120)}") from None
    if isinstance(reply, dict) and "error" in reply:
        e = reply["error"] or {}
        raise GuestAgentError(f"{name}: the guest agent's {cmd} failed: {shown(str(e.get('desc', e)), 200)}")
    return reply.get("return") if isinstance(reply, dict) else reply


def ping(session: Session, name: str, timeout: int = CALL_TIMEOUT) -> None:
    """``guest-ping``: returns when an agent answers, raises :class:`AgentUnavailable` otherwise."""
    command(session, name, "guest-ping", timeout=timeout)


def info(session: Session, name: str, timeout: int = CALL_TIMEOUT) -> dict:
    """``guest-info``: the agent's version and the commands it supports (``supported`` names the enabled ones)."""
    ret = command(session, name, "guest-info", timeout=timeout) or {}
    return {"version": ret.get("version"),
            "supported": sorted(c["name"] for c in ret.get("supported_commands", []) if c.get("enabled"))}


def _text(data: str | None) -> str:
    if not data:
        return ""
    return base64.b64decode(data).decode("utf-8", "replace")[:MAX_OUTPUT]


def exec_status(status: dict) -> ExecResult | None:
    """A ``guest-exec-status`` answer -> the result, or None while the command still runs."""
    if not status.get("exited"):
        return None
    return ExecResult(exitcode=status.get("exitcode"), signal=status.get("signal"),
                      out=_text(status.get("out-data")), err=_text(status.get("err-data")))


def run(session: Session, name: str, argv: list[str], timeout: float, input_text: str | None = None,
        call_timeout: int = CALL_TIMEOUT) -> ExecResult:
    """``argv`` in the guest through ``guest-exec``, its output captured; waits at most ``timeout`` seconds
    (polling ``guest-exec-status`` every :data:`POLL_INTERVAL`, a bounded number of times)."""
    args: dict = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if input_text is not None:
        args["input-data"] = base64.b64encode(input_text.encode()).decode()
    started = command(session, name, "guest-exec", args, timeout=call_timeout) or {}
    pid = started.get("pid")
    if not isinstance(pid, int):
        raise GuestAgentError(f"{name}: the guest agent's guest-exec returned no pid: {shown(str(started), 120)}")
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 2):
        result = exec_status(command(session, name, "guest-exec-status", {"pid": pid}, timeout=call_timeout) or {})
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_INTERVAL)
    raise GuestAgentError(f"{name}: {shown(' '.join(argv), 80)} (guest pid {pid}) did not finish within {timeout:g} s")


def sh(session: Session, name: str, script: str, timeout: float, call_timeout: int = CALL_TIMEOUT) -> ExecResult:
    """``sh -c SCRIPT`` in the guest (every Linux guest has a /bin/sh: busybox, Debian, NixOS)."""
    return run(session, name, ["/bin/sh", "-c", script], timeout, call_timeout=call_timeout)
