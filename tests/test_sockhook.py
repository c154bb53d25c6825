"""The bind hook (audio/bindhook.py, and PipeWire's join answers in audio/pipewire/sockhook.py): where PipeWire's NETJACK2 manager listens, decided from outside.

The hook runs for real here: a child process of the test's own is started under the seccomp filter,
binds as PipeWire 1.4.2's manager binds (SO_REUSEADDR, INADDR_ANY, the port), and the test reads
where it listens from the kernel (/proc/net/udp, as ``ss -uln`` does).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from archdsp_libvirt.audio import sockets
from archdsp_libvirt.audio import bindhook
from archdsp_libvirt.audio.pipewire import joins, rxqueue, sockhook

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
def run_hooked(tmp_path):
    """``run_hooked(name, script, *args, master_ip=, port=, spawn=sockhook.spawn, **hook_args)``: run a Python
    script under the hook, output to ``tmp_path/NAME.log``; (process, hook, log, what the hook said). Each is
    stopped afterwards, with its session (a child it forked goes too)."""
    why = bindhook.available()
    if why:
        pytest.skip(f"the bind hook cannot run here: {why}")
    started = []

    def run(name: str, script: str, *args, master_ip: str = "127.0.0.1", port: int, spawn=sockhook.spawn,
            **hook_args):
        log, said = tmp_path / f"{name}.log", []
        proc, hook = spawn([sys.executable, "-c", script, *map(str, args)], log, master_ip, port,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), say=said.append, **hook_args)
        started.append((proc, hook))
        return proc, hook, log, said

    yield run
    for proc, hook in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session (spawn): a forked child goes with it
        except ProcessLookupError:
            pass
        proc.stop(timeout=5)
        hook.close()


@pytest.fixture
def hooked(run_hooked):
    def start(master_ip: str, port: int):
        proc, hook, log, said = run_hooked("binder", BINDER, port, master_ip=master_ip, port=port)
        return proc, hook, wait_for(log, "done"), said

    return start


def test_the_managers_wildcard_bind_lands_on_master_ip_only(hooked):
    port = free_port()
    proc, hook, out, said = hooked("127.0.0.1", port)
    # The kernel's table: the port is on 127.0.0.1 only; the other socket kept its wildcard.
    assert rxqueue.listening(proc.pid, port) == [f"127.0.0.1:{port}"]
    assert "announce 127.0.0.1" in out and "other 0.0.0.0" in out
    # An IPv6 wildcard of the port is refused: nothing listens on every address.
    assert f"v6 refused {errno.EADDRNOTAVAIL}" in out
    assert [(e.call, e.action) for e in hook.events] == [("bind", "rebound"), ("bind", "refused")]
    assert said[0] == f"bind 0.0.0.0:{port}: rebound to 127.0.0.1:{port}"
    # A datagram to master_ip reaches the rebound socket.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        tx.sendto(b"x" * 100, ("127.0.0.1", port))
    time.sleep(0.2)
    sock = next(s for s in rxqueue.udp_sockets(proc.pid) if s[2][4] == f"127.0.0.1:{port}")
    assert sock[2][2] > 0  # queued in the hooked process's socket


def test_a_master_ip_the_host_does_not_have_fails_the_bind(hooked):
    port = free_port()
    proc, hook, out, said = hooked("192.0.2.77", port)  # TEST-NET-1: on no interface
    assert f"announce refused {errno.EADDRNOTAVAIL}" in out  # the manager's load fails, as it should
    assert hook.events[0].action == "refused" and "192.0.2.77" in hook.events[0].detail
    assert rxqueue.listening(proc.pid, port) == []


@pytest.mark.parametrize(("family", "host", "port", "master", "want"), [
    (socket.AF_INET, "0.0.0.0", 19000, "192.168.122.1", "rebind"),
    (socket.AF_INET, "0.0.0.0", 19001, "192.168.122.1", "pass"),     # another port
    (socket.AF_INET, "127.0.0.1", 19000, "192.168.122.1", "pass"),   # already one address
    (socket.AF_INET6, "::", 19000, "192.168.122.1", "refuse"),
    (socket.AF_INET, "0.0.0.0", 19000, "fd00::1", "refuse"),         # no IPv4 master to bind to
])
def test_bind_action(family, host, port, master, want):
    assert bindhook.bind_action(family, host, port, master, 19000) == want


def test_parse_sockaddr():
    raw4 = socket.AF_INET.to_bytes(2, sys.byteorder) + (19000).to_bytes(2, "big") + socket.inet_aton("10.1.2.3") + bytes(8)
    assert sockhook.parse_sockaddr(raw4) == (socket.AF_INET, "10.1.2.3", 19000)
    raw6 = (socket.AF_INET6.to_bytes(2, sys.byteorder) + (19000).to_bytes(2, "big") + bytes(4)
            + socket.inet_pton(socket.AF_INET6, "::") + bytes(4))
    assert sockhook.parse_sockaddr(raw6) == (socket.AF_INET6, "::", 19000)
    assert sockhook.parse_sockaddr(socket.AF_UNIX.to_bytes(2, sys.byteorder) + b"/run/x") is None
    assert sockhook.parse_sockaddr(b"\x02") is None


def test_the_filter_sends_only_bind_and_connect_of_this_architecture():
    code = sockhook.program("x86_64")
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    assert len(insns) == 7
    assert int.from_bytes(insns[1][4:], "little") == 0xC000003E
    assert [int.from_bytes(i[4:], "little") for i in insns[3:5]] == [49, 42]  # bind, connect
    aarch64 = sockhook.program("aarch64")
    assert [int.from_bytes(aarch64[o:o + 4], "little") for o in (28, 36)] == [200, 203]


# As the manager makes a pair for each join packet: a UDP socket connected to the slave's address. Then a
# TCP connect and a Unix one, which the hook lets through.
JOINER = """
import errno, select, socket, sys, time
slave = ("127.0.0.1", int(sys.argv[1]))

def pair():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(slave)
        return s
    except OSError as e:
        print("refused", e.errno, flush=True)
        return None

first = pair()
print("first", first is not None, flush=True)
again = pair()                       # the same join's packet again, at once
print("again", again is not None, flush=True)
time.sleep(float(sys.argv[2]))       # past the window: a new slave at that address
second = pair()
print("second", second is not None, flush=True)
p = select.poll(); p.register(first, select.POLLIN)
ev = p.poll(1000)
print("first hup", bool(ev and ev[0][1] & select.POLLHUP), flush=True)
p = select.poll(); p.register(second, select.POLLIN)
print("second hup", bool(p.poll(0)), flush=True)
t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    t.connect(("127.0.0.1", int(sys.argv[3])))
    print("tcp connected", flush=True)
except OSError as e:
    print("tcp", e.errno, flush=True)
print("done", flush=True)
time.sleep(30)
"""


def test_a_repeated_join_is_refused_and_a_new_slave_lets_the_old_pair_go(run_hooked):
    slave_port, window = free_port(), 0.5
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(1)
        _proc, hook, log, said = run_hooked("joiner", JOINER, slave_port, window * 2, tcp.getsockname()[1], port=1,
                                            window=window)
        out = wait_for(log, "done")
    assert "first True" in out
    assert f"refused {errno.ECONNREFUSED}" in out and "again False" in out  # the repeat: no second pair
    assert "second True" in out and "first hup True" in out and "second hup False" in out
    assert "tcp connected" in out  # not a pair: untouched
    assert [(e.call, e.action, e.closed) for e in hook.events] == [("join", "new", 0), ("join", "repeat", 0),
                                                                   ("join", "new", 1)]
    assert said[1].startswith(f"join 127.0.0.1:{slave_port}: repeat (a join packet again within 0.5 s")
    assert said[0] == f"join 127.0.0.1:{slave_port}: new (no older pair)"
    assert said[2] == f"join 127.0.0.1:{slave_port}: new (1 older pair(s) to that address let go)"


def test_joins_decide():
    j = joins.Joins(window=3.0)
    a = "10.0.0.2:19000"
    assert j.decide(a, 100.0, set()) == "new"
    j.accept(a, 100.0, 77)
    assert j.decide(a, 101.0, {77}) == "repeat"     # a second later: the slave did not hear the answer yet
    assert j.decide(a, 101.0, set()) == "new"       # that pair is gone: a join again
    assert j.decide(a, 103.5, {77}) == "new"        # past the window: a new slave
    assert j.decide("10.0.0.3:19000", 101.0, {77}) == "new"  # another address
    assert j.refused == 1


def test_a_flood_of_repeats_means_the_last_pair_streams_to_a_new_slave():
    j = joins.Joins(window=3.0)
    a = "10.0.0.2:19000"
    j.accept(a, 100.0, 77)
    # A slave restarted right after its join hears the old pair's packets and answers each with a join
    # packet: a handful in a row is a new slave's in-flight strays (refused), many is a pair that streams.
    kinds = [j.decide(a, 100.1 + k * 0.002, {77}) for k in range(joins.STRAY_REPEATS + 2)]
    assert kinds[:joins.STRAY_REPEATS] == ["repeat"] * joins.STRAY_REPEATS
    assert kinds[-1] == "stray"
    # Repeats a second apart (a slow answer) never count as a flood.
    j.accept(a, 200.0, 78)
    assert {j.decide(a, 200.0 + k * 0.1, {78}) for k in range(1, 3)} == {"repeat"}  # 0.1 s after the join
    assert [j.decide(a, 200.2 + k * 1.0, {78}) for k in range(1, 3)] == ["repeat", "repeat"]


# ---- the hook fails closed, and decides by the process that calls -------------------------------------

# The manager's wildcard bind of its port, made by: the process itself, a thread of it, a child it forked,
# and an AF_INET6 socket with the IPv4-mapped wildcard. Each prints what the kernel answered.
CALLERS = """
import os, socket, sys, threading, time
port, who = int(sys.argv[1]), sys.argv[2]

def wildcard(tag, family=socket.AF_INET, host="0.0.0.0"):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        print(tag, "bound", s.getsockname()[0], flush=True)
        return s
    except OSError as e:
        print(tag, "refused", e.errno, flush=True)
        s.close()

kept = []
if who == "self":
    kept.append(wildcard("self"))
elif who == "thread":
    t = threading.Thread(target=lambda: kept.append(wildcard("thread")))
    t.start(); t.join()
elif who == "child":
    pid = os.fork()
    if pid == 0:
        s = wildcard("child")
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.1", 0))   # another port: the child's other binds go on
        print("child other", other.getsockname()[0], flush=True)
        print("done", flush=True)
        time.sleep(30)
        os._exit(0)
elif who == "mapped":
    kept.append(wildcard("mapped", socket.AF_INET6, "::ffff:0.0.0.0"))
if who != "child":
    print("done", flush=True)
time.sleep(30)
"""


@pytest.fixture
def caller(run_hooked):
    def start(who: str, port: int):
        proc, hook, log, said = run_hooked(who, CALLERS, port, who, port=port)
        return proc, hook, wait_for(log, "done"), said

    return start


def _wildcards(port: int) -> list[str]:
    """Sockets of ``port`` on every address, anywhere in this network namespace (the kernel's table)."""
    return [a for a in sockets.bound(port) if a.rsplit(":", 1)[0] in ("0.0.0.0", "[::]", "[::ffff:0.0.0.0]")]


def test_a_handler_that_raises_refuses_the_bind(caller, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("a bug in the decision")

    monkeypatch.setattr(bindhook, "bind_action", broken)
    port = free_port()
    proc, _hook, out, said = caller("self", port)
    assert f"self refused {errno.EPERM}" in out  # fails closed: the wildcard is never bound
    assert _wildcards(port) == [] and rxqueue.listening(proc.pid, port) == []
    assert any("refused (EPERM)" in m and "RuntimeError: a bug in the decision" in m for m in said)


def test_an_unreadable_memory_refuses_the_bind(caller, monkeypatch):
    real_open = open

    def no_mem(path, *a, **k):
        if str(path).endswith("/mem"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(bindhook, "open", no_mem, raising=False)  # the module's open, not the builtin
    port = free_port()
    proc, _hook, out, said = caller("self", port)
    assert f"self refused {errno.EPERM}" in out
    assert _wildcards(port) == [] and rxqueue.listening(proc.pid, port) == []
    assert any("refused (EPERM)" in m and "Permission denied" in m for m in said)


def test_a_forked_childs_bind_of_the_port_is_refused(caller):
    port = free_port()
    proc, hook, out, _said = caller("child", port)
    assert f"child refused {errno.EPERM}" in out
    assert "child other 127.0.0.1" in out  # another port: as before
    assert _wildcards(port) == []
    assert [(e.call, e.action) for e in hook.events] == [("bind", "refused")]
    assert "not the hooked process" in hook.events[0].detail


def test_a_thread_of_the_manager_is_the_manager(caller):
    port = free_port()
    proc, hook, out, _said = caller("thread", port)
    assert "thread bound 127.0.0.1" in out
    assert rxqueue.listening(proc.pid, port) == [f"127.0.0.1:{port}"]
    assert [(e.call, e.action) for e in hook.events] == [("bind", "rebound")]


def test_the_ipv4_mapped_wildcard_is_refused(caller):
    port = free_port()
    proc, _hook, out, _said = caller("mapped", port)
    assert f"mapped refused {errno.EADDRNOTAVAIL}" in out
    assert _wildcards(port) == [] and rxqueue.listening(proc.pid, port) == []


@pytest.mark.parametrize(("family", "host", "manager", "want"), [
    (socket.AF_INET6, "::ffff:0.0.0.0", True, "refuse"),
    (socket.AF_INET6, "::ffff:127.0.0.1", True, "pass"),
    (socket.AF_INET6, "::", True, "refuse"),
    (socket.AF_INET, "0.0.0.0", False, "deny"),      # a child of the manager: not its port at all
    (socket.AF_INET, "127.0.0.1", False, "deny"),
])
def test_bind_action_of_the_mapped_wildcard_and_of_children(family, host, manager, want):
    assert bindhook.bind_action(family, host, 19000, "192.168.122.1", 19000, manager) == want
    assert bindhook.bind_action(family, host, 19001, "192.168.122.1", 19000, manager) == "pass"


def test_thread_group(tmp_path):
    assert bindhook.thread_group(os.getpid()) == os.getpid()
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "status").write_text("Name:\tx\nTgid:\t4\nPid:\t5\n")
    assert bindhook.thread_group(5, tmp_path) == 4
    with pytest.raises(OSError):
        bindhook.thread_group(6, tmp_path)


# ---- bounded: Hook.events and Joins ---------------------------------------------------------------------

def test_hook_events_are_bounded_and_the_counts_are_counters():
    r, w = os.pipe()  # a listener that never notifies
    hook = sockhook.Hook(r, os.getpid(), "127.0.0.1", 1, say=lambda _m: None)
    try:
        for k in range(5000):
            hook.joins.accept(f"10.0.0.{k % 200}:{k}", float(k), k, closed=1)
            hook._note(bindhook.Event("join", "new", f"10.0.0.{k % 200}:{k}", closed=1))
        assert len(hook.events) <= bindhook.EVENTS_KEPT
        assert hook.events[-1].asked == "10.0.0.199:4999"
        assert hook.counts() == {"new": 5000, "let_go": 5000, "refused": 0, "held": 0}
    finally:
        hook.close()
        os.close(w)


def test_joins_forget_old_addresses_and_keep_a_bounded_number():
    j = joins.Joins(window=3.0, let_go_every=10.0, kept=100)
    for k in range(10_000):  # one join a second from always another address: only the recent ones count
        j.accept(f"10.0.{k // 256}.{k % 256}:19000", float(k), k, closed=1)
    assert len(j.accepted) <= 3 and len(j.let_go_at) <= 10
    for k in range(10_000):  # a burst from many addresses at one instant: the oldest go
        j.accept(f"10.1.{k // 256}.{k % 256}:19000", 20_000.0, k)
    assert len(j.accepted) <= 100 and len(j.let_go_at) <= 100
    assert j.counts()["new"] == 20_000


# ---- rate-limited let-go (fake clock) -------------------------------------------------------------------

def test_a_live_pair_is_let_go_at_most_once_per_interval():
    j = joins.Joins(window=3.0, let_go_every=10.0)
    vm = "192.168.122.10:19000"
    assert j.decide(vm, 100.0, set()) == "new"   # the VM's first join: nothing to let go
    j.accept(vm, 100.0, 77)
    assert j.decide(vm, 104.0, {77}) == "new"    # a new slave there, after the window: let the pair go
    j.accept(vm, 104.0, 78, closed=1)
    # Join packets with the VM's source address (anyone's to write) while its pair streams: held back.
    assert [j.decide(vm, t, {78}) for t in (107.5, 110.0, 113.9)] == ["held"] * 3
    assert j.decide(vm, 114.0, {78}) == "new"    # the interval is over: a new slave is believed again
    assert j.decide(vm, 108.0, set()) == "new"   # no live pair to that address: never held
    assert j.decide("192.168.122.11:19000", 108.0, {99}) == "new"  # per address
    assert j.counts() == {"new": 2, "let_go": 1, "refused": 0, "held": 3}


def test_a_flood_of_strays_right_after_a_let_go_is_held():
    j = joins.Joins(window=3.0, let_go_every=10.0)
    a = "10.0.0.2:19000"
    j.accept(a, 100.0, 77, closed=1)
    kinds = [j.decide(a, 100.1 + k * 0.002, {77}) for k in range(joins.STRAY_REPEATS + 2)]
    assert kinds[-1] == "held"  # a stray would let the pair go: not twice in 10 s
    j2 = joins.Joins(window=3.0, let_go_every=10.0)
    j2.accept(a, 100.0, 77)     # the first pair to that address: its strays may let it go (a restart)
    kinds = [j2.decide(a, 100.1 + k * 0.002, {77}) for k in range(joins.STRAY_REPEATS + 2)]
    assert kinds[-1] == "stray"


# ---- the bind-only hook (jackd's): bind answered, connect never handed over ---------------------------

BIND_CONNECT = """
import socket, sys, time
port, peer = int(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
print("bound", s.getsockname()[0], flush=True)
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.1", peer))
print("connected", flush=True)
go = sys.argv[3]
for _ in range(300):  # then, once told, the same bind again (as a reloaded master does)
    try:
        open(go).close()
        break
    except OSError:
        time.sleep(0.05)
s.close()
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", port))
print("again", s.getsockname()[0], flush=True)
time.sleep(30)
"""


def test_the_bind_only_filter_hands_over_bind_and_no_connect():
    code = bindhook.program("x86_64", connect=False)
    insns = [code[i:i + 8] for i in range(0, len(code), 8)]
    assert len(insns) == 6
    assert 42 not in [int.from_bytes(i[4:], "little") for i in insns]  # no connect
    assert int.from_bytes(insns[3][4:], "little") == 49 and insns[3][2] == 1  # bind -> notify
    assert bindhook.program("x86_64") == sockhook.program("x86_64")  # the join hook's: both calls


def test_the_bind_only_hook_rebinds_and_lets_connect_run_unasked(run_hooked, tmp_path):
    port, peer = free_port(), free_port()
    go = tmp_path / "go"
    proc, hook, log, said = run_hooked("bc", BIND_CONNECT, port, peer, go, port=port, spawn=bindhook.spawn)
    out = wait_for(log, "connected")
    assert "bound 127.0.0.1" in out
    assert rxqueue.listening(proc.pid, port) == [f"127.0.0.1:{port}"]
    assert [(e.call, e.action) for e in hook.events] == [("bind", "rebound")]
    # the listener handed to another holder (as the bridge hands jackd's to its supervisor) keeps answering
    second = bindhook.Hook(os.dup(hook.listener), proc.pid, "127.0.0.1", port, say=said.append)
    try:
        hook.close()
        go.touch()
        assert "again 127.0.0.1" in wait_for(log, "again")
        assert [(e.call, e.action) for e in second.events] == [("bind", "rebound")]
    finally:
        second.close()
