"""tuned: which profile is active, whether it is realtime-virtual-host (whose knobs ``host prepare`` then
leaves alone), and the profile variables that carry a config's cores."""

from __future__ import annotations

import re

from ...config import DspConfig
from ...cpuset import format_cpuset
from ..files import Host, cmdline_cpus
from ..findings import Finding
from ..model import HostModel

ACTIVE_PROFILE = "/etc/tuned/active_profile"
RVH = "realtime-virtual-host"
RVH_VARIABLES = "/etc/tuned/realtime-virtual-host-variables.conf"


def tuned_running(host: Host) -> bool:
    return any((host.read(f"/proc/{e}/comm") or "").strip() == "tuned"
               for e in host.listdir("/proc") if e.isdigit())


def active_profiles(host: Host) -> list[str]:
    """The profiles /etc/tuned/active_profile names (tuned merges several, space-separated)."""
    return (host.read(ACTIVE_PROFILE) or "").split()


def realtime_virtual_host(host: Host) -> str | None:
    """The active profile when tuned runs realtime-virtual-host (itself, or a profile of /etc/tuned that
    includes it), else None."""
    if not tuned_running(host):
        return None
    for name in active_profiles(host):
        conf = host.read(f"/etc/tuned/{name}/tuned.conf") or ""
        if name == RVH or re.search(rf"^\s*include\s*=.*\b{RVH}\b", conf, re.M):
            return name
    return None


def _variable(text: str, key: str) -> str | None:
    m = None
    for m in re.finditer(rf"^\s*{key}\s*=\s*(\S*)\s*$", text, re.M):
        pass
    return m.group(1) if m else None


def tuned_variables(cfg: DspConfig) -> str:
    """What ``host tuned-profile`` prints: /etc/tuned/realtime-virtual-host-variables.conf for ``cfg``."""
    cores = format_cpuset(frozenset(cfg.isolated_cores))
    return (f"# {RVH_VARIABLES}, then: tuned-adm profile {RVH} (and reboot: the profile adds\n"
            f"# isolcpus, nohz_full and rcu_nocbs for these cores to the kernel command line)\n"
            f"isolated_cores={cores}\n"
            "# move kernel-managed IRQs off the isolated cores too (isolcpus=managed_irq: kernel 5.6 and later)\n"
            "isolate_managed_irq=Y\n")


def check_tuned(cfg: DspConfig, model: HostModel) -> list[Finding]:
    cores = frozenset(cfg.isolated_cores)
    expected = (f"tuned not running, or running {RVH} with isolated_cores = {format_cpuset(cores)} "
                "(archdsp-virt host tuned-profile CONFIG)")
    host = model.files
    if host is None:
        return [Finding("tuned.profile", "skip", model.unknown("tuned's profile"), expected)]
    if not tuned_running(host):
        return [Finding("tuned.profile", "ok", "tuned does not run", expected)]
    profiles = active_profiles(host)
    if not profiles:
        return [Finding("tuned.profile", "ok", "tuned runs with no active profile", expected)]
    named = " ".join(profiles)
    rvh = realtime_virtual_host(host)
    if rvh is None:
        return [Finding("tuned.profile", "warn",
                        f"tuned runs profile {named}: it may set back what host prepare sets (governor, sysctls, "
                        "THP)", expected,
                        f"archdsp-virt host tuned-profile CONFIG > {RVH_VARIABLES} && tuned-adm profile {RVH}")]
    have = _variable(host.read(RVH_VARIABLES) or "", "isolated_cores")
    have_set = cmdline_cpus(have) if have else None
    seen = f"tuned runs profile {named} ({RVH}), isolated_cores = {have or 'unset'}"
    if have_set != cores:
        return [Finding("tuned.profile", "warn", seen + ": not the config's vCPU cores", expected,
                        f"archdsp-virt host tuned-profile CONFIG > {RVH_VARIABLES} && tuned-adm profile {RVH}")]
    return [Finding("tuned.profile", "ok", seen + "; host prepare leaves its knobs to it", expected)]
