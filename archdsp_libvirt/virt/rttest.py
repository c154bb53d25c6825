"""In-guest scheduling latency: cyclictest (Debian's rt-tests) on the guest's vCPU while the audio runs.

The command runs through the QEMU guest agent (``guest-exec``, :mod:`.agent`) where one answers;
otherwise, when the config forwards a host port to the guest's SSH port, over SSH, else through the
guest's serial console (a shell there, as the demo guest has with ``archdsp.shell=1``). The result's
``via`` (and ``channel``) says which: ``guest-agent``, ``ssh`` or ``console``.
The result is set against the period budget: a wake-up later than one period is a missed cycle.
"""

from __future__ import annotations

import re
import subprocess

from msgspec import Struct, structs

from ..config import DspConfig
from ..config.paths import write_output
from ..errors import AgentUnavailable, ArchdspError
from ..host.accel import TCG_CAUSE
from ..procs import child_env

BEGIN = "ARCHDSP-RT-BEGIN"
END = re.compile(r"ARCHDSP-RT-END rc=(\d+)")
HIST_BUCKETS_US = 2000
PRIORITY = 90  # above the guest's jackd (archdsp.rtprio, 70) and its IRQ threads (75): the best case a thread sees
HOW_TO_ADD = ("cyclictest is not in the guest: add Debian's rt-tests (apt-get install rt-tests), or on "
              "ArchibaldOS/NixOS environment.systemPackages = [ pkgs.rt-tests ]; the demo guest "
              "(scripts/build-dsp-guest) carries it")


CHANNEL_NAMES = {"guest-agent": "through the QEMU guest agent", "ssh": "over ssh", "console": "on the serial console"}


class RtResult(Struct, frozen=True):
    samples: int
    min_us: int
    avg_us: int
    max_us: int
    overflows: int
    histogram: tuple[tuple[int, int], ...]  # (µs, count), counts > 0 only
    seconds: float
    budget_us: float
    verdict: str
    holds: bool
    via: str  # the channel: "guest-agent", "ssh" or "console"
    accelerator: str | None = None  # "kvm" or "tcg", from the running domain's definition; None: unknown

    def as_dict(self) -> dict:
        d = structs.asdict(self)
        d["channel"] = self.via
        d["histogram"] = [list(b) for b in self.histogram]
        return d


def command(seconds: float, interval_us: int = 1000) -> str:
    """The shell line typed into the guest: markers (written so the echoed line does not match them),
    cyclictest on CPU 0 (the vCPU) with a histogram, its empty buckets dropped."""
    return (f"printf 'ARCHDSP-RT\\055BEGIN\\n'; cyclictest -m -q -p {PRIORITY} -t 1 -a 0 -i {interval_us} "
            f"-D {max(1, round(seconds))} -h {HIST_BUCKETS_US} 2>&1 | awk '!/^[0-9]+([ \\t]+0+)+[ \\t]*$/'; "
            "printf 'ARCHDSP-RT\\055END rc=%s\\n' $?")


def _summary(text: str, name: str) -> int | None:
    m = re.search(rf"^# {name}:\s*(\d+)", text, re.M)
    return int(m.group(1)) if m else None


def parse(output: str, seconds: float, budget_us: float, via: str, accelerator: str | None = None) -> RtResult:
    """cyclictest's histogram output (``-h``, ``-q``) between the markers -> :class:`RtResult`."""
    start = output.rfind(BEGIN)
    body = output[start + len(BEGIN):] if start >= 0 else output
    end = END.search(body)
    if end:
        body = body[:end.start()]
    body = body.replace("\r", "")
    if re.search(r"cyclictest: (not found|No such file)", body):
        raise ArchdspError(HOW_TO_ADD)
    hist = tuple((int(a), int(b)) for a, b in re.findall(r"^(\d+)\s+(\d+)\s*$", body, re.M) if int(b))
    mins, avgs, maxs = (_summary(body, n) for n in ("Min Latencies", "Avg Latencies", "Max Latencies"))
    total = _summary(body, "Total")
    overflows = _summary(body, "Histogram Overflows") or 0
    if total is None or maxs is None or mins is None or avgs is None:
        tail = " / ".join(ln for ln in body.strip().splitlines()[-3:]) or "(nothing)"
        raise ArchdspError(f"cyclictest in the guest printed no histogram summary: {tail}")
    holds = maxs <= budget_us
    verdict = (f"max {maxs} us {'<=' if holds else '>'} the period budget {budget_us:.0f} us: "
               + ("every wake-up came within one period" if holds else
                  "a thread in the guest woke more than a period late: the audio cannot hold this period here"))
    if not holds and accelerator == "tcg":
        verdict += f"; cause: {TCG_CAUSE}"
    return RtResult(samples=total, min_us=mins, avg_us=avgs, max_us=maxs, overflows=overflows, histogram=hist,
                    seconds=seconds, budget_us=round(budget_us, 1), verdict=verdict, holds=holds, via=via,
                    accelerator=accelerator)


def budget_us(cfg: DspConfig) -> float:
    nj = cfg.netjack
    return nj.buffer_size * 1e6 / nj.sample_rate


def ssh_port(cfg: DspConfig) -> int | None:
    """The host port forwarded to the guest's SSH port, if the config has one."""
    net = cfg.network
    if not net.enable:
        return None
    return next((h for h, g in net.forwards if g == 22), None)


def run(cfg: DspConfig, session, seconds: float, force: bool = False, ssh_user: str = "root") -> RtResult:
    """Run cyclictest in ``cfg``'s running guest for ``seconds`` and parse it."""
    from .inspect import accelerator

    try:
        accel = accelerator(session, cfg.name)
    except ArchdspError:  # not defined: the console or ssh says what is wrong
        accel = None
    line = command(seconds)
    from . import agent

    try:
        r = agent.sh(session, cfg.name, line, timeout=seconds + 30)
    except AgentUnavailable:
        pass  # the other channels below
    else:
        return parse(r.out + r.err, seconds, budget_us(cfg), agent.VIA, accel)
    port = ssh_port(cfg)
    if port is not None:
        argv = ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
                "-o", "ConnectTimeout=10", f"{ssh_user}@{cfg.network.hostfwd_address}", line]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                                  env=child_env(keep=("SSH_AUTH_SOCK",)))
        except subprocess.TimeoutExpired:
            raise ArchdspError(f"cyclictest over ssh (port {port}) did not finish within {seconds + 60:g} s") from None
        if proc.returncode == 255:
            raise ArchdspError(f"ssh to the guest (127.0.0.1:{port}) failed: {proc.stderr.strip()[-200:]}")
        return parse(proc.stdout + proc.stderr, seconds, budget_us(cfg), "ssh", accel)
    from .console import expect

    matched, seen = expect(session, cfg.name, END.pattern, seconds + 60, force=force,
                           send=b"\n" + line.encode() + b"\n")
    if not matched:
        tail = seen.strip().splitlines()[-2:] if seen.strip() else ["(no output)"]
        raise ArchdspError(
            f"no answer from a shell on {cfg.name}'s console within {seconds + 60:g} s (last: {' / '.join(tail)}): "
            "the guest needs its QEMU guest agent (" + agent.HOW_TO_ADD + "), a shell on its serial console "
            "(the demo guest: archdsp.shell=1 in boot.cmdline) or a port forward to its SSH port "
            "(network.hostfwd = {\"2222\" = 22})")
    return parse(seen, seconds, budget_us(cfg), "console", accel)


def format_result(r: RtResult, bars: int = 12) -> str:
    lines = [f"cyclictest in the guest ({CHANNEL_NAMES.get(r.via, r.via)}, {r.seconds:g} s, 1 thread on the vCPU, SCHED_FIFO {PRIORITY}, "
             f"1 ms interval" + (f", accelerator {r.accelerator}" if r.accelerator else "") + ")",
             f"samples {r.samples}   min {r.min_us} us   avg {r.avg_us} us   max {r.max_us} us"
             + (f"   overflows (> {HIST_BUCKETS_US} us) {r.overflows}" if r.overflows else ""),
             "histogram (us: count):"]
    hist = list(r.histogram)
    if len(hist) > bars:  # the busiest buckets and the tail
        keep = sorted(sorted(hist, key=lambda b: -b[1])[:bars - 3] + hist[-3:])
        hist = sorted(set(keep))
    peak = max((c for _, c in hist), default=1)
    for us, count in hist:
        lines.append(f"  {us:5d} {count:8d} {'#' * max(1, round(30 * count / peak))}")
    lines.append(("OK: " if r.holds else "TOO LATE: ") + r.verdict)
    return "\n".join(lines) + "\n"


def plot(r: RtResult, path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    xs = [us for us, _ in r.histogram]
    ys = [c for _, c in r.histogram]
    ax.bar(xs, ys, width=max(1.0, (max(xs, default=1) - min(xs, default=0)) / 200), color="tab:blue")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a bucket of one sample stays visible
    ax.axvline(r.budget_us, color="tab:red", linestyle="--", label=f"period budget {r.budget_us:.0f} µs")
    right = max(r.budget_us * 1.5, max(xs, default=0)) * 1.05
    if r.max_us <= right:
        ax.axvline(r.max_us, color="tab:orange", linestyle=":", label=f"max {r.max_us} µs")
    ax.set_xlabel("wake-up latency (µs)")
    ax.set_ylabel("samples (log scale)")
    ax.set_xlim(0, right)
    ax.set_title(f"cyclictest in the guest, {r.seconds:g} s: {r.samples} samples, min/avg/max "
                 f"{r.min_us}/{r.avg_us}/{r.max_us} µs ({'holds' if r.holds else 'misses'} the period)")
    if r.overflows:
        ax.annotate(f"{r.overflows} samples > {HIST_BUCKETS_US} µs (beyond the histogram), max {r.max_us} µs",
                    xy=(0.98, 0.95), xycoords="axes fraction", ha="right", va="top", color="tab:orange",
                    bbox={"facecolor": "white", "alpha": 0.9, "edgecolor": "none"})
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    write_output(path, lambda f: fig.savefig(f, dpi=100, format="png"))  # never through a planted link
    plt.close(fig)
    return str(path)
