"""What ``scripts/host-services`` asks the package, so that the script keeps no copy of its logic.

The script asks through the installed CLI, ``archdsp-virt host prepare ...`` (hidden plumbing, see
:mod:`archdsp_libvirt.cli.host`): whether the qemu.conf cgroup fix is needed, the line it writes, and
whether a recorded PID is still the daemon the script started.
"""

from __future__ import annotations

from pathlib import Path

from ..procs import Owned
from .checks import QEMU_CGROUP_LINE, rt_cgroup
from .files import Host

__all__ = ["QEMU_CGROUP_LINE", "needs_qemu_conf_fix", "still_ours"]


def needs_qemu_conf_fix(host: Host) -> tuple[bool, str]:
    """Whether SCHED_FIFO vCPUs need the qemu.conf fix (check's rt.cgroup is fail or warn), and
    ``"STATUS: what was seen"``: the verdict ``check`` reports, never a copy of it."""
    status, seen = rt_cgroup(host)
    return status != "ok", f"{status}: {seen}"


def still_ours(name: str, pid: int, start: int) -> bool:
    """Whether PID is still the NAME process that started at START (clock ticks since boot): a
    reused PID, or another program under it, is not."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return comm == name and Owned(pid, start).alive()
