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

from ...errors import BridgeError
from ...procs import spawn_detached
from . import server as pw
from . import rxqueue, sockhook
from ..link import (
    STATUS_PERIOD,
    Link,
    guard_master,
    ignored_problem,
    link_lines,
    owned,
    read_json,
    state_paths,
    write_json,
)


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


def start(cfg, user: str | None = None, allow_any_address: bool = False, wait: float = 0.0, say=print,
          remote: str | None = None) -> dict:
    link = Link.of(cfg)
    state_file, status_file, log = state_paths(link.domain)
    state = read_json(state_file)
    if state and (sup := owned(state.get("supervisor"))) and sup.alive():
        say(f"bridge for {link.domain} already running on PipeWire ({state['pipewire']['remote']})")
        if wait:
            wait_for_link(link.domain, wait)
        return state
    guard_master(link, say)
    if not pw.module_installed():
        raise BridgeError(f"this PipeWire has no {pw.MODULE} (PipeWire >= 1.2 has it; on Debian 12 run "
                          "scripts/install-test-deps, which takes PipeWire from bookworm-backports)")
    target, core = resolve(user, remote)
    version = core.get("version", "?")
    say(f"PipeWire {version} of user {core.get('user-name') or target.user or '?'} at {target.remote} "
        f"(found by {target.how})")
    ifname = pw.interface_of(link.master_ip)
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
    args = pw.manager_args(link.master_ip, link.port, link.rate, link.period, link.channels)
    cost = rxqueue.packet_cost(ifname)
    conf = _conf_path(link.domain)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(pw.client_conf(args))
    conf.chmod(0o644)
    status_file.unlink(missing_ok=True)
    _restart_request(link.domain).unlink(missing_ok=True)
    argv = [sys.executable, "-P", "-m", "archdsp_libvirt.audio.pipewire.supervisor", "--domain", link.domain,
            "--conf", str(conf), "--status", str(status_file), "--log", str(log),
            "--restart-file", str(_restart_request(link.domain)), "--slave", link.slave,
            *([] if table else ["--master-ip", link.master_ip]),
            "--port", str(link.port), "--queue-bound",
            str(rxqueue.bound_for(link.period, link.channels, link.network_latency, cost)),
            "--queue-step", str(cost // 2), "--cycles-per-second", f"{link.rate / link.period:g}"]
    if shutil.which("pw-jack"):
        argv = ["pw-jack", *argv]
    sup = spawn_detached(argv, log, env=pw.pw_env(target))
    state = {"domain": link.domain, "audio_server": "pipewire", "server": f"PipeWire {version}",
             "pipewire": {"remote": target.remote, "user": core.get("user-name") or target.user, "how": target.how,
                          "version": version},
             "supervisor": sup.as_dict(), "master_ip": link.master_ip, "port": link.port, "slave": link.slave,
             "channels": link.channels, "nft_table": table, "interface": ifname,
             "allow_any_address": allow_any_address, "started": time.time()}
    write_json(state_file, state)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (read_json(status_file) or {}).get("manager"):
        if not sup.alive():
            break
        time.sleep(0.2)
    seen = read_json(status_file) or {}
    if not seen.get("manager"):
        stop(link.domain, say=lambda _m: None)
        raise BridgeError(f"the NETJACK2 manager did not start in PipeWire; see {log}")
    say(f"NETJACK2 master (PipeWire's {pw.MODULE}, pid {seen['manager']['pid']}) for slaves at "
        f"{link.master_ip}:{link.port}/udp; supervisor pid {sup.pid}")
    say(f"VM ports: {pw.CAPTURE_NODE}:send_AUXn (host -> VM) and {pw.PLAYBACK_NODE}:receive_AUXn (VM -> host); "
        f"JACK clients see these names with PIPEWIRE_PROPS='{pw.JACK_PROPS}' pw-jack ...")
    if wait:
        wait_for_link(link.domain, wait)
        say(f"link up: slave '{link.slave}' joined")
    return state


def wait_for_link(domain: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    info: dict = {}
    while time.monotonic() < deadline:
        info = status(domain)
        if info.get("link") == "up" or not info.get("running"):
            break
        time.sleep(0.25)
    if info.get("link") == "up":
        return info
    state = read_json(state_paths(domain)[0]) or {}
    raise BridgeError(
        f"the guest side of the link is missing: no NETJACK slave joined PipeWire's manager at "
        f"{state.get('master_ip', '?')}:{state.get('port', '?')} within {timeout:g} s "
        f"(is the VM up and its JACK running? archdsp-virt status / console)"
        if info.get("running") else f"the bridge for {domain} is not running: {info.get('problem', 'stopped')}")


def stop(domain: str, say=print) -> bool:
    state_file, status_file, _log = state_paths(domain)
    state = read_json(state_file)
    if not state:
        say(f"bridge for {domain} is not running")
        return False
    seen = read_json(status_file) or {}
    sup = owned(state.get("supervisor"))
    if sup and sup.stop():
        say(f"stopped bridge supervisor (pid {sup.pid})")
    mgr = owned(seen.get("manager"))
    if mgr and mgr.stop(timeout=5):
        say(f"stopped the NETJACK2 manager (pid {mgr.pid}); its nodes left PipeWire with it")
    if pw.drop_guard(domain):
        say(f"removed nftables table inet {pw.nft_table(domain)}")
    for path in (state_file, status_file, _conf_path(domain), _restart_request(domain)):
        path.unlink(missing_ok=True)
    return True


def forget_slave(domain: str, say=print) -> list[str]:
    """The VM is about to (re)start: restart the manager, so its old slave's nodes go."""
    seen = read_json(state_paths(domain)[1]) or {}
    _restart_request(domain).write_text("restart\n")
    deadline = time.monotonic() + 10
    while _restart_request(domain).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    say("bridge: restarted PipeWire's NETJACK2 manager for the VM's new slave")
    return [seen["slave"]] if seen.get("slave") else []


def status(domain: str) -> dict:
    state_file, status_file, log = state_paths(domain)
    state = read_json(state_file) or {}
    sup = owned(state.get("supervisor"))
    seen = read_json(status_file) or {}
    info = {
        "running": bool(sup and sup.alive()), "audio_server": "pipewire", "server": state.get("server"),
        "pipewire": state.get("pipewire"), "server_pid": None, "server_started_by_bridge": False,
        "server_alive": seen.get("server") == "running",
        "master": f"{state.get('master_ip')}:{state.get('port')}/udp",
        "listening": listening_text(state, seen.get("listening")),
        "slave": seen.get("slave"), "ignored": seen.get("ignored", []), "link": seen.get("link", "down"),
        "ports": seen.get("ports", {}),
        "pairs": seen.get("pairs", 0), "nodes": seen.get("nodes", []), "manager_restarts": seen.get("restarts", 0),
        "manager_pid": (seen.get("manager") or {}).get("pid"), "queues": seen.get("queues", []),
        "joins": seen.get("joins"),
        "xruns": seen.get("xruns", 0), "since": state.get("started"), "link_changed": seen.get("link_changed"),
        "log": str(log),
    }
    if not info["running"]:
        info["link"] = "down"
        info["problem"] = seen.get("problem") or "the bridge supervisor is not running"
    elif seen and time.time() - seen.get("updated", 0) > 5 * STATUS_PERIOD + 10:
        info["problem"] = "the bridge supervisor stopped reporting"
    elif info["ignored"]:
        info["problem"] = ignored_problem(info["ignored"], info["slave"], state.get("slave", "?"),
                                          state.get("master_ip", "?"))
    elif seen.get("queue_problem"):
        info["problem"] = seen["queue_problem"]
    return info


def listening_text(state: dict, seen: list[str] | None) -> str:
    """Where the manager listens, as the supervisor saw it in /proc, and what keeps it there."""
    where = ", ".join(f"{a}/udp" for a in seen) if seen else "?"
    if state.get("nft_table"):
        return (f"{where} (nftables table inet {state['nft_table']}: only {state.get('interface')} to "
                f"{state.get('master_ip')})")
    return f"{where} (bound by the bridge)"


def format_status(info: dict) -> list[str]:
    p = info.get("pipewire") or {}
    lines = ["=== NETJACK Bridge ===",
             f"  server: {info['server']} (user {p.get('user')}, {p.get('remote')}, found by {p.get('how')})",
             f"  master: {info['master']}   listening: {info['listening']}"]
    queues = "".join(f"   receive queue: {q['queued']} bytes" + (f" (bound {q['bound']})" if q.get("bound") else
                                                                   " (unbounded)")
                     for q in info.get("queues", []))
    j = info.get("joins")
    joins = f"   joins: {j['new']}, old pairs let go {j['let_go']}, repeats refused {j['refused']}" if j else ""
    return lines + link_lines(info, f"   node pairs: {info['pairs']}   manager pid {info.get('manager_pid')}, "
                                    f"restarted {info['manager_restarts']}x{joins}{queues}")


def systemd_unit(cfg, config_path: Path, user: str | None, hook_missing: str | None = None) -> str:
    """A system unit running the bridge against USER's PipeWire (which must run at boot: loginctl enable-linger).
    Where this host's kernel cannot bind the manager to master_ip (``hook_missing`` says why), the unit
    starts it behind the nftables rule (``--allow-any-address``) and says so."""
    exe = shutil.which("archdsp-virt") or "archdsp-virt"
    who = f" --pipewire-user {user}" if user else ""
    if hook_missing:
        who = f" --allow-any-address{who}"
    cfg_path = Path(config_path).resolve()
    uid = ""
    if user:
        import pwd

        try:
            uid = str(pwd.getpwnam(user).pw_uid)
        except KeyError:
            raise BridgeError(f"--pipewire-user {user}: no such user on this host") from None
    after = f" user@{uid}.service" if uid else ""
    why = (f"# This kernel cannot bind the manager to {cfg.netjack.master_ip} ({hook_missing}): it listens on every\n"
           "# address behind an nftables rule that keeps the port to the VM's bridge.\n" if hook_missing else "")
    return (
        why + "[Unit]\n"
        f"Description=NETJACK bridge to the DSP VM {cfg.name} (PipeWire{' of ' + user if user else ''})\n"
        f"After=libvirtd.service network-online.target{after}\n"
        "Wants=libvirtd.service\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart={exe} netjack start --audio-server pipewire{who} --wait 0 {cfg_path}\n"
        f"ExecStop={exe} netjack stop {cfg_path}\n"
        f"ExecReload={exe} netjack restart {cfg_path}\n"
        "Restart=on-failure\nRestartSec=10\n"
        "KillMode=none\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
