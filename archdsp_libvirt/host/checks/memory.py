"""Hugepages and locked memory for the VM's RAM."""

from __future__ import annotations

import re
import resource

from ...config import PAGE_SIZES_KIB, DspConfig
from ..files import Host, page_size_kib
from ..findings import Finding
from ..model import HostModel, memlock_limit_mb

CAP_SYS_RESOURCE = 24


MEMLOCK_FIX = ("set realtime.mlock = false, or run libvirtd with CAP_SYS_RESOURCE / "
               "raise the hard memlock limit")


def _mib(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB"


# What the host keeps for itself (kernel, libvirtd, QEMU's own memory, the audio server) below which
# memory.size warns.
HOST_KEEPS_MB = 1024


def check_memory_size(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """memory_mb against the host's RAM (MemTotal of /proc/meminfo, or libvirt's getInfo remotely)."""
    expected = f"memory_mb = {cfg.memory_mb} below the host's RAM, leaving it >= {HOST_KEEPS_MB} MiB"
    if model.memory_kib is None:
        where = "/proc/meminfo has no MemTotal" if model.files is not None else "libvirt did not say"
        return [Finding("memory.size", "skip", f"the host's RAM is unknown ({where})", expected)]
    total_mb = model.memory_kib // 1024
    seen = f"memory_mb = {cfg.memory_mb} of {total_mb} MiB on {model.where}"
    if cfg.memory_mb > total_mb:
        return [Finding("memory.size", "fail", seen + ": more than the host has", expected,
                        f"set memory_mb <= {max(total_mb - HOST_KEEPS_MB, 1)}")]
    if total_mb - cfg.memory_mb < HOST_KEEPS_MB:
        return [Finding("memory.size", "warn", seen + f": the host keeps {total_mb - cfg.memory_mb} MiB", expected,
                        f"set memory_mb <= {max(total_mb - HOST_KEEPS_MB, 1)}, or run it on a host with more RAM")]
    return [Finding("memory.size", "ok", seen, expected)]


def check_hugepages(cfg: DspConfig, model: HostModel) -> list[Finding]:
    kib = PAGE_SIZES_KIB[cfg.hugepage_size]
    need = -(-cfg.memory_mb * 1024 // kib)
    pool = f"/sys/kernel/mm/hugepages/hugepages-{kib}kB"
    expected = f">= {need} free {cfg.hugepage_size} pages for memory_mb = {cfg.memory_mb}"
    mount_expected = f"a hugetlbfs mounted with pagesize={cfg.hugepage_size}"
    if not cfg.hugepages:
        return [Finding("hugepages.free", "skip", "hugepages = 0 in the config", expected),
                Finding("hugepages.mount", "skip", "hugepages = 0 in the config", mount_expected)]
    out = []
    host = model.files
    found = model.pool(kib)
    nr, free = (found.total, found.free) if found else (None, None)
    if host is None and (free is None or nr is None):
        if found is None and model.online_cpus is not None:  # libvirt answered, and lists no such pool
            out.append(Finding("hugepages.free", "fail", f"libvirt at {model.where} lists no {cfg.hugepage_size} "
                               "pages", expected, f"on that host: kernel parameters hugepagesz={cfg.hugepage_size} "
                               f"hugepages={need}, or hugepage_size = \"2M\""))
        else:
            out.append(Finding("hugepages.free", "skip", model.unknown(f"free {cfg.hugepage_size} pages"), expected))
    elif nr is None or free is None:
        out.append(Finding("hugepages.free", "fail", f"no {pool} (page size {cfg.hugepage_size} not supported here)",
                           expected, f"kernel parameters hugepagesz={cfg.hugepage_size} hugepages={need}, "
                           "or hugepage_size = \"2M\""))
    elif free >= need:
        out.append(Finding("hugepages.free", "ok", f"{free} of {nr} free", expected))
    else:
        target = nr - free + need
        fix = (f"echo {target} > {pool}/nr_hugepages" if cfg.hugepage_size == "2M"
               else f"echo {target} > {pool}/nr_hugepages (or kernel parameters hugepagesz=1G hugepages={target})")
        out.append(Finding("hugepages.free", "fail", f"{free} of {nr} free", expected, fix))

    if host is None:
        out.append(Finding("hugepages.mount", "skip", model.unknown("hugetlbfs mounts"), mount_expected))
        return out
    default_kib = _default_hugepage_kib(host)
    fits = [m for m in host.mounts() if m.fstype == "hugetlbfs"
            and (page_size_kib(m.option("pagesize") or "") or default_kib) == kib]
    if fits:
        out.append(Finding("hugepages.mount", "ok", f"hugetlbfs on {fits[0].path}", mount_expected))
    else:
        others = [m.path for m in host.mounts() if m.fstype == "hugetlbfs"]
        seen = f"hugetlbfs only for other page sizes ({', '.join(others)})" if others else "no hugetlbfs mounted"
        mnt = "/dev/hugepages" if cfg.hugepage_size == "2M" else "/dev/hugepages1G"
        out.append(Finding("hugepages.mount", "fail", seen, mount_expected,
                           f"mkdir -p {mnt} && mount -t hugetlbfs -o pagesize={cfg.hugepage_size} hugetlbfs {mnt}, "
                           "then restart libvirtd"))
    return out


def _default_hugepage_kib(host: Host) -> int:
    m = re.search(r"^Hugepagesize:\s*(\d+)\s*kB", host.read("/proc/meminfo") or "", re.M)
    return int(m.group(1)) if m else 2048


def check_memlock(cfg: DspConfig, model: HostModel) -> list[Finding]:
    need_mb = memlock_limit_mb(cfg.memory_mb)  # the memtune hard_limit the domain is rendered with
    expected = f"hard RLIMIT_MEMLOCK >= {need_mb} MiB (memory_mb + 1 GiB) or CAP_SYS_RESOURCE"
    if not cfg.realtime.mlock:
        return [Finding("memlock.limit", "skip", "realtime.mlock = false", expected)]
    host = model.files
    if host is None:
        return [Finding("memlock.limit", "skip", model.unknown("the locked-memory limit"), expected)]
    lim = host.limit("Max locked memory", resource.RLIMIT_MEMLOCK)
    hard = lim[1] if lim else None
    hard_text = "unknown" if lim is None else "unlimited" if hard is None else _mib(hard)
    cap = host.has_capability(CAP_SYS_RESOURCE)
    observed = f"hard memlock {hard_text}, CAP_SYS_RESOURCE {'yes' if cap else 'no' if cap is False else 'unknown'}"
    if cap or (lim is not None and (hard is None or hard >= need_mb * 1024 * 1024)):
        return [Finding("memlock.limit", "ok", observed, expected)]
    return [Finding("memlock.limit", "fail", observed, expected, MEMLOCK_FIX)]
