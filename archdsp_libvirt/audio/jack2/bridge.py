"""The host side of the NETJACK2 link (the original design's dsp-netjack-bridge).

``start`` joins the host's JACK graph (a running server, or one it starts
with ``--server dummy|alsa`` at the config's rate and period), loads JACK2's
NETJACK master (``netmanager``) and leaves a supervisor running.

``netmanager -a IP`` only picks the multicast group: JACK2 binds its port on
every address (``0.0.0.0:PORT``). A jackd the bridge starts runs under the bind
hook (:mod:`..bindhook`), which its supervisor answers: the master's bind lands
on master_ip, and after the load the kernel's table is read to prove it (the
start is undone otherwise). A JACK server the bridge joins cannot be hooked: its
master is refused when the kernel shows it on every address, unless
``--allow-any-address`` keeps the port behind an nftables table (:mod:`..guard`).

The supervisor is a plain JACK client (no audio ports, no process callback) that:

- gives the VM's ports stable names: ``netjack:capture_N`` (host -> VM) and
  ``netjack:playback_N`` (VM -> host) are JACK aliases of the slave's
  ``to_slave_N`` / ``from_slave_N``, re-made whenever the slave rejoins;
- counts the server's xruns since the bridge started;
- writes what it sees to a status file once a second.

Every process is known by PID and start time and stopped by PID.
NETJACK discovery stays on the VM's bridge: the master is given the host's
unicast address there, so it joins no multicast group and nothing follows
the default route out of the machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

from ...cpuset import format_cpuset
from ...errors import BridgeError
from ...procs import Owned, spawn_detached, stop_together
from .. import bindhook, guard, placement, sockets
from ..backend import StartOptions, wait_until
from ..link import (STATUS_PERIOD, Link, bound_log, bridge_lock, guard_master, ignored_problem, link_lines, run_file,
                    state_paths)
from ..records import read_record, write_record
from . import master
from .master import jack_env
from .state import JackSeen, JackState, Stale, slave_clients

if TYPE_CHECKING:
    from ...host.model import HostModel

ALIAS_CLIENT = "netjack"
SUPERVISOR_CLIENT = "archdsp-bridge"
# Seconds a jackd of the bridge's own gets to finish on SIGTERM before SIGKILL. JACK2 1.9.21 with the
# netmanager loaded never finishes on SIGTERM (the netmanager's unload hangs, with or without a slave):
# a longer wait only made every `netjack stop` take 19 s.
SERVER_GRACE = 3.0


class _Started:
    """What a start has started and not yet put on the record (stopped again if the start fails)."""

    def __init__(self, server: Owned | None = None) -> None:
        self.server = server
        self.supervisor: Owned | None = None


def _stop_processes(sup: Owned | None, srv: Owned | None) -> tuple[bool, bool]:
    """Stop the supervisor, then the bridge's own jackd ``srv`` (None: the server is someone else's);
    whether each was running.

    On a jackd of ours, the supervisor's goodbye to it (its client's close) waits on a server whose
    netmanager never lets it finish: both are signalled at once and share one :data:`SERVER_GRACE`
    (one after the other, each waited out its own). On someone else's server the supervisor gets
    Owned.stop's full time to close its client cleanly.
    """
    if sup is not None and srv is not None:
        sup_stopped, srv_stopped = stop_together([sup, srv], SERVER_GRACE)
        return sup_stopped, srv_stopped
    sup_stopped = sup is not None and sup.stop()
    srv_stopped = srv is not None and srv.stop(timeout=SERVER_GRACE)
    return sup_stopped, srv_stopped


def default_server() -> str:
    return os.environ.get("JACK_DEFAULT_SERVER") or "default"


def open_client(server: str, name: str):
    """A JACK client on ``server`` (never starting one), or :class:`BridgeError`."""
    os.environ.setdefault("JACK_NO_AUDIO_RESERVATION", "1")
    try:
        import jack
    except OSError as exc:  # libjack is missing
        raise BridgeError(f"JACK is not installed ({exc}): apt-get install jackd2") from None
    jack.set_error_function(lambda _msg: None)  # libjack's own chatter: our errors say what matters
    jack.set_info_function(lambda _msg: None)
    try:
        return jack.Client(name, servername=server, no_start_server=True)
    except jack.JackOpenError:
        raise BridgeError(f"no JACK server '{server}' is running") from None


def _start_server(link: Link, model: HostModel, server: str, kind: str, device: str, nperiods: int, log: Path,
                  say, allow_any: bool) -> tuple[Owned, bindhook.Hook | None]:
    """Start jackd (under the bind hook where the kernel has it); the process and the hook answering it
    (this process's, until the supervisor takes the listener over)."""
    if not shutil.which("jackd"):
        raise BridgeError("jackd is not installed: apt-get install jackd2")
    missing = bindhook.available()
    if missing and not allow_any:
        raise BridgeError(f"the NETJACK master cannot be bound to {link.master_ip} here ({missing}): JACK2 would "
                          f"listen on 0.0.0.0:{link.port}/udp (every address); pass --allow-any-address to start "
                          "it behind an nftables rule that keeps the port to the VM's bridge")
    driver = ["-d", "dummy", "-r", str(link.rate), "-p", str(link.period)]
    if kind == "alsa":
        driver = ["-d", "alsa", "-d", device, "-r", str(link.rate), "-p", str(link.period), "-n", str(nperiods)]
    argv = ["jackd", "-n", server, "-R", "-t", "5000", *driver]
    hook = None
    if missing:
        proc = spawn_detached(argv, log, env=jack_env(server))
    else:
        proc, hook = bindhook.spawn(argv, log, link.master_ip, link.port, env=jack_env(server), say=say)
    say(f"started jackd '{server}' ({kind}, {link.rate} Hz, {link.period} frames), pid {proc.pid}"
        + (f", under the bind hook (port {link.port} only on {link.master_ip})" if hook else ""))
    keep = placement.housekeeping_cores(model, link.vcpu_cores)
    if keep:  # off the vCPUs' cores: a FIFO jackd thread there preempts the FIFO vCPU every period
        placement.pin_process(proc.pid, keep)
        say(f"jackd '{server}' pinned to the housekeeping cores {format_cpuset(keep)} (the VM's: "
            f"{format_cpuset(link.vcpu_cores)})")
    else:
        say(f"jackd '{server}' not pinned: no core outside the VM's {format_cpuset(link.vcpu_cores)}")

    def answers() -> bool:
        if not proc.alive():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            why = lines[-2:] if lines else ["(no output)"]
            raise BridgeError(f"jackd '{server}' exited at start: {' / '.join(why)} (see {log})")
        try:
            open_client(server, "archdsp-probe").close()
        except BridgeError:
            return False
        return True

    if not wait_until(answers, 10, step=0.2):
        proc.stop()
        if hook:
            hook.close()
        raise BridgeError(f"jackd '{server}' did not answer within 10 s; see {log}")
    if keep:  # the threads jackd made before the first pin
        placement.pin_process(proc.pid, keep)
    return proc, hook


def start(link: Link, options: StartOptions, model: HostModel, say=print) -> tuple[JackState, bool]:
    """Bring the host side of the link up (idempotent): the state, and whether this call started it."""
    with bridge_lock(link.domain):
        return _start(link, options, model, say)


def read_state(domain: str) -> JackState | None:
    return read_record(state_paths(domain)[0], JackState)


def _start(link: Link, options: StartOptions, model: HostModel, say) -> tuple[JackState, bool]:
    state_file, status_file, log = state_paths(link.domain)
    bound_log(log)
    state = read_state(link.domain)
    if state and state.supervisor and state.supervisor.alive():
        say(f"bridge for {link.domain} already running on JACK server '{state.server}'")
        return state, False
    server = options.server or (state.server if state else None) or default_server()
    guard_master(link, model, say)
    placement.confine_self(model, link.vcpu_cores)  # what this starts (jackd, the supervisor) stays off the VM's cores
    # A jackd an earlier start made is still ours when its supervisor died: keep it on the record, so that
    # stop stops it.
    earlier = state.server_process if state else None
    owned_server = earlier if earlier is not None and earlier.alive() else None
    if owned_server is not None and state.hooked:
        # its bind hook died with the supervisor: the kernel now answers its binds ENOSYS, a master cannot
        # be loaded into it again
        owned_server.stop(timeout=SERVER_GRACE)
        say(f"the bridge's supervisor had died; jackd '{server}' (pid {owned_server.pid}) it started ran under "
            "its bind hook: stopped, to be started again")
        owned_server = None
    elif owned_server is not None:
        say(f"the bridge's supervisor had died; jackd '{server}' (pid {owned_server.pid}) it started is kept")
    if state and state.nft_table:
        guard.drop(link.domain)
    started = _Started(owned_server)
    try:
        return _start_owned(link, model, server, options, say, owned_server, log, status_file, state_file,
                            started), True
    except BaseException:
        # Whatever stopped us before the state was written (a JACK error, Ctrl-C, a full /run): leave no
        # jackd with a master and no supervisor behind.
        _stop_processes(started.supervisor, started.server)
        raise


def _start_owned(link: Link, model: HostModel, server: str, options: StartOptions, say, owned_server: Owned | None,
                 log: Path, status_file: Path, state_file: Path, started: _Started) -> JackState:
    hook: bindhook.Hook | None = None
    try:
        probe = open_client(server, "archdsp-probe")
    except BridgeError:
        if options.start_server is None:
            raise BridgeError(f"no JACK server '{server}' is running: start yours (jackd, or PipeWire's JACK), "
                              "or pass --server dummy (or --server alsa) to start one") from None
        owned_server, hook = _start_server(link, model, server, options.start_server, options.device,
                                           options.nperiods, log, say, options.allow_any_address)
        started.server = owned_server
        probe = open_client(server, "archdsp-probe")
    try:
        try:
            if probe.samplerate != link.rate:
                raise BridgeError(f"JACK server '{server}' runs at {probe.samplerate} Hz, the config wants "
                                  f"{link.rate} Hz (archibaldos.netjack.sample_rate): restart it at {link.rate} Hz")
            if probe.blocksize != link.period:
                say(f"JACK server '{server}': period {probe.blocksize} -> {link.period} frames")
                probe.blocksize = link.period
        finally:
            probe.close()
        status_file.unlink(missing_ok=True)
        _exclude_path(link.domain).unlink(missing_ok=True)
        hook_args = ([] if hook is None else
                     ["--hook-fd", str(hook.listener), "--hook-pid", str(hook.pid), "--master-ip", link.master_ip,
                      "--port", str(link.port)])
        sup = spawn_detached(
            [sys.executable, "-P", "-m", "archdsp_libvirt.audio.jack2.supervisor", "--server", server,
             "--slave", link.slave, "--channels", str(link.channels), "--status", str(status_file),
             "--stale", str(_exclude_path(link.domain)), "--log", str(log), *hook_args],
            log, env=jack_env(server), pass_fds=(hook.listener,) if hook else (),
        )
        started.supervisor = sup
    finally:
        if hook is not None:
            hook.close()  # the supervisor holds the listener now (or the start is undone)
    netmanager = master.load(server, link.master_ip, link.port)
    table, ifname = master.verify(link, owned_server, hook is not None, options.allow_any_address, model, server,
                                  say)
    state = JackState(domain=link.domain, server=server, server_process=owned_server, server_kind=options.start_server,
                      device=options.device, nperiods=options.nperiods, supervisor=sup, master_ip=link.master_ip,
                      port=link.port, slave=link.slave, channels=link.channels, started=time.time(),
                      hooked=hook is not None, nft_table=table, interface=ifname,
                      allow_any_address=options.allow_any_address)
    write_record(state_file, state)
    started.server = started.supervisor = None  # on the record now: stop stops them
    say(f"NETJACK master listening on {', '.join(f'{w}/udp' for w in listening(state))} (netmanager {netmanager}; "
        "the kernel's table)")
    say(f"bridge supervisor pid {sup.pid}: VM ports as {ALIAS_CLIENT}:capture_N (host -> VM) and "
        f"{ALIAS_CLIENT}:playback_N (VM -> host)")
    return state


def stop(domain: str, say=print) -> bool:
    """Stop what ``start`` started (by PID): supervisor, NETJACK master, our jackd. Idempotent."""
    with bridge_lock(domain):
        return _stop(domain, say)


def _stop(domain: str, say) -> bool:
    state_file, status_file, _log = state_paths(domain)
    state = read_state(domain)
    if not state:
        say(f"bridge for {domain} is not running")
        return False
    sup, srv = state.supervisor, state.server_process
    sup_stopped, srv_stopped = _stop_processes(sup, srv)
    if sup_stopped:
        say(f"stopped bridge supervisor (pid {sup.pid})")
    server = state.server
    if srv is None:  # someone else's server: take our master out of it, leave the server alone
        try:
            r = master.unload(server)
            if r.returncode == 0:
                say(f"unloaded the NETJACK master from JACK server '{server}'")
        except BridgeError as err:
            say(f"could not unload the NETJACK master from '{server}' ({err}); it stays until that server stops")
    elif srv_stopped:
        say(f"stopped jackd '{server}' (pid {srv.pid}) and the NETJACK master in it")
    if state.nft_table and guard.drop(domain):
        say(f"removed nftables table inet {state.nft_table}")
    for path in (state_file, status_file, _exclude_path(domain)):
        path.unlink(missing_ok=True)
    return True


def forget_slave(domain: str, say=print) -> list[str]:
    """Mark the slave clients the bridge sees now as stale (the VM behind them is gone or restarting).

    JACK2's master keeps a dead slave's ports for about a minute; a restarted VM joins beside it as
    ``NAME-01``. The supervisor then ignores the stale ones, and the aliases follow the new slave.
    (Unloading the master instead can deadlock JACK2 1.9.21 while a master is exiting.)
    """
    seen = read_record(state_paths(domain)[1], JackSeen) or JackSeen()
    state = read_state(domain)
    # The server's own list as well as the supervisor's last report (up to a second old: a slave that
    # rejoined since would otherwise keep the aliases from the VM's new one).
    now = slave_clients(master.port_names(state.server), state.slave) if state else {}
    stale = sorted(set(seen.clients) | set(now))
    if stale:
        write_record(_exclude_path(domain), Stale(stale))
        say(f"bridge: the old NETJACK slave {', '.join(stale)} is stale; the VM's new slave takes the aliases")
    return stale


def _exclude_path(domain: str) -> Path:
    return run_file(f"netjack-{domain}.stale.json")


def listening(state: JackState) -> list[str]:
    """Where the master's port is bound, as the kernel says: the sockets of the jackd the bridge started,
    else (a server it joined, whose PID it does not know) every socket on the port."""
    return master.where_bound(state.server_process, state.port)


def status(domain: str) -> dict:
    """The bridge as data: server, link up/down, ports, xruns since start."""
    _state_file, status_file, log = state_paths(domain)
    state = read_state(domain)
    if not state:
        return {"running": False, "problem": "not started (archdsp-virt netjack start CONFIG)"}
    sup, srv = state.supervisor, state.server_process
    got = read_record(status_file, JackSeen)
    seen = got or JackSeen()
    where = listening(state)
    info = {
        "running": bool(sup and sup.alive()),
        "audio_server": state.audio_server,
        "server": state.server,
        "server_pid": srv.pid if srv else None,
        "server_started_by_bridge": srv is not None,
        "server_alive": seen.server == "running" if srv is None else srv.alive(),
        "master": f"{state.master_ip}:{state.port}/udp",
        "listening": ", ".join(f"{a}/udp" for a in where) if where else "?",
        "slave": seen.slave,
        "ignored": seen.ignored,
        "link": seen.link,
        "ports": seen.ports,
        "xruns": seen.xruns,
        "since": state.started,
        "link_changed": seen.link_changed,
        "log": str(log),
    }
    if not info["running"]:
        info["link"] = "down"
        info["problem"] = ("the JACK server went away (archdsp-virt netjack restart)"
                           if seen.server == "gone" else "the bridge supervisor is not running")
    elif got and time.time() - seen.updated > 5 * STATUS_PERIOD + 5:
        info["problem"] = "the bridge supervisor stopped reporting"
    elif info["ignored"]:
        info["problem"] = ignored_problem(info["ignored"], info["slave"], state.slave, state.master_ip)
    wildcard = [w for w in where if sockets.is_wildcard(w)]
    if state.nft_table:
        info["guard"] = f"nftables table inet {state.nft_table}: only {state.interface} to {state.master_ip}"
    elif wildcard and not info.get("problem"):
        info["problem"] = (f"the NETJACK master listens on {', '.join(wildcard)} (every address, the kernel's table): "
                           "any machine that reaches this host can join the link (archdsp-virt netjack restart "
                           "--jack-server NAME --server dummy: a jackd of the bridge's own, bound to master_ip)")
    return info


def format_status(info: dict) -> list[str]:
    lines = ["=== NETJACK Bridge ==="]
    if not info.get("running") and "server" not in info:
        return lines + [f"  {info.get('problem')}"]
    owner = f"started by the bridge, pid {info['server_pid']}" if info["server_started_by_bridge"] else "external"
    guard_note = f" ({info['guard']})" if info.get("guard") else ""
    lines.append(f"  server: JACK '{info['server']}' ({owner})   master: {info['master']}   "
                 f"listening: {info.get('listening', '?')}{guard_note}")
    return lines + link_lines(info)
