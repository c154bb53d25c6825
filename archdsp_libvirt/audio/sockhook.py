"""Where PipeWire's NETJACK2 manager listens, decided from outside its process (seccomp).

PipeWire 1.4.2's manager binds its listening socket to INADDR_ANY whatever ``net.ip`` says (a unicast
``net.ip`` only means "join no group"), and it has no option for the address. The bridge hosts the
manager in a process of its own, so it starts that process under a seccomp filter that hands one
system call, ``bind``, to the bridge's supervisor (``SECCOMP_RET_USER_NOTIF``):

- ``bind(0.0.0.0:PORT)`` (IPv4, the manager's port): the supervisor binds the same socket, through a
  copy of the descriptor (``pidfd_getfd``), to ``master_ip:PORT`` and answers 0: the manager then
  listens on the VM's address only (``ss -uln``: ``master_ip:PORT``);
- a wildcard bind of the port in IPv6 is refused (EADDRNOTAVAIL): nothing may listen on every address;
- every other bind goes on unchanged (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``).

Linux >= 5.6 (user notification with CONTINUE, pidfd_getfd). :func:`available` says whether this
kernel has it; the bridge refuses to start a manager it cannot bind when it has not.

The process is started by :func:`spawn`: ``python -m archdsp_libvirt.audio.sockhook FD -- ARGV``
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
import subprocess
import sys
import threading
from pathlib import Path

from msgspec import Struct

from ..errors import BridgeError
from ..procs import Owned, fd_of

# struct seccomp_notif {u64 id; u32 pid; u32 flags; struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}}
_NOTIF = struct.Struct("<QIIiIQ6Q")
_RESP = struct.Struct("<QqiI")  # struct seccomp_notif_resp {u64 id; s64 val; s32 error; u32 flags}


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (ord("!") << 8) | nr


_RECV = _iowr(0, _NOTIF.size)
_SEND = _iowr(1, _RESP.size)
_ID_VALID = (1 << 30) | (8 << 16) | (ord("!") << 8) | 2
_CONTINUE = 1
_NO_NEW_PRIVS = 38
_SET_MODE_FILTER, _NEW_LISTENER = 1, 1 << 3
_RET_ALLOW, _RET_USER_NOTIF = 0x7FFF0000, 0x7FC00000

# architecture: (AUDIT_ARCH, bind, seccomp) system call numbers
_ARCH = {"x86_64": (0xC000003E, 49, 317), "aarch64": (0xC00000B7, 200, 277)}


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
    """The classic BPF filter: bind of this architecture goes to the listener, everything else runs."""
    arch, nr_bind, _ = _ARCH[machine or platform.machine()]
    ld, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    insns = [
        (ld, 0, 0, 4),            # 0: A = seccomp_data.arch
        (jeq, 0, 2, arch),        # 1: another ABI -> 4 (allow)
        (ld, 0, 0, 0),            # 2: A = seccomp_data.nr
        (jeq, 1, 0, nr_bind),     # 3: bind -> 5 (notify)
        (ret, 0, 0, _RET_ALLOW),  # 4
        (ret, 0, 0, _RET_USER_NOTIF),  # 5
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
    fd = libc.syscall(_ARCH[platform.machine()][2], _SET_MODE_FILTER, _NEW_LISTENER, ctypes.byref(prog))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp(SECCOMP_SET_MODE_FILTER): {os.strerror(err)}")
    return fd


def _launch(argv: list[str]) -> int:
    """``python -m archdsp_libvirt.audio.sockhook FD -- PROGRAM ARGS``: the filter, then the program."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m archdsp_libvirt.audio.sockhook FD -- PROGRAM [ARGS]", file=sys.stderr)
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


class Bind(Struct, frozen=True):
    """What the hook did with one bind: ``rebound`` (to master_ip), ``refused`` or ``passed``."""

    action: str
    asked: str
    bound: str | None = None
    error: str | None = None


def decide(family: int, host: str, port: int, master_ip: str, want_port: int) -> str:
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
    """Answers the bind notifications of one hooked process (a thread), as :func:`decide` says."""

    def __init__(self, listener: int, pid: int, master_ip: str, port: int, say=print):
        self.listener, self.pid, self.master_ip, self.port, self.say = listener, pid, master_ip, port, say
        self.binds: list[Bind] = []
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
            nid, _tid, _flags, _nr, _arch, _ip, *args = _NOTIF.unpack(buf)
            self._answer(nid, *self._handle(nid, args[0], args[1], args[2]))

    def _handle(self, nid: int, fd: int, addr: int, addrlen: int) -> tuple[int, int]:
        """(error, flags) of the answer to one bind."""
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
        action = decide(family, host, port, self.master_ip, self.port)
        if action == "pass":
            return 0, _CONTINUE
        if action == "refuse":
            self._note(Bind("refused", asked, error="only master_ip may be bound"))
            return -errno.EADDRNOTAVAIL, 0
        try:
            with socket.socket(fileno=fd_of(self.pid, fd)) as sock:
                sock.bind((self.master_ip, port))
        except OSError as e:
            self._note(Bind("refused", asked, error=f"bind {self.master_ip}:{port}: {e.strerror or e}"))
            return -(e.errno or errno.EADDRNOTAVAIL), 0
        self._note(Bind("rebound", asked, bound=f"{self.master_ip}:{port}"))
        return 0, 0

    def _note(self, b: Bind) -> None:
        self.binds.append(b)
        self.say(f"bind {b.asked}: {b.action}" + (f" to {b.bound}" if b.bound else f" ({b.error})"))

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
          say=print, timeout: float = 10.0) -> tuple[Owned, Hook]:
    """Start ``argv`` (in its own session, output to ``log``) under the bind hook."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "archdsp_libvirt.audio.sockhook", str(child.fileno()), "--", *argv],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, pass_fds=(child.fileno(),), env=env, cwd="/")
        child.close()
        parent.settimeout(timeout)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(parent, 200, 1)
        except (TimeoutError, OSError) as e:
            proc.kill()
            proc.wait(5)
            raise BridgeError(f"the bind hook did not start {argv[0]}: {e}") from None
        if not fds:
            proc.wait(5)
            raise BridgeError(f"the bind hook did not start {argv[0]}: {msg.decode(errors='replace')}")
        return Owned.of(proc.pid), Hook(fds[0], proc.pid, master_ip, port, say=say)
    finally:
        parent.close()
        child.close()


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
