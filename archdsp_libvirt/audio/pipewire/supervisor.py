"""The PipeWire bridge's supervisor process (``python -m archdsp_libvirt.audio.pipewire.supervisor``).

Started by :func:`.bridge.start`, it

- runs PipeWire's NETJACK2 manager in a ``pipewire -c`` process (a client of the user's daemon) under the
  hook of :mod:`.sockhook`, which binds its port to master_ip, lets a restarted slave's old pair go and
  refuses the join packets a slave repeats;
- restarts that process when more than one send/recv pair stays anyway (at most
  :data:`RESTARTS_MOST` times in :data:`RESTARTS_PER` seconds, then held back with a growing pause:
  anyone who reaches the port can make a second pair; status says ``restarts held back: ...``), and
  when the VM is about to restart (:func:`.bridge.forget_slave`, never held back);
- stops the manager and refuses to run when the kernel shows its port bound anywhere but master_ip
  (the hook's bind is checked, not trusted);
- bounds the receive queue of the manager's socket to the slave to a few cycles (:mod:`.rxqueue`);
- counts the graph's xruns through PipeWire's JACK and lists the real port names;
- writes what it sees to the status file :func:`.bridge.status` reads.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ...errors import BridgeError
from ...procs import Owned, spawn_detached
from . import server as pw
from .. import sockets
from . import rxqueue, sockhook
from ..link import bound_log
from ..records import write_record
from .state import Joins, Node, PipeWireSeen, Queue

POLL = 1.0
# A restart of the manager waits until more than one pair stayed this long: a slave whose master vanishes
# in the middle of its join waits for it forever (JACK 1.9.21's net driver).
CROWDED_AFTER = 2.0
# Restarts for a crowded manager: at most this many in this many seconds; then they are held back for
# RESTARTS_PER seconds, twice that the next time, ... at most RESTARTS_HOLD_MOST.
RESTARTS_MOST, RESTARTS_PER, RESTARTS_HOLD_MOST = 3, 60.0, 600.0


class RestartLimit:
    """How often a crowded manager may be restarted: :meth:`allow` says whether a restart may happen at
    ``now``; past ``most`` restarts in ``per`` seconds, restarts are held back for ``per`` seconds, and each
    further time the budget runs out for twice as long (at most ``longest``). ``longest`` seconds after
    the last pause ended without a new one, the backoff starts again at ``per``."""

    def __init__(self, most: int = RESTARTS_MOST, per: float = RESTARTS_PER, longest: float = RESTARTS_HOLD_MOST):
        self.most, self.per, self.longest = most, per, longest
        self.done: deque[float] = deque(maxlen=most)  # the last restarts
        self.until = 0.0  # restarts held back until then
        self.strikes = 0  # times the budget ran out in a row
        self.held = 0  # restarts held back since the start

    def allow(self, now: float) -> bool:
        if self.strikes and now - self.until >= self.longest:
            self.strikes = 0
        if now < self.until:
            self.held += 1
            return False
        if len(self.done) == self.most and now - self.done[0] < self.per:
            self.strikes += 1
            self.until = now + min(self.per * 2 ** (self.strikes - 1), self.longest)
            self.held += 1
            return False
        self.done.append(now)
        return True

    def text(self, now: float) -> str | None:
        """``restarts held back: ...`` while they are; None otherwise."""
        if now >= self.until:
            return None
        return (f"restarts held back: {self.most} in {self.per:g} s already (a second slave's pair?); "
                f"next allowed in {self.until - now:.0f} s")


def listening_problem(where: list[str], master_ip: str, port: int) -> str | None:
    """Why the manager may not run when the kernel shows its port bound at ``where``; None when every
    socket of the port is on master_ip (or none is bound yet)."""
    ip = ipaddress.ip_address(master_ip)  # as the kernel's table prints it (fd00:0::1 is fd00::1)
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    wrong = [w for w in where if w != f"{host}:{port}"]
    if not wrong:
        return None
    return (f"the NETJACK2 manager listens on {', '.join(wrong)}/udp, not only {host}:{port}: "
            "stopped (the bind hook did not hold)")


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


class Reporter:
    """Writes the status file. A write that fails (a full or read-only /run: ENOSPC, EROFS) skips that
    report and is said once, not every period; the next period tries again, and a write that works again
    is said too. The manager matters more than the screen."""

    def __init__(self, path: Path, say):
        self.path, self.say, self.failing = path, say, False

    def __call__(self, seen: PipeWireSeen) -> bool:
        try:
            write_record(self.path, seen)
        except OSError as exc:
            if not self.failing:
                self.say(f"cannot write {self.path}: {exc.strerror or exc}; trying again every period")
            self.failing = True
            return False
        if self.failing:
            self.say(f"writing {self.path} again")
        self.failing = False
        return True


def _bound(log: Path, say) -> None:
    """Keep the log (the manager's output and ours) bounded (:func:`..link.bound_log`), never fatally."""
    try:
        if bound_log(log):
            say(f"{log} passed its bound; the older part is in {log.name}.1")
    except OSError as exc:
        say(f"cannot bound {log}: {exc.strerror or exc}")


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
              queue_step: int = rxqueue.COPY_PACKET // 2, cycles_per_second: float = 750.0,
              master_ip: str | None = None) -> int:
    """Run the manager until SIGTERM. With ``master_ip`` it runs under the bind hook, which binds its port
    to that address (:mod:`.sockhook`); without, it listens on every address (an nftables table guards it)."""
    def say(m: str) -> None:
        print(f"bridge supervisor: {m}", flush=True)

    report = Reporter(status_file, say)
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
    limit = RestartLimit()
    multi_since: float | None = None
    bounds = rxqueue.Bounds(queue_bound or 0, queue_step, cycles_per_second, say=say)
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
                                    say=say)
        return proc

    try:
        while not stop_flag.is_set():
            if mgr is None or not mgr.alive():
                if mgr is not None:
                    quick_deaths = quick_deaths + 1 if time.time() - mgr_started < 5 else 0
                    if quick_deaths >= 3:
                        report(PipeWireSeen(
                            link="down", updated=time.time(),
                            problem=f"the NETJACK2 manager keeps exiting (see {log})"))
                        return 1
                mgr, mgr_started = launch(), time.time()
            nodes = pw.netjack_nodes(pw.dump(target), mgr.pid) if target else []
            n = pw.pairs(nodes)
            multi_since = (multi_since or time.time()) if n > 1 else None
            crowded = multi_since is not None and time.time() - multi_since > CROWDED_AFTER
            vm_restarts = restart_file.exists()
            if vm_restarts or (crowded and limit.allow(time.monotonic())):
                why = "the VM restarts" if vm_restarts else f"{n} node pairs"
                say(f"{why}: restarting the NETJACK2 manager (pid {mgr.pid})")
                mgr.stop(timeout=5)
                mgr, mgr_started = launch(), time.time()
                restarts += 1
                restart_file.unlink(missing_ok=True)
                nodes, n, multi_since = [], 0, None
            where = sockets.listening(mgr.pid, port) if port else []
            wrong = listening_problem(where, master_ip, port) if master_ip and port else None
            if wrong:
                print(f"bridge supervisor: {wrong}", flush=True)
                mgr.stop(timeout=5)
                mgr = None
                write_record(status_file, PipeWireSeen(link="down", updated=time.time(), problem=wrong,
                                                       listening=where))
                return 1
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
            report(PipeWireSeen(
                link=link, slave=slave, ignored=ignored, ports=ports, pairs=n,
                nodes=[Node(**x) for x in nodes], manager=mgr, restarts=restarts,
                queues=[Queue(**q) for q in queues], queue_problem=queue_problem,
                listening=where, restarts_held=limit.text(time.monotonic()),
                joins=Joins(**hook.counts()) if hook else None,
                xruns=xruns if client is not None else None, updated=time.time(), since=started,
                link_changed=changed))
            _bound(log, say)
            stop_flag.wait(POLL)
    except BridgeError as e:
        report(PipeWireSeen(link="down", updated=time.time(), problem=str(e)))
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

    ap = argparse.ArgumentParser(prog="python -m archdsp_libvirt.audio.pipewire.supervisor")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--conf", type=Path, required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--restart-file", type=Path, required=True)
    ap.add_argument("--slave")
    ap.add_argument("--port", type=int)
    ap.add_argument("--queue-bound", type=int)
    ap.add_argument("--queue-step", type=int, default=rxqueue.COPY_PACKET // 2)
    ap.add_argument("--cycles-per-second", type=float, default=750.0)
    ap.add_argument("--master-ip")
    a = ap.parse_args(argv)
    os.environ.setdefault("JACK_NO_START_SERVER", "1")
    return supervise(a.domain, a.conf, a.status, a.log, a.restart_file, a.slave, a.port, a.queue_bound,
                     a.queue_step, a.cycles_per_second, a.master_ip)


if __name__ == "__main__":
    sys.exit(_main())
