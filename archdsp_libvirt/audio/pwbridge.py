"""The host side of the NETJACK2 link on PipeWire.

``start`` finds the user's PipeWire (:func:`.pipewire.find_target`), refuses unless the address
promise can be kept (:func:`.pipewire.address_guard`), writes a ``pipewire -c`` file hosting
PipeWire's NETJACK2 manager and leaves a supervisor running that

- runs that manager process (a client of the user's daemon) and restarts it when more than one
  send/recv pair exists (a restarted VM joins beside its old pair, which PipeWire never frees) or
  when the VM is about to restart (:func:`forget_slave`);
- bounds the receive queue of the manager's socket to the slave to a few cycles
  (:mod:`.pwqueue`: the manager never drops a stale cycle, so without a bound every stall of the
  guest adds a period to the round trip for good);
- counts the graph's xruns through PipeWire's JACK and lists the real port names;
- writes what it sees to the same status file the JACK2 bridge writes.

``stop`` stops the supervisor and the manager process by PID (their nodes go with it) and removes
the nftables table: nothing else in the user's PipeWire is touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import BridgeError
from ..procs import Owned, spawn_detached
from . import pipewire as pw
from . import pwqueue, sockhook
from .link import (
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

POLL = 1.0
# A restart of the manager waits until more than one pair stayed this long: a slave whose master vanishes
# in the middle of its join waits for it forever (JACK 1.9.21's net driver).
CROWDED_AFTER = 2.0


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
    table = pw.address_guard(link.domain, link.master_ip, link.port, allow_any_address, sockhook.available())
    if table:
        say(f"nftables table inet {table}: port {link.port}/udp only on {ifname} to "
            f"{link.master_ip} (PipeWire's manager itself listens on 0.0.0.0:{link.port})")
    elif allow_any_address:
        say(f"--allow-any-address not needed: the manager's port is bound to {link.master_ip} only")
    args = pw.manager_args(link.master_ip, link.port, link.rate, link.period, link.channels)
    cost = pwqueue.packet_cost(ifname)
    conf = _conf_path(link.domain)
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(pw.client_conf(args))
    conf.chmod(0o644)
    status_file.unlink(missing_ok=True)
    _restart_request(link.domain).unlink(missing_ok=True)
    argv = [sys.executable, "-P", "-m", "archdsp_libvirt.audio.pwbridge", "--domain", link.domain,
            "--conf", str(conf), "--status", str(status_file), "--log", str(log),
            "--restart-file", str(_restart_request(link.domain)), "--slave", link.slave,
            *([] if table else ["--master-ip", link.master_ip]),
            "--port", str(link.port), "--queue-bound",
            str(pwqueue.bound_for(link.period, link.channels, link.network_latency, cost)),
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


def link_state(nodes: list[dict], slave: str | None) -> tuple[str, str | None, list[str]]:
    """(link up/down, the slave, slaves ignored) from our manager's nodes.

    PipeWire gives every slave's pair the same node names, so only the VM's own slave name makes the
    link up: a second guest's pair (another name) is reported, never taken for the VM's.
    """
    names = sorted({x["slave"] for x in nodes if x.get("slave")})
    ignored = [x for x in names if slave is not None and x != slave]
    now = next((x for x in names if x not in ignored), None)
    up = pw.pairs(nodes) == 1 and len(nodes) == 2 and now is not None
    return ("up" if up else "down"), now, ignored


# --- the supervisor process ---------------------------------------------------------------------

def _jack_client():
    """A JACK client through PipeWire's libjack (we run under pw-jack), for xruns and port names."""
    try:
        import jack

        jack.set_error_function(lambda _m: None)
        jack.set_info_function(lambda _m: None)
        return jack.Client("archdsp-bridge", no_start_server=True)
    except Exception:  # noqa: BLE001 - no JACK library, or PipeWire's JACK refused: status says 'xruns ?'
        return None


def supervise(domain: str, conf: Path, status_file: Path, log: Path, restart_file: Path,
              vm_slave: str | None = None, port: int | None = None, queue_bound: int | None = None,
              queue_step: int = pwqueue.COPY_PACKET // 2, cycles_per_second: float = 750.0,
              master_ip: str | None = None) -> int:
    """Run the manager until SIGTERM. With ``master_ip`` it runs under the bind hook, which binds its port
    to that address (:mod:`.sockhook`); without, it listens on every address (an nftables table guards it)."""
    target = pw.find_target()
    stop_flag = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_flag.set())
    signal.signal(signal.SIGINT, lambda *_: stop_flag.set())
    xruns = 0
    client = _jack_client()
    if client is not None:
        def on_xrun(_delay):
            nonlocal xruns
            xruns += 1
        client.set_xrun_callback(on_xrun)
        client.activate()
    mgr: Owned | None = None
    restarts, quick_deaths, started, mgr_started = 0, 0, time.time(), time.time()
    multi_since: float | None = None
    bounds = pwqueue.Bounds(queue_bound or 0, queue_step, cycles_per_second,
                            say=lambda m: print(f"bridge supervisor: {m}", flush=True))
    link, changed, slave = "down", time.time(), None
    hook: sockhook.Hook | None = None

    def launch() -> Owned:
        nonlocal hook
        if hook is not None:
            hook.close()
            hook = None
        argv = ["pipewire", "-c", str(conf)]
        if master_ip is None or port is None:
            return spawn_detached(argv, log, env=pw.pw_env(target))
        proc, hook = sockhook.spawn(argv, log, master_ip, port, env=pw.pw_env(target),
                                    say=lambda m: print(f"bridge supervisor: {m}", flush=True))
        return proc

    try:
        while not stop_flag.is_set():
            if mgr is None or not mgr.alive():
                if mgr is not None:
                    quick_deaths = quick_deaths + 1 if time.time() - mgr_started < 5 else 0
                    if quick_deaths >= 3:
                        write_json(status_file, {"server": "running", "link": "down", "updated": time.time(),
                                                  "problem": f"the NETJACK2 manager keeps exiting (see {log})"})
                        return 1
                mgr, mgr_started = launch(), time.time()
            nodes = pw.netjack_nodes(pw.dump(target), mgr.pid) if target else []
            n = pw.pairs(nodes)
            multi_since = (multi_since or time.time()) if n > 1 else None
            crowded = multi_since is not None and time.time() - multi_since > CROWDED_AFTER
            if crowded or restart_file.exists():
                why = f"{n} node pairs" if crowded else "the VM restarts"
                print(f"bridge supervisor: {why}: restarting the NETJACK2 manager (pid {mgr.pid})", flush=True)
                mgr.stop(timeout=5)
                mgr, mgr_started = launch(), time.time()
                restarts += 1
                restart_file.unlink(missing_ok=True)
                nodes, n, multi_since = [], 0, None
            queues, queue_problem = bounds.poll(mgr.pid, port, time.time()) if port and queue_bound else ([], None)
            ports = {}
            if client is not None:
                try:
                    ports = pw.logical_ports([p.name for p in client.get_ports()])
                except Exception:  # noqa: BLE001 - a port went away while listing
                    ports = {}
            now_up, now_slave, ignored = link_state(nodes, vm_slave)
            if now_up != link or now_slave != slave:
                link, slave, changed = now_up, now_slave, time.time()
            write_json(status_file, {"server": "running", "link": link, "slave": slave, "ignored": ignored,
                                      "ports": ports,
                                      "pairs": n, "nodes": nodes, "manager": mgr.as_dict(), "restarts": restarts,
                                      "queues": queues, "queue_problem": queue_problem,
                                      "listening": pwqueue.listening(mgr.pid, port) if port else [],
                                      "joins": hook.counts() if hook else None,
                                      "xruns": xruns if client is not None else None, "updated": time.time(),
                                      "since": started, "link_changed": changed})
            stop_flag.wait(POLL)
    except BridgeError as e:
        write_json(status_file, {"server": "running", "link": "down", "updated": time.time(), "problem": str(e)})
        return 1
    finally:
        if mgr is not None:
            mgr.stop(timeout=5)
        if hook is not None:
            hook.close()
        if client is not None:
            try:
                client.deactivate()
                client.close()
            except Exception:  # noqa: BLE001
                pass
    return 0


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m archdsp_libvirt.audio.pwbridge")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--conf", type=Path, required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--restart-file", type=Path, required=True)
    ap.add_argument("--slave")
    ap.add_argument("--port", type=int)
    ap.add_argument("--queue-bound", type=int)
    ap.add_argument("--queue-step", type=int, default=pwqueue.COPY_PACKET // 2)
    ap.add_argument("--cycles-per-second", type=float, default=750.0)
    ap.add_argument("--master-ip")
    a = ap.parse_args(argv)
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    return supervise(a.domain, a.conf, a.status, a.log, a.restart_file, a.slave, a.port, a.queue_bound,
                     a.queue_step, a.cycles_per_second, a.master_ip)


if __name__ == "__main__":
    sys.exit(_main())
