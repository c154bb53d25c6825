"""The host side of the NETJACK2 link on PipeWire.

``start`` finds the user's PipeWire (:func:`.server.find_target`), refuses unless the address
promise can be kept (the bind hook of :mod:`.sockhook`, else :func:`.server.address_guard`),
writes a ``pipewire -c`` file hosting PipeWire's NETJACK2 manager and leaves the supervisor of
:mod:`.supervisor` running it. ``status`` reads what the supervisor writes (the same status file
the JACK2 bridge writes).

``stop`` stops the supervisor and the manager process by PID (their nodes go with it) and removes
the nftables table if there is one: nothing else in the user's PipeWire is touched.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ...errors import BridgeError
from ...procs import spawn_detached
from ..backend import StartOptions, wait_until
from ..link import STATUS_PERIOD, Link, bound_log, bridge_lock, guard_master, ignored_problem, link_lines, state_paths
from ..records import read_record, write_record
from . import conf, rxqueue, sockhook
from . import server as pw
from .state import Joined, PipeWireSeen, PipeWireState

if TYPE_CHECKING:
    from ...host.model import HostModel


def _conf_path(domain: str) -> Path:
    return state_paths(domain)[0].with_suffix(".pipewire.conf")


def _restart_request(domain: str) -> Path:
    return state_paths(domain)[0].with_suffix(".restart")


def resolve(user: str | None, remote: str | None = None) -> tuple[pw.Target, dict]:
    """The user's PipeWire and its core info, or :class:`BridgeError` saying where it looked."""
    target = pw.find_target(env={"PIPEWIRE_REMOTE": remote}) if remote else pw.find_target(user)
    if target is None:
        raise BridgeError("no PipeWire server to join: XDG_RUNTIME_DIR is unset and not run through sudo; "
                          "pass --pipewire-user USER")
    info = pw.probe(target)
    if info is None:
        raise BridgeError(f"no PipeWire server answers at {target.remote} (found by {target.how}): "
                          "is the user's PipeWire running?")
    return target, info


def read_state(domain: str) -> PipeWireState | None:
    return read_record(state_paths(domain)[0], PipeWireState)


def read_seen(domain: str) -> PipeWireSeen | None:
    return read_record(state_paths(domain)[1], PipeWireSeen)


def start(link: Link, options: StartOptions, model: HostModel, say=print) -> tuple[PipeWireState, bool]:
    """Start the manager for ``link`` in the user's PipeWire (idempotent): the state, and whether this
    call started it. One start or stop of a domain at a time (:func:`..link.bridge_lock`): a second start
    waits, then finds the first's supervisor."""
    with bridge_lock(link.domain):
        return _start(link, options, model, say)


def _start(link: Link, options: StartOptions, model: HostModel, say) -> tuple[PipeWireState, bool]:
    user, remote, allow_any_address = options.user, options.remote, options.allow_any_address
    state_file, status_file, log = state_paths(link.domain)
    state = read_state(link.domain)
    if state and state.supervisor and state.supervisor.alive():
        say(f"bridge for {link.domain} already running on PipeWire ({state.pipewire.remote})")
        return state, False
    guard_master(link, model, say)
    if not pw.module_installed():
        raise BridgeError(f"this PipeWire has no {pw.MODULE} (PipeWire >= 1.2 has it; on Debian 12 run "
                          "scripts/install-test-deps, which takes PipeWire from bookworm-backports)")
    target, core = resolve(user, remote)
    version = core.get("version", "?")
    say(f"PipeWire {version} of user {core.get('user-name') or target.user or '?'} at {target.remote} "
        f"(found by {target.how})")
    ifname = model.files.interface_of(link.master_ip) if model.files is not None else None
    if ifname is None:
        raise BridgeError(f"archibaldos.netjack.master_ip {link.master_ip} is on no interface of this host: start "
                          "the VM's network (virsh net-start default)")
    table = pw.address_guard(link.domain, link.master_ip, ifname, link.port, allow_any_address,
                              sockhook.available())
    if table:
        say(f"nftables table inet {table}: port {link.port}/udp only on {ifname} to "
            f"{link.master_ip} (PipeWire's manager itself listens on 0.0.0.0:{link.port})")
    elif allow_any_address:
        say(f"--allow-any-address not needed: the manager's port is bound to {link.master_ip} only")
    args = conf.manager_args(link.master_ip, link.port, link.rate, link.period, link.channels)
    cost = rxqueue.packet_cost(ifname)
    bound_log(log)
    conf_file = _conf_path(link.domain)
    conf_file.parent.mkdir(parents=True, exist_ok=True)
    conf_file.write_text(conf.client_conf(args))
    conf_file.chmod(0o644)
    status_file.unlink(missing_ok=True)
    _restart_request(link.domain).unlink(missing_ok=True)
    argv = [sys.executable, "-P", "-m", "archdsp_libvirt.audio.pipewire.supervisor", "--domain", link.domain,
            "--conf", str(conf_file), "--status", str(status_file), "--log", str(log),
            "--restart-file", str(_restart_request(link.domain)), "--slave", link.slave,
            *([] if table else ["--master-ip", link.master_ip]),
            "--port", str(link.port), "--queue-bound",
            str(rxqueue.bound_for(link.period, link.channels, link.network_latency, cost)),
            "--queue-step", str(cost // 2), "--cycles-per-second", f"{link.rate / link.period:g}"]
    if shutil.which("pw-jack"):
        argv = ["pw-jack", *argv]
    sup = spawn_detached(argv, log, env=pw.pw_env(target))
    state = PipeWireState(
        domain=link.domain, server=f"PipeWire {version}",
        pipewire=Joined(remote=target.remote, user=core.get("user-name") or target.user, how=target.how,
                        version=version),
        supervisor=sup, master_ip=link.master_ip, port=link.port, slave=link.slave, channels=link.channels,
        nft_table=table, interface=ifname, allow_any_address=allow_any_address, started=time.time())
    write_record(state_file, state)

    def manager() -> object:  # up, and its port bound (status then says where it listens), or gone
        seen = read_seen(link.domain)
        return (seen and seen.manager and seen.listening) or not sup.alive()

    wait_until(manager, 10, step=0.2)
    seen = read_seen(link.domain)
    if not (seen and seen.manager):
        _stop(link.domain, say=lambda _m: None)
        raise BridgeError(f"the NETJACK2 manager did not start in PipeWire; see {log}")
    say(f"NETJACK2 master (PipeWire's {pw.MODULE}, pid {seen.manager.pid}) for slaves at "
        f"{link.master_ip}:{link.port}/udp; supervisor pid {sup.pid}")
    say(f"VM ports: {pw.CAPTURE_NODE}:send_AUXn (host -> VM) and {pw.PLAYBACK_NODE}:receive_AUXn (VM -> host); "
        f"JACK clients see these names with PIPEWIRE_PROPS='{pw.JACK_PROPS}' pw-jack ...")
    return state, True


def stop(domain: str, say=print) -> bool:
    """Stop what ``start`` started (by PID), under the same lock as ``start``. Idempotent."""
    with bridge_lock(domain):
        return _stop(domain, say)


def _stop(domain: str, say) -> bool:
    state_file, status_file, _log = state_paths(domain)
    state = read_state(domain)
    if not state:
        say(f"bridge for {domain} is not running")
        return False
    seen = read_seen(domain) or PipeWireSeen()
    sup = state.supervisor
    if sup and sup.stop():
        say(f"stopped bridge supervisor (pid {sup.pid})")
    mgr = seen.manager
    if mgr and mgr.stop(timeout=5):
        say(f"stopped the NETJACK2 manager (pid {mgr.pid}); its nodes left PipeWire with it")
    if pw.drop_guard(domain):
        say(f"removed nftables table inet {pw.nft_table(domain)}")
    for path in (state_file, status_file, _conf_path(domain), _restart_request(domain)):
        path.unlink(missing_ok=True)
    return True


def forget_slave(domain: str, say=print) -> list[str]:
    """The VM is about to (re)start: restart the manager, so its old slave's nodes go."""
    seen = read_seen(domain) or PipeWireSeen()
    request = _restart_request(domain)
    request.write_text("restart\n")
    wait_until(lambda: not request.exists(), 10, step=0.2)
    say("bridge: restarted PipeWire's NETJACK2 manager for the VM's new slave")
    return [seen.slave] if seen.slave else []


def status(domain: str) -> dict:
    _state_file, _status_file, log = state_paths(domain)
    state = read_state(domain)
    if state is None:
        return {"running": False, "audio_server": "pipewire", "problem": "not started (archdsp-virt netjack start CONFIG)"}
    got = read_seen(domain)
    seen = got or PipeWireSeen()
    sup = state.supervisor
    info = {
        "running": bool(sup and sup.alive()), "audio_server": state.audio_server, "server": state.server,
        "pipewire": msgspec.to_builtins(state.pipewire), "server_pid": None, "server_started_by_bridge": False,
        "server_alive": seen.server == "running",
        "master": f"{state.master_ip}:{state.port}/udp",
        "listening": listening_text(state, seen.listening),
        "slave": seen.slave, "ignored": seen.ignored, "link": seen.link, "ports": seen.ports,
        "pairs": seen.pairs, "nodes": msgspec.to_builtins(seen.nodes), "manager_restarts": seen.restarts,
        "manager_pid": seen.manager.pid if seen.manager else None, "queues": msgspec.to_builtins(seen.queues),
        "joins": msgspec.to_builtins(seen.joins), "restarts_held": seen.restarts_held,
        "xruns": seen.xruns, "since": state.started, "link_changed": seen.link_changed,
        "log": str(log),
    }
    if not info["running"]:
        info["link"] = "down"
        info["problem"] = seen.problem or "the bridge supervisor is not running"
    elif got and time.time() - seen.updated > 5 * STATUS_PERIOD + 10:
        info["problem"] = "the bridge supervisor stopped reporting"
    elif info["ignored"]:
        info["problem"] = ignored_problem(info["ignored"], info["slave"], state.slave, state.master_ip)
    elif seen.queue_problem:
        info["problem"] = seen.queue_problem
    if info["running"] and seen.restarts_held:
        info["problem"] = "; ".join(filter(None, [info.get("problem"), seen.restarts_held]))
    return info


def listening(state: PipeWireState) -> list[str]:
    """Where the manager's port is bound, as the supervisor last read it from /proc/PID/net/udp."""
    seen = read_seen(state.domain)
    return seen.listening if seen else []


def listening_text(state: PipeWireState, seen: list[str] | None) -> str:
    """Where the manager listens, as the supervisor saw it in /proc, and what keeps it there."""
    where = ", ".join(f"{a}/udp" for a in seen) if seen else "?"
    if state.nft_table:
        return f"{where} (nftables table inet {state.nft_table}: only {state.interface} to {state.master_ip})"
    return f"{where} (bound by the bridge)"


def format_status(info: dict) -> list[str]:
    if "server" not in info:
        return ["=== NETJACK Bridge ===", f"  {info.get('problem')}"]
    p = info.get("pipewire") or {}
    lines = ["=== NETJACK Bridge ===",
             f"  server: {info['server']} (user {p.get('user')}, {p.get('remote')}, found by {p.get('how')})",
             f"  master: {info['master']}   listening: {info['listening']}"]
    queues = "".join(f"   receive queue: {q['queued']} bytes" + (f" (bound {q['bound']})" if q.get("bound") else
                                                                   " (unbounded)")
                     for q in info.get("queues", []))
    j = info.get("joins")
    joins = (f"   joins: {j['new']}, old pairs let go {j['let_go']}, repeats refused {j['refused']}"
             + (f", let-gos held back {j['held']}" if j.get("held") else "")) if j else ""
    return lines + link_lines(info, f"   node pairs: {info['pairs']}   manager pid {info.get('manager_pid')}, "
                                    f"restarted {info['manager_restarts']}x{joins}{queues}")
