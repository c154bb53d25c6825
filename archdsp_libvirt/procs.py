"""Processes this package starts, known by PID *and* start time, so that a
reused PID is never mistaken for ours and nothing else is ever signalled."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from msgspec import Struct


def start_time(pid: int, proc: str = "/proc") -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(proc, str(pid), "stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def boot_time(proc: str = "/proc") -> int | None:
    """When the machine booted, in seconds since the epoch (``btime`` of /proc/stat)."""
    try:
        for line in Path(proc, "stat").read_text().splitlines():
            if line.startswith("btime "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def age(pid: int, proc: str = "/proc", now: float | None = None) -> float | None:
    """How long the process has run, in seconds: from its start time, not from /proc/PID's mtime
    (which is when /proc first looked at it)."""
    ticks = start_time(pid, proc)
    booted = boot_time(proc)
    if ticks is None or booted is None:
        return None
    started = booted + ticks / os.sysconf("SC_CLK_TCK")
    return max(0.0, (time.time() if now is None else now) - started)


class Owned(Struct, frozen=True):
    """A process we started."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> Owned:
        st = start_time(pid)
        if st is None:
            raise ProcessLookupError(pid)
        return cls(pid, st)

    def alive(self) -> bool:
        if start_time(self.pid) != self.start:
            return False
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            threads = len(os.listdir(f"/proc/{self.pid}/task"))
        except (OSError, IndexError):
            return False
        # A zombie leader whose other threads still run is a process still shutting down.
        return state != "Z" or threads > 1

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. True if it was running.

        Returns once the process is reaped too (bounded): a JACK server whose zombie still holds its
        PID counts as active for a new server of the same name.
        """
        return stop_together([self], timeout)[0]

    def as_dict(self) -> dict:
        return {"pid": self.pid, "start": self.start}


def stop_together(procs: list[Owned], timeout: float) -> list[bool]:
    """Stop several processes at once: SIGTERM to each, one shared wait of up to ``timeout`` s, SIGKILL
    to whatever is left, then each reaped (up to 5 s more). Whether each was running.

    For processes that go down together anyway (a JACK server of ours and the client watching it): one
    after the other, each would wait out its own grace on the other's goodbye."""
    running = [p.alive() for p in procs]
    for p, was in zip(procs, running):
        if was:
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.alive() for p in procs):
        for p in procs:
            _reap(p.pid)
        time.sleep(0.05)
    for p in procs:
        if p.alive():
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for _ in range(100):
        for p in procs:
            _reap(p.pid)
        if all(start_time(p.pid) != p.start for p in procs):
            break
        time.sleep(0.05)
    return running


def fd_of(pid: int, fd: int) -> int:
    """A copy, in this process, of process ``pid``'s descriptor ``fd`` (``pidfd_getfd``): the same open
    socket or file. OSError when the kernel is older than 5.6 or this process may not trace ``pid``."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        mine = libc.syscall(_PIDFD_GETFD, pidfd, fd, 0)
        if mine < 0:
            err = ctypes.get_errno() or errno.ENOSYS
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return mine
    finally:
        os.close(pidfd)


_PIDFD_GETFD = 438  # the syscall number on every Linux architecture that has it (5.6+)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# PATH for every child of a root process: the system's folders only, never the caller's.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_PASSED = frozenset({"LANG", "LANGUAGE", "TERM"})
RUN_DIR_DEFAULT = "/run/archdsp-libvirt"


def child_env(extra: Mapping[str, str] | None = None, *, keep: tuple[str, ...] = (),
              environ: Mapping[str, str] | None = None, euid: int | None = None) -> dict[str, str]:
    """The environment of a process this package starts: an allow list, then ``extra``.

    Passed on: LANG, LANGUAGE, LC_*, TERM, and the names in ``keep``. PATH is :data:`SAFE_PATH` as root
    (the caller's otherwise), HOME root's own home as root (the caller's otherwise). Nothing else: not
    PIPEWIRE_MODULE_DIR, SPA_PLUGIN_DIR, JACK_DRIVER_DIR, LD_* or PYTHON* (libraries and code a child
    would load as root), nor ARCHDSP_RUN_DIR. What a child needs of PipeWire or JACK (XDG_RUNTIME_DIR,
    PIPEWIRE_REMOTE, JACK_DEFAULT_SERVER, ...) the caller sets in ``extra``.
    """
    env = os.environ if environ is None else environ
    root = (os.geteuid() if euid is None else euid) == 0
    out = {k: v for k, v in env.items() if k in _PASSED or k.startswith("LC_") or k in keep}
    out["PATH"] = SAFE_PATH if root or not env.get("PATH") else env["PATH"]
    home = _own_home() if root else env.get("HOME")
    if home:
        out["HOME"] = home
    out.update(extra or {})
    return out


def _own_home() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_dir or "/"
    except KeyError:
        return "/"


def run_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """The bridge's state folder: ``$ARCHDSP_RUN_DIR``, else /run/archdsp-libvirt.

    Its files name the PIDs ``netjack stop`` kills, so as root the variable is taken only for an
    absolute path to a directory (not a symbolic link) owned by root that no group or other user may
    write; anything else is a :class:`UsageError` naming the variable.
    """
    from .errors import UsageError

    env = os.environ if environ is None else environ
    value = env.get("ARCHDSP_RUN_DIR")
    if not value:
        return Path(RUN_DIR_DEFAULT)
    if (os.geteuid() if euid is None else euid) != 0:
        return Path(value)
    shown = value if value.isprintable() else repr(value)
    why = None
    try:
        st = os.lstat(value)
    except OSError as exc:
        st, why = None, (exc.strerror or "cannot be read").lower()
    if not os.path.isabs(value):
        why = "is not an absolute path"
    elif st is not None and not stat.S_ISDIR(st.st_mode):
        why = "is a symbolic link" if stat.S_ISLNK(st.st_mode) else "is not a directory"
    elif st is not None and st.st_uid != 0:
        why = f"is owned by uid {st.st_uid}, not root"
    elif st is not None and st.st_mode & 0o022:
        why = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if why:
        raise UsageError(f"ARCHDSP_RUN_DIR={shown} {why}: as root the bridge's state folder must be a root-owned "
                         f"directory only root may write (mkdir -m 0755); or unset it to use {RUN_DIR_DEFAULT}")
    return Path(value)


def spawn_detached(argv: list[str], log: Path, env: dict[str, str] | None = None,
                   pass_fds: tuple[int, ...] = ()) -> Owned:
    """Start ``argv`` in its own session, output to ``log``; it outlives this process. Of this process's
    descriptors it inherits only ``pass_fds``; its environment is ``env``, else :func:`child_env`."""
    env = child_env() if env is None else env
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True, pass_fds=pass_fds, env=env, cwd="/")
    return Owned.of(proc.pid)


def flock_within(fd, seconds: float, poll: float = 0.05) -> bool:
    """Take an exclusive flock on ``fd`` (a file or descriptor), waiting at most ``seconds``; False when
    another holder kept it that long (the caller says what to do)."""
    import fcntl

    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)
