"""What the commands do, as library functions the CLI calls one at a time."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import msgspec

from .domain.build import Rendered, render_domain
from .config import ConfigError, DspConfig, load_config
from .cpuset import parse_cpuset
from .errors import ArchdspError, HostError, RenderError, UsageError
from .domain.policy import forced_passt
from .host.model import HostModel as HostFacts


def host_facts(cfg: DspConfig, uri: str | None, host_cpus: str | None = None) -> tuple[HostFacts, list[str]]:
    """This host's facts (or another's, with ``host_cpus``), and notes on how they were found."""
    notes: list[str] = []
    if host_cpus is not None:
        try:
            cpus = parse_cpuset(host_cpus)
        except ValueError as exc:
            raise UsageError(f"--host-cpus: {exc}; expected a CPU list such as 0-7") from None
        if not cpus:
            raise UsageError("--host-cpus: empty CPU list; expected a CPU list such as 0-7")
    else:
        cpus = HostFacts.local().online_cpus
    passt = forced_passt(cfg)
    if passt is None:
        from .virt.connection import open_connection, supports_passt

        passt = False
        try:
            conn = open_connection(uri, readonly=True, retry=False)
        except ArchdspError as err:
            notes.append(f"note: cannot ask libvirt whether it has passt ({err}); port forwards use hostfwd")
        else:
            try:
                passt = supports_passt(conn)
            finally:
                conn.close()
    return HostFacts(online_cpus=cpus, passt=passt), notes


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
    """Load ``config`` and render it for the host, with the notes to show the user."""
    cfg = load_config(config)
    if port_forwards:
        cfg = msgspec.structs.replace(cfg, network=msgspec.structs.replace(cfg.network, port_forward_backend=port_forwards))
    facts, notes = host_facts(cfg, uri, host_cpus=host_cpus)
    with _naming(config):
        rendered = render_domain(cfg, facts, uuid=uuid)
    backend = rendered.plan.port_forward_backend
    if backend == "passt":
        notes.append("port forwards: libvirt <portForward> on the passt backend")
    elif backend == "hostfwd":
        notes.append("port forwards: QEMU user-net hostfwd in <qemu:commandline> (no passt backend in this libvirt)")
    return rendered, notes


def up_command(config: Path, uri: str | None, restart: bool, autostart: bool, skip: set[str],
               preflight: bool, say) -> None:
    """``archdsp-virt up``: preflight, define, start, verify."""
    from .virt.connection import Session
    from .virt.lifecycle import up

    cfg = load_config(config)
    with Session(uri) as session:
        if preflight:
            run_preflight(cfg, session, skip, say)
        with _naming(config):
            up(cfg, session, restart=restart, autostart=autostart, say=say,
               before_start=lambda: _fresh_master(cfg, say))


def _fresh_master(cfg: DspConfig, say) -> None:
    """Before the VM (re)starts under a running bridge that still holds its old NETJACK slave: mark that
    slave stale, so the aliases follow the new one (JACK's master keeps a dead slave for a minute)."""
    if not cfg.netjack.enable:
        return
    from .audio.bridge import forget_slave, status as bridge_status

    if bridge_status(cfg.name).get("running"):
        forget_slave(cfg.name, say=say)


def run_preflight(cfg: DspConfig, session, skip: set[str], say) -> None:
    """Refuse to go on when a host check fails (unless skipped, which is said)."""
    from .host.checks import failures, preflight
    from .host.files import Host

    try:  # through the session: a daemon that is restarting gets its bounded retries
        version = session.run("connecting", lambda conn: conn.getLibVersion())
        reachable, detail = True, f"connected to {session.uri} (libvirt {version // 1_000_000}.{version // 1000 % 1000})"
    except ArchdspError as err:
        reachable, detail = False, str(err)
    findings = preflight(cfg, Host(), reachable, skip, libvirt_detail=detail)
    for f in findings:
        if f.observed.startswith("skipped on request"):
            say(f"preflight: {f.id} {f.observed} (--skip-check)")
    failed = failures(findings)
    if failed:
        first = failed[0]
        more = f" (and {len(failed) - 1} more: see 'archdsp-virt check')" if len(failed) > 1 else ""
        raise HostError(
            f"preflight {first.id} failed: {first.observed}; expected {first.expected}; fix: {first.fix}{more}"
            f" (or --skip-check {first.id}); nothing was defined or started"
        )
    warned = sum(f.status == "warn" for f in findings)
    say(f"preflight: {len(findings)} checks, none failed" + (f", {warned} warnings (archdsp-virt check)" if warned else ""))


def status_command(config: Path, uri: str | None, as_json: bool) -> str:
    import json

    from .virt.connection import Session
    from .virt.lifecycle import format_status, status

    cfg = load_config(config)
    with Session(uri) as session:
        info = status(cfg, session)
    if cfg.netjack.enable:
        from .audio.bridge import format_status as format_bridge, status as bridge_status

        info["bridge"] = bridge_status(cfg.name)
        info["sections"] = [format_bridge(info["bridge"])]
    if as_json:
        info.pop("sections", None)
        return json.dumps(info, indent=2, sort_keys=True) + "\n"
    return format_status(info)


def console_command(config: Path, uri: str | None, force: bool, pattern: str | None, timeout: float, echo,
                    send: str | None = None) -> None:
    from .virt.connection import Session
    from .virt.console import ensure_event_loop, expect, interactive

    cfg = load_config(config)
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
