"""Define, start and stop the DSP domain, idempotently, and roll back what a failed start changed.

``up`` may be run any number of times: it keeps the UUID of an existing
domain of the same name, reports "already running" as success, says when a
running domain has an older definition, and leaves the existing definition
exactly as it was when anything it does is refused. Read-only questions are
:mod:`.inspect`'s; the checks after the start are :mod:`.verify`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import libvirt
from msgspec import Struct, field

from ..config import DspConfig
from ..domain.build import Rendered
from ..errors import ArchdspError, HostError
from ..host.model import HostModel
from .connection import LibvirtFailure, Session
from .drift import differences
from .inspect import has_qemu_namespace, inactive_xml, is_active, is_updated, live_xml, uuid_of
from .verify import tune_and_verify, verify_remote

Say = Callable[[str], None]
# What ``up`` renders with: the config's domain for the host model, with the UUID to keep (None: new).
Render = Callable[[str | None], Rendered]


def _quiet(_msg: str) -> None:
    pass


class UpResult(Struct):
    name: str
    uuid: str
    defined: str  # "new", "updated", "unchanged"
    started: bool
    restarted: bool
    stale: bool
    steps: list[str] = field(default_factory=list)


def _define(session: Session, xml: str) -> None:
    session.run("defining the domain", lambda c: c.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE))


def _undefine(session: Session, name: str, doing: str) -> None:
    """Undefine, with NVRAM and managed save removed where the driver has them."""
    flags = libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
    try:
        session.dom(name, doing, lambda d: d.undefineFlags(flags))
    except LibvirtFailure as err:
        if err.code not in (libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT):
            raise
        session.dom(name, doing, lambda d: d.undefine())


def _restore(session: Session, name: str, old_xml: str | None, say: Say) -> bool:
    """Put back the definition that was there before (or none). False (and said) if it could not."""
    try:
        if old_xml is None:
            dom = session.lookup(name)
            if dom is not None and not is_active(session, name):
                _undefine(session, name, f"removing the half-made definition of {name}")
                say(f"removed the new definition of {name}")
        else:
            _define(session, old_xml)
            say(f"restored the previous definition of {name}")
    except ArchdspError as err:  # best effort, reported
        say(f"could not restore the previous definition of {name}: {err}")
        return False
    return True


def _describe(exc: BaseException) -> str:
    """One line for an unexpected exception: an OSError names its file and reason."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def _roll_back(session: Session, name: str, previous: str | None, was_new: bool, restart_old: bool,
               say: Say) -> str:
    """After a failed (re)start: put the previous definition back, and start the VM again from it
    when it was running before we stopped it. Best effort; each step is said, and the outcome is
    returned as a clause for the error message."""
    if (previous is not None or was_new) and not _restore(session, name, previous, say):
        return f"the previous definition of {name} could not be restored (see above)"
    if not restart_old:
        return ("the new definition was removed" if was_new else
                f"the previous definition of {name} is back" if previous is not None else
                f"the definition of {name} is unchanged")
    try:
        session.dom(name, f"starting {name} again", lambda d: d.create())
    except ArchdspError as err:
        say(f"could not start {name} again from its previous definition: {err}")
        return f"the previous definition of {name} is back, but the VM could not be started again: {err}"
    say(f"started {name} again from its previous definition")
    return f"the previous definition of {name} is back and the VM runs it again"


def _define_kept(session: Session, name: str, render: Render, say: Say) -> tuple[Rendered, str | None]:
    """Define the rendered domain, keeping the UUID of one already there: (what was rendered, the
    definition it replaced or None)."""
    existing = session.lookup(name)
    old_xml = inactive_xml(session, name) if existing is not None else None
    rendered = render(uuid_of(session, name) if existing is not None else None)
    try:
        _define(session, rendered.xml)
    except LibvirtFailure as err:
        # Another `up` of this config defined it between our lookup and our define (libvirt refuses a
        # second UUID for the name): once, take its UUID.
        if old_xml is not None or err.code != libvirt.VIR_ERR_OPERATION_FAILED or session.lookup(name) is None:
            raise
        say(f"{name} was defined meanwhile (another up?): defining over it with its UUID")
        old_xml = inactive_xml(session, name)
        rendered = render(uuid_of(session, name))
        _define(session, rendered.xml)
    return rendered, old_xml


def _start(session: Session, name: str, roll_back: Callable[[], str], say: Say) -> bool:
    """Start ``name``: True when this call started it, False when it was running already; on any other
    refusal, ``roll_back()`` and raise with its outcome."""
    try:
        session.dom(name, f"starting {name}", lambda d: d.create())
    except LibvirtFailure as err:
        if err.code == libvirt.VIR_ERR_OPERATION_INVALID and is_active(session, name):
            say(f"{name} is already running")  # started meanwhile (another up, a virsh start)
            return False
        outcome = roll_back()
        raise LibvirtFailure(f"{err.message}; {outcome}", code=err.code, transient=False) from None
    say(f"started {name}")
    return True


def _before_start(name: str, before_start: Callable[[], None], roll_back: Callable[[], str]) -> None:
    try:
        before_start()
    except BaseException as exc:
        outcome = roll_back()
        if not isinstance(exc, Exception):
            raise  # KeyboardInterrupt, SystemExit: rolled back, then theirs
        if isinstance(exc, ArchdspError):
            exc.message = f"before starting {name}: {exc.message}; {outcome}"
            raise
        raise HostError(f"before starting {name}: {_describe(exc)}; {outcome}") from None


def up(
    cfg: DspConfig,
    session: Session,
    model: HostModel,
    render: Render,
    restart: bool = False,
    autostart: bool = True,
    say: Say = _quiet,
    verify_threads: bool = True,
    start_timeout: float = 30.0,
    before_start: Callable[[], None] | None = None,
) -> UpResult:
    """Define ``cfg`` as ``render`` renders it (keeping an existing UUID), start it, tune and verify its
    threads. ``model`` is the host behind ``session``, the one the command built."""
    name = cfg.name
    rendered, old_xml = _define_kept(session, name, render, say)
    for w in rendered.warnings:
        say(f"warning: {w}")
    backend = rendered.plan.port_forward_backend
    if backend:
        say(f"port forwards: {'libvirt portForward (passt)' if backend == 'passt' else 'QEMU hostfwd (qemu:commandline)'}")
    # Check that libvirt kept what we own.
    new_xml = inactive_xml(session, name)
    lost = differences(rendered.xml, new_xml, with_commandline=has_qemu_namespace(session))
    if lost:
        _restore(session, name, old_xml, say)
        raise ArchdspError(f"libvirt did not keep the definition as rendered: {'; '.join(lost)}")
    uuid = uuid_of(session, name)
    defined = "new" if old_xml is None else "unchanged" if new_xml == old_xml else "updated"
    say(f"defined {name} ({defined}, uuid {uuid})")

    result = UpResult(name=name, uuid=uuid, defined=defined, started=False, restarted=False, stale=False)
    active = is_active(session, name)
    # What to put back, and start again, when a restart cannot start the new definition: the
    # persistent definition before ours, or (when an earlier `up` already defined this one without
    # restarting) the definition the stopped VM ran.
    previous = old_xml if defined != "unchanged" else None
    stopped_running = False
    if active:
        stale = is_updated(session, name)
        if stale and restart:
            if previous is None:
                previous = live_xml(session, name, secure=True)
            say(f"{name} runs an older definition: restarting it")
            session.dom(name, f"stopping {name}", lambda d: d.destroy())
            active = False
            stopped_running = True
            result.restarted = True
        elif stale:
            result.stale = True
            say(f"{name} is already running, with an older definition: run 'up --restart' to apply the new one")
        else:
            say(f"{name} is already running")
    if not active:
        def roll_back() -> str:
            return _roll_back(session, name, previous, old_xml is None, stopped_running, say)

        if before_start is not None:
            _before_start(name, before_start, roll_back)
        result.started = _start(session, name, roll_back, say)
    if autostart:
        session.dom(name, "setting autostart", lambda d: d.setAutostart(1))
        say(f"autostart on: {name} starts when the host boots")

    if verify_threads and has_qemu_namespace(session):
        if not result.started:  # our own start returned once libvirt had finished it
            _wait_started(session, name, start_timeout)
        if model.is_local:
            tune_and_verify(cfg, rendered.plan, say, timeout=start_timeout)
        else:
            verify_remote(cfg, rendered.plan, session, say)
    elif verify_threads:
        say("thread check skipped: this driver runs no QEMU process")
    return result


def _wait_started(session: Session, name: str, timeout: float) -> None:
    """Wait while libvirt is still starting the domain (another ``up`` or a ``virsh start`` got there
    first): it is active from the moment QEMU is launched, but its vCPUs are pinned and scheduled
    only by the end of the start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state, reason = session.dom(name, "checking state", lambda d: d.state())
        if not (state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_STARTING_UP):
            return
        time.sleep(0.1)


class DownResult(Struct):
    name: str
    was: str  # "absent", "shut off", "running"
    how: str  # "", "shutdown", "destroy"
    undefined: bool


def down(name: str, session: Session, timeout: float = 60.0, force: bool = False,
         undefine: bool = False, say: Say = _quiet) -> DownResult:
    """ACPI shutdown, wait up to ``timeout`` s, then destroy; optionally undefine. Idempotent."""
    if session.lookup(name) is None:
        say(f"{name} is not defined: nothing to do")
        return DownResult(name, "absent", "", False)
    how = ""
    was = "shut off"
    if is_active(session, name):
        was = "running"
        if not force:
            try:
                session.dom(name, f"shutting down {name}", lambda d: d.shutdown())
                say(f"asked {name} to shut down (ACPI); waiting up to {timeout:g} s")
            except LibvirtFailure as err:
                say(f"ACPI shutdown refused ({err}); destroying")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not is_active(session, name):
                    how = "shutdown"
                    break
                time.sleep(0.5)
        if not how:
            try:
                session.dom(name, f"destroying {name}", lambda d: d.destroy())
            except LibvirtFailure as err:
                if is_active(session, name):
                    raise
                say(f"({err})")
            how = "destroy"
        say(f"{name} is shut off ({'ACPI shutdown' if how == 'shutdown' else 'destroyed'})")
    else:
        say(f"{name} is already shut off")
    undefined = False
    if undefine:
        _undefine(session, name, f"undefining {name}")
        undefined = True
        say(f"{name} is undefined")
    return DownResult(name, was, how, undefined)
