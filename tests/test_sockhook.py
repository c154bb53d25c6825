"""The bind hook (audio/sockhook.py): where PipeWire's NETJACK2 manager listens, decided from outside.

The hook runs for real here: a child process of the test's own is started under the seccomp filter,
binds as PipeWire 1.4.2's manager binds (SO_REUSEADDR, INADDR_ANY, the port), and the test reads
where it listens from the kernel (/proc/net/udp, as ``ss -uln`` does).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from archdsp_libvirt.audio import pwqueue, sockhook

ROOT = Path(__file__).resolve().parents[1]

# The manager's make_announce_socket, then a socket of another port and an IPv6 wildcard of the port.
BINDER = """
import socket, sys, time
port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("0.0.0.0", port))
    print("announce", s.getsockname()[0], flush=True)
except OSError as e:
    print("announce refused", e.errno, flush=True)
other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
other.bind(("0.0.0.0", 0))
print("other", other.getsockname()[0], flush=True)
v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try:
    v6.bind(("::", port))
    print("v6 bound", flush=True)
except OSError as e:
    print("v6 refused", e.errno, flush=True)
print("done", flush=True)
time.sleep(30)
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(log: Path, text: str, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        body = log.read_text() if log.exists() else ""
        if text in body:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in {log}: {body!r}")


@pytest.fixture
def hooked(tmp_path):
    why = sockhook.available()
    if why:
        pytest.skip(f"the bind hook cannot run here: {why}")
    started = []

    def start(master_ip: str, port: int):
        log = tmp_path / "binder.log"
        said: list[str] = []
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc, hook = sockhook.spawn([sys.executable, "-c", BINDER, str(port)], log, master_ip, port, env=env,
                                    say=said.append)
        started.append((proc, hook))
        return proc, hook, wait_for(log, "done"), said

    yield start
    for proc, hook in started:
        proc.stop(timeout=5)
        hook.close()


def test_the_managers_wildcard_bind_lands_on_master_ip_only(hooked):
    port = free_port()
    proc, hook, out, said = hooked("127.0.0.1", port)
    # The kernel's table: the port is on 127.0.0.1 only; the other socket kept its wildcard.
    assert pwqueue.listening(proc.pid, port) == [f"127.0.0.1:{port}"]
    assert "announce 127.0.0.1" in out and "other 0.0.0.0" in out
    # An IPv6 wildcard of the port is refused: nothing listens on every address.
    assert f"v6 refused {errno.EADDRNOTAVAIL}" in out
    assert [b.action for b in hook.binds] == ["rebound", "refused"]
    assert said[0] == f"bind 0.0.0.0:{port}: rebound to 127.0.0.1:{port}"
    # A datagram to master_ip reaches the rebound socket.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.sendto(b"x" * 100, ("127.0.0.1", port))
    time.sleep(0.2)
    sock = next(s for s in pwqueue._udp_sockets(proc.pid, Path("/proc")) if s[2][4] == f"127.0.0.1:{port}")
    assert sock[2][2] > 0  # queued in the hooked process's socket


def test_a_master_ip_the_host_does_not_have_fails_the_bind(hooked):
    port = free_port()
    proc, hook, out, said = hooked("192.0.2.77", port)  # TEST-NET-1: on no interface
    assert f"announce refused {errno.EADDRNOTAVAIL}" in out  # the manager's load fails, as it should
    assert hook.binds[0].action == "refused" and "192.0.2.77" in hook.binds[0].error
    assert pwqueue.listening(proc.pid, port) == []


@pytest.mark.parametrize(("family", "host", "port", "master", "want"), [
    (socket.AF_INET, "0.0.0.0", 19000, "192.168.122.1", "rebind"),
    (socket.AF_INET, "0.0.0.0", 19001, "192.168.122.1", "pass"),     # another port
    (socket.AF_INET, "127.0.0.1", 19000, "192.168.122.1", "pass"),   # already one address
    (socket.AF_INET6, "::", 19000, "192.168.122.1", "refuse"),
    (socket.AF_INET, "0.0.0.0", 19000, "fd00::1", "refuse"),         # no IPv4 master to bind to
])
def test_decide(family, host, port, master, want):
    assert sockhook.decide(family, host, port, master, 19000) == want


def test_parse_sockaddr():
    raw4 = socket.AF_INET.to_bytes(2, sys.byteorder) + (19000).to_bytes(2, "big") + socket.inet_aton("10.1.2.3") + bytes(8)
    assert sockhook.parse_sockaddr(raw4) == (socket.AF_INET, "10.1.2.3", 19000)
    raw6 = (socket.AF_INET6.to_bytes(2, sys.byteorder) + (19000).to_bytes(2, "big") + bytes(4)
            + socket.inet_pton(socket.AF_INET6, "::") + bytes(4))
    assert sockhook.parse_sockaddr(raw6) == (socket.AF_INET6, "::", 19000)
    assert sockhook.parse_sockaddr(socket.AF_UNIX.to_bytes(2, sys.byteorder) + b"/run/x") is None
    assert sockhook.parse_sockaddr(b"\x02") is None


def test_the_filter_sends_only_bind_of_this_architecture():
    code = sockhook.program("x86_64")
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    assert len(insns) == 6
    assert int.from_bytes(insns[1][4:], "little") == 0xC000003E and int.from_bytes(insns[3][4:], "little") == 49
    assert int.from_bytes(sockhook.program("aarch64")[28:32], "little") == 200
