"""Define, start, stop and inspect the DSP domain, idempotently.

``up`` may be run any number of times: it keeps the UUID of an existing
domain of the same name, reports "already running" as success, says when a
running domain has an older definition, and leaves the existing definition
exactly as it was when anything it does is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import libvirt
from msgspec import Struct, field

from ..domain.build import Rendered, render_domain
from ..config import DspConfig
from .connection import LibvirtFailure, Session
from ..cpuset import format_cpuset
from ..domain.drift import differences
from ..errors import ArchdspError, HostError
from ..domain.policy import forced_passt
from ..host.model import HostModel
from . import threads as qthreads

Say = Callable[[str], None]

STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "no state",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}
SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "crashed (QEMU exited unexpectedly)",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed to start",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "from snapshot",
}
RENICE_LOOKS = 5  # looks at QEMU's emulator threads until none is left at another nice


def _quiet(_msg: str) -> None:
    pass


def host_model(session: Session, cfg: DspConfig) -> HostModel:
    """The host model of the host behind ``session``, for callers that did not build one."""
    from ..host.files import Host
    from .hostfacts import gather

    return gather(session, files=Host() if session.is_local else None, passt=forced_passt(cfg))


def _has_qemu_namespace(session: Session) -> bool:
    return session.uri.startswith("qemu")


class UpResult(Struct):
    name: str
    uuid: str
    defined: str  # "new", "updated", "unchanged"
    started: bool
    restarted: bool
    stale: bool
    steps: list[str] = field(default_factory=list)


def _inactive_xml(session: Session, name: str) -> str:
    return session.dom(name, f"reading the definition of {name}",
                       lambda d: d.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))


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
            if dom is not None and not session.dom(name, "checking state", lambda d: d.isActive()):
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


def up(
    cfg: DspConfig,
    session: Session,
    restart: bool = False,
    autostart: bool = True,
    say: Say = _quiet,
    verify_threads: bool = True,
    start_timeout: float = 30.0,
    before_start: Callable[[], None] | None = None,
    model: HostModel | None = None,
) -> UpResult:
    """Define ``cfg`` (keeping an existing UUID), start it, tune and verify its threads.

    ``model`` is the host behind ``session`` (built from it when not given).
    """
    name = cfg.name
    facts = model if model is not None else host_model(session, cfg)
    existing = session.lookup(name)
    old_xml = _inactive_xml(session, name) if existing is not None else None
    uuid = session.dom(name, "reading the UUID", lambda d: d.UUIDString()) if existing is not None else None
    rendered: Rendered = render_domain(cfg, facts, uuid=uuid)
    for w in rendered.warnings:
        say(f"warning: {w}")
    backend = rendered.plan.port_forward_backend
    if backend:
        say(f"port forwards: {'libvirt portForward (passt)' if backend == 'passt' else 'QEMU hostfwd (qemu:commandline)'}")

    # Define; then check that libvirt kept what we own.
    try:
        _define(session, rendered.xml)
    except LibvirtFailure as err:
        if old_xml is not None or "already exists with uuid" not in str(err):
            raise
        # Another `up` of this config defined it between our lookup and our define: once, take its UUID.
        say(f"{name} was defined meanwhile (another up?): defining over it with its UUID")
        old_xml = _inactive_xml(session, name)
        uuid = session.dom(name, "reading the UUID", lambda d: d.UUIDString())
        rendered = render_domain(cfg, facts, uuid=uuid)
        _define(session, rendered.xml)
    new_xml = _inactive_xml(session, name)
    lost = differences(rendered.xml, new_xml, with_commandline=_has_qemu_namespace(session))
    if lost:
        _restore(session, name, old_xml, say)
        raise ArchdspError(f"libvirt did not keep the definition as rendered: {'; '.join(lost)}")
    uuid = session.dom(name, "reading the UUID", lambda d: d.UUIDString())
    if old_xml is None:
        defined = "new"
    else:
        defined = "unchanged" if new_xml == old_xml else "updated"
    say(f"defined {name} ({defined}, uuid {uuid})")

    result = UpResult(name=name, uuid=uuid, defined=defined, started=False, restarted=False, stale=False)
    active = session.dom(name, "checking state", lambda d: d.isActive())
    # What to put back, and start again, when a restart cannot start the new definition: the
    # persistent definition before ours, or (when an earlier `up` already defined this one without
    # restarting) the definition the stopped VM ran.
    previous = old_xml if defined != "unchanged" else None
    stopped_running = False
    if active:
        stale = _is_updated(session, name)
        if stale and restart:
            if previous is None:
                previous = session.dom(name, "reading the running definition",
                                       lambda d: d.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
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
        if before_start is not None:
            try:
                before_start()
            except BaseException as exc:
                outcome = _roll_back(session, name, previous, old_xml is None, stopped_running, say)
                if not isinstance(exc, Exception):
                    raise  # KeyboardInterrupt, SystemExit: rolled back, then theirs
                if isinstance(exc, ArchdspError):
                    exc.message = f"before starting {name}: {exc.message}; {outcome}"
                    raise
                raise HostError(f"before starting {name}: {_describe(exc)}; {outcome}") from None
        try:
            session.dom(name, f"starting {name}", lambda d: d.create())
        except LibvirtFailure as err:
            if "already running" in str(err) or err.code == libvirt.VIR_ERR_OPERATION_INVALID and "active" in str(err):
                say(f"{name} is already running")
            else:
                outcome = _roll_back(session, name, previous, old_xml is None, stopped_running, say)
                raise LibvirtFailure(f"{err.message}; {outcome}", code=err.code, transient=False) from None
        else:
            result.started = True
            say(f"started {name}")
    if autostart:
        session.dom(name, "setting autostart", lambda d: d.setAutostart(1))
        say(f"autostart on: {name} starts when the host boots")

    if verify_threads and _has_qemu_namespace(session):
        if not result.started:  # our own start returned once libvirt had finished it
            _wait_started(session, name, start_timeout)
        if facts.is_local:
            tune_and_verify(cfg, rendered, say, timeout=start_timeout)
        else:
            verify_remote(cfg, rendered, session, say)
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


def _is_updated(session: Session, name: str) -> bool:
    """Whether the running domain was started from an older definition than the persistent one.

    Compared on what the config owns, between libvirt's live and inactive XML (virDomainIsUpdated
    does not track redefinitions).
    """
    live = session.dom(name, "reading the running definition", lambda d: d.XMLDesc(0))
    return bool(differences(_inactive_xml(session, name), live, with_commandline=_has_qemu_namespace(session)))


class VcpuPlacement(Struct, frozen=True):
    """Where libvirt says one vCPU runs: its host CPU now, the CPUs it may use, its scheduler."""

    vcpu: int
    cpu: int
    affinity: frozenset[int]
    scheduler: str | None  # "fifo", "rr", "other"... from the live XML's vcpusched; None: libvirt's default
    priority: int | None


def vcpu_placement(session: Session, name: str) -> list[VcpuPlacement]:
    """Each vCPU's placement as libvirt reports it (virDomainGetVcpus and the live XML's
    ``vcpusched``): the same on a remote host as on this one, with nothing read from /proc."""
    from lxml import etree

    from ..cpuset import parse_cpuset

    info, maps = session.dom(name, "reading vCPUs", lambda d: d.vcpus())
    root = etree.fromstring(session.dom(name, "reading the running definition", lambda d: d.XMLDesc(0)).encode())
    sched: dict[int, tuple[str, int | None]] = {}
    for el in root.iterfind("cputune/vcpusched"):
        prio = el.get("priority")
        for v in parse_cpuset(el.get("vcpus") or ""):
            sched[v] = (el.get("scheduler") or "other", int(prio) if prio else None)
    out = []
    for (n, _state, _cpu_time, cpu), cpumap in zip(info, maps):
        s, prio = sched.get(n, (None, None))
        out.append(VcpuPlacement(n, cpu, frozenset(i for i, on in enumerate(cpumap) if on), s, prio))
    return out


def verify_remote(cfg: DspConfig, rendered: Rendered, session: Session, say: Say) -> None:
    """The vCPU check for a host we cannot read: affinity and scheduler as libvirt reports them."""
    plan = rendered.plan
    placement = {p.vcpu: p for p in vcpu_placement(session, cfg.name)}
    problems = []
    for pin in plan.pins:
        p = placement.get(pin.vcpu)
        if p is None:
            problems.append(f"libvirt reports no vCPU {pin.vcpu}")
            continue
        want_fifo = pin.vcpu in plan.fifo_vcpus
        say(f"vCPU {pin.vcpu}: on CPU {p.cpu}, affinity {format_cpuset(p.affinity)}, scheduler "
            f"{p.scheduler or 'default'}{f' priority {p.priority}' if p.priority is not None else ''} (from libvirt)")
        if p.affinity != pin.cpus:
            problems.append(f"vCPU {pin.vcpu} may run on {format_cpuset(p.affinity)}, "
                            f"config pins it to {format_cpuset(pin.cpus)}")
        if want_fifo and (p.scheduler != "fifo" or p.priority != cfg.realtime.priority):
            problems.append(f"vCPU {pin.vcpu} runs {p.scheduler or 'default'} priority {p.priority}, "
                            f"config wants fifo priority {cfg.realtime.priority}")
    if cfg.realtime.enable:
        say(f"emulator threads' nice {cfg.realtime.nice}: not set (libvirt has no call for it; "
            "run 'archdsp-virt up' on that host to renice them)")
    if problems:
        raise HostError("the running domain does not match the config: " + "; ".join(problems))


def tune_and_verify(cfg: DspConfig, rendered: Rendered, say: Say, timeout: float = 30.0,
                    proc: str = "/proc", run_dir: str = "/run/libvirt/qemu") -> None:
    """Renice QEMU's emulator threads; check every vCPU thread's affinity and class."""
    plan = rendered.plan
    deadline = time.monotonic() + timeout
    vcpus: dict[int, qthreads.Thread] = {}
    pid = None
    while time.monotonic() < deadline:
        pid = qthreads.qemu_pid(cfg.name, run_dir)
        if pid is not None:
            vcpus = qthreads.vcpu_threads(pid, proc)
            if len(vcpus) >= len(plan.pins):
                break
        time.sleep(0.2)
    if pid is None:
        raise HostError(f"{cfg.name}: no QEMU process found ({run_dir}/{cfg.name}.pid)")
    if len(vcpus) < len(plan.pins):
        raise HostError(f"{cfg.name}: found {len(vcpus)} vCPU threads in QEMU (pid {pid}), expected {len(plan.pins)}")

    if cfg.realtime.enable:
        # QEMU starts threads of its own while it boots, and one started by a thread not yet reniced keeps
        # nice 0: look again until a look finds none left (a few looks, 0.1 s apart).
        for _ in range(RENICE_LOOKS):
            left = [t.tid for t in qthreads.emulator_threads(pid, proc) if t.nice != cfg.realtime.nice]
            if not left:
                break
            try:
                qthreads.renice(left, cfg.realtime.nice)
            except ProcessLookupError:
                pass  # a thread that ended meanwhile; the next look renices the rest
            except OSError as exc:
                raise HostError(
                    f"cannot set nice {cfg.realtime.nice} on QEMU's emulator threads: {exc.strerror} "
                    "(run as root, or set realtime.nice to 0)"
                ) from None
            time.sleep(0.1)
        emu = qthreads.emulator_threads(pid, proc)
        say(f"emulator threads ({len(emu)}) at nice {cfg.realtime.nice}")

    problems = []
    for pin in plan.pins:
        t = vcpus[pin.vcpu]
        want_policy = "FIFO" if pin.vcpu in plan.fifo_vcpus else None
        line = (f"vCPU {pin.vcpu}: thread {t.tid} affinity {format_cpuset(t.affinity)} "
                f"class {t.policy} rtprio {t.rt_priority}")
        if t.affinity != pin.cpus:
            problems.append(f"vCPU {pin.vcpu} thread {t.tid} may run on {format_cpuset(t.affinity)}, "
                            f"config pins it to {format_cpuset(pin.cpus)}")
        if want_policy and (t.policy != want_policy or t.rt_priority != cfg.realtime.priority):
            problems.append(f"vCPU {pin.vcpu} thread {t.tid} runs {t.policy} rtprio {t.rt_priority}, "
                            f"config wants FIFO rtprio {cfg.realtime.priority}")
        say(line)
    if problems:
        raise HostError("the running domain does not match the config: " + "; ".join(problems))


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
    if session.dom(name, "checking state", lambda d: d.isActive()):
        was = "running"
        if not force:
            try:
                session.dom(name, f"shutting down {name}", lambda d: d.shutdown())
                say(f"asked {name} to shut down (ACPI); waiting up to {timeout:g} s")
            except LibvirtFailure as err:
                say(f"ACPI shutdown refused ({err}); destroying")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not session.dom(name, "checking state", lambda d: d.isActive()):
                    how = "shutdown"
                    break
                time.sleep(0.5)
        if not how:
            try:
                session.dom(name, f"destroying {name}", lambda d: d.destroy())
            except LibvirtFailure as err:
                if session.dom(name, "checking state", lambda d: d.isActive()):
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
