"""The domain's commands: the host model, xml, up, down, status, console and check.

Each command builds the host model once (:func:`host_model`) and passes it down, with the rendered
domain, to the rooms below; nothing below builds another.
"""

from __future__ import annotations

from collections.abc import Collection
from contextlib import contextmanager
from typing import TYPE_CHECKING
from pathlib import Path

import msgspec

from ..domain.build import Rendered, render_domain
from ..config import ConfigError, DspConfig, load_config
from ..cpuset import CpuSet, parse_cpuset
from ..errors import ArchdspError, RenderError, UsageError
from ..domain.policy import PLAN_FACTS, forced_passt
from ..host.model import HostModel
from ..host.sources import ALL_FACTS
from ..virt.uri import is_local_uri

if TYPE_CHECKING:
    from ..virt.connection import Session


def _host_cpus(host_cpus: str | None) -> CpuSet | None:
    if host_cpus is None:
        return None
    try:
        cpus = parse_cpuset(host_cpus)
    except ValueError as exc:
        raise UsageError(f"--host-cpus: {exc}; expected a CPU list such as 0-7") from None
    if not cpus:
        raise UsageError("--host-cpus: empty CPU list; expected a CPU list such as 0-7")
    return cpus


def host_model(cfg: DspConfig, session: Session | None, host_cpus: str | None = None,
               notes: list[str] | None = None, host_root: str = "/", reachable: bool = True,
               wanted: Collection[str] = ALL_FACTS, uri: str | None = None) -> HostModel:
    """The one host model of a command: this machine's files and libvirt when ``session`` reaches this
    machine, libvirt alone when it names another host; ``host_cpus`` renders for a host given by hand.
    Without a session (nothing asked of libvirt), ``uri`` says which host it is. Only the ``wanted``
    facts are read."""
    from ..host.files import Host
    from ..virt.hostfacts import gather

    cpus = _host_cpus(host_cpus)
    if session is not None and not reachable:
        if not session.is_local:  # a remote host we cannot reach: nothing is known of it
            return HostModel(uri=session.uri, source="libvirt")
        session = None
    local = session.is_local if session is not None else is_local_uri(uri)
    # This machine's files only for this machine: a remote URI describes the remote host, never this one.
    files = Host(host_root) if local else None
    return gather(session, files=files, passt=forced_passt(cfg), online_cpus=cpus, notes=notes, wanted=wanted)


@contextmanager
def _naming(config: Path):
    """Policy refusals (a disk image that is a host device, ...) name the key; add the file, as load_config does."""
    try:
        yield
    except (ConfigError, RenderError) as err:
        if err.message.startswith(f"{config}: "):
            raise
        raise type(err)(f"{config}: {err.message}") from None


def render_for_cli(config: Path, uri: str | None, host_cpus: str | None = None,
                   port_forwards: str | None = None, uuid: str | None = None) -> tuple[Rendered, list[str]]:
    """Load ``config`` and render it for the host, with the notes to show the user.

    Only what the XML needs is read or asked (the CPUs, and passt where the config leaves it to the
    host). libvirt is asked only for what this machine's files cannot say (a remote host's CPUs, or
    whether it has passt), read-only and without retries: rendering must not wait on a daemon that is
    down. With ``host_cpus`` the host is given by hand and libvirt is not asked at all.
    """
    cfg = load_config(config, files_here=is_local_uri(uri))  # a remote host's files are not these
    if port_forwards:
        cfg = msgspec.structs.replace(cfg, network=msgspec.structs.replace(cfg.network, port_forward_backend=port_forwards))
    notes: list[str] = []
    if host_cpus is not None or (is_local_uri(uri) and forced_passt(cfg) is not None):
        model = host_model(cfg, None, host_cpus=host_cpus, notes=notes, wanted=PLAN_FACTS, uri=uri)
        if forced_passt(cfg) is None:
            notes.append("note: --host-cpus renders for a host given by hand: libvirt is not asked whether it "
                         "has passt; port forwards use hostfwd (--port-forwards passt to choose passt)")
    else:
        from ..virt.connection import Session

        with Session(uri, readonly=True, attempts=1) as session:
            model = host_model(cfg, session, host_cpus=host_cpus, notes=notes, wanted=PLAN_FACTS)
    with _naming(config):
        rendered = render_domain(cfg, model, uuid=uuid)
    accel = rendered.plan.accel
    if accel is not None and accel.asked == "auto":
        notes.append(f"note: domain_type = \"auto\" renders {accel.name.upper()}: {accel.reason}")
    backend = rendered.plan.port_forward_backend
    if backend == "passt":
        notes.append("port forwards: libvirt <portForward> on the passt backend")
    elif backend == "hostfwd":
        notes.append("port forwards: QEMU user-net hostfwd in <qemu:commandline> (no passt backend in this libvirt)")
    return rendered, notes


def up_command(config: Path, uri: str | None, restart: bool, autostart: bool, skip: set[str],
               preflight: bool, say, host_root: str = "/") -> None:
    """``archdsp-virt up``: preflight, define, start, verify, on one host model."""
    from ..host.checks import require
    from ..virt.connection import Session
    from ..virt.lifecycle import up

    cfg = load_config(config, files_here=is_local_uri(uri))  # a remote host's files are not these

    def before_start() -> None:  # on this machine only: the bridge's host side runs here
        _fresh_master(cfg, say)

    with _naming(config):
        with Session(uri) as session:
            model = host_model(cfg, session, host_root=host_root)
            if not model.is_local:
                say(f"host: {session.uri} (facts from libvirt; nothing of this machine is read)")
            _say_accel(cfg, model, say)
            if preflight:
                reachable, detail = _reach(session)
                require(cfg, model, reachable, skip, libvirt_detail=detail, say=say)
            up(cfg, session, model, lambda uuid: render_domain(cfg, model, uuid=uuid), restart=restart,
               autostart=autostart, say=say, before_start=before_start if model.is_local else None)


def _say_accel(cfg: DspConfig, model: HostModel, say) -> None:
    """The one line ``up`` says when ``domain_type = "auto"`` fell back to TCG, or rests on an assumption."""
    from ..host.accel import resolve

    accel = resolve(cfg.domain_type, model)
    if accel.fallback:
        say(accel.reason)
    elif accel.asked == "auto" and accel.assumed:
        say(f"running under KVM: {accel.reason}")


def _fresh_master(cfg: DspConfig, say) -> None:
    """Before the VM (re)starts under a running bridge that still holds its old NETJACK slave: mark that
    slave stale, so the aliases follow the new one (JACK's master keeps a dead slave for a minute)."""
    if not cfg.netjack.enable:
        return
    from ..audio.servers import forget_slave, status as bridge_status

    if bridge_status(cfg.name).get("running"):
        forget_slave(cfg.name, say=say)


def _reach(session: Session) -> tuple[bool, str]:
    """Whether libvirt answers through ``session`` (a daemon that is restarting gets its bounded retries),
    and what was seen."""
    try:
        version = session.run("connecting", lambda conn: conn.getLibVersion())
    except ArchdspError as err:
        return False, str(err)
    return True, f"connected to {session.uri} (libvirt {version // 1_000_000}.{version // 1000 % 1000})"


def run_preflight(cfg: DspConfig, session: Session, model: HostModel, skip: set[str], say) -> None:
    """Refuse to go on when a host check fails (unless skipped, which is said)."""
    from ..host.checks import require

    reachable, detail = _reach(session)
    require(cfg, model, reachable, skip, libvirt_detail=detail, say=say)


def down_command(config: Path, uri: str | None, timeout: float, force: bool, undefine: bool, say) -> None:
    """``archdsp-virt down``: ACPI shutdown, destroy after ``timeout``; optionally undefine."""
    from ..virt.connection import Session
    from ..virt.lifecycle import down

    cfg = load_config(config, files_here=is_local_uri(uri))  # a remote host's files are not these
    with Session(uri) as session:
        down(cfg.name, session, timeout=timeout, force=force, undefine=undefine, say=say)


def status_command(config: Path, uri: str | None, as_json: bool) -> str:
    import json

    from ..virt.connection import Session
    from ..virt.status import format_status, status

    cfg = load_config(config, files_here=is_local_uri(uri))  # a remote host's files are not these
    with Session(uri) as session:
        model = host_model(cfg, session)
        info = status(cfg, session, model)
    if cfg.netjack.enable and model.is_local:
        from ..audio.servers import format_status as format_bridge, status as bridge_status

        info["bridge"] = bridge_status(cfg.name)
        info["sections"] = [format_bridge(info["bridge"])]
        xruns = info["bridge"].get("xruns")
        if info.get("accelerator") == "tcg" and isinstance(xruns, int) and xruns > 0:
            from ..host.accel import TCG_CAUSE

            info["cause"] = f"{xruns} xruns on the bridge: {TCG_CAUSE}"
    elif cfg.netjack.enable:  # the bridge's host side runs on the VM's host, not on this machine
        info["bridge"] = {"running": "unknown", "problem": f"the bridge runs on {model.where}: "
                          "run 'archdsp-virt netjack status CONFIG' there"}
        info["sections"] = [["=== NETJACK Bridge ===", f"  {info['bridge']['problem']}"]]
    if as_json:
        info.pop("sections", None)
        return json.dumps(info, indent=2, sort_keys=True) + "\n"
    return format_status(info)


def console_command(config: Path, uri: str | None, force: bool, pattern: str | None, timeout: float, echo,
                    send: str | None = None) -> None:
    from ..virt.connection import Session
    from ..virt.console import ensure_event_loop, expect, interactive

    cfg = load_config(config, files_here=is_local_uri(uri))  # a remote host's files are not these
    ensure_event_loop()
    with Session(uri) as session:
        if pattern is None:
            if send:
                raise UsageError("--send goes with --expect")
            interactive(session, cfg.name, force=force)
            return
        try:
            data = send.encode().decode("unicode_escape").encode("latin-1") if send else None
        except UnicodeError as exc:
            raise UsageError(f"--send: {exc.reason} in {send!r}; backslash escapes such as \\n or \\x1b are expected") from None
        matched, _seen = expect(session, cfg.name, pattern, timeout, force=force, echo=echo, send=data)
    if not matched:
        raise ArchdspError(f"console: {pattern!r} did not appear within {timeout:g} s")


def probe_libvirt(uri: str | None) -> tuple[bool, str]:
    """Whether a read-only libvirt connection to ``uri`` opens now (no retries), and what was seen."""
    from ..virt.connection import Session

    with Session(uri, readonly=True, attempts=1) as session:
        try:
            session.connect()
        except ArchdspError as err:
            return False, str(err)
        return True, f"connected to {session.uri.split('?', 1)[0]} (read-only)"


def guest_check_command(config: Path, uri: str | None, as_json: bool = False) -> tuple[str, bool]:
    """What ``archdsp-virt guest check`` prints (the in-guest preflight, through the guest agent), and
    whether any check failed."""
    import json

    from ..host.checks import failures, findings_json, format_findings
    from ..virt.connection import Session
    from ..virt.guestcheck import run

    cfg = load_config(config, files_here=is_local_uri(uri))
    if not cfg.netjack.enable:
        raise ConfigError(f"{config}: archibaldos.netjack.enable: guest check compares the guest's slave with "
                          "the link's settings; set enable = true")
    with Session(uri) as session:
        found = run(cfg, session)
    text = json.dumps(findings_json(found), indent=2) + "\n" if as_json else format_findings(found)
    return text, bool(failures(found))


def check_command(config: Path, uri: str | None, host_root: str = "/", as_json: bool = False) -> tuple[str, bool]:
    """What ``archdsp-virt check`` prints, and whether any check failed.

    The host is the one behind ``uri``: this machine's files (under ``host_root``) only when the URI
    names this machine; over a remote URI, libvirt's facts alone, and every host-only fact is a skip.
    """
    import json

    from ..host.checks import failures, findings_json, format_findings, run_checks
    from ..virt.connection import Session

    cfg = load_config(config, files_here=is_local_uri(uri))  # a remote host's files are not these
    reachable, detail = probe_libvirt(uri)
    with Session(uri, readonly=True, attempts=1) as session:
        model = host_model(cfg, session, host_root=host_root, reachable=reachable)
    findings = run_checks(cfg, model, reachable, libvirt_detail=detail)
    text = json.dumps(findings_json(findings), indent=2) + "\n" if as_json else format_findings(findings)
    return text, bool(failures(findings))
