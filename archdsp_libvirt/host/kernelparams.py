"""The kernel command line a DSP VM host needs, and how far /proc/cmdline is from it.

``kernel_params(cfg, vendor)`` is the list, in the order of the original
design's ``boot.kernelParams``::

    amd_iommu=on iommu=pt isolcpus=0-1 nohz_full=0-1 rcu_nocbs=0-1 threadirqs
    hugepagesz=2M hugepages=2048 default_hugepagesz=2M

then the real-time KVM host's boot-time knobs (what ``check``'s rows name, the values tuned's
realtime-virtual-host sets)::

    skew_tick=1 kvm.kvmclock_periodic_sync=0 kvm_amd.pause_filter_count=0 irqaffinity=2-3

The IOMMU parameters are always included, not only when ``audio_device`` is
enabled: the design lists them for every DSP host, ``iommu=pt`` keeps host
devices off the translation path, and enabling passthrough later then needs
no second reboot. CPU lists use the one formatter (``0-1``, the kernel
accepts it wherever it accepts ``0,1``). ``isolcpus`` is given without
flags, as in the design.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from msgspec import Struct, field

from ..config import DspConfig, load_config
from ..cpuset import CpuSet, format_cpuset
from ..errors import UsageError
from .checks import IOMMU_PARAMS
from .checks.knobs import PLE
from .files import Host, cmdline_cpus, cmdline_values, page_size_kib

FORMATS = ("plain", "nix", "grub")
CPU_LIST_KEYS = ("isolcpus", "nohz_full", "rcu_nocbs", "irqaffinity")


def kernel_params(cfg: DspConfig, cpu_vendor: str | None, online: CpuSet | None = None) -> list[str]:
    """The kernel parameters ``cfg`` needs on a host whose /proc/cpuinfo vendor_id is ``cpu_vendor``;
    ``irqaffinity=`` (the cores left to the host) only when its ``online`` CPUs are known."""
    iommu = IOMMU_PARAMS.get(cpu_vendor or "")
    if iommu is None:
        raise UsageError(
            f"unknown CPU vendor {cpu_vendor or '(none in /proc/cpuinfo)'}: pass --cpu-vendor "
            + " or ".join(sorted(set(IOMMU_PARAMS)))
        )
    cores = format_cpuset(cfg.isolated_cores)
    params = [iommu, "iommu=pt", f"isolcpus={cores}", f"nohz_full={cores}", f"rcu_nocbs={cores}", "threadirqs"]
    if cfg.hugepages:
        size = cfg.hugepage_size
        params += [f"hugepagesz={size}", f"hugepages={cfg.hugepages}", f"default_hugepagesz={size}"]
    module, ple = PLE[cpu_vendor or ""]
    params += ["skew_tick=1", "kvm.kvmclock_periodic_sync=0", f"{module}.{ple}=0"]
    keep = (online or frozenset()) - frozenset(cfg.isolated_cores)
    if keep:
        params.append(f"irqaffinity={format_cpuset(keep)}")
    return params


def format_params(params: Sequence[str], fmt: str) -> str:
    """``plain`` (one line), ``nix`` (``boot.kernelParams``), ``grub`` (a line for /etc/default/grub)."""
    if fmt == "plain":
        return " ".join(params) + "\n"
    if fmt == "nix":
        return "boot.kernelParams = [\n" + "".join(f'  "{p}"\n' for p in params) + "];\n"
    if fmt == "grub":
        # /etc/default/grub is sourced by the shell: the line appends to what is already there.
        return (
            "# append to /etc/default/grub, then run update-grub and reboot\n"
            f'GRUB_CMDLINE_LINUX_DEFAULT="$GRUB_CMDLINE_LINUX_DEFAULT {" ".join(params)}"\n'
        )
    raise UsageError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")


class CmdlineDiff(Struct):
    """Wanted parameters split by what the running kernel's command line has."""

    missing: list[str] = field(default_factory=list)
    conflicting: list[tuple[str, str]] = field(default_factory=list)  # (wanted, what the cmdline has)
    present: list[str] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return bool(self.missing or self.conflicting)


def _hugepages_by_size(tokens: Iterable[str]) -> dict[int | None, list[str]]:
    """``hugepages=N`` values keyed by the page size (KiB) they apply to, as the kernel pairs them."""
    out: dict[int | None, list[str]] = {}
    size: int | None = None
    default: int | None = None
    for tok in tokens:
        k, _, v = tok.partition("=")
        if k == "hugepagesz":
            size = page_size_kib(v)
        elif k == "default_hugepagesz":
            default = page_size_kib(v)
        elif k == "hugepages":
            out.setdefault(size if size is not None else default, []).append(v)
    return out


def _judge(param: str, tokens: list[str], page_kib: int | None) -> tuple[str, str | None]:
    """("present" | "missing" | "conflicting", what the command line has)."""
    key, sep, want = param.partition("=")
    if not sep:
        return ("present", param) if param in tokens else ("missing", None)
    if key == "hugepages":
        pools = _hugepages_by_size(tokens)
        # hugepages= before any hugepagesz= sizes the default pool: 2M on x86.
        values = pools.get(page_kib, []) or (pools.get(None, []) if page_kib == 2048 else [])
        if not values:
            return "missing", None
        enough = values[-1].isdigit() and int(values[-1]) >= int(want)
        return ("present" if enough else "conflicting"), f"hugepages={values[-1]}"
    have = cmdline_values(tokens, key)
    if not have:
        return "missing", None
    last = f"{key}={have[-1]}"
    if key in CPU_LIST_KEYS:
        return ("present" if cmdline_cpus(have[-1]) == cmdline_cpus(want) else "conflicting"), last
    if key in ("amd_iommu", "intel_iommu", "iommu"):
        return ("present" if any(want in v.split(",") for v in have) else "conflicting"), last
    if key == "hugepagesz":  # one per pool: another size is no conflict
        return ("present" if any(page_size_kib(v) == page_size_kib(want) for v in have) else "missing"), None
    if key == "default_hugepagesz":
        return ("present" if page_size_kib(have[-1]) == page_size_kib(want) else "conflicting"), last
    return ("present" if have[-1] == want else "conflicting"), last


def diff_cmdline(params: Sequence[str], tokens: Sequence[str]) -> CmdlineDiff:
    """Compare wanted ``params`` with a command line split into ``tokens``.

    CPU lists compare as sets (``0,1`` is ``0-1``); ``hugepages=N`` counts as
    present when the pool for the same page size is at least N.
    """
    tokens = list(tokens)
    page_kib = next((page_size_kib(p.partition("=")[2]) for p in params if p.startswith("hugepagesz=")), None)
    result = CmdlineDiff()
    for p in params:
        verdict, have = _judge(p, tokens, page_kib)
        if verdict == "present":
            result.present.append(p)
        elif verdict == "missing":
            result.missing.append(p)
        else:
            result.conflicting.append((p, have or ""))
    return result


def format_diff(diff: CmdlineDiff) -> str:
    lines = [f"missing      {p}" for p in diff.missing]
    lines += [f"conflicting  {p} (/proc/cmdline has {have})" for p, have in diff.conflicting]
    lines += [f"present      {p}" for p in diff.present]
    return "\n".join(lines) + "\n"


def kernel_params_command(config: str | Path, host: Host, fmt: str = "plain", diff: bool = False,
                          cpu_vendor: str | None = None) -> tuple[str, bool]:
    """What ``host kernel-params`` prints, and whether the running kernel lacks any of it."""
    cfg = load_config(config)
    params = kernel_params(cfg, cpu_vendor or host.cpu_vendor(), host.cpus("online"))
    if not diff:
        return format_params(params, fmt), False
    d = diff_cmdline(params, host.cmdline())
    return format_diff(d), d.differs

