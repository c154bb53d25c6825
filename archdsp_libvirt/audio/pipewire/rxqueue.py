"""The receive queue of PipeWire's NETJACK2 manager, kept to the cycles a slave may have in flight.

PipeWire 1.4.2's manager reads at most one cycle of the slave's packets per graph cycle (the data
socket is re-armed only after the sink ran) and never drops a stale one. Each time the slave sends
two cycles between two sink runs (a guest that stalls and catches up, or the burst of a join), one
cycle stays in the socket for good: the round trip grows by a period each time until the socket's
buffer is full (~45 periods at 96 kHz / 128 frames: 60 ms). The module has no option for the
buffer's size (it asks for 30 cycles' worth).

The bridge's supervisor therefore bounds that socket's receive buffer (``SO_RCVBUF`` set through a
copy of the manager's descriptor, ``pidfd_getfd``): the kernel drops what arrives while the queue is
full, a stale backlog drains at a cycle per period, and the round trip stays in the budget's range.
The packets dropped are those of a slave that came late, which the manager would have played far
too late.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from msgspec import Struct

from ...procs import fd_of
from ..sockets import listening, parse_udp_table, udp_sockets  # noqa: F401  (rxqueue.listening: the tests' name)

HEADER = 48       # struct nj2_packet_header (packed)
IP_UDP = 64       # what JACK2 and the module reserve for the IP and UDP headers of a packet
MTU = 1500
# What a datagram of up to an MTU costs in a receive queue (the kernel's truesize), measured on Linux 6.18
# (README, PipeWire): from a guest through its tap (the tun driver), and through veth or loopback, which
# pass the sender's buffer (a 2 KiB slab).
TAP_PACKET = 1280
COPY_PACKET = 2304


class QueuedSocket(Struct, frozen=True):
    fd: int
    inode: int
    remote: str
    queued: int  # bytes of the receive queue in the kernel's accounting (``rx_queue`` of /proc/net/udp)
    drops: int = 0  # datagrams the kernel dropped because the queue was full


def data_sockets(pid: int, port: int, proc: Path = Path("/proc")) -> list[QueuedSocket]:
    """The manager's UDP sockets connected to a slave's ``port`` (one per slave), with their queues."""
    return [QueuedSocket(fd, inode, f"{row[0]}:{row[1]}", row[2], row[3])
            for fd, inode, row in udp_sockets(pid, proc) if row[1] == port]


def packet_cost(ifname: str | None, sysfs: Path = Path("/sys/class/net")) -> int:
    """The cost of one of the slave's packets arriving on ``ifname`` (master_ip's interface): a bridge of
    guests' taps (libvirt's virbr0) or a tap, else a copying device (veth, loopback) and its larger cost."""
    if ifname:
        dev = sysfs / ifname
        if (dev / "bridge").exists() or (dev / "tun_flags").exists():
            return TAP_PACKET
    return COPY_PACKET


def packets_per_cycle(period: int, channels: int, mtu: int = MTU) -> int:
    """The slave's packets in one cycle: a sync packet (JACK2 sends an MTU) and the audio, split as
    JACK2's float encoder splits it (sub-periods of a power of two frames that fit a packet)."""
    room = mtu - IP_UDP - HEADER
    sub = period
    while sub > 1 and sub * channels * 4 > room:
        sub //= 2
    return 1 + max(1, period // sub)


def bound_for(period: int, channels: int, network_latency: int, cost: int = COPY_PACKET) -> int:
    """The receive buffer for the manager's data socket: whole cycles, half a packet to spare.

    The manager leaves ``network_latency`` cycles queued (it reads a cycle only once it is that old),
    one more may stand behind them after the slave came late once, and one is arriving: ``L + 2``
    cycles. Linux takes a datagram only while it fits (or into an empty queue), so the cut falls between
    two cycles: a late cycle is dropped whole. A bound that cut inside a cycle would take a cycle's sync
    packet and drop its audio, every period."""
    return (network_latency + 2) * packets_per_cycle(period, channels) * cost + cost // 2


def set_receive_buffer(pid: int, fd: int, size: int) -> int:
    """Set ``SO_RCVBUF`` of process ``pid``'s descriptor ``fd``; returns what the kernel made of it
    (it doubles the value asked for, so half of ``size`` is asked). OSError when the kernel is
    older than 5.6 or this process may not trace ``pid``."""
    with socket.socket(fileno=fd_of(pid, fd)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(1, size // 2))
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


# A bound that cuts cycles the slave sent in time (a packet costs more than estimated) shows as loss in
# look after look: packets dropped in every period or every other. A guest's stalls drop a few cycles now
# and then. After STREAK looks in a row that each lost more than this share of the cycles, the bound is
# raised by a step, up to what PipeWire itself asks for.
STEADY_LOSS = 0.01
STREAK = 3
PIPEWIRE_BUFFER = 151440  # what the kernel makes of the module's own request at 96 kHz / 128, 2 channels


def lossy(dropped: int, seconds: float, cycles_per_second: float) -> bool:
    """Whether one look saw more loss than a guest's stalls make."""
    return seconds > 0 and dropped / seconds > STEADY_LOSS * cycles_per_second


def raised(bound: int, streak: int, step: int, ceiling: int = PIPEWIRE_BUFFER) -> int:
    """The bound after ``streak`` lossy looks in a row."""
    if streak < STREAK:
        return bound
    return min(max(ceiling, bound), bound + step)


class Bounds:
    """The bounds the supervisor keeps on the manager's sockets, one per slave, by socket inode."""

    def __init__(self, bound: int, step: int, cycles_per_second: float, say=print) -> None:
        self.bound, self.step, self.cycles_per_second, self.say = bound, step, cycles_per_second, say
        self.sockets: dict[int, dict] = {}

    def poll(self, pid: int, port: int, now: float) -> tuple[list[dict], str | None]:
        """Bound new sockets, raise the bound of one that drops steadily: the queues, and a problem."""
        queues, problem = [], None
        socks = data_sockets(pid, port)
        for gone in set(self.sockets) - {s.inode for s in socks}:  # a slave's pair the manager freed, or a
            del self.sockets[gone]                                  # manager that was restarted
        for sock in socks:
            seen = self.sockets.get(sock.inode)
            try:
                if seen is None:
                    seen = self.sockets[sock.inode] = {"bound": 0, "drops": sock.drops, "t": now, "raised": 0,
                                                        "streak": 0}
                    seen["bound"] = set_receive_buffer(pid, sock.fd, self.bound)
                    self.say(f"receive buffer of the manager's socket to {sock.remote} bounded to {seen['bound']} "
                             f"bytes (it held {sock.queued})")
                elif seen["bound"]:
                    lost = lossy(sock.drops - seen["drops"], now - seen["t"], self.cycles_per_second)
                    seen["streak"] = seen["streak"] + 1 if lost else 0
                    want = raised(seen["bound"], seen["streak"], self.step)
                    if want != seen["bound"]:
                        seen["bound"] = set_receive_buffer(pid, sock.fd, want)
                        seen["raised"] += 1
                        seen["streak"] = 0
                        self.say(f"the manager's socket to {sock.remote} dropped packets in {STREAK} looks in a "
                                 f"row: bound raised to {seen['bound']} bytes")
                    seen["drops"], seen["t"] = sock.drops, now
            except OSError as exc:
                seen["bound"] = 0
                problem = (f"the receive queue of PipeWire's manager is not bounded ({exc.strerror}): the round "
                           "trip grows with every stall of the guest (Linux >= 5.6 and root or the manager's "
                           "user needed)")
                self.say(problem)
            if not seen["bound"]:
                problem = problem or "the receive queue of PipeWire's manager is not bounded (see the bridge's log)"
            queues.append({"remote": sock.remote, "queued": sock.queued, "bound": seen["bound"] or None,
                           "drops": sock.drops, "raised": seen["raised"]})
        return queues, problem
