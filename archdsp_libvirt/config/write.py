"""Changing a user's config file without ever losing it.

:func:`update_config` is the one writer of a config file (``tune --apply`` uses it). It

- edits the document with tomlkit, so comments and layout stay;
- keeps the file's encoding (UTF-8), its byte order mark if it had one, and its line endings (a file
  written with CRLF throughout stays CRLF, also on the lines tomlkit adds);
- checks the new text with the config loader *before* anything is written: a value the config refuses
  leaves the old file byte for byte as it was;
- writes a temporary file in the same folder, fsyncs it, gives it the old file's mode and owner, and
  renames it over the old name (then fsyncs the folder): a write that fails half-way (a full disk, a file
  size limit) leaves the old file whole;
- refuses a config that is a symbolic link (root would otherwise replace whatever the link names): the
  message gives the link's target to pass instead. The folder is opened once and every step works
  relative to it, so the name cannot be swapped for a link meanwhile; a file changed by someone else
  while the edit ran is not overwritten.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import ArchdspError, ConfigError
from .load import config_from_bytes, decode_config, shown_path
from .model import CONFIG_MAX_BYTES

T = TypeVar("T")


def same_line_endings(old: str, new: str) -> str:
    """``new`` with ``old``'s line endings: CRLF throughout when ``old`` used CRLF throughout."""
    lf = old.count("\n")
    if lf and old.count("\r\n") == lf:
        return new.replace("\r\n", "\n").replace("\n", "\r\n")
    return new


def update_config(path: str | os.PathLike[str], edit: Callable[..., T]) -> T:
    """Run ``edit(doc)`` on the config's tomlkit document and write the result as the module says.

    Returns what ``edit`` returned. Nothing is written when the text did not change. Raises
    :class:`ConfigError` (exit 2) for a file or a new value that cannot be used, :class:`ArchdspError`
    (exit 1) when the write itself fails; in both cases the old file is unchanged.
    """
    import tomlkit
    from tomlkit.exceptions import TOMLKitError

    p = Path(path)
    shown = shown_path(p)
    folder, name = os.path.split(os.fspath(p))
    if name in ("", ".", ".."):
        raise ConfigError(f"{shown}: not a file name; pass the path of a TOML file")
    try:
        dir_fd = os.open(folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot open its folder: {exc.strerror}") from None
    try:
        before, raw = _read(dir_fd, name, p, shown)
        text = decode_config(raw, shown)
        try:
            doc = tomlkit.parse(text)
        except TOMLKitError as exc:
            raise ConfigError(f"{shown}: invalid TOML: {exc}") from None
        result = edit(doc)
        new_text = same_line_endings(text, tomlkit.dumps(doc))
        new = (codecs.BOM_UTF8 if raw.startswith(codecs.BOM_UTF8) else b"") + new_text.encode("utf-8")
        if new == raw:
            return result
        try:
            config_from_bytes(new, shown)
        except ConfigError as err:
            raise ConfigError(f"{err.message} (refused before writing: the file is unchanged)") from None
        _replace(dir_fd, name, new, before, shown)
        return result
    finally:
        os.close(dir_fd)


def _read(dir_fd: int, name: str, path: Path, shown: str) -> tuple[os.stat_result, bytes]:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file; pass the path of a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{shown}: is a symbolic link; a config is written only as a regular file: pass the "
                          f"file it names ({shown_path(os.path.realpath(path))})")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{shown}: not a regular file; pass the path of a TOML file")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        with os.fdopen(fd, "rb") as fh:
            now = os.fstat(fh.fileno())
            raw = fh.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror}") from None
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        raise ConfigError(f"{shown}: replaced while it was being read; run the command again")
    return st, raw


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)


def _replace(dir_fd: int, name: str, data: bytes, before: os.stat_result, shown: str) -> None:
    """Write ``data`` to a new file beside ``name`` and rename it over ``name``."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
    except OSError as exc:
        raise ArchdspError(f"{shown}: cannot write a new file beside it ({exc.strerror}); the file is unchanged") \
            from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            made = os.fstat(fd)
            if (made.st_uid, made.st_gid) != (before.st_uid, before.st_gid):
                os.fchown(fd, before.st_uid, before.st_gid)  # before the mode: chown clears set-id bits
            os.fchmod(fd, stat.S_IMODE(before.st_mode))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is None or not _same_file(now, before):
            raise ConfigError(f"{shown}: changed by something else meanwhile; not overwritten, run the command again")
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise ArchdspError(f"{shown}: cannot write the new config ({exc.strerror}); the file is unchanged") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)  # the rename itself reaches the disk
