"""What every bridge backend shares: the link as the config gives it, the master's address rule (as
``check`` applies it), where the bridge's files under /run are, and the status screen's link lines."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from msgspec import Struct

from ..config import DspConfig
from ..errors import BridgeError, ConfigError
from ..procs import flock_within, run_dir

if TYPE_CHECKING:
    from ..host.model import HostModel

RUN_DIR = run_dir()  # $ARCHDSP_RUN_DIR only where it is safe (procs.run_dir)
STATUS_PERIOD = 1.0
LOG_MAX_BYTES = 1024 * 1024


def run_file(name: str) -> Path:
    """A file of the bridge's under /run (``$ARCHDSP_RUN_DIR``)."""
    return RUN_DIR / name


def state_paths(name: str) -> tuple[Path, Path, Path]:
    return (RUN_DIR / f"netjack-{name}.json", RUN_DIR / f"netjack-{name}.status.json",
            RUN_DIR / f"netjack-{name}.log")


@contextmanager
def bridge_lock(domain: str, timeout: float = 60.0):
    """One ``netjack start`` (or stop) of a domain at a time, whichever the backend: a second waits, then
    finds the first's bridge (``netjack-NAME.lock`` under the run folder)."""
    import fcntl

    lock = run_file(f"netjack-{domain}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if not flock_within(fd, timeout):
            raise BridgeError(f"another 'netjack start' or 'stop' of {domain} still runs (lock {lock})")
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def bound_log(log: Path, max_bytes: int | None = None) -> bool:
    """Keep a bridge log under /run (a tmpfs, in memory) bounded: once it is larger than ``max_bytes``
    (:data:`LOG_MAX_BYTES`) its content is copied to ``LOG.1`` (replacing the one before) and the log is
    truncated in place, so the processes writing into it (opened for appending) go on at its start. True
    when it was cut. A symbolic link is left alone.

    Both backends' supervisors call it every period; the JACK2 start calls it too."""
    try:
        fd = os.open(log, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # none yet, or a symbolic link (ELOOP): not ours to cut
        return False
    with open(fd, "r+b") as src:
        if os.fstat(fd).st_size <= (LOG_MAX_BYTES if max_bytes is None else max_bytes):
            return False
        old = log.with_name(log.name + ".1")
        tmp = log.with_name(log.name + ".1.tmp")
        tmp.unlink(missing_ok=True)
        with open(tmp, "xb") as dst:  # x: never through a planted name
            shutil.copyfileobj(src, dst)
        tmp.replace(old)
        os.ftruncate(fd, 0)
    return True


class Link(Struct, frozen=True):
    """What the bridge needs from the config."""

    domain: str
    slave: str
    master_ip: str
    port: int
    rate: int
    period: int
    channels: int
    vcpu_cores: tuple[int, ...] = ()
    allow_lan: bool = False
    network_latency: int = 0

    @classmethod
    def of(cls, cfg: DspConfig) -> Link:
        nj = cfg.netjack
        if not nj.enable:
            raise ConfigError("archibaldos.netjack.enable: the bridge is for the NETJACK link; set enable = true")
        return cls(cfg.name, nj.client_name, nj.master_ip, nj.source_port, nj.sample_rate, nj.buffer_size,
                   nj.channels, tuple(cfg.isolated_cores), nj.allow_lan, nj.network_latency)


def check_master_address(ip: str, allow_lan: bool, model: HostModel) -> str | None:
    """Refuse a master address that is not this host's, or that other machines reach (unless ``allow_lan``),
    by the rule ``check`` applies (:func:`~..host.checks.neighbours.master_address`), read from ``model``'s
    files. Returns the exposure ``allow_lan`` accepted."""
    from ..host.checks.neighbours import master_address  # here: `netjack status` never needs the host's files

    if model.files is None:
        raise BridgeError(f"archibaldos.netjack.master_ip {ip}: the bridge runs on this machine, and "
                          f"{model.where}'s files are not this machine's")
    rule = master_address(ip, allow_lan, model.files)
    if rule.interface is None:
        raise BridgeError(f"archibaldos.netjack.master_ip {ip} is not an address of this host: {rule.fix}")
    if rule.status == "fail":
        raise BridgeError(f"archibaldos.netjack.master_ip: {rule.exposed}; any machine there could join the link "
                          f"and take host audio: {rule.fix}")
    return rule.exposed


def guard_master(link: Link, model: HostModel, say) -> None:
    """:func:`check_master_address` for a bridge start, saying so when the LAN may join."""
    if exposed := check_master_address(link.master_ip, link.allow_lan, model):
        say(f"warning: {exposed}; the LAN can join the link (archibaldos.netjack.allow_lan = true)")


def ignored_problem(ignored: list[str], following: str | None, slave: str, master_ip: str) -> str:
    """Status words for slaves the link does not follow (a second guest on master_ip's network)."""
    who = f"the link follows '{following}'" if following else f"the link waits for '{slave}' itself"
    return (f"NETJACK slave {', '.join(repr(c) for c in ignored)} ignored: {who}; another guest on "
            f"{master_ip}'s network joined under this VM's slave name (stop it, or give the VM's slave a name of "
            "its own: archibaldos.netjack.client_name)")


def link_lines(info: dict, extra: str = "") -> list[str]:
    """The status screen's link, port and problem lines (both audio servers)."""
    link = info["link"]
    lines = [f"  link: {link}" + (f" (slave '{info['slave']}')" if link == "up" and info.get("slave") else "")
             + f"   xruns since start: {info['xruns']}" + extra]
    lines += [f"  {logical} = {real}" for logical, real in sorted(info.get("ports", {}).items())]
    if info.get("problem"):
        lines.append(f"  problem: {info['problem']}")
    return lines
