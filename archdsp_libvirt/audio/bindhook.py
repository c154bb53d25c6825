"""A server's listening socket bound from outside its process (seccomp user notification).

Some NETJACK2 masters bind their listening socket to INADDR_ANY whatever address they are given (JACK2's
``netmanager -a IP`` and PipeWire 1.4's ``net.ip`` only pick the multicast group). The bridge starts
such a process under a seccomp filter that hands its ``bind`` calls (and, where asked, ``connect``) to
the bridge's supervisor (``SECCOMP_RET_USER_NOTIF``):

- ``bind(0.0.0.0:PORT)`` (IPv4, the master's port): the supervisor binds the same socket, through a
  copy of the descriptor (``pidfd_getfd``), to ``master_ip:PORT`` and answers 0: the process then
  listens on the VM's address only (``ss -uln``: ``master_ip:PORT``); a wildcard bind of the port in
  IPv6 (``::``, or the IPv4-mapped ``::ffff:0.0.0.0``) is refused (EADDRNOTAVAIL): nothing may listen
  on every address;
- the calls are decided by the process that makes them (the notification's pid): only the hooked
  process itself (any of its threads) gets the rebind; another process of the filtered tree (a child
  it forked or ran) may not bind the port at all (EPERM, whatever the address);
- every other call goes on unchanged (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``);
- the hook fails closed: a call it cannot decide (the caller's memory unreadable, the caller gone, a
  handler that raises) is answered EPERM and logged, never let through; once nobody holds the
  listener (the supervisor gone), the kernel answers the filtered calls ENOSYS.

:class:`Hook` answers binds; a subclass answers ``connect`` too (:meth:`Hook._connect`). Linux >= 5.6
(user notification with CONTINUE, pidfd_getfd): :func:`available` says whether this kernel has it.

The process is started by :func:`spawn`: ``python -m archdsp_libvirt.audio.bindhook [--connect] FD -- ARGV``
installs the filter in itself, passes the filter's listener over the inherited socket FD, and
executes ARGV, which keeps the filter.
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
from collections import deque
from pathlib import Path

from msgspec import Struct

from ..errors import BridgeError
from ..procs import Owned, fd_of, spawn_detached

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
EVENTS_KEPT = 256  # Hook.events keeps the last ones only


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


def program(machine: str | None = None, connect: bool = True) -> bytes:
    """The classic BPF filter: bind (and connect, unless ``connect`` is false) of this architecture go to
    the listener, all else runs."""
    arch, nr_bind, nr_connect, _ = _ARCH[machine or platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    if not connect:
        insns = [
            (ld, 0, 0, 4),             # 0: A = seccomp_data.arch
            (jeq, 0, 2, arch),         # 1: another ABI -> 4 (allow)
            (ld, 0, 0, 0),             # 2: A = seccomp_data.nr
            (jeq, 1, 0, nr_bind),      # 3: bind -> 5 (notify)
            (ret, 0, 0, _RET_ALLOW),   # 4
            (ret, 0, 0, _RET_USER_NOTIF),  # 5
        ]
        return b"".join(struct.pack("<HBBI", *i) for i in insns)
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


def _install(connect: bool = True) -> int:
    """Put this process under :func:`program`; returns the listener descriptor."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    code = program(connect=connect)
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
    """``python -m archdsp_libvirt.audio.bindhook [--connect] FD -- PROGRAM ARGS``: the filter, then the program."""
    connect = bool(argv) and argv[0] == "--connect"
    argv = argv[1:] if connect else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m archdsp_libvirt.audio.bindhook [--connect] FD -- PROGRAM [ARGS]", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[0])) as chan:
        try:
            listener = _install(connect)
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


def bind_action(family: int, host: str, port: int, master_ip: str, want_port: int, manager: bool = True) -> str:
    """``rebind`` a wildcard IPv4 bind of the master's port, ``refuse`` a wildcard IPv6 one (``::`` or
    the IPv4-mapped ``::ffff:0.0.0.0``), ``pass`` the rest. A process other than the manager's own
    (``manager`` false: a child of the hooked process) may not bind the port at all: ``deny``."""
    if port != want_port:
        return "pass"
    if not manager:
        return "deny"
    if family == socket.AF_INET and host == "0.0.0.0":
        return "rebind" if ipaddress.ip_address(master_ip).version == 4 else "refuse"
    if family == socket.AF_INET6:
        ip = ipaddress.IPv6Address(host)
        if ip.is_unspecified or (ip.ipv4_mapped is not None and ip.ipv4_mapped.is_unspecified):
            return "refuse"
    return "pass"


class Event(Struct, frozen=True):
    """What the hook did with one call: a bind ``rebound`` (to master_ip) or ``refused``; a slave's
    join ``new`` (``closed`` older pairs to that address let go), ``repeat`` (refused) or ``held``
    (refused: a live pair to that address was let go too recently)."""

    call: str
    action: str
    asked: str
    detail: str = ""
    closed: int = 0


class Hook:
    """Answers the bind notifications of one hooked process (a thread); :meth:`_connect` lets every
    connect go on (a subclass decides them)."""

    CONNECT = False  # whether the filter hands connect to this hook too

    def __init__(self, listener: int, pid: int, master_ip: str, port: int, say=print):
        self.listener, self.pid, self.master_ip, self.port, self.say = listener, pid, master_ip, port, say
        self.events: deque[Event] = deque(maxlen=EVENTS_KEPT)  # the last ones
        self._nr_connect = _ARCH[platform.machine()][2]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"bindhook-{pid}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 2.0) -> None:
        """Stop answering and close the listener; again is a no-op (the descriptor's number may be another's
        by then)."""
        self._stop.set()
        self._thread.join(timeout)
        listener, self.listener = self.listener, -1
        if listener >= 0:
            try:
                os.close(listener)
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
        manager = thread_group(pid) == self.pid  # a thread of the hooked process; else a process it started
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            raw = os.pread(mem.fileno(), min(addrlen, 128), addr)
        if not self._valid(nid):  # the caller went (its pid may be another's now): what was read is no proof
            raise OSError(errno.ESRCH, f"the call of pid {pid} is gone")
        parsed = parse_sockaddr(raw)
        if parsed is None:
            if len(raw) < 2 or struct.unpack_from("=H", raw)[0] in (socket.AF_INET, socket.AF_INET6):
                raise ValueError(f"a socket address of {len(raw)} bytes")  # short: not read whole
            return 0, _CONTINUE  # another family (a Unix socket)
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
            self._note(Event("bind", "refused", asked, f"pid {pid} is not the hooked process"))
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
        return 0, _CONTINUE

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
          say=print, timeout: float = 10.0, hook: type[Hook] = Hook, **hook_args) -> tuple[Owned, Hook]:
    """Start ``argv`` (in its own session, output to ``log``) under the filter, answered by a ``hook``."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = spawn_detached([sys.executable, "-P", "-m", "archdsp_libvirt.audio.bindhook",
                               *(["--connect"] if hook.CONNECT else []), str(child.fileno()), "--", *argv], log,
                              env=env, pass_fds=(child.fileno(),))
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
        return proc, hook(fds[0], proc.pid, master_ip, port, say=say, **hook_args)
    finally:
        parent.close()
        child.close()


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
