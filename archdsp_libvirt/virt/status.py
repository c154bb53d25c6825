"""The ``dsp-status`` screen: the domain as libvirt sees it, on the host model of its host.

Everything about the host (isolation, hugepages) comes from the host model,
so a remote domain is shown with its own host's facts, or with "unknown".
vCPU placement comes from libvirt (``virDomainGetVcpus`` and the live XML's
``vcpusched``); only where the QEMU process runs on this machine are its
threads also read from /proc (class and priority as the kernel applies them).
"""

from __future__ import annotations

import libvirt

from ..config import DspConfig
from ..cpuset import format_cpuset
from ..errors import ArchdspError
from ..procs import age
from ..host.model import HostModel
from . import threads as qthreads
from . import vhost
from .connection import Session
from .drift import differences
from .guest import format_section as format_guest, status as guest_status
from ..host.accel import TCG_CAUSE
from .inspect import (SHUTOFF_REASONS, STATE_NAMES, accelerator_of, has_qemu_namespace, inactive_xml, is_updated,
                      live_xml, uuid_of, vcpu_placement)

UNKNOWN = "unknown"


def _isolation(cfg: DspConfig, model: HostModel) -> dict:
    wanted = frozenset(cfg.isolated_cores)
    iso = model.isolated_cpus
    return {
        "config_cores": format_cpuset(wanted),
        "host_isolated": format_cpuset(iso) if iso is not None else UNKNOWN,
        "missing": format_cpuset(wanted - iso) if iso is not None else UNKNOWN,
        "source": model.source if iso is not None else model.unknown("isolcpus"),
    }


def _hugepages(cfg: DspConfig, model: HostModel) -> dict:
    pool = model.pool(cfg.page_size_kib)
    return {
        "page_size_kib": cfg.page_size_kib,
        "wanted": cfg.hugepages,
        "total": pool.total if pool and pool.total is not None else UNKNOWN,
        "free": pool.free if pool and pool.free is not None else UNKNOWN,
    }


def network_thread(root, model: HostModel, pid: int | None, local_qemu: bool, proc: str = "/proc") -> dict:
    """The network data path of the running domain (``root``: its live XML): its vhost-net threads as
    /proc has them, or the reason there are none (``reason``: why, or that it cannot be known here)."""
    if not model.is_local:
        return {"threads": [], "reason": "remote host: unknown (run 'archdsp-virt status' on that host)"}
    if not local_qemu:
        return {"threads": [], "reason": "unknown: this libvirt driver runs no QEMU process"}
    if pid is None:
        return {"threads": [], "reason": "unknown: QEMU's process was not found"}
    found = vhost.find(pid, proc)
    if found:
        return {"threads": [nt.as_dict() for nt in found], "reason": None}
    taps = [i for i in root.iterfind("devices/interface") if i.get("type") in vhost.TAP_TYPES]
    forced_qemu = bool(taps) and all(i.xpath("string(driver/@name)") == "qemu" for i in taps)
    return {"threads": [], "reason": vhost.why_none(pid, root.get("type"), len(taps),
                                                    model.files.exists(vhost.VHOST_DEV), forced_qemu)}


def status(cfg: DspConfig, session: Session, model: HostModel, proc: str = "/proc") -> dict:
    """The ``dsp-status`` screen as data: domain, vCPUs, isolation, hugepages, memory, console, the guest
    (through its agent, only while the domain runs), drift.
    ``model`` is the host behind ``session``, the one the command built."""
    name = cfg.name
    info: dict = {"name": name, "uri": session.uri, "defined": False, "host": model.source,
                  "isolation": _isolation(cfg, model), "hugepages": _hugepages(cfg, model)}
    if session.lookup(name) is None:
        info["state"] = "not defined"
        return info
    info["defined"] = True
    state, reason = session.dom(name, "reading state", lambda d: d.state())
    info["uuid"] = uuid_of(session, name)
    info["state"] = STATE_NAMES.get(state, str(state))
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        info["reason"] = SHUTOFF_REASONS.get(reason, str(reason))
    info["autostart"] = bool(session.dom(name, "reading autostart", lambda d: d.autostart()))
    xml_live = live_xml(session, name)
    xml_inactive = inactive_xml(session, name)
    from lxml import etree

    root = etree.fromstring(xml_live.encode())
    info["accelerator"] = accelerator_of(xml_live)
    info["console_log"] = root.xpath("string(devices/serial/log/@file)") or None
    info["memory"] = {
        "mib": int(root.findtext("memory") or 0) // 1024,
        "locked": root.find("memoryBacking/locked") is not None,
        "hugepages": root.find("memoryBacking/hugepages") is not None,
    }
    pins = {int(p.get("vcpu")): p.get("cpuset") for p in root.iterfind("cputune/vcpupin")}
    info["emulatorpin"] = root.xpath("string(cputune/emulatorpin/@cpuset)") or None
    active = state in (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_BLOCKED)
    vcpus = []
    if active:
        try:
            stats = session.dom(name, "reading stats", lambda d: d.info())
            info["cpu_time_s"] = round(stats[4] / 1e9, 3)
        except ArchdspError:
            pass
        local_qemu = model.is_local and has_qemu_namespace(session)
        pid = qthreads.qemu_pid(name) if local_qemu else None
        info["qemu_pid"] = pid if pid is not None else (UNKNOWN if not local_qemu else None)
        threads: dict[int, qthreads.Thread] = {}
        if pid is not None:
            uptime = age(pid, proc)  # from the process's start time (/proc/PID/stat), not an mtime
            if uptime is not None:
                info["uptime_s"] = round(uptime, 1)
            threads = qthreads.vcpu_threads(pid, proc)
        try:
            placement = vcpu_placement(session, name)
        except ArchdspError:
            placement = []
        for p in placement:
            t = threads.get(p.vcpu)
            vcpus.append({
                "vcpu": p.vcpu,
                "pinned": pins.get(p.vcpu),
                "actual_cpu": p.cpu,
                "affinity": format_cpuset(t.affinity if t else p.affinity),
                # The class the kernel applies (from /proc, on this machine), else what libvirt was told.
                "policy": t.policy if t else (p.scheduler.upper() if p.scheduler else "OTHER"),
                "rt_priority": t.rt_priority if t else (p.priority if p.priority is not None else 0),
                "thread": t.tid if t else UNKNOWN,
                "source": "proc" if t else "libvirt",
            })
        info["network_thread"] = network_thread(root, model, pid, local_qemu, proc)
    else:
        vcpus = [{"vcpu": n, "pinned": c} for n, c in sorted(pins.items())]
    info["vcpus"] = vcpus
    info["guest"] = guest_status(session, name, state == libvirt.VIR_DOMAIN_RUNNING)
    # Drift: what libvirt has against what the config renders (with the same UUID).
    try:
        from ..domain.build import render_domain

        wanted = render_domain(cfg, model, uuid=info["uuid"]).xml
        info["drift"] = differences(wanted, xml_inactive, with_commandline=has_qemu_namespace(session))
    except ArchdspError as err:
        info["drift"] = [f"cannot compare with the config: {err}"]
    info["stale"] = active and is_updated(session, name)
    return info


def _network_lines(info: dict) -> list[str]:
    """The network data path beside the vCPUs and emulator threads: each vhost thread, or why none."""
    net = info.get("network_thread")
    if net is None:
        return []
    if not net["threads"]:
        return [f"  network data path: {net['reason']}"]
    return [f"  network data path: {vhost.describe(t)}" for t in net["threads"]]


def format_status(info: dict) -> str:
    """The human form of :func:`status`, in the sections of the original dsp-status."""
    lines = ["=== DSP VM Status ==="]
    lines.append(f"{info['name']} ({info['uri']}): {info['state']}" + (f" ({info['reason']})" if info.get("reason") else ""))
    if info.get("defined"):
        lines.append(f"  uuid: {info['uuid']}   autostart: {'enabled' if info['autostart'] else 'disabled'}")
        if "uptime_s" in info:
            lines.append(f"  up for {info['uptime_s']:.0f} s, QEMU pid {info['qemu_pid']}")
        elif info.get("qemu_pid") == UNKNOWN:
            lines.append("  QEMU runs on the remote host: its pid and uptime are unknown here")
        if info.get("accelerator"):
            accel = info["accelerator"]
            lines.append(f"  accelerator: {accel}" + (" (software emulation, no KVM: expect xruns)"
                                                       if accel == "tcg" else ""))
        if info.get("stale"):
            lines.append("  running an older definition: 'archdsp-virt up --restart' applies the new one")
    lines.append("")
    lines.append("=== vCPUs ===")
    for v in info.get("vcpus", []):
        if "actual_cpu" in v:
            lines.append(f"  vCPU {v['vcpu']}: pinned {v['pinned']}, on CPU {v['actual_cpu']}, "
                         f"affinity {v['affinity']}, {v['policy']} rtprio {v['rt_priority']}"
                         + (" (as libvirt reports it)" if v.get("source") == "libvirt" else ""))
        else:
            lines.append(f"  vCPU {v['vcpu']}: pinned {v['pinned']}")
    if info.get("emulatorpin"):
        lines.append(f"  emulator threads: {info['emulatorpin']}")
    lines.extend(_network_lines(info))
    lines.append("")
    lines.append("=== CPU Isolation ===")
    iso = info["isolation"]
    if iso["host_isolated"] == UNKNOWN:
        lines.append(f"  config: {iso['config_cores']}   host isolated: {iso['source']}")
    else:
        lines.append(f"  config: {iso['config_cores']}   host isolated: {iso['host_isolated'] or '(none)'}"
                     + (f"   not isolated: {iso['missing']}" if iso.get("missing") else ""))
    lines.append("")
    lines.append("=== Hugepages ===")
    hp = info["hugepages"]
    lines.append(f"  {hp['page_size_kib']} KiB pages: total {hp['total']}, free {hp['free']} "
                 f"(config wants {hp['wanted']})")
    if "memory" in info:
        m = info["memory"]
        lines.append(f"  guest memory {m['mib']} MiB, hugepage-backed: {'yes' if m['hugepages'] else 'no'}, "
                     f"locked: {'yes' if m['locked'] else 'no'}")
    if info.get("console_log"):
        lines.append("")
        lines.append(f"=== Console ===\n  log: {info['console_log']}")
    if info.get("guest"):
        lines.append("")
        lines.extend(format_guest(info["guest"]))
    if info.get("drift"):
        lines.append("")
        lines.append("=== Drift (definition differs from the config) ===")
        lines.extend(f"  {d}" for d in info["drift"])
    for extra in info.get("sections", []):
        lines.append("")
        lines.extend(extra)
    if info.get("cause"):
        lines.append(f"  cause: {info['cause']}")
    return "\n".join(lines) + "\n"
