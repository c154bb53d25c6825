"""What the join hook (:mod:`.sockhook`) decides, apart from how it intercepts the calls: which of a
slave's join packets make a new pair, are repeats, or would let a live pair go too soon (:class:`Joins`).
(Which binds are rebound is :func:`..bindhook.bind_action`.)

Pure decisions on addresses and clocks, so they are tested without seccomp.
"""

from __future__ import annotations


from msgspec import Struct

# A slave repeats its join packet each second until the manager answers (JACK2's SLAVE_INIT_TIMEOUT),
# and once per stray packet it hears meanwhile; a join packet this soon after an answered one from the
# same address is a repeat.
REPEAT_WINDOW = 3.0
QUICK, STRAY_REPEATS = 0.5, 20  # see Joins
# Live pairs to one slave address can be let go at most once in this many seconds (a join packet's source
# address is anyone's to write). Off (0) by default: at 10 s, a guest slave restarted within that time
# stayed out (ten restarts a second apart made two joins, and the TCG guest's round trip heard nothing),
# so a spoofed join can still make the VM's slave join again; Joins(let_go_every=...) sets a limit.
LET_GO_EVERY = 0.0
ADDRESSES_KEPT = 1024  # slave addresses Joins remembers at most (the oldest go first)


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
    so the slave that pair served is gone (a restart right after its join), and the join is new.

    A join that would let a live pair go (``live_inodes``: the manager's sockets to that address) is
    ``held`` (refused) when a live pair to that address was let go less than ``let_go_every`` ago.

    Bounded: an address is forgotten once nothing it remembers counts any more (its last pair older
    than the window, its last let-go older than ``let_go_every``), and at most :data:`ADDRESSES_KEPT`
    addresses are kept. The counts (``new``, ``let_go``, ``refused``, ``held``) are counters."""

    def __init__(self, window: float = REPEAT_WINDOW, let_go_every: float = LET_GO_EVERY,
                 kept: int = ADDRESSES_KEPT):
        self.window, self.let_go_every, self.kept = window, let_go_every, kept
        self.accepted: dict[str, Pair] = {}  # by the slave's address, oldest first
        self.let_go_at: dict[str, float] = {}  # when a live pair to that address was last let go
        self.new = self.let_go = self.refused = self.held = 0

    def decide(self, remote: str, now: float, live_inodes: set[int]) -> str:
        """``new``, ``repeat`` (refuse it), ``stray`` (new: the last pair streams to a joining slave) or
        ``held`` (refuse it: a live pair to that address was let go less than ``let_go_every`` ago)."""
        last = self.accepted.get(remote)
        if not last or last.inode not in live_inodes or now - last.made >= self.window:
            kind = "new"
        else:
            if now - last.last_packet < QUICK:
                last.quick_repeats += 1
            last.last_packet = now
            if last.quick_repeats <= STRAY_REPEATS:
                self.refused += 1
                return "repeat"
            kind = "stray"
        if live_inodes and now - self.let_go_at.get(remote, -float("inf")) < self.let_go_every:
            self.held += 1
            return "held"
        return kind

    def accept(self, remote: str, now: float, inode: int, closed: int = 0) -> None:
        """The manager made a pair for ``remote`` at ``now``; ``closed`` live pairs to it were let go."""
        self.new += 1
        self.let_go += closed
        if closed:
            self.let_go_at.pop(remote, None)
            self.let_go_at[remote] = now
        self.accepted.pop(remote, None)
        self.accepted[remote] = Pair(now, inode, now)
        self.prune(now)

    def prune(self, now: float) -> None:
        """Forget what no longer counts, and the oldest addresses beyond :attr:`kept`."""
        for table, age in ((self.accepted, self.window), (self.let_go_at, self.let_go_every)):
            while table:
                first = next(iter(table))
                made = table[first].made if table is self.accepted else table[first]
                if now - made < age and len(table) <= self.kept:
                    break
                del table[first]

    def counts(self) -> dict:
        return {"new": self.new, "let_go": self.let_go, "refused": self.refused, "held": self.held}
