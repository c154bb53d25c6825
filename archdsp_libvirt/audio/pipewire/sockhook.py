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

The filter, its launcher and the bind answers are :mod:`..bindhook`'s (JACK2's jackd runs under the same
bind hook); :class:`Hook` here adds the answers to ``connect``, and :func:`spawn` starts the manager under it.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

from ...procs import Owned, fd_of
from .. import bindhook
from ..bindhook import _CONTINUE, Event, available, parse_sockaddr, program  # noqa: F401  (the hook's API here)
from . import rxqueue
from .joins import REPEAT_WINDOW, Joins


class Hook(bindhook.Hook):
    """Answers the bind and connect notifications of the manager's process (a thread)."""

    CONNECT = True

    def __init__(self, listener: int, pid: int, master_ip: str, port: int, say=print,
                 window: float = REPEAT_WINDOW):
        self.joins = Joins(window)
        super().__init__(listener, pid, master_ip, port, say=say)

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



def spawn(argv: list[str], log: Path, master_ip: str, port: int, env: dict[str, str] | None = None,
          say=print, timeout: float = 10.0, window: float = REPEAT_WINDOW) -> tuple[Owned, Hook]:
    """Start ``argv`` (the manager; in its own session, output to ``log``) under the hook."""
    return bindhook.spawn(argv, log, master_ip, port, env=env, say=say, timeout=timeout, hook=Hook, window=window)
