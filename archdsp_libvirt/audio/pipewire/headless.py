"""A headless PipeWire of our own (pipewire + WirePlumber in a runtime directory we own), for the
demo and the tests: ``python -m archdsp_libvirt.audio.pipewire.headless start|stop DIR [--user USER]``.

WirePlumber's Dummy-Driver drives the graph when no sound card exists. The processes are known by
PID and start time and stopped by PID. DIR belongs to the user the servers run as, so nothing root keeps
or reads lives there: the record of what was started (``headless-KEY.json``) and the servers' log
(``headless-KEY.log``) are in the bridge's run folder (:func:`..link.run_file`, root's own as root), KEY
naming DIR; the log is opened without following a symbolic link and refused unless it is a regular
file of our own.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
import sys
import time
from pathlib import Path
from typing import ClassVar

from msgspec import Struct

from ...errors import BridgeError
from ...procs import Owned, child_env, spawn_detached
from ..link import run_file
from ..records import read_record, write_record
from . import server as pw


class Headless(Struct, kw_only=True):
    """What :func:`start` started for a runtime directory (``headless-KEY.json`` in the run folder)."""

    WHAT: ClassVar[str] = "headless PipeWire record"
    FIX: ClassVar[str] = "stop the processes it names by hand, then remove the file"

    directory: str
    pipewire: Owned
    wireplumber: Owned | None = None


def _key(directory: Path) -> str:
    """A file name of the run folder's for ``directory``: its last part (readable) and a hash of its
    absolute path (so that two folders of the same name never share one)."""
    where = os.path.abspath(directory)
    tag = "".join(c if c.isalnum() or c in "-_" else "_" for c in os.path.basename(where))[:32] or "root"
    return f"{tag}-{hashlib.sha256(os.fsencode(where)).hexdigest()[:16]}"


def record_path(directory: Path) -> Path:
    return run_file(f"headless-{_key(directory)}.json")


def log_path(directory: Path) -> Path:
    return run_file(f"headless-{_key(directory)}.log")


def open_log(log: Path) -> None:
    """Make sure ``log`` is a regular file of this process's user, created here if missing, never reached
    through a symbolic link (O_NOFOLLOW): :class:`BridgeError` otherwise."""
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise BridgeError(f"{log}: cannot open the headless PipeWire's log ({exc.strerror}): remove it") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise BridgeError(f"{log}: not a regular file of uid {os.geteuid()}: remove it")


def _own_directory(directory: Path, ent: pwd.struct_passwd | None) -> None:
    """Make ``directory`` the servers' runtime directory: mode 0700, owned by ``ent`` (else by us). Its mode and
    owner are set through a descriptor opened without following a symbolic link, and a folder someone else
    owns is refused: a link planted at DIR never makes root chmod or chown what it points at."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise BridgeError(f"{directory}: not a directory of its own ({exc.strerror}): pass a real directory") from None
    try:
        st = os.fstat(fd)
        allowed = {os.geteuid()} | ({ent.pw_uid} if ent else set())
        if st.st_uid not in allowed:
            raise BridgeError(f"{directory} is owned by uid {st.st_uid}: the headless PipeWire's runtime directory "
                              "must be ours or the --user's")
        os.fchmod(fd, 0o700)
        if ent:
            os.fchown(fd, ent.pw_uid, ent.pw_gid)
    finally:
        os.close(fd)


def _read(directory: Path) -> Headless | None:
    rec = read_record(record_path(directory), Headless)
    return rec if rec is not None and rec.directory == os.path.abspath(directory) else None


def start(directory: Path, user: str | None = None, say=print) -> pw.Target:
    directory = Path(directory)
    old = _read(directory)
    if old is not None:
        if old.pipewire.alive() and (old.wireplumber is None or old.wireplumber.alive()):
            say(f"headless PipeWire already runs in {directory}")
            return pw.Target(str(directory), "pipewire-0", user, None, "headless")
        stop(directory, say=lambda _m: None)
    prefix: list[str] = []
    ent = pwd.getpwnam(user) if user else None
    _own_directory(directory, ent)
    if user:
        prefix = ["runuser", "-u", user, "--"]
    env = child_env({"XDG_RUNTIME_DIR": str(directory), "DBUS_SESSION_BUS_ADDRESS": "disabled:"})
    if user:
        env.update({"HOME": pwd.getpwnam(user).pw_dir, "USER": user})
    log = log_path(directory)
    open_log(log)
    record = record_path(directory)
    daemon = spawn_detached([*prefix, "env", f"XDG_RUNTIME_DIR={directory}", "pipewire"], log, env=env)
    write_record(record, Headless(directory=os.path.abspath(directory), pipewire=daemon))
    target = pw.Target(str(directory), "pipewire-0", user, None, "headless")
    deadline = time.monotonic() + 10
    while pw.probe(target) is None:
        if time.monotonic() > deadline or not daemon.alive():
            daemon.stop()
            record.unlink(missing_ok=True)
            raise BridgeError(f"headless PipeWire did not start in {directory}; see {log}")
        time.sleep(0.2)
    session = spawn_detached([*prefix, "env", f"XDG_RUNTIME_DIR={directory}", "wireplumber"], log, env=env)
    write_record(record, Headless(directory=os.path.abspath(directory), pipewire=daemon, wireplumber=session))
    say(f"headless PipeWire in {directory} (pipewire pid {daemon.pid}, wireplumber pid {session.pid}; log {log})")
    return target


def stop(directory: Path, say=print) -> bool:
    """Stop what :func:`start` started for ``directory``, as its record in the run folder names it (by PID
    and start time). Nothing in ``directory`` itself (the user's) is read: a PID planted there is never
    signalled."""
    record = record_path(directory)
    procs = _read(directory)
    if procs is None:
        return False
    for name, proc in (("wireplumber", procs.wireplumber), ("pipewire", procs.pipewire)):
        if proc is not None and proc.stop(timeout=5):
            say(f"stopped {name} (pid {proc.pid})")
    record.unlink(missing_ok=True)
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
