"""What the commands do, as library functions the CLI calls one at a time."""

from __future__ import annotations

from pathlib import Path

from . import Rendered, render_domain
from .config import DspConfig, load_config
from .cpuset import parse_cpuset
from .errors import ArchdspError, UsageError
from .policy import HostFacts


def host_facts(cfg: DspConfig, uri: str | None, host_cpus: str | None = None,
               port_forwards: str | None = None) -> tuple[HostFacts, list[str]]:
    """This host's facts (or another's, with ``host_cpus``), and notes on how they were found."""
    notes: list[str] = []
    if host_cpus is not None:
        try:
            cpus = parse_cpuset(host_cpus)
        except ValueError as exc:
            raise UsageError(f"--host-cpus: {exc}; expected a CPU list such as 0-7") from None
        if not cpus:
            raise UsageError("--host-cpus: empty CPU list; expected a CPU list such as 0-7")
        facts = HostFacts(online_cpus=cpus)
    else:
        facts = HostFacts.local()
    backend = port_forwards or cfg.network.port_forward_backend
    passt = backend == "passt"
    if cfg.network.enable and cfg.network.hostfwd and backend == "auto":
        from .connection import open_connection, supports_passt

        try:
            conn = open_connection(uri, readonly=True, retry=False)
        except ArchdspError as err:
            notes.append(f"note: cannot ask libvirt whether it has passt ({err}); port forwards use hostfwd")
        else:
            try:
                passt = supports_passt(conn)
            finally:
                conn.close()
    facts = HostFacts(online_cpus=facts.online_cpus, passt=passt)
    return facts, notes


def render_for_cli(config: Path, uri: str | None, host_cpus: str | None = None,
                   port_forwards: str | None = None, uuid: str | None = None) -> tuple[Rendered, list[str]]:
    """Load ``config`` and render it for the host, with the notes to show the user."""
    cfg = load_config(config)
    if port_forwards and port_forwards != "auto":
        cfg = cfg.model_copy(update={"network": cfg.network.model_copy(update={"port_forward_backend": port_forwards})})
    facts, notes = host_facts(cfg, uri, host_cpus=host_cpus, port_forwards=port_forwards)
    rendered = render_domain(cfg, facts, uuid=uuid)
    backend = rendered.plan.port_forward_backend
    if backend == "passt":
        notes.append("port forwards: libvirt <portForward> on the passt backend")
    elif backend == "hostfwd":
        notes.append("port forwards: QEMU user-net hostfwd in <qemu:commandline> (no passt backend in this libvirt)")
    return rendered, notes
