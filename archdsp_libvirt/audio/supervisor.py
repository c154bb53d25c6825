"""The bridge supervisor: a plain JACK client (no audio ports, no process callback) that

- gives the VM's ports stable names: ``netjack:capture_N`` (host -> VM) and
  ``netjack:playback_N`` (VM -> host) are JACK aliases of the slave's
  ``to_slave_N`` / ``from_slave_N``, re-made whenever the slave rejoins;
- counts the server's xruns since the bridge started;
- writes what it sees to a status file once a second.

Run as ``python -P -m archdsp_libvirt.audio.supervisor ...`` by :func:`.bridge.start`.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path

from ..errors import ArchdspError
from .bridge import ALIAS_CLIENT, STATUS_PERIOD, SUPERVISOR_CLIENT, _read_json, _write_json, open_client


def _report(path: Path, data: dict) -> None:
    """Write the status file; a full or read-only /run (ENOSPC, EROFS) skips one report, it does not end the
    supervisor (the aliases matter more than the screen)."""
    try:
        _write_json(path, data)
    except OSError as exc:
        print(f"bridge supervisor: cannot write {path}: {exc.strerror}", file=sys.stderr)


_SLAVE_PORT = re.compile(r"^(?P<client>[^:]+):(?P<dir>to|from)_slave_(?P<n>\d+)$")


def _slave_clients(port_names: list[str], slave: str) -> dict[str, set[str]]:
    """Clients that are the slave (``dsp``, or ``dsp-01`` when a stale one still holds the name)."""
    out: dict[str, set[str]] = {}
    for name in port_names:
        m = _SLAVE_PORT.match(name)
        if m and re.fullmatch(re.escape(slave) + r"(-\d+)?", m["client"]):
            out.setdefault(m["client"], set()).add(name)
    return out


def _newest(clients: list[str], slave: str) -> str:
    return max(clients, key=lambda c: int(c[len(slave) + 1:]) if c != slave else -1)


def supervise(server: str, slave: str, channels: int, status_file: Path, exclude_file: Path) -> int:
    import threading

    client = open_client(server, SUPERVISOR_CLIENT)
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
    changed = time.time()
    started = time.time()
    try:
        while not stop_flag.is_set():
            if gone.is_set():
                _report(status_file, {"server": "gone", "link": "down", "xruns": xruns, "updated": time.time(),
                                          "since": started, "link_changed": time.time(), "ports": {}})
                return 3
            names = [p.name for p in client.get_ports()]
            clients = _slave_clients(names, slave)
            stale = set((_read_json(exclude_file) or {}).get("stale", []))
            if stale and not stale & set(clients):
                exclude_file.unlink(missing_ok=True)  # the stale slaves are gone
                stale = set()
            for gone_client in stale & set(clients):
                for real in clients.pop(gone_client):
                    _drop_aliases(client, real)
            ports: dict[str, str] = {}
            current = None
            if clients:
                current = _newest(list(clients), slave)
                for i in range(1, channels + 1):
                    for direction, alias in (("to", "capture"), ("from", "playback")):
                        real = f"{current}:{direction}_slave_{i}"
                        want = f"{ALIAS_CLIENT}:{alias}_{i}"
                        if real in clients[current]:
                            ports[want] = real
                            _ensure_alias(client, real, want)
                for other in clients:
                    if other != current:
                        for real in clients[other]:
                            _drop_aliases(client, real)
            now_up = "up" if current and len(ports) == 2 * channels else "down"
            if now_up != link:
                link, changed = now_up, time.time()
            _report(status_file, {"server": "running", "link": link, "slave": current, "ports": ports,
                                      "clients": sorted(clients) + sorted(stale & set(_slave_clients(names, slave))),
                                      "xruns": xruns, "updated": time.time(), "since": started,
                                      "link_changed": changed})
            stop_flag.wait(STATUS_PERIOD if link == "up" else 0.25)
    finally:
        try:
            client.deactivate()
            client.close()
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
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

    ap = argparse.ArgumentParser(prog="python -m archdsp_libvirt.audio.supervisor", description="NETJACK bridge supervisor")
    ap.add_argument("--server", required=True)
    ap.add_argument("--slave", required=True)
    ap.add_argument("--channels", type=int, required=True)
    ap.add_argument("--status", type=Path, required=True)
    ap.add_argument("--stale", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        return supervise(args.server, args.slave, args.channels, args.status, args.stale)
    except ArchdspError as err:
        print(f"bridge supervisor: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(_main())
