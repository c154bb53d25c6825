"""The guest-side contract: the link's guest settings as one systemd credential.

The domain carries them as an SMBIOS type 11 OEM string (``<sysinfo type='smbios'><oemStrings>``)::

    io.systemd.credential:archdsp.netjack=v=1 master=192.168.122.1 port=19000 name=dsp latency=0 ...

systemd >= 252 imports it as the system credential ``archdsp.netjack``; any other guest reads the
same string from ``/sys/firmware/dmi/entries/11-*/raw`` (the demo initramfs does). The value is
space-separated ``key=value`` pairs that a POSIX shell splits with no JSON tool: keys are lower-case
words, values ``[A-Za-z0-9._:/-]+``. A value that needs anything else (a space, ``=``, a quote) is
refused, never escaped, so a reader needs no unescaping rules. ``v`` is the format's version:
readers ignore keys they do not know and refuse a ``v`` they do not know. docs/guest-contract.md
is the reference.
"""

from __future__ import annotations

import re

from ..config import DspConfig
from ..errors import ConfigError

VERSION = "1"
CREDENTIAL = "archdsp.netjack"
OEM_PREFIX = f"io.systemd.credential:{CREDENTIAL}="
# v first, then in the order the guest's slave uses them; optional keys last.
KEYS = ("v", "master", "port", "name", "latency", "channels", "sync", "dsp", "rate", "period", "ip")

_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")
_VALUE = re.compile(r"[A-Za-z0-9._:/-]{1,64}")


class ContractError(ConfigError):
    """A credential value that is not in the contract's format."""


def settings(cfg: DspConfig) -> dict[str, str] | None:
    """The link's guest settings of ``cfg``, in the contract's keys; None without a NETJACK link."""
    nj = cfg.netjack
    if not nj.enable:
        return None
    out = {
        "v": VERSION,
        "master": nj.master_ip,
        "port": str(nj.source_port),
        "name": nj.client_name,
        "latency": str(nj.network_latency),
        "channels": str(nj.channels),
        "sync": "1" if nj.sync else "0",
        "dsp": "thru" if nj.dsp_client else "direct",
        "rate": str(nj.sample_rate),
        "period": str(nj.buffer_size),
    }
    if nj.guest_ip:
        out["ip"] = nj.guest_ip
    return out


def encode(values: dict[str, str]) -> str:
    """``v=1 master=... port=...``: the known keys in :data:`KEYS` order, then any others sorted.

    Refuses (:class:`ContractError`) a key or value outside the format instead of escaping it."""
    if values.get("v") != VERSION:
        raise ContractError(f"guest contract: v must be {VERSION}, got {values.get('v')!r}")
    order = [k for k in KEYS if k in values] + sorted(k for k in values if k not in KEYS)
    for key in order:
        if not _KEY.fullmatch(key):
            raise ContractError(f"guest contract: key {key!r} must be a lower-case word (a-z, 0-9, _)")
        if not _VALUE.fullmatch(values[key]):
            raise ContractError(
                f"guest contract: {key}={values[key]!r} is not one word of letters, digits and . _ : / - "
                "(spaces, '=' and quotes are refused, not escaped)"
            )
    return " ".join(f"{k}={values[k]}" for k in order)


def decode(text: str) -> dict[str, str]:
    """The pairs of a credential value (what :func:`encode` wrote); :class:`ContractError` when it is
    not in the format, has a key twice or a version this package does not read."""
    out: dict[str, str] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not eq or not _KEY.fullmatch(key) or not _VALUE.fullmatch(value):
            raise ContractError(f"guest contract: {word!r} is not key=value in the contract's format")
        if key in out:
            raise ContractError(f"guest contract: {key} is given twice")
        out[key] = value
    if out.get("v") != VERSION:
        raise ContractError(f"guest contract: version v={out.get('v')} is not one this package reads (v={VERSION})")
    return out


def oem_string(cfg: DspConfig) -> str | None:
    """The SMBIOS OEM string (``io.systemd.credential:archdsp.netjack=...``) of ``cfg``'s link."""
    values = settings(cfg)
    return None if values is None else OEM_PREFIX + encode(values)


def from_oem_strings(entries: list[str]) -> dict[str, str] | None:
    """The contract's settings from a domain's OEM strings; None when none carries them."""
    for entry in entries:
        if entry.startswith(OEM_PREFIX):
            return decode(entry[len(OEM_PREFIX):])
    return None
