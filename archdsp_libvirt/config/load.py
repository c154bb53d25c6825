"""Loading a DSP VM description: TOML text to a checked :class:`DspConfig`, or one error line."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import msgspec
from msgspec import Struct

from ..errors import ConfigError, Invalid
from .model import _CONTROL_RE, CONFIG_MAX_BYTES, DspConfig
from .paths import shorten

# --- loading -----------------------------------------------------------------

# msgspec's names for what it expected, as the user reads them.
_TYPE_WORDS = {
    "int": "an integer",
    "bool": "true or false",
    "str": "a string",
    "array": "a list",
    "object": "a table",
    "float": "a number",
}
_MESSAGE_RE = re.compile(r"(?s)(?P<msg>.*?)(?: - at `\$(?P<path>.*)`)?")
_PATH_PART_RE = re.compile(r"\.(\w+)|\[(\d+)\]")


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            # A key is the user's text: one with a newline, an escape or a non-character is quoted,
            # and a long one is cut (a 1 MB key is not echoed whole).
            quoted = repr(text) if _CONTROL_RE.search(text) or _unfit_char(text) else text
            out += ("." if out else "") + shorten(quoted, 40)
    return out or "(top level)"


def _unfit_char(text: str) -> str | None:
    """The first character XML and libvirt cannot hold: a control character (C0, DEL, C1), a surrogate, or a
    Unicode non-character (U+FDD0..U+FDEF, U+FFFE and U+FFFF in every plane); None when there is none."""
    for ch in text:
        o = ord(ch)
        if o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or 0xFDD0 <= o <= 0xFDEF or (o & 0xFFFE) == 0xFFFE:
            return ch
    return None


def _unfit_strings(data: Any, loc: tuple[Any, ...] = ()) -> tuple[tuple[Any, ...], str] | None:
    """Where a string of the config (a value, a list item or a table's key) holds such a character."""
    if isinstance(data, str):
        ch = _unfit_char(data)
        return (loc, ch) if ch else None
    if isinstance(data, dict):
        for k, v in data.items():
            ch = _unfit_char(k)
            if ch:
                return (*loc, k), ch
            found = _unfit_strings(v, (*loc, k))
            if found:
                return found
    if isinstance(data, list):
        for i, v in enumerate(data):
            found = _unfit_strings(v, (*loc, i))
            if found:
                return found
    return None


def _shown(got: Any) -> str:
    """``, got VALUE`` for a short scalar the user wrote; nothing for a table or a long value."""
    if isinstance(got, (dict, list)) or got is _MISSING:
        return ""
    text = repr(got)
    return f", got {text}" if len(text) <= 60 else ""


_MISSING = object()


def _value_at(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _field_type(loc: tuple[Any, ...]) -> Any:
    """The declared type of the key at ``loc`` (None for a list item or an unknown key)."""
    tp: Any = DspConfig
    for part in loc:
        if not isinstance(part, str) or not (isinstance(tp, type) and issubclass(tp, Struct)):
            return None
        found = [f.type for f in msgspec.structs.fields(tp) if f.name == part]
        if not found:
            return None
        tp = found[0]
        if get_origin(tp) is Union:
            tp = next(a for a in get_args(tp) if a is not type(None))
    return tp


def _literal_words(tp: Any) -> str | None:
    """``'a', 'b' or 'c'`` for a Literal type."""
    if get_origin(tp) is not Literal:
        return None
    values = [repr(v) for v in get_args(tp)]
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def _describe(exc: msgspec.ValidationError, data: dict[str, Any]) -> tuple[str, str]:
    """(key, message) for msgspec's error: the key as written in the file, the message in our words."""
    m = _MESSAGE_RE.fullmatch(str(exc))
    assert m is not None
    msg = m["msg"]
    loc: tuple[Any, ...] = tuple(a if a else int(i) for a, i in _PATH_PART_RE.findall(m["path"] or ""))
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, Invalid):
        # One of our checks: the table's path plus the key it names (none for a check across keys).
        if not cause.key and not loc:
            return "", cause.message
        loc += cause.key
        shown = "" if "password" in str(loc[-1]) else _shown(_value_at(data, loc)) if cause.key else ""
        return _key_path(loc), cause.message + shown
    if (unknown := re.fullmatch(r"(?s)Object contains unknown field `(.*)`", msg)):
        return _key_path(loc + (unknown[1],)), "unknown key; remove it or check its spelling (see README: Configuration)"
    if (missing := re.fullmatch(r"(?s)Object missing required field `(.*)`", msg)):
        return _key_path(loc + (missing[1],)), "required key is missing"
    shown = _shown(_value_at(data, loc))
    if (choices := _literal_words(_field_type(loc))) is not None:
        return _key_path(loc), f"must be {choices}{shown}"
    if (bound := re.fullmatch(r"Expected `\w+` ((?:>=|<=|>|<) -?\d+)", msg)):
        return _key_path(loc), f"must be {bound[1]}{shown}"
    if (wrong := re.fullmatch(r"Expected `(\w+)(?: \| null)?`, got `\w+`", msg)) and wrong[1] in _TYPE_WORDS:
        return _key_path(loc), f"expected {_TYPE_WORDS[wrong[1]]}{shown}"
    return _key_path(loc), (msg[:1].lower() + msg[1:]).rstrip(".") + shown


def parse_config(data: dict[str, Any], source: str = "<config>", files_here: bool = True) -> DspConfig:
    """Check a decoded TOML table; raise :class:`ConfigError` naming the key. ``files_here``: check what
    the disk, kernel, initrd and console log are on this machine (false for a remote host's config)."""
    try:
        cfg = msgspec.convert(data, DspConfig)
    except msgspec.ValidationError as exc:
        key, msg = _describe(exc, data)
        where = f"{source}: {key}: " if key else f"{source}: "
        raise ConfigError(where + shorten(msg, 400)) from None
    # Every string, wherever it is (values, list items, table keys): one XML cannot hold would crash the
    # renderer (lxml) and mean nothing to libvirt. Checked once the model took the file, so an unknown
    # or misspelt key is reported as such first.
    found = _unfit_strings(data)
    if found:
        loc, ch = found
        raise ConfigError(f"{source}: {_key_path(loc)}: must not contain control characters or Unicode "
                          f"non-characters (found U+{ord(ch):04X}); XML and libvirt cannot hold them")
    if files_here:
        try:
            cfg.check_files_here()
        except Invalid as exc:
            raise ConfigError(f"{source}: {_key_path(exc.key)}: {exc.message}{_shown(_value_at(data, exc.key))}") from None
    return cfg


def shown_path(path: str | os.PathLike[str]) -> str:
    """A file's name as a one-line message shows it: one with a newline or an escape is quoted."""
    text = str(path)
    return repr(text) if _CONTROL_RE.search(text) else text


def load_config(path: str | os.PathLike[str], files_here: bool = True) -> DspConfig:
    """Read and check a DSP VM description from a TOML file (``files_here``: see :func:`parse_config`)."""
    p = Path(path)
    shown = shown_path(p)
    try:
        # Opened without blocking (a FIFO would wait for a writer), then refused unless a regular file:
        # /dev/zero or a FIFO would be read for ever.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if stat.S_ISDIR(mode):
                raise IsADirectoryError
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{shown}: not a regular file (a device, FIFO or socket); pass the path of a TOML file")
            raw = fh.read(CONFIG_MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file; pass the path of a TOML file such as domains/minimal.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory; pass the path of a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read: {exc.strerror}") from None
    return config_from_bytes(raw, shown, files_here)


def decode_config(raw: bytes, shown: str) -> str:
    """The text of a config file's bytes (UTF-8, a byte order mark taken off), or the one-line error."""
    if len(raw) > CONFIG_MAX_BYTES:
        raise ConfigError(f"{shown}: larger than {CONFIG_MAX_BYTES // 1024} KiB; a DSP VM description is a few lines")
    try:
        # A UTF-8 byte order mark (some editors write one) is not TOML: taken off, as Python's utf-8-sig does.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{shown}: not UTF-8 text; a TOML file is expected") from None


def config_from_bytes(raw: bytes, shown: str = "<config>", files_here: bool = True) -> DspConfig:
    """Check a config file's bytes as :func:`load_config` checks the file (``shown`` names it)."""
    text = decode_config(raw, shown)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{shown}: invalid TOML: arrays or tables nested too deeply") from None
    return parse_config(data, shown, files_here)
