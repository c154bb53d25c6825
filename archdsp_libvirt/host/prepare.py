"""What ``scripts/host-services`` asks the package, so that the script keeps no copy of its logic.

::

    python -m archdsp_libvirt.host.prepare rt-budget              exit 0 when SCHED_FIFO vCPUs need the qemu.conf
                                                                  fix (check's rt.cgroup is fail or warn), 1 when not;
                                                                  prints what was seen
    python -m archdsp_libvirt.host.prepare qemu-conf-line         the cgroup_controllers line that fix writes
    python -m archdsp_libvirt.host.prepare start-time PID         the process's start time (clock ticks since boot)
    python -m archdsp_libvirt.host.prepare owned NAME PID START   exit 0 when PID is still the NAME process that
                                                                  started at START (a reused PID is not)

``--host-root DIR`` (before the command) reads a fake host tree, as ``check --host-root`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..procs import Owned, start_time
from .checks import QEMU_CGROUP_LINE, rt_cgroup
from .files import Host


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m archdsp_libvirt.host.prepare", description=__doc__.split("\n")[0])
    ap.add_argument("--host-root", default="/")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("rt-budget")
    sub.add_parser("qemu-conf-line")
    st = sub.add_parser("start-time")
    st.add_argument("pid", type=int)
    ow = sub.add_parser("owned")
    ow.add_argument("name")
    ow.add_argument("pid", type=int)
    ow.add_argument("start", type=int)
    args = ap.parse_args(argv)
    if args.command == "rt-budget":
        status, seen = rt_cgroup(Host(args.host_root))
        print(f"{status}: {seen}")
        return 0 if status != "ok" else 1
    if args.command == "qemu-conf-line":
        print(QEMU_CGROUP_LINE)
        return 0
    if args.command == "start-time":
        ticks = start_time(args.pid)
        if ticks is None:
            return 1
        print(ticks)
        return 0
    # owned: the recorded process, by PID, start time and name
    try:
        comm = Path(f"/proc/{args.pid}/comm").read_text().strip()
    except OSError:
        return 1
    return 0 if comm == args.name and Owned(args.pid, args.start).alive() else 1


if __name__ == "__main__":
    sys.exit(main())
