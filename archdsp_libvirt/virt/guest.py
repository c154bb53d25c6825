"""The guest seen from inside, through its QEMU guest agent: one probe, parsed by plain functions.

:func:`probe` runs one POSIX shell script in the guest (``guest-exec``, bounded) that prints
sections (``@NAME`` then its lines): the kernel, its command line, clocksource, CPU flags, cpuidle,
isolation, the NETJACK slave's argv (``jackd ... -d net`` from /proc/*/cmdline), the programs the
link needs, the IRQ threads' scheduling and the slave's xruns where a log says them. ``status``
shows :func:`section` of it; ``guest check`` turns it into findings (:mod:`.guestcheck`).
"""

from __future__ import annotations

import time

from msgspec import Struct

from ..errors import AgentUnavailable, GuestAgentError
from . import agent

UNKNOWN = "unknown"
# Bounds on a guest that answers slowly: under TCG the guest's real-time audio (jackd at FIFO 70 and its
# client, 750 periods a second at 96 kHz / 128) takes most of its one emulated vCPU, and the agent's
# commands get what is left (a fork costs such a guest about half a second; the probe took 8 to over 15 s
# in the disk guest). On KVM the probe answers in well under a second; the bounds stop a guest that hangs.
PROBE_TIMEOUT = 30.0  # seconds the probe may take in the guest (it reads /proc once, forking per jackd only)
PROBE_CALL_TIMEOUT = 3  # seconds libvirt waits for each agent answer during it

# Sections, in order. Every read is guarded: a file a guest lacks prints nothing. Files are read with shell
# builtins: under TCG each fork costs the guest about half a second (one per jackd, the xrun count).
_SECTION = 's() { echo "@$1"; }\n'
# The NETJACK slaves: each jackd's pid and argv (ARG_SEP between its arguments).
_SLAVES = r"""
s slave
for d in /proc/[0-9]*; do
	read -r comm <"$d/comm" 2>/dev/null || continue
	case "$comm" in jackd*) echo "${d#/proc/} $(tr '\000' '\037' <"$d/cmdline")" ;; esac
done
"""
PROBE = _SECTION + r"""
r() { [ -r "$1" ] && while IFS= read -r l || [ -n "$l" ]; do echo "$l"; done <"$1"; }
s uname_r; r /proc/sys/kernel/osrelease
s uname_v; r /proc/sys/kernel/version
s realtime; r /sys/kernel/realtime 2>/dev/null
s cmdline; r /proc/cmdline
s clocksource; r /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null
s clocksources; r /sys/devices/system/clocksource/clocksource0/available_clocksource 2>/dev/null
n=0 f=''
while IFS= read -r l; do
	case "$l" in processor*) n=$((n + 1)) ;; flags*) [ -n "$f" ] || f=$l ;; esac
done </proc/cpuinfo
s flags; echo "$f"
s cpus; echo "$n"
s cpuidle; r /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null
s isolated; r /sys/devices/system/cpu/isolated 2>/dev/null
s nohz_full; r /sys/devices/system/cpu/nohz_full 2>/dev/null
""" + _SLAVES + r"""
s affinity
for d in /proc/[0-9]*; do
	read -r comm <"$d/comm" 2>/dev/null || continue
	case "$comm" in jackd*)
		while IFS= read -r l; do
			case "$l" in Cpus_allowed_list:*) v=${l#*:}; echo "${d#/proc/} ${v#"${v%%[![:space:]]*}"}"; break ;; esac
		done <"$d/status" ;;
	esac
done
s programs
for b in jackd cyclictest chrt; do p=$(command -v "$b" 2>/dev/null) && echo "$b $p"; done
s irqthreads
for d in /proc/[0-9]*; do
	read -r comm <"$d/comm" 2>/dev/null || continue
	case "$comm" in irq/*)
		read -r st <"$d/stat" 2>/dev/null || continue
		set -f; set -- ${st##*) }; set +f
		[ $# -ge 39 ] && shift 37 && echo "$comm $1 $2" ;;
	esac
done
s xruns
if [ -f /tmp/jackd.log ]; then
	echo "jackd log /tmp/jackd.log $(grep -ci xrun /tmp/jackd.log)"
elif [ -e /etc/systemd/system/archdsp-netjack.service ] || [ -e /run/systemd/units/invocation:archdsp-netjack.service ]; then
	echo "journal archdsp-netjack.service $(journalctl -q -b -u archdsp-netjack.service 2>/dev/null | grep -ci xrun)"
fi
s end
"""
# What tune waits on: the slaves alone (the whole probe costs a TCG guest seconds a round).
SLAVE_PROBE = _SECTION + _SLAVES + "s end\n"


ARG_SEP = "\x1f"  # the probe writes a process's argv with this between arguments (NULs cannot pass sh)


def parse_probe(text: str) -> dict[str, list[str]]:
    """The probe's output -> its sections' lines (empty lines dropped)."""
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@") and line[1:].replace("_", "").isalnum():
            cur = out.setdefault(line[1:], [])
        elif cur is not None and line.strip():
            cur.append(line.rstrip())
    return out


def probe(session, name: str, timeout: float = PROBE_TIMEOUT, script: str = PROBE) -> dict[str, list[str]]:
    """Run ``script`` (:data:`PROBE`, or :data:`SLAVE_PROBE`) in ``name``'s guest -> its sections
    (:class:`AgentUnavailable` without an agent)."""
    r = agent.sh(session, name, script, timeout=timeout, call_timeout=PROBE_CALL_TIMEOUT)
    sections = parse_probe(r.out)
    if "end" not in sections:
        raise GuestAgentError(f"{name}: the guest probe did not finish (exit {r.exitcode}): {r.err.strip()[-200:]}")
    return sections


def first(sections: dict[str, list[str]], key: str) -> str | None:
    lines = sections.get(key) or []
    return lines[0].strip() if lines else None


class Slave(Struct, frozen=True):
    """A ``jackd ... -d net`` process in the guest and the link settings its argv says."""

    pid: int
    argv: tuple[str, ...]
    settings: dict[str, str]


# jackd -d net's options -> the contract's keys (docs/guest-contract.md)
_NET_OPTS = {"-a": "master", "--multicast-ip": "master", "-p": "port", "--udp-net-port": "port",
             "-n": "name", "--client-name": "name", "-l": "latency", "--latency": "latency",
             "-C": "channels", "--input-ports": "channels"}


def slave_settings(argv: tuple[str, ...] | list[str]) -> dict[str, str] | None:
    """The link settings of a jackd argv, None when it is not ``jackd ... -d net``.

    Server options come before ``-d`` (``-S``/``--sync``: sync=1), the net driver's after it."""
    argv = list(argv)
    if not argv or not argv[0].rsplit("/", 1)[-1].startswith("jackd"):
        return None
    driver_at = None
    for i, a in enumerate(argv):
        if a in ("-d", "--driver") and i + 1 < len(argv):
            driver_at = i
            break
        if a in ("-dnet", "--driver=net"):
            driver_at = i - 1
            argv.insert(i + 1, "net")
            break
    if driver_at is None or argv[driver_at + 1] != "net":
        return None
    server, driver = argv[1:driver_at], argv[driver_at + 2:]
    out = {"sync": "1" if any(a in ("-S", "--sync") for a in server) else "0"}
    i = 0
    while i < len(driver):
        a = driver[i]
        key, value = a, None
        if "=" in a and a.startswith("--"):
            key, value = a.split("=", 1)
        elif len(a) > 2 and a[0] == "-" and a[1] != "-" and a[:2] in _NET_OPTS:
            key, value = a[:2], a[2:]
        if key in _NET_OPTS:
            if value is None and i + 1 < len(driver):
                i += 1
                value = driver[i]
            if value is not None:
                out[_NET_OPTS[key]] = value
        i += 1
    return out


def slaves(sections: dict[str, list[str]]) -> list[Slave]:
    """The NETJACK slaves the probe found (``PID ARG\\x1fARG...`` lines), by pid."""
    found = []
    for line in sections.get("slave", []):
        pid, _, rest = line.partition(" ")
        if not pid.isdigit():
            continue
        argv = tuple(a for a in rest.split(ARG_SEP) if a)
        got = slave_settings(argv)
        if got is not None:
            found.append(Slave(pid=int(pid), argv=argv, settings=got))
    return sorted(found, key=lambda s: s.pid)


def is_realtime(sections: dict[str, list[str]]) -> bool:
    """PREEMPT_RT: ``uname -v`` says so, or /sys/kernel/realtime is 1."""
    return "PREEMPT_RT" in (first(sections, "uname_v") or "") or first(sections, "realtime") == "1"


def xruns(sections: dict[str, list[str]]) -> tuple[int | str, str]:
    """(the slave's xruns, where they were counted) or ("unknown", why)."""
    line = first(sections, "xruns")
    if line:
        where, _, count = line.rpartition(" ")
        if count.isdigit():
            return int(count), where
    return UNKNOWN, "no slave log this probe can read (the demo init's /tmp/jackd.log, or archdsp-netjack.service's journal)"


def section(sections: dict[str, list[str]]) -> dict:
    """``status``'s guest object from the probe: kernel, RT or not, the slave and its settings, xruns."""
    found = slaves(sections)
    count, where = xruns(sections)
    slave = found[0] if found else None
    return {
        "agent": "connected",
        "kernel": first(sections, "uname_r") or UNKNOWN,
        "kernel_version": first(sections, "uname_v") or UNKNOWN,
        "preempt_rt": is_realtime(sections),
        "slave": ({"pid": slave.pid, "argv": list(slave.argv), "settings": slave.settings} if slave else None),
        "xruns": count,
        "xruns_source": where,
    }


def status(session, name: str, active: bool) -> dict:
    """The guest object of ``status``: no agent call unless the domain runs; bounded (:data:`PROBE_TIMEOUT`)."""
    if not active:
        return {"agent": "not asked (the domain is not running)", "kernel": UNKNOWN}
    try:
        return section(probe(session, name))
    except AgentUnavailable as err:
        return {"agent": "unavailable", "kernel": UNKNOWN, "problem": str(err)}
    except GuestAgentError as err:
        return {"agent": "error", "kernel": UNKNOWN, "problem": str(err)}


def format_section(g: dict) -> list[str]:
    lines = ["=== Guest (through the QEMU guest agent) ==="]
    if g.get("agent") != "connected":
        lines.append(f"  {g.get('problem') or g.get('agent')}")
        return lines
    lines.append(f"  kernel {g['kernel']} ({'PREEMPT_RT' if g['preempt_rt'] else 'not PREEMPT_RT'}): "
                 f"{g['kernel_version']}")
    s = g.get("slave")
    if s:
        settings = " ".join(f"{k}={v}" for k, v in sorted(s["settings"].items()))
        lines.append(f"  NETJACK slave: pid {s['pid']}, {settings}")
    else:
        lines.append("  NETJACK slave: none running (no jackd -d net process)")
    if g["xruns"] == UNKNOWN:
        lines.append(f"  guest xruns: unknown ({g['xruns_source']})")
    else:
        lines.append(f"  guest xruns: {g['xruns']} (lines in {g['xruns_source']})")
    return lines


# --- restarting the guest's slave with other link settings (tune) ---------------------------------
# The demo init takes "LATENCY=N SYNC=0|1 DELAY=S" in /run/archdsp-restart and says where it is in
# /run/archdsp-state. A systemd guest running archdsp-netjack.service (archdsp-virt guest unit) takes
# the override /run/archdsp/netjack.override (LATENCY= and SYNC= lines, read over the credential's
# latency= and sync=) and a restart of the unit (docs/guest-contract.md, "Changing the settings").
UNIT = "archdsp-netjack.service"
OVERRIDE = "/run/archdsp/netjack.override"
SYSTEMCTL_TIMEOUT = 120  # systemctl and a jackd stopping: tens of seconds in a TCG guest (above)

_REQUEST = """
if [ -d /run/systemd/system ] && systemctl cat {unit} >/dev/null 2>&1; then  # a systemd guest with the unit
	mkdir -p /run/archdsp && printf 'LATENCY=%s\\nSYNC=%s\\n' {latency} {sync} >{override} &&
		systemctl stop {unit} && echo systemd
else
	echo 'LATENCY={latency} SYNC={sync} DELAY={delay}' >/run/archdsp-restart && echo init
fi
"""
_TAKEN = "[ -e /run/archdsp-restart ] && echo waiting; cat /run/archdsp-state 2>/dev/null"


def request_restart(session, name: str, latency: int, sync: bool, delay: int, timeout: float = 15.0) -> str:
    """Stop the guest's slave so that it comes back with ``latency``/``sync``: "init" (the demo init took the
    request and stopped its jackd) or "systemd" (the unit is stopped; :func:`start_slave` starts it)."""
    script = _REQUEST.format(unit=UNIT, override=OVERRIDE, latency=int(latency), sync=int(sync), delay=int(delay))
    r = agent.sh(session, name, script, timeout=SYSTEMCTL_TIMEOUT)
    how = r.out.strip()
    if how not in ("init", "systemd"):
        raise GuestAgentError(f"{name}: the guest took no restart request (exit {r.exitcode}): "
                              f"{(r.err or r.out).strip()[-200:]}")
    if how == "systemd":
        return how
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout) + 2):  # the init looks every second
        state = agent.sh(session, name, _TAKEN, timeout=5).out
        if "waiting" not in state and state.startswith("RESTARTING"):
            return how
        if time.monotonic() >= deadline:
            break
        time.sleep(1)
    raise GuestAgentError(f"{name}: the guest's init did not take the restart request within {timeout:g} s "
                          "(it needs the demo guest's init, scripts/dsp-guest-init.sh)")


def start_slave(session, name: str, how: str) -> None:
    """After :func:`request_restart`: start the stopped unit again (the demo init restarts by itself)."""
    if how == "systemd":
        r = agent.sh(session, name, f"systemctl start {UNIT}", timeout=SYSTEMCTL_TIMEOUT)
        if not r.ok:
            raise GuestAgentError(f"{name}: systemctl start {UNIT} failed: {(r.err or r.out).strip()[-200:]}")


def wait_ready(session, name: str, how: str, latency: int, sync: bool, timeout: float) -> None:
    """Until the guest's slave is back with ``latency``/``sync`` (the demo init's READY in /run/archdsp-state,
    or the unit active with a jackd -d net at those settings); bounded by ``timeout``."""
    want = {"latency": str(int(latency)), "sync": str(int(sync))}
    deadline = time.monotonic() + timeout
    last = ""
    for _ in range(int(timeout / 2) + 2):
        if how == "init":
            last = agent.sh(session, name, "cat /run/archdsp-state 2>/dev/null", timeout=5).out.strip()
            if last == f"READY latency={want['latency']} sync={want['sync']}":
                return
            if last.startswith("FAILED"):
                break
        else:
            found = slaves(probe(session, name, script=SLAVE_PROBE))
            last = " ".join(f"{k}={v}" for k, v in sorted(found[0].settings.items())) if found else "no slave"
            if found and all(found[0].settings.get(k) == v for k, v in want.items()):
                return
        if time.monotonic() >= deadline:
            break
        time.sleep(2)
    raise GuestAgentError(f"{name}: the guest's slave did not come back with latency {latency}, sync {int(sync)} "
                          f"within {timeout:g} s (the guest says: {last or 'nothing'})")
