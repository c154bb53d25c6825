"""Host paths in the config: what a disk image, kernel, initrd or console log may name.

libvirt hands each of these files to QEMU, and with ``dynamic_ownership``
(libvirt's default) it first chowns and relabels it for the QEMU user. So
whatever a config names, the guest can read, and a disk image it can
write; virtlogd (root) creates and truncates the console log. The rules:

- by the path as written, whether or not it exists here: absolute (or
  ``~/``), no control characters, no ``..`` segments, at most PATH_MAX,
  and not in a host system folder (:data:`SYSTEM_DIRS`: devices, kernel
  interfaces, runtime sockets, host configuration and its secrets) nor in
  a folder of keys (:data:`SECRET_DIRS`);
- by what the path is, where it exists (symlinks followed, as libvirt and
  QEMU follow them): the resolved path obeys the same folder rules; it is
  a regular file; a disk image or console log has no other names (hard
  links: libvirt's chown and virtlogd's truncation would reach them); a
  kernel or initrd is readable by everyone (boot files are public: a
  kernel or initrd that hides from other users is a host secret, such as
  /etc/shadow or an initramfs holding disk-encryption keys); the console
  log is not a symlink, nor under a symlinked folder.
"""

from __future__ import annotations

import os
import re
import stat

from ..errors import Invalid

PATH_MAX = 4096
# Folders that never hold a VM image, kernel or log of the user's: device nodes (/dev/sda, /dev/mem),
# kernel interfaces (/proc/kcore, a PCI BAR's sysfs resource0), runtime sockets and pid files,
# the host's configuration and secrets (/etc/shadow, /etc/ssh, /etc/libvirt/secrets).
SYSTEM_DIRS = ("/dev", "/proc", "/sys", "/run", "/var/run", "/etc", "/var/lib/libvirt/secrets")
# Folders of keys, wherever they are (~/.ssh/id_ed25519 as a raw disk would hand the key to the guest).
SECRET_DIRS = frozenset({".ssh", ".gnupg"})
# Characters that have no place in a path, a kernel argument or an XML attribute.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def shorten(text: str, limit: int = 60) -> str:
    """``text``, cut to ``limit`` characters with an ellipsis: a value echoed in a one-line error."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clean_text(value: str, what: str) -> None:
    if CONTROL_RE.search(value):
        raise Invalid(f"{what} must not contain control characters or newlines")


def clean_path(value: str, what: str = "the path") -> None:
    """A path as libvirt will get it: no control characters, no ``..`` segments, at most PATH_MAX.

    ``..`` is refused rather than resolved: a path that climbs out of the
    folder it names is almost always a mistake or a trick, and libvirt's
    security drivers label the path as written.
    """
    clean_text(value, what)
    if len(value) > PATH_MAX:
        raise Invalid(f"{what} must be at most {PATH_MAX} characters, got {len(value)}")
    if ".." in value.split("/"):
        raise Invalid(f"{what} must not contain '..' segments; write the folder it means (e.g. /var/lib/libvirt/images/dsp.qcow2)")


def _place(path: str) -> str | None:
    """Why ``path`` (absolute, normalized) is in a folder no config may name, or None."""
    for top in SYSTEM_DIRS:
        if path == top or path.startswith(top + "/"):
            return f"is under {top}, a host system folder (devices, kernel interfaces, sockets or host secrets)"
    if SECRET_DIRS & set(path.split("/")):
        return "is in a folder of keys (.ssh, .gnupg)"
    return None


def host_path(v: str | None) -> None:
    """A path on the host: absolute (or ``~/``), clean, no '..', not in a system folder."""
    if v is None:
        return
    clean_path(v)
    if v.startswith("~") and not (v == "~" or v.startswith("~/")):
        raise Invalid("~user paths are not expanded here; write the full path, or ~/ for your own home")
    if not (v.startswith("/") or v.startswith("~")):
        raise Invalid("must be an absolute path (or start with ~/)")
    why = _place(os.path.normpath(os.path.expanduser(v)))
    if why:
        raise Invalid(f"{why}; name a file of your own, e.g. under /var/lib/libvirt/images")


def console_log_path(v: str | None) -> None:
    if v is None:
        return
    clean_path(v)
    if not v.startswith("/"):
        raise Invalid("must be an absolute path")
    if not v.endswith(".log") or v.endswith("/.log"):
        raise Invalid(
            "must be a file name ending in .log (virtlogd truncates it on every start), "
            "e.g. /var/log/libvirt/qemu/dsp-console.log"
        )
    why = _place(os.path.normpath(v))
    if why:
        raise Invalid(f"{why}; virtlogd (root) writes it: use /var/log/libvirt/qemu/NAME-console.log")


def _kind(mode: int) -> str:
    return ("a block device" if stat.S_ISBLK(mode) else "a character device" if stat.S_ISCHR(mode)
            else "a folder" if stat.S_ISDIR(mode) else "a FIFO or socket")


def existing_file(path: str, role: str) -> None:
    """Where ``path`` exists here, what it is must be fit for ``role`` ("disk", "kernel", "initrd").

    A path that does not exist here is left to the preflight (``check``'s
    ``boot.files``) and to libvirt on the host that runs the domain.
    """
    path = os.path.expanduser(path)
    real = os.path.realpath(path)
    via = f" (through a symlink to {shorten(real)})" if real != os.path.abspath(path) else ""
    try:
        st = os.stat(path)
    except OSError:
        # Not here (or not reachable): still not through a link into a system folder.
        why = _place(real)
        if why:
            raise Invalid(f"{why.replace('is ', 'resolves to a file ', 1)}{via}; name a file of your own") from None
        return
    if not stat.S_ISREG(st.st_mode):
        raise Invalid(f"is {_kind(st.st_mode)}{via}; a regular file is expected")
    why = _place(real)
    if why:
        raise Invalid(f"{why.replace('is ', 'resolves to a file ', 1)}{via}; name a file of your own")
    if role == "disk" and st.st_nlink > 1:
        raise Invalid(
            f"has {st.st_nlink} names (hard links): libvirt would hand the guest, and chown, a file other "
            "names share; copy it (cp --reflink=auto) or name a file of its own"
        )
    if role in ("kernel", "initrd") and not st.st_mode & stat.S_IROTH:
        raise Invalid(
            f"is not readable by everyone (mode {stat.S_IMODE(st.st_mode):04o}): a boot file is public, and one "
            f"that hides from other users is taken for a host secret; chmod o+r it if it really is a {role}"
        )


def existing_console_log(path: str) -> None:
    """virtlogd, as root, creates and truncates the console log on every start: never through a link."""
    parent = os.path.dirname(path)
    real_parent = os.path.realpath(parent)
    if real_parent != os.path.normpath(parent):
        raise Invalid(
            f"is under a symlinked folder ({shorten(parent)} -> {shorten(real_parent)}): virtlogd (root) would "
            "write where the link points; give the real folder"
        )
    why = _place(real_parent)
    if why:
        raise Invalid(f"{why}; use /var/log/libvirt/qemu/NAME-console.log")
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise Invalid(
            f"is a symlink to {shorten(os.path.realpath(path))}: virtlogd (root) would truncate "
            "what it points to; give the real path"
        )
    if not stat.S_ISREG(st.st_mode):
        raise Invalid("exists and is not a regular file; give a log file's path")
    if st.st_nlink > 1:
        raise Invalid(
            f"has {st.st_nlink} names (hard links): virtlogd (root) truncates it, and every other name with it; "
            "give a path of its own"
        )


# --- files the commands write for the user (a plot): checked before the work, written without following a link ---

def _shared(st: os.stat_result) -> bool:
    """A folder every user may write in (/tmp, /var/tmp, /dev/shm): anyone can plant a link there."""
    return bool(st.st_mode & stat.S_IWOTH)


def output_file(value: str, suffixes: tuple[str, ...]) -> str:
    """Where a command may write the user's output ``value`` (a plot), checked before the work starts:
    the rules of the config's paths (clean, no '..', not in a system folder or a folder of keys, also
    where the path leads), one of ``suffixes``, an existing folder this user may write in, no link on
    the way that lies in a shared folder, and no target that is a link or anything but a regular
    file. Relative paths are taken from the current folder. The absolute path, or :class:`Invalid`."""
    clean_path(value)
    if value.startswith("~") and not (value == "~" or value.startswith("~/")):
        raise Invalid("~user paths are not expanded here; write the full path, or ~/ for your own home")
    path = os.path.abspath(os.path.expanduser(value))
    folder, name = os.path.split(path)
    why = _place(path)
    if why:
        raise Invalid(f"{why}; write it into a folder of your own")
    if not name.lower().endswith(suffixes) or name.lower() in suffixes:
        raise Invalid(f"must be a file name ending in {' or '.join(suffixes)}, e.g. ./result{suffixes[0]}")
    # Every link on the way: one in a shared folder could be pointed elsewhere by another user.
    at = "/"
    for part in folder.strip("/").split("/") if folder != "/" else []:
        nxt = os.path.join(at, part)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            raise Invalid(f"the folder {shorten(folder)} does not exist; create it (mkdir -p) or name "
                          "another") from None
        except NotADirectoryError:
            raise Invalid(f"{shorten(at)} is not a folder; name a file in an existing folder") from None
        except PermissionError:
            raise Invalid(f"{shorten(at)} may not be entered by this user; name another folder") from None
        if stat.S_ISLNK(st.st_mode) and _shared(os.stat(at)):
            raise Invalid(f"goes through the symlink {shorten(nxt)} in a folder every user may write in; "
                          "give the real folder")
        at = os.path.realpath(nxt)
    if not os.path.isdir(at):
        raise Invalid(f"{shorten(folder)} is not a folder; name a file in an existing folder")
    why = _place(at)
    if why:
        raise Invalid(f"{why.replace('is ', 'resolves to a folder ', 1)} (through a symlink); "
                      "write it into a folder of your own")
    if not os.access(at, os.W_OK | os.X_OK):
        raise Invalid(f"the folder {shorten(folder)} is not writable by this user; name another folder")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if stat.S_ISLNK(st.st_mode):
        raise Invalid(f"is a symlink to {shorten(os.path.realpath(path))}; give the real path")
    if not stat.S_ISREG(st.st_mode):
        raise Invalid(f"exists and is {_kind(st.st_mode)}; a regular file is expected (it is replaced)")
    return path


def write_output(path: str | os.PathLike[str], write) -> str:
    """Write ``path`` as ``write(binary file)`` does, without following a link: into a new file beside
    it (O_EXCL | O_NOFOLLOW, in the folder opened once), synced, then renamed over the name. A link
    planted at the name after the check is replaced, never written through; on failure the old file
    stays as it was. The path written."""
    full = os.path.abspath(os.path.expanduser(os.fspath(path)))
    folder, name = os.path.split(full)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for _attempt in range(16):
            tmp = f".{name[:200]}.{os.urandom(6).hex()}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666,
                             dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 16 random names taken
            raise FileExistsError(f"{folder}: no free temporary name beside {name}")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return full
