"""The guest's disk, kernel and initrd: there, and readable by the user QEMU runs as."""

from __future__ import annotations

import os
import stat

from ...config import DspConfig
from ..files import Host
from ..findings import Finding
from ..model import HostModel


def _qemu_ids(host: Host, user: str) -> tuple[int | None, set[int]]:
    """The QEMU user's uid and its groups' gids (from the host's /etc/passwd and /etc/group)."""
    if user.startswith("+") and user[1:].isascii() and user[1:].isdigit():
        return int(user[1:]), set()
    uid, gids = None, set()
    for line in (host.read("/etc/passwd") or "").splitlines():
        f = line.split(":")
        if len(f) >= 4 and f[0] == user and f[2].isdigit() and f[3].isdigit():
            uid, gids = int(f[2]), {int(f[3])}
    for line in (host.read("/etc/group") or "").splitlines():
        f = line.split(":")
        if len(f) >= 4 and f[2].isdigit() and user in f[3].split(","):
            gids.add(int(f[2]))
    return uid, gids


def _may(st: os.stat_result, uid: int | None, gids: set[int], bits: int) -> bool:
    """Whether user ``uid`` (groups ``gids``) has ``bits`` (an rwx triple, 4/2/1) on ``st``."""
    mode = stat.S_IMODE(st.st_mode)
    if uid is not None and st.st_uid == uid:
        return mode >> 6 & bits == bits
    if st.st_gid in gids:
        return mode >> 3 & bits == bits
    return mode & bits == bits


def check_boot_files(cfg: DspConfig, model: HostModel) -> list[Finding]:
    """The disk image, kernel and initrd exist, are regular files, and the QEMU user can reach them.

    QEMU runs as qemu.conf's ``user`` (default libvirt-qemu). With
    ``dynamic_ownership = 1`` (libvirt's default) libvirt chowns the disk,
    kernel and initrd to that user when the domain starts, so a root-owned
    0600 image is fine; it does not change the folders above them, so each
    must let the user through (x). With ``dynamic_ownership = 0`` the files
    must already be readable (the disk also writable) by the user. QEMU as
    root reads everything.
    """
    fid = "boot.files"
    host = model.files
    files = [(key, os.path.expanduser(path), role) for key, path, role in (
        ("archibaldos.disk_image", cfg.disk_image, "disk"), ("boot.kernel", cfg.boot.kernel, "kernel"),
        ("boot.initrd", cfg.boot.initrd, "initrd")) if path]
    expected = "the disk image, kernel and initrd exist here as regular files the QEMU user can read"
    if not files:
        return [Finding(fid, "skip", "no disk image, kernel or initrd to boot", expected)]
    if host is None:
        return [Finding(fid, "skip", model.unknown("the boot files (" + ", ".join(p for _, p, _ in files) + ")"),
                        expected)]
    user = (host.qemu_conf("user") or '"libvirt-qemu"').strip('"')
    as_root = user in ("root", "+0", "0")
    dynamic = (host.qemu_conf("dynamic_ownership") or "1").strip() != "0"
    uid, gids = _qemu_ids(host, user)
    fixes = {"disk": "qemu-img create -f qcow2 {path} 8G (or copy the image there), or set {key}",
             "kernel": "copy the kernel there (scripts/build-dsp-guest builds the demo's), or set {key}",
             "initrd": "copy the initrd there (scripts/build-dsp-guest builds the demo's), or set {key}"}
    for key, path, role in files:
        st = host.stat(path)
        if st is None:
            return [Finding(fid, "fail", f"{key} {path}: no such file", expected,
                            fixes[role].format(path=path, key=key))]
        if not stat.S_ISREG(st.st_mode):
            return [Finding(fid, "fail", f"{key} {path}: not a regular file", expected,
                            f"set {key} to an image or boot file")]
        if as_root:
            continue
        folder = os.path.dirname(path)
        while folder not in ("/", ""):
            dst = host.stat(folder)
            if dst is not None and not _may(dst, uid, gids, 1):
                return [Finding(fid, "fail", f"{key} {path}: QEMU user {user} cannot enter {folder} "
                                f"(mode {stat.S_IMODE(dst.st_mode):04o})", expected,
                                f"chmod o+x {folder}, or move the file to /var/lib/libvirt/images")]
            folder = os.path.dirname(folder)
        need = 6 if role == "disk" else 4
        if not dynamic and not _may(st, uid, gids, need):
            return [Finding(fid, "fail", f"{key} {path}: mode {stat.S_IMODE(st.st_mode):04o}, not "
                            f"{'readable and writable' if need == 6 else 'readable'} by QEMU user {user} "
                            "(dynamic_ownership = 0)", expected, f"chown {user} {path}")]
    names = ", ".join(path for _, path, _ in files)
    how = ("QEMU runs as root" if as_root else
           f"libvirt chowns them to {user} on start (dynamic_ownership)" if dynamic else f"{user} can read them")
    return [Finding(fid, "ok", f"{names}: present; {how}", expected)]
