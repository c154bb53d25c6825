"""The sockets of PipeWire's NETJACK2 manager, decided from outside its process (seccomp).

PipeWire 1.4.2's manager binds its listening socket to INADDR_ANY whatever ``net.ip`` says (a unicast
``net.ip`` only means "join no group"), and it has no option for the address. It also makes a new
send/receive pair for every join packet a slave sends and never lets an old one go while its socket
works: a restarted guest's slave (the same address and port) joins beside the pair of the slave it
replaces, which goes on sending to that address, and a slave that hears those packets while it
joins sends its join packet again, once per packet. The bridge hosts the manager in a process of its
own, so it starts that process under a seccomp filter that hands two system calls, ``bind`` and
``connect``, to the bridge's supervisor (``SECCOMP_RET_USER_NOTIF``):

- ``bind(0.0.0.0:PORT)`` (IPv4, the manager's port): the supervisor binds the same socket, through a
  copy of the descriptor (``pidfd_getfd``), to ``master_ip:PORT`` and answers 0: the manager then
  listens on the VM's address only (``ss -uln``: ``master_ip:PORT``); a wildcard bind of the port in
  IPv6 (``::``, or the IPv4-mapped ``::ffff:0.0.0.0``) is refused (EADDRNOTAVAIL): nothing may listen
  on every address;
- the calls are decided by the process that makes them (the notification's pid): only the manager's
  own process (any of its threads) gets the rebind and the join logic below; another process of the
  filtered tree (a child the manager forked or ran) may not bind the manager's port at all (EPERM,
  whatever the address), and its other calls go on unchanged;
- ``connect`` of a UDP socket to a slave (the manager's new pair for a join): when a pair for that
  slave address was made less than :data:`.joins.REPEAT_WINDOW` ago and is still there, this is the same
  join's packet again: refused (ECONNREFUSED; the manager frees the new pair through its own error
  path). Otherwise the join is a new slave at that address: the sockets of the older pairs to it are
  shut down (``shutdown`` on a copy) before the connect goes on, and the manager frees those pairs
  and their nodes through its own error path (``on_setup_io``: error -> ``stop_follower``). Letting a
  live pair go can be rate-limited per address (:data:`.joins.LET_GO_EVERY`, off by default): a join packet carries no proof of
  who sent it, so anyone who reaches the port with the VM's source address could drop the VM's pair;
  a let-go held back is refused (ECONNREFUSED) and counted (``held``);
- every other call goes on unchanged (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``);
- the hook fails closed: a call it cannot decide (the caller's memory unreadable, the caller gone, a
  handler that raises) is answered EPERM and logged, never let through.

Linux >= 5.6 (user notification with CONTINUE, pidfd_getfd). :func:`available` says whether this
kernel has it; the bridge refuses to start a manager it cannot bind when it has not.

The process is started by :func:`spawn`: ``python -m archdsp_libvirt.audio.pipewire.sockhook FD -- ARGV``
installs the filter in itself, passes the filter's listener over the inherited socket FD, and
executes ARGV (the manager), which keeps the filter. :class:`Hook` answers the notifications.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ...errors import BridgeError
from ...procs import Owned, fd_of, spawn_detached
from . import rxqueue
from .joins import REPEAT_WINDOW, Event, Joins, bind_action

# struct seccomp_notif {u64 id; u32 pid; u32 flags; struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}}
_NOTIF = struct.Struct("<QIIiIQ6Q")
_RESP = struct.Struct("<QqiI")  # struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags}


def _ioc(direction: int, nr: int, size: int) -> int:
    """A seccomp ioctl's number (``_IOC``; direction 1 = write, 3 = read and write)."""
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


_RECV = _ioc(3, 0, _NOTIF.size)
_SEND = _ioc(3, 1, _RESP.size)
_ID_VALID = _ioc(1, 2, 8)
_CONTINUE = 1
_NO_NEW_PRIVS = 38
_SET_MODE_FILTER, _NEW_LISTENER = 1, 1 << 3
_RET_ALLOW, _RET_USER_NOTIF = 0x7FFF0000, 0x7FC00000

# architecture: (AUDIT_ARCH, bind, connect, seccomp) system call numbers
_ARCH = {"x86_64": (0xC000003E, 49, 42, 317), "aarch64": (0xC00000B7, 200, 203, 277)}
EVENTS_KEPT = 256  # Hook.events keeps the last ones only; the counts are counters


def available() -> str | None:
    """None when this kernel and architecture can run the hook, else why not (one line)."""
    if platform.machine() not in _ARCH:
        return f"no seccomp bind hook for {platform.machine()} (x86_64 and aarch64 have one)"
    try:
        major, minor = (int(x) for x in platform.release().split(".")[:2])
    except ValueError:
        return f"cannot read the kernel version {platform.release()!r}"
    if (major, minor) < (5, 6):
        return f"Linux {major}.{minor} has no seccomp user notification with pidfd_getfd (5.6 or later)"
    try:
        seccomp = next((ln for ln in Path("/proc/self/status").read_text().splitlines()
                        if ln.startswith("Seccomp:")), None)
    except OSError:
        seccomp = None
    if seccomp is None:
        return "this kernel has no seccomp (CONFIG_SECCOMP_FILTER)"
    return None


def program(machine: str | None = None) -> bytes:
    """The classic BPF filter: bind and connect of this architecture go to the listener, all else runs."""
    arch, nr_bind, nr_connect, _ = _ARCH[machine or platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    insns = [
        (ld, 0, 0, 4),             # 0: A = seccomp_data.arch
        (jeq, 0, 3, arch),         # 1: another ABI -> 5 (allow)
        (ld, 0, 0, 0),             # 2: A = seccomp_data.nr
        (jeq, 2, 0, nr_bind),      # 3: bind -> 6 (notify)
        (jeq, 1, 0, nr_connect),   # 4: connect -> 6 (notify)
        (ret, 0, 0, _RET_ALLOW),   # 5
        (ret, 0, 0, _RET_USER_NOTIF),  # 6
    ]
    return b"".join(struct.pack("<HBBI", *i) for i in insns)


def _install() -> int:
    """Put this process under :func:`program`; returns the listener descriptor."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = program()
    buf = ctypes.create_string_buffer(code, len(code))

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = Fprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    fd = libc.syscall(_ARCH[platform.machine()][3], _SET_MODE_FILTER, _NEW_LISTENER, ctypes.byref(prog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    return fd


def _launch(argv: list[str]) -> int:
    """``python -m archdsp_libvirt.audio.pipewire.sockhook FD -- PROGRAM ARGS``: the filter, then the program."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m archdsp_libvirt.audio.pipewire.sockhook FD -- PROGRAM [ARGS]", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[0])) as chan:
        try:
            listener = _install()
        except OSError as e:
            chan.sendall(f"error {e}".encode()[:200])
            return 1
        socket.send_fds(chan, [b"ok"], [listener])
        os.close(listener)
    try:
        os.execvp(argv[2], argv[2:])
    except OSError as e:
        print(f"cannot run {argv[2]}: {e}", file=sys.stderr)
        return 127


def thread_group(pid: int, proc: Path = Path("/proc")) -> int:
    """The process (thread group) thread ``pid`` belongs to; OSError/ValueError when it cannot be read."""
    with open(proc / str(pid) / "status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise ValueError(f"no Tgid in {proc}/{pid}/status")


def parse_sockaddr(raw: bytes) -> tuple[int, str, int] | None:
    """(family, host, port) of a ``struct sockaddr_in``/``sockaddr_in6``; None for other families."""
    if len(raw) < 2:
        return None
    family = struct.unpack_from("=H", raw)[0]
    if family == socket.AF_INET and len(raw) >= 8:
        return family, socket.inet_ntop(socket.AF_INET, raw[4:8]), struct.unpack_from("!H", raw, 2)[0]
    if family == socket.AF_INET6 and len(raw) >= 24:
        return family, socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
    return None


class Hook:
    """Answers the bind and connect notifications of one hooked process (a thread)."""

    def __init__(self, listener: int, pid: int, master_ip: str, port: int, say=print,
                 window: float = REPEAT_WINDOW):
        self.listener, self.pid, self.master_ip, self.port, self.say = listener, pid, master_ip, port, say
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)  # the last ones; counts() are counters
        self.joins = Joins(window)
        self._nr_connect = _ARCH[platform.machine()][2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"sockhook-{pid}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        try:
            os.close(self.listener)
        except OSError:
            pass

    def _serve(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while not self._stop.is_set():
            events = poller.poll(200)
            if any(ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL) for _fd, ev in events):
                return  # the hooked process is gone
            if not events:
                continue
            buf = bytearray(_NOTIF.size)
            try:
                fcntl.ioctl(self.listener, _RECV, buf, True)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.EINTR):  # the caller died meanwhile
                    continue
                return
            nid, pid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
            try:
                answer = self._handle(nid, pid, nr, args[0], args[1], args[2])
            except Exception as e:  # noqa: BLE001 - fail closed: a call not decided is refused, and said
                call = "connect" if nr == self._nr_connect else "bind"
                self.say(f"hook: {call} of pid {pid} refused (EPERM): cannot decide it: {type(e).__name__}: {e}")
                answer = (-errno.EPERM, 0)
            self._answer(nid, *answer)

    def _handle(self, nid: int, pid: int, nr: int, fd: int, addr: int, addrlen: int) -> tuple[int, int]:
        """(error, flags) of the answer to one call of thread ``pid``; raises when it cannot decide."""
        manager = thread_group(pid) == self.pid  # a thread of the manager's process; else a process it started
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            raw = os.pread(mem.fileno(), min(addrlen, 128), addr)
        if not self._valid(nid):  # the caller went (its pid may be another's now): what was read is no proof
            raise OSError(errno.ESRCH, f"the call of pid {pid} is gone")
        parsed = parse_sockaddr(raw)
        if parsed is None:
            if len(raw) < 2 or struct.unpack_from("=H", raw)[0] in (socket.AF_INET, socket.AF_INET6):
                raise ValueError(f"a socket address of {len(raw)} bytes")  # short: not read whole
            return 0, _CONTINUE  # another family (a Unix socket: the manager's PipeWire connection)
        family, host, port = parsed
        asked = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if nr == self._nr_connect:
            return self._connect(fd, host, port, asked) if manager else (0, _CONTINUE)
        return self._bind(fd, family, host, port, asked, manager, pid)

    def _bind(self, fd: int, family: int, host: str, port: int, asked: str, manager: bool = True,
              pid: int = 0) -> tuple[int, int]:
        action = bind_action(family, host, port, self.master_ip, self.port, manager)
        if action == "pass":
            return 0, _CONTINUE
        if action == "deny":
            self._note(Event("bind", "refused", asked, f"pid {pid} is not the manager's process"))
            return -errno.EPERM, 0
        if action == "refuse":
            self._note(Event("bind", "refused", asked, "only master_ip may be bound"))
            return -errno.EADDRNOTAVAIL, 0
        try:
            with socket.socket(fileno=fd_of(self.pid, fd)) as sock:
                sock.bind((self.master_ip, port))
        except OSError as e:
            self._note(Event("bind", "refused", asked, f"bind {self.master_ip}:{port}: {e.strerror or e}"))
            return -(e.errno or errno.EADDRNOTAVAIL), 0
        self._note(Event("bind", "rebound", asked, f"to {self.master_ip}:{port}"))
        return 0, 0

    def _connect(self, fd: int, host: str, port: int, asked: str) -> tuple[int, int]:
        """A UDP socket connected to a slave is the manager's new pair for a join."""
        with socket.socket(fileno=fd_of(self.pid, fd)) as sock:
            if sock.type != socket.SOCK_DGRAM:
                return 0, _CONTINUE
            inode = os.fstat(sock.fileno()).st_ino
        older = [(f, i) for f, i, row in rxqueue.udp_sockets(self.pid) if (row[0], row[1]) == (host, port) and f != fd]
        now = time.monotonic()
        kind = self.joins.decide(asked, now, {i for _f, i in older})
        if kind == "repeat":
            if not self.events or self.events[-1].action != "repeat":  # said once per run of repeats
                self._note(Event("join", "repeat", asked, f"a join packet again within {self.joins.window:g} s: "
                                                          "refused, the manager keeps its first pair"))
            return -errno.ECONNREFUSED, 0
        if kind == "held":
            if not self.events or self.events[-1].action != "held":  # said once per run
                self._note(Event("join", "held", asked, f"a pair to that address was let go less than "
                                                        f"{self.joins.let_go_every:g} s ago: refused, the "
                                                        "streaming pair stays"))
            return -errno.ECONNREFUSED, 0
        closed = 0
        for f, _i in older:
            try:
                with socket.socket(fileno=fd_of(self.pid, f)) as old:
                    old.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError:
                pass  # freed meanwhile
        self.joins.accept(asked, now, inode, closed)
        why = ("its last pair streams to a slave that is joining: that pair's slave is gone; " if kind == "stray"
               else "")
        self._note(Event("join", "new", asked, why + (f"{closed} older pair(s) to that address let go" if closed
                                                      else "no older pair"), closed))
        return 0, _CONTINUE

    def counts(self) -> dict:
        """Joins accepted, older pairs let go, repeated join packets refused and let-gos held back, since
        the process started (counters: :attr:`events` keeps the last :data:`EVENTS_KEPT` only)."""
        return self.joins.counts()

    def _note(self, e: Event) -> None:
        self.events.append(e)
        detail = "" if not e.detail else f" {e.detail}" if e.action == "rebound" else f" ({e.detail})"
        self.say(f"{e.call} {e.asked}: {e.action}{detail}")

    def _valid(self, nid: int) -> bool:
        try:
            fcntl.ioctl(self.listener, _ID_VALID, struct.pack("<Q", nid))
            return True
        except OSError:
            return False

    def _answer(self, nid: int, error: int, flags: int) -> None:
        try:
            fcntl.ioctl(self.listener, _SEND, _RESP.pack(nid, 0, error, flags))
        except OSError:
            pass  # the caller died meanwhile (ENOENT)


def spawn(argv: list[str], log: Path, master_ip: str, port: int, env: dict[str, str] | None = None,
          say=print, timeout: float = 10.0, window: float = REPEAT_WINDOW) -> tuple[Owned, Hook]:
    """Start ``argv`` (in its own session, output to ``log``) under the hook."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = spawn_detached([sys.executable, "-P", "-m", "archdsp_libvirt.audio.pipewire.sockhook",
                               str(child.fileno()), "--", *argv], log, env=env, pass_fds=(child.fileno(),))
        child.close()
        parent.settimeout(timeout)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(parent, 200, 1)
        except (TimeoutError, OSError) as e:
            proc.stop(timeout=5)
            raise BridgeError(f"the bind hook did not start {argv[0]}: {e}") from None
        if not fds:
            proc.stop(timeout=5)
            raise BridgeError(f"the bind hook did not start {argv[0]}: {msg.decode(errors='replace')}")
        return proc, Hook(fds[0], proc.pid, master_ip, port, say=say, window=window)
    finally:
        parent.close()
        child.close()

if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
