"""The bridge supervisor: a plain JACK client (no audio ports, no process callback) that

- gives the VM's ports stable names: ``netjack:capture_N`` (host -> VM) and
  ``netjack:playback_N`` (VM -> host) are JACK aliases of the slave's
  ``to_slave_N`` / ``from_slave_N``, re-made whenever the slave rejoins;
- counts the server's xruns since the bridge started;
- writes what it sees to a status file once a second;
- answers the bind hook of the jackd the bridge started (``--hook-fd``: the listener, handed over by the
  start): the master's bind lands on master_ip (:mod:`..bindhook`). While the supervisor runs, jackd's
  binds are answered; once it is gone, the kernel answers them ENOSYS (a master cannot be loaded again).

Run as ``python -P -m archdsp_libvirt.audio.jack2.supervisor ...`` by :func:`.bridge.start`.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from ...errors import ArchdspError
from ..link import STATUS_PERIOD, bound_log
from ..records import read_record, write_record
from .bridge import ALIAS_CLIENT, SUPERVISOR_CLIENT, open_client
from .state import JackSeen, Stale, slave_clients


def _report(path: Path, seen: JackSeen) -> None:
    """Write the status file; a full or read-only /run (ENOSPC, EROFS) skips one report, it does not end the
    supervisor (the aliases matter more than the screen)."""
    try:
        write_record(path, seen)
    except OSError as exc:
        print(f"bridge supervisor: cannot write {path}: {exc.strerror}", file=sys.stderr)


def _bound(log: Path) -> None:
    """Keep the log (jackd's output and ours) bounded (:func:`..link.bound_log`); a failure to cut it is said,
    never fatal."""
    try:
        if bound_log(log):
            print(f"bridge supervisor: {log} passed its bound; the older part is in {log.name}.1", file=sys.stderr)
    except OSError as exc:
        print(f"bridge supervisor: cannot bound {log}: {exc.strerror}", file=sys.stderr)


def _suffix(client: str, slave: str) -> int:
    return -1 if client == slave else int(client[len(slave) + 1:])


def choose_slave(present: Iterable[str], slave: str, stale: set[str], current: str | None) -> tuple[str | None, list[str]]:
    """The client the aliases follow, and the ones they ignore.

    JACK gives no source address for a slave, so the choice rests on names and on what the bridge
    was told. The one followed keeps the aliases while it is there and not marked stale. Else the
    exact name. A renamed ``NAME-NN`` is taken only when the exact name is free or held by a slave
    marked stale (the VM restarted while JACK still held its old ports); never beside a live
    ``NAME``, so a second guest joining as ``dsp-99`` gets no host audio.
    """
    present = set(present)
    live = sorted((c for c in present if c not in stale), key=lambda c: _suffix(c, slave))
    if current in live:
        chosen: str | None = current
    elif slave in live:
        chosen = slave
    elif slave not in present or slave in stale:
        chosen = live[0] if live else None
    else:
        chosen = None
    return chosen, [c for c in live if c != chosen]


def supervise(server: str, slave: str, channels: int, status_file: Path, exclude_file: Path,
              log: Path | None = None, hook=None) -> int:
    import threading

    try:
        client = open_client(server, SUPERVISOR_CLIENT)
    except BaseException:
        if hook is not None:
            hook.close()
        raise
    xruns = 0
    gone = threading.Event()
    stop_flag = threading.Event()

    def on_xrun(_delay):
        nonlocal xruns
        xruns += 1

    client.set_xrun_callback(on_xrun)
    client.set_shutdown_callback(lambda _status, _reason: gone.set())
    signal.signal(signal.SIGTERM, lambda *_: stop_flag.set())
    signal.signal(signal.SIGINT, lambda *_: stop_flag.set())
    client.activate()
    link = "down"
    current: str | None = None
    changed = time.time()
    started = time.time()
    try:
        while not stop_flag.is_set():
            if gone.is_set():
                _report(status_file, JackSeen(server="gone", link="down", xruns=xruns, updated=time.time(),
                                              since=started, link_changed=time.time()))
                return 3
            names = [p.name for p in client.get_ports()]
            clients = slave_clients(names, slave)
            try:
                stale = set((read_record(exclude_file, Stale) or Stale()).stale)
            except ArchdspError:  # not what the bridge writes: no slave is stale
                stale = set()
            if stale and not stale & set(clients):
                exclude_file.unlink(missing_ok=True)  # the stale slaves are gone
                stale = set()
            current, ignored = choose_slave(clients, slave, stale, current)
            for other, reals in clients.items():
                if other != current:
                    for real in reals:
                        _drop_aliases(client, real)
            ports: dict[str, str] = {}
            if current is not None:
                for i in range(1, channels + 1):
                    for direction, alias in (("to", "capture"), ("from", "playback")):
                        real = f"{current}:{direction}_slave_{i}"
                        want = f"{ALIAS_CLIENT}:{alias}_{i}"
                        if real in clients[current]:
                            ports[want] = real
                            _ensure_alias(client, real, want)
            now_up = "up" if current and len(ports) == 2 * channels else "down"
            if now_up != link:
                link, changed = now_up, time.time()
            _report(status_file, JackSeen(server="running", link=link, slave=current, ports=ports,
                                          clients=sorted(clients), ignored=ignored, xruns=xruns,
                                          updated=time.time(), since=started, link_changed=changed))
            if log is not None:
                _bound(log)
            stop_flag.wait(STATUS_PERIOD if link == "up" else 0.25)
    finally:
        try:
            client.deactivate()
            client.close()
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
        if hook is not None:
            hook.close()
    return 0


def _ensure_alias(client, real: str, alias: str) -> None:
    import jack

    try:
        port = client.get_port_by_name(real)
        if alias not in port.aliases:
            port.set_alias(alias)
    except jack.JackError:
        pass


def _drop_aliases(client, real: str) -> None:
    import jack

    try:
        port = client.get_port_by_name(real)
        for alias in port.aliases:
            if alias.startswith(f"{ALIAS_CLIENT}:"):
                port.unset_alias(alias)
    except jack.JackError:
        pass


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m archdsp_libvirt.audio.jack2.supervisor", description="NETJACK bridge supervisor")
    ap.add_argument("--server", required=True)
    ap.add_argument("--slave", required=True)
    ap.add_argument("--channels", type=int, required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--stale", type=Path, required=True)
    ap.add_argument("--log", type=Path)
    ap.add_argument("--hook-fd", type=int, help="the bind hook's listener of the jackd the bridge started")
    ap.add_argument("--hook-pid", type=int)
    ap.add_argument("--master-ip")
    ap.add_argument("--port", type=int)
    args = ap.parse_args(argv)
    hook = None
    if args.hook_fd is not None:  # first: jackd's binds wait for an answer meanwhile
        from ..bindhook import Hook

        hook = Hook(args.hook_fd, args.hook_pid, args.master_ip, args.port,
                    say=lambda m: print(f"bridge supervisor: {m}", file=sys.stderr, flush=True))
    try:
        return supervise(args.server, args.slave, args.channels, args.status, args.stale, args.log, hook)
    except ArchdspError as err:
        print(f"bridge supervisor: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
