"""The bound on the receive queue of PipeWire's NETJACK2 manager (audio/rxqueue.py).

The mechanism is tested on real sockets of a process of the test's own on loopback: a process that
never reads (as the manager that reads one cycle per period, behind a burst), its socket found by
port through /proc, its receive buffer set from outside through pidfd_getfd.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archdsp_libvirt.audio.pipewire import rxqueue

UDP_SAMPLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  812: 0100A8C0:A7A7 EF7AA8C0:4A38 01 00000000:0001C200 00:00000000 00000000     0        0 931201 2 0000000000000000 79
 1207: 00000000:4A38 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 931150 2 0000000000000000 0
"""
UDP6_SAMPLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
   33: 00000000000000000000000001000000:8D2E 00000000000000000000000001000000:4A38 01 00000000:00000A00 00:00000000 00000000     0        0 4242 2 0000000000000000 3
"""


def test_parse_udp_table_reads_remote_queue_and_drops():
    rows = rxqueue.parse_udp_table(UDP_SAMPLE)
    # The manager's data socket in a run without a bound: 115,200 bytes queued (0x1C200), 79 drops.
    assert rows[931201] == ("192.168.122.239", 19000, 115200, 79, "192.168.0.1:42919")
    assert rows[931150] == ("0.0.0.0", 0, 0, 0, "0.0.0.0:19000")
    assert rxqueue.parse_udp_table(UDP6_SAMPLE)[4242] == ("::1", 19000, 2560, 3, "[::1]:36142")
    assert rxqueue.parse_udp_table("header only\n  1: short row\n") == {}


def test_the_packets_of_a_cycle():
    # JACK2's slave sends an MTU-sized sync packet, then the audio: 2 channels x 128 frames fit one packet;
    # 8 channels x 256 frames go as 8 sub-periods of 32 frames.
    assert rxqueue.packets_per_cycle(128, 2) == 2
    assert rxqueue.packets_per_cycle(128, 8) == 1 + 4
    assert rxqueue.packets_per_cycle(256, 8) == 1 + 8


def test_the_cost_of_a_packet_follows_the_masters_interface(tmp_path):
    for name, marker in (("virbr0", "bridge"), ("vnet3", "tun_flags"), ("veth0", None)):
        (tmp_path / name).mkdir()
        if marker:
            (tmp_path / name / marker).mkdir()
    assert rxqueue.packet_cost("virbr0", tmp_path) == rxqueue.packet_cost("vnet3", tmp_path) == rxqueue.TAP_PACKET
    assert rxqueue.packet_cost("veth0", tmp_path) == rxqueue.packet_cost(None, tmp_path) == rxqueue.COPY_PACKET


def test_a_datagram_on_loopback_costs_what_the_model_says():
    """COPY_PACKET is the kernel's count for the slave's datagrams (1,072 and 1,500 bytes) through a copying
    device: checked on this kernel, where a change would make the bound cut live cycles."""
    recv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    recv.bind(("127.0.0.1", 0))
    send = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    send.connect(recv.getsockname())
    try:
        for size in (rxqueue.HEADER + 128 * 2 * 4, rxqueue.MTU):
            send.send(b"x" * size)
            time.sleep(0.05)
            ino = os.fstat(recv.fileno()).st_ino
            cost = rxqueue.parse_udp_table(Path("/proc/net/udp").read_text())[ino][2]
            recv.recv(4096)
            assert cost <= rxqueue.COPY_PACKET, (size, cost)
    finally:
        recv.close()
        send.close()


def test_the_bound_is_whole_cycles():
    for cost in (rxqueue.TAP_PACKET, rxqueue.COPY_PACKET):
        for latency in (0, 1, 2):
            n = rxqueue.packets_per_cycle(128, 2)
            bound = rxqueue.bound_for(128, 2, latency, cost)
            # the cycles the manager leaves queued, one that stood behind them since the slave was late once,
            # and the one arriving fit ...
            assert (latency + 2) * n * cost <= bound
            # ... and not one packet more: Linux cuts between two cycles, never inside one
            assert bound < ((latency + 2) * n + 1) * cost


HOLDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.connect(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 75720)  # what PipeWire's manager asks for
print(s.fileno(), s.getsockname()[1], flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder():
    """A process holding a UDP socket connected to a sender's port, never reading it (the manager behind)."""
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(sender.getsockname()[1])], stdout=subprocess.PIPE,
                            text=True)
    try:
        fd, port = map(int, proc.stdout.readline().split())
        sender.connect(("127.0.0.1", port))
        yield proc.pid, fd, sender
    finally:
        proc.kill()
        proc.wait(timeout=10)
        sender.close()


def burst(sender, cycles):
    for _ in range(cycles):
        sender.send(b"s" * rxqueue.MTU)
        sender.send(b"a" * (rxqueue.HEADER + 128 * 2 * 4))


def queue_of(pid, port):
    socks = rxqueue.data_sockets(pid, port)
    assert len(socks) == 1, socks
    return socks[0]


def test_without_a_bound_a_burst_stays_queued(holder):
    pid, fd, sender = holder
    port = sender.getsockname()[1]
    assert queue_of(pid, port).fd == fd
    burst(sender, 20)
    time.sleep(0.2)
    q = queue_of(pid, port)
    assert q.drops == 0 and q.queued >= 20 * 2 * 1000  # every cycle of the burst waits to be read


def test_a_bounded_queue_keeps_whole_cycles_and_drops_the_rest(holder):
    pid, fd, sender = holder
    port = sender.getsockname()[1]
    bound = rxqueue.bound_for(128, 2, 0, rxqueue.COPY_PACKET)
    try:
        got = rxqueue.set_receive_buffer(pid, fd, bound)
    except OSError as exc:  # pragma: no cover - depends on the kernel
        pytest.skip(f"pidfd_getfd is not available here ({exc}): Linux >= 5.6 is needed")
    assert got == bound  # the kernel doubles what is asked: half of the bound is asked
    burst(sender, 20)
    time.sleep(0.2)
    q = queue_of(pid, port)
    assert q.drops > 0
    assert q.queued <= bound, q
    # whole cycles stayed (two: the one standing and the one arriving); the rest was dropped whole
    assert q.queued == 2 * rxqueue.packets_per_cycle(128, 2) * rxqueue.COPY_PACKET, q


def test_a_socket_of_another_port_is_not_taken(holder):
    pid, _fd, sender = holder
    assert rxqueue.data_sockets(pid, sender.getsockname()[1] + 1) == []
    assert rxqueue.data_sockets(2 ** 22 + 7, 19000) == []  # no such process


def test_listening_names_the_address_a_process_bound():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
        a.bind(("127.0.0.1", 0))
        b.bind(("0.0.0.0", 0))
        b.connect(a.getsockname())  # connected: not listening
        port = a.getsockname()[1]
        assert rxqueue.listening(os.getpid(), port) == [f"127.0.0.1:{port}"]
        assert rxqueue.listening(os.getpid(), b.getsockname()[1]) == []


def test_set_receive_buffer_says_why_it_cannot(holder):
    pid, _fd, _sender = holder
    with pytest.raises(OSError):
        rxqueue.set_receive_buffer(pid, 999, 5000)  # no such descriptor in that process
    with pytest.raises(OSError):
        rxqueue.set_receive_buffer(2 ** 22 + 7, 3, 5000)  # no such process


def test_a_bound_is_raised_on_loss_in_look_after_look_only():
    cps = 750.0  # 96 kHz / 128: 750 cycles a second
    # a bound cutting inside cycles lost every other one (380 packets a second, seen on the TCG guest's tap)
    assert rxqueue.lossy(380, 1.0, cps)
    # a guest's stall cut a burst of 7 cycles (14 packets) in a second: not more than a stall makes
    assert not rxqueue.lossy(7, 1.0, cps) and not rxqueue.lossy(0, 0.0, cps)
    assert rxqueue.raised(4480, rxqueue.STREAK - 1, 640) == 4480  # one lossy look could be a stall
    assert rxqueue.raised(4480, rxqueue.STREAK, 640) == 5120
    # never above what PipeWire asks for itself
    assert rxqueue.raised(rxqueue.PIPEWIRE_BUFFER - 100, rxqueue.STREAK, 640) == rxqueue.PIPEWIRE_BUFFER


def test_bounds_bound_a_new_socket_and_raise_it_on_steady_loss(holder):
    pid, fd, sender = holder
    port = sender.getsockname()[1]
    said = []
    bounds = rxqueue.Bounds(rxqueue.bound_for(128, 2, 0, rxqueue.COPY_PACKET), rxqueue.COPY_PACKET // 2, 10.0,
                            say=said.append)
    try:
        queues, problem = bounds.poll(pid, port, now=100.0)
    except OSError as exc:  # pragma: no cover - depends on the kernel
        pytest.skip(f"pidfd_getfd is not available here ({exc}): Linux >= 5.6 is needed")
    assert problem is None and queues[0]["bound"] == rxqueue.bound_for(128, 2, 0, rxqueue.COPY_PACKET)
    assert queues[0]["raised"] == 0 and "bounded to" in said[0]
    for look in range(rxqueue.STREAK):  # packets dropped in look after look, at 10 cycles a second
        burst(sender, 20)
        time.sleep(0.2)
        queues, _ = bounds.poll(pid, port, now=101.0 + look)
        assert queues[0]["raised"] == (1 if look == rxqueue.STREAK - 1 else 0), (look, queues)
    assert queues[0]["bound"] == rxqueue.bound_for(128, 2, 0, rxqueue.COPY_PACKET) + rxqueue.COPY_PACKET // 2
    assert "bound raised to" in said[-1]
    again, _ = bounds.poll(pid, port, now=110.0)  # nothing dropped since: the bound stays
    assert again[0]["raised"] == 1 and again[0]["bound"] == queues[0]["bound"]


def test_bounds_say_when_the_socket_cannot_be_bounded(holder, monkeypatch):
    pid, _fd, sender = holder

    def refuse(_pid, _fd, _size):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(rxqueue, "set_receive_buffer", refuse)
    queues, problem = rxqueue.Bounds(5000, 500, 750.0, say=lambda _m: None).poll(pid, sender.getsockname()[1], 1.0)
    assert queues[0]["bound"] is None and "not bounded (Operation not permitted)" in problem


def test_bounds_forget_a_socket_that_is_gone(holder):
    pid, _fd, sender = holder
    port = sender.getsockname()[1]
    bounds = rxqueue.Bounds(5000, 500, 750.0, say=lambda _m: None)
    try:
        bounds.poll(pid, port, 1.0)
    except OSError as exc:  # pragma: no cover - depends on the kernel
        pytest.skip(f"pidfd_getfd is not available here ({exc}): Linux >= 5.6 is needed")
    assert len(bounds.sockets) == 1
    assert bounds.poll(pid, port + 1, 2.0) == ([], None)  # no socket to that port any more
    assert bounds.sockets == {}
