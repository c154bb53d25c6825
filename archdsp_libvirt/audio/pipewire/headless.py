"""A headless PipeWire of our own (pipewire + WirePlumber in a runtime directory we own), for the
demo and the tests: ``python -m archdsp_libvirt.audio.pipewire.headless start|stop DIR [--user USER]``.

WirePlumber's Dummy-Driver drives the graph when no sound card exists. The processes are known by
PID and start time (DIR/pids.json) and stopped by PID.
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from pathlib import Path

from ...errors import BridgeError
from ...procs import Owned, child_env, spawn_detached
from . import server as pw


def start(directory: Path, user: str | None = None, say=print) -> pw.Target:
    directory = Path(directory)
    pids = directory / "pids.json"
    if pids.exists():
        old = json.loads(pids.read_text())
        if all(Owned(**p).alive() for p in old.values()):
            say(f"headless PipeWire already runs in {directory}")
            return pw.Target(str(directory), "pipewire-0", user, None, "headless")
        stop(directory, say=lambda _m: None)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    prefix: list[str] = []
    if user:
        ent = pwd.getpwnam(user)
        os.chown(directory, ent.pw_uid, ent.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    env = child_env({"XDG_RUNTIME_DIR": str(directory), "DBUS_SESSION_BUS_ADDRESS": "disabled:"})
    if user:
        env.update({"HOME": pwd.getpwnam(user).pw_dir, "USER": user})
    log = Path("/tmp") / f"archdsp-pw-{directory.name}.log"
    daemon = spawn_detached([*prefix, "env", f"XDG_RUNTIME_DIR={directory}", "pipewire"], log, env=env)
    target = pw.Target(str(directory), "pipewire-0", user, None, "headless")
    deadline = time.monotonic() + 10
    while pw.probe(target) is None:
        if time.monotonic() > deadline or not daemon.alive():
            daemon.stop()
            raise BridgeError(f"headless PipeWire did not start in {directory}; see {log}")
        time.sleep(0.2)
    session = spawn_detached([*prefix, "env", f"XDG_RUNTIME_DIR={directory}", "wireplumber"], log, env=env)
    pids.write_text(json.dumps({"pipewire": daemon.as_dict(), "wireplumber": session.as_dict()}))
    say(f"headless PipeWire in {directory} (pipewire pid {daemon.pid}, wireplumber pid {session.pid})")
    return target


def stop(directory: Path, say=print) -> bool:
    pids = Path(directory) / "pids.json"
    try:
        procs = json.loads(pids.read_text())
    except (OSError, ValueError):
        return False
    for name in ("wireplumber", "pipewire"):
        if name in procs and Owned(**procs[name]).stop(timeout=5):
            say(f"stopped {name} (pid {procs[name]['pid']})")
    pids.unlink(missing_ok=True)
    return True


def _main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m archdsp_libvirt.audio.pipewire.headless start|stop DIR [--user USER]", file=sys.stderr)
        return 2
    user = argv[argv.index("--user") + 1] if "--user" in argv else None
    try:
        (start(Path(argv[1]), user) if argv[0] == "start" else stop(Path(argv[1])))
    except BridgeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
