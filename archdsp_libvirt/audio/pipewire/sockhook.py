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
  IPv6 is refused (EADDRNOTAVAIL): nothing may listen on every address;
- ``connect`` of a UDP socket to a slave (the manager's new pair for a join): when a pair for that
  slave address was made less than :data:`REPEAT_WINDOW` ago and is still there, this is the same
  join's packet again: refused (ECONNREFUSED; the manager frees the new pair through its own error
  path). Otherwise the join is a new slave at that address: the sockets of the older pairs to it are
  shut down (``shutdown`` on a copy) before the connect goes on, and the manager frees those pairs
  and their nodes through its own error path (``on_setup_io``: error -> ``stop_follower``);
- every other call goes on unchanged (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``).

Linux >= 5.6 (user notification with CONTINUE, pidfd_getfd). :func:`available` says whether this
kernel has it; the bridge refuses to start a manager it cannot bind when it has not.

The process is started by :func:`spawn`: ``python -m archdsp_libvirt.audio.pipewire.sockhook FD -- ARGV``
installs the filter in itself, passes the filter's listener over the inherited socket FD, and
executes ARGV (the manager), which keeps the filter. :class:`Hook` answers the notifications.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import platform
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

from msgspec import Struct

from ...errors import BridgeError
from ...procs import Owned, fd_of, spawn_detached
from . import rxqueue

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
# A slave repeats its join packet each second until the manager answers (JACK2's SLAVE_INIT_TIMEOUT),
# and once per stray packet it hears meanwhile; a join packet this soon after an answered one from the
# same address is a repeat.
REPEAT_WINDOW = 3.0
QUICK, STRAY_REPEATS = 0.5, 20  # see Joins


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


class Event(Struct, frozen=True):
    """What the hook did with one call: a bind ``rebound`` (to master_ip) or ``refused``; a slave's
    join ``new`` (``closed`` older pairs to that address let go) or ``repeat`` (refused)."""

    call: str
    action: str
    asked: str
    detail: str = ""
    closed: int = 0


class Pair(Struct):
    """The last pair made for a slave address: when, its socket's inode, and the repeats since."""

    made: float
    inode: int
    last_packet: float
    quick_repeats: int = 0


class Joins:
    """The last pair the manager made for each slave address, and the join packets repeated since.

    A slave repeats its join packet once a second while no answer comes, and once per stray packet it
    hears meanwhile. Within :data:`REPEAT_WINDOW` of the last pair made for its address, a join packet is
    such a repeat and refused, unless repeats came quickly (less than :data:`QUICK` apart) more than
    :data:`STRAY_REPEATS` times: then a pair is streaming to that address while a slave there joins,
    so the slave that pair served is gone (a restart right after its join), and the join is new."""

    def __init__(self, window: float = REPEAT_WINDOW):
        self.window = window
        self.accepted: dict[str, Pair] = {}  # by the slave's address
        self.refused = 0

    def decide(self, remote: str, now: float, live_inodes: set[int]) -> str:
        """``new``, ``repeat`` (refuse it) or ``stray`` (new: the last pair streams to a joining slave)."""
        last = self.accepted.get(remote)
        if not last or last.inode not in live_inodes or now - last.made >= self.window:
            return "new"
        if now - last.last_packet < QUICK:
            last.quick_repeats += 1
        last.last_packet = now
        if last.quick_repeats > STRAY_REPEATS:
            return "stray"
        self.refused += 1
        return "repeat"

    def accept(self, remote: str, now: float, inode: int) -> None:
        self.accepted[remote] = Pair(now, inode, now)


def bind_action(family: int, host: str, port: int, master_ip: str, want_port: int) -> str:
    """``rebind`` a wildcard IPv4 bind of the manager's port, ``refuse`` a wildcard IPv6 one, ``pass`` the rest."""
    if port != want_port:
        return "pass"
    if family == socket.AF_INET and host == "0.0.0.0":
        return "rebind" if ipaddress.ip_address(master_ip).version == 4 else "refuse"
    if family == socket.AF_INET6 and host == "::":
        return "refuse"
    return "pass"


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
        self.events: list[Event] = []
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
            nid, _tid, _flags, nr, _arch, _ip, *args = _NOTIF.unpack(buf)
            try:
                answer = self._handle(nid, nr, args[0], args[1], args[2])
            except OSError:
                answer = (0, _CONTINUE)  # the process or its socket went meanwhile: let the call run
            except Exception as e:  # noqa: BLE001 - an unanswered call would hang the manager: answer it
                self.say(f"hook: {type(e).__name__}: {e}; the call runs unchanged")
                answer = (0, _CONTINUE)
            self._answer(nid, *answer)

    def _handle(self, nid: int, nr: int, fd: int, addr: int, addrlen: int) -> tuple[int, int]:
        """(error, flags) of the answer to one call."""
        try:
            with open(f"/proc/{self.pid}/mem", "rb", buffering=0) as mem:
                raw = os.pread(mem.fileno(), min(addrlen, 128), addr)
        except OSError:
            return 0, _CONTINUE
        if not self._valid(nid):
            return 0, _CONTINUE
        parsed = parse_sockaddr(raw)
        if parsed is None:
            return 0, _CONTINUE
        family, host, port = parsed
        asked = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        if nr == self._nr_connect:
            return self._connect(fd, host, port, asked)
        return self._bind(fd, family, host, port, asked)

    def _bind(self, fd: int, family: int, host: str, port: int, asked: str) -> tuple[int, int]:
        action = bind_action(family, host, port, self.master_ip, self.port)
        if action == "pass":
            return 0, _CONTINUE
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
        closed = 0
        for f, _i in older:
            try:
                with socket.socket(fileno=fd_of(self.pid, f)) as old:
                    old.shutdown(socket.SHUT_RDWR)
                closed += 1
            except OSError:
                pass  # freed meanwhile
        self.joins.accept(asked, now, inode)
        why = ("its last pair streams to a slave that is joining: that pair's slave is gone; " if kind == "stray"
               else "")
        self._note(Event("join", "new", asked, why + (f"{closed} older pair(s) to that address let go" if closed
                                                      else "no older pair"), closed))
        return 0, _CONTINUE

    def counts(self) -> dict:
        """Joins accepted, older pairs let go and repeated join packets refused, since the process started."""
        new = [e for e in self.events if e.call == "join" and e.action == "new"]
        return {"new": len(new), "let_go": sum(e.closed for e in new), "refused": self.joins.refused}

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
