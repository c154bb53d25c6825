"""Define, start, stop and inspect the DSP domain, idempotently.

``up`` may be run any number of times: it keeps the UUID of an existing
domain of the same name, reports "already running" as success, says when a
running domain has an older definition, and leaves the existing definition
exactly as it was when anything it does is refused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import libvirt
from msgspec import Struct, field

from ..domain.build import Rendered, render_domain
from ..config import DspConfig
from .connection import LibvirtFailure, Session, supports_passt
from ..cpuset import format_cpuset
from ..domain.drift import differences
from ..errors import ArchdspError, HostError
from ..domain.policy import forced_passt
from ..host.model import HostModel as HostFacts
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


def _quiet(_msg: str) -> None:
    pass


def host_facts_for(session: Session, cfg: DspConfig) -> HostFacts:
    """The facts of the host behind ``session``: its CPUs and whether its libvirt has passt."""
    cpus = None
    if session.is_local:
        cpus = HostFacts.local().online_cpus
    else:
        try:
            from lxml import etree

            caps = etree.fromstring(session.run("reading capabilities", lambda c: c.getCapabilities()).encode())
            cpus = frozenset(int(c) for c in caps.xpath("//topology/cells/cell/cpus/cpu/@id")) or None
        except ArchdspError:
            cpus = None
    passt = forced_passt(cfg)
    if passt is None:
        passt = session.run("reading domain capabilities", supports_passt)
    return HostFacts(online_cpus=cpus, passt=passt)


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
) -> UpResult:
    """Define ``cfg`` (keeping an existing UUID), start it, tune and verify its threads."""
    name = cfg.name
    facts = host_facts_for(session, cfg)
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

    if verify_threads and session.is_local and _has_qemu_namespace(session):
        if not result.started:  # our own start returned once libvirt had finished it
            _wait_started(session, name, start_timeout)
        tune_and_verify(cfg, rendered, say, timeout=start_timeout)
    elif verify_threads:
        say("thread check skipped: no local QEMU process behind this connection")
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
        emu = [t.tid for t in qthreads.emulator_threads(pid, proc)]
        try:
            qthreads.renice(emu, cfg.realtime.nice)
        except OSError as exc:
            raise HostError(
                f"cannot set nice {cfg.realtime.nice} on QEMU's emulator threads: {exc.strerror} "
                "(run as root, or set realtime.nice to 0)"
            ) from None
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


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def hugepage_counts(size_kib: int, sysfs: str = "/sys/kernel/mm/hugepages") -> dict[str, int | None]:
    base = os.path.join(sysfs, f"hugepages-{size_kib}kB")
    out: dict[str, int | None] = {}
    for key, fname in (("total", "nr_hugepages"), ("free", "free_hugepages"), ("reserved", "resv_hugepages"),
                       ("surplus", "surplus_hugepages")):
        v = _read(os.path.join(base, fname))
        out[key] = int(v) if v is not None and v.isdigit() else None
    return out


def status(cfg: DspConfig, session: Session, proc: str = "/proc", sysfs_root: str = "/sys") -> dict:
    """The ``dsp-status`` screen as data: domain, vCPUs, isolation, hugepages, memory, console, drift."""
    name = cfg.name
    info: dict = {"name": name, "uri": session.uri, "defined": False}
    dom = session.lookup(name)
    isolated = _read(os.path.join(sysfs_root, "devices/system/cpu/isolated"))
    from ..cpuset import parse_cpuset

    isolated_set = parse_cpuset(isolated) if isolated is not None else frozenset()
    info["isolation"] = {
        "config_cores": format_cpuset(cfg.isolated_cores),
        "host_isolated": format_cpuset(isolated_set) if isolated is not None else None,
        "missing": format_cpuset(set(cfg.isolated_cores) - isolated_set) if isolated is not None else None,
    }
    info["hugepages"] = {"page_size_kib": cfg.page_size_kib, "wanted": cfg.hugepages,
                         **hugepage_counts(cfg.page_size_kib, os.path.join(sysfs_root, "kernel/mm/hugepages"))}
    if dom is None:
        info["state"] = "not defined"
        return info
    info["defined"] = True
    state, reason = session.dom(name, "reading state", lambda d: d.state())
    info["uuid"] = session.dom(name, "reading the UUID", lambda d: d.UUIDString())
    info["state"] = STATE_NAMES.get(state, str(state))
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        info["reason"] = SHUTOFF_REASONS.get(reason, str(reason))
    info["autostart"] = bool(session.dom(name, "reading autostart", lambda d: d.autostart()))
    xml_live = session.dom(name, "reading the definition", lambda d: d.XMLDesc(0))
    xml_inactive = _inactive_xml(session, name)
    from lxml import etree

    root = etree.fromstring(xml_live.encode())
    info["console_log"] = root.xpath("string(devices/serial/log/@file)") or None
    info["memory"] = {
        "mib": int(root.findtext("memory") or 0) // 1024,
        "locked": root.find("memoryBacking/locked") is not None,
        "hugepages": root.find("memoryBacking/hugepages") is not None,
    }
    pins = {int(p.get("vcpu")): p.get("cpuset") for p in root.iterfind("cputune/vcpupin")}
    info["emulatorpin"] = root.xpath("string(cputune/emulatorpin/@cpuset)") or None
    active = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED)
    vcpus = []
    if active:
        try:
            stats = session.dom(name, "reading stats", lambda d: d.info())
            info["cpu_time_s"] = round(stats[4] / 1e9, 3)
        except ArchdspError:
            pass
        pid = qthreads.qemu_pid(name, proc=proc) if session.is_local and _has_qemu_namespace(session) else None
        info["qemu_pid"] = pid
        if pid is not None:
            from ..procs import age

            uptime = age(pid, proc)  # from the process's start time (/proc/PID/stat), not an mtime
            if uptime is not None:
                info["uptime_s"] = round(uptime, 1)
            threads = qthreads.vcpu_threads(pid, proc)
        else:
            threads = {}
        try:
            vinfo = session.dom(name, "reading vCPUs", lambda d: d.vcpus()[0])
        except ArchdspError:
            vinfo = []
        for v in vinfo:
            n = v[0]
            t = threads.get(n)
            vcpus.append({
                "vcpu": n,
                "pinned": pins.get(n),
                "actual_cpu": v[3],
                "thread": t.tid if t else None,
                "affinity": format_cpuset(t.affinity) if t else None,
                "policy": t.policy if t else None,
                "rt_priority": t.rt_priority if t else None,
            })
    else:
        vcpus = [{"vcpu": n, "pinned": c} for n, c in sorted(pins.items())]
    info["vcpus"] = vcpus
    # Drift: what libvirt has against what the config renders (with the same UUID).
    try:
        facts = host_facts_for(session, cfg)
        wanted = render_domain(cfg, facts, uuid=info["uuid"]).xml
        info["drift"] = differences(wanted, xml_inactive, with_commandline=_has_qemu_namespace(session))
    except ArchdspError as err:
        info["drift"] = [f"cannot compare with the config: {err}"]
    info["stale"] = active and _is_updated(session, name)
    return info


def format_status(info: dict) -> str:
    """The human form of :func:`status`, in the sections of the original dsp-status."""
    lines = ["=== DSP VM Status ==="]
    lines.append(f"{info['name']} ({info['uri']}): {info['state']}" + (f" ({info['reason']})" if info.get("reason") else ""))
    if info.get("defined"):
        lines.append(f"  uuid: {info['uuid']}   autostart: {'enabled' if info['autostart'] else 'disabled'}")
        if "uptime_s" in info:
            lines.append(f"  up for {info['uptime_s']:.0f} s, QEMU pid {info['qemu_pid']}")
        if info.get("stale"):
            lines.append("  running an older definition: 'archdsp-virt up --restart' applies the new one")
    lines.append("")
    lines.append("=== vCPUs ===")
    for v in info.get("vcpus", []):
        if "actual_cpu" in v:
            lines.append(f"  vCPU {v['vcpu']}: pinned {v['pinned']}, on CPU {v['actual_cpu']}, "
                         f"affinity {v['affinity']}, {v['policy']} rtprio {v['rt_priority']}")
        else:
            lines.append(f"  vCPU {v['vcpu']}: pinned {v['pinned']}")
    if info.get("emulatorpin"):
        lines.append(f"  emulator threads: {info['emulatorpin']}")
    lines.append("")
    lines.append("=== CPU Isolation ===")
    iso = info["isolation"]
    lines.append(f"  config: {iso['config_cores']}   host isolated: {iso['host_isolated'] or '(none)'}"
                 + (f"   not isolated: {iso['missing']}" if iso.get("missing") else ""))
    lines.append("")
    lines.append("=== Hugepages ===")
    hp = info["hugepages"]
    lines.append(f"  {hp['page_size_kib']} KiB pages: total {hp['total']}, free {hp['free']}, "
                 f"reserved {hp['reserved']} (config wants {hp['wanted']})")
    if "memory" in info:
        m = info["memory"]
        lines.append(f"  guest memory {m['mib']} MiB, hugepage-backed: {'yes' if m['hugepages'] else 'no'}, "
                     f"locked: {'yes' if m['locked'] else 'no'}")
    if info.get("console_log"):
        lines.append("")
        lines.append(f"=== Console ===\n  log: {info['console_log']}")
    if info.get("drift"):
        lines.append("")
        lines.append("=== Drift (definition differs from the config) ===")
        lines.extend(f"  {d}" for d in info["drift"])
    for extra in info.get("sections", []):
        lines.append("")
        lines.extend(extra)
    return "\n".join(lines) + "\n"
