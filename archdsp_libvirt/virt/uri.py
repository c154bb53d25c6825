"""libvirt URIs as virsh reads them, without loading libvirt itself."""

from __future__ import annotations

import ipaddress
import os
from urllib.parse import urlsplit

from ..errors import UsageError, shown

DEFAULT_URI = "qemu:///system"


def check_uri(uri: str, source: str = "-c/--connect") -> str:
    """``uri`` when libvirt can be asked about it; else a one-line :class:`UsageError` naming
    ``source`` (the option or variable it came from), the URI and the fix."""
    where = f"{source} '{shown(uri, 200)}'"
    if not uri.isprintable():
        bad = sorted({shown(c) for c in uri if not c.isprintable()})
        raise UsageError(f"{where}: a URI cannot hold control or other non-printing characters ({', '.join(bad)}): "
                         "write it on one line, without them")
    example = "e.g. qemu+ssh://[fe80::1]/system, or use a host name"
    try:
        parts = urlsplit(uri)
        parts.hostname, parts.port  # noqa: B018 - each raises ValueError when malformed
    except ValueError as err:
        what = "port" if str(err).startswith("Port") else "host"
        raise UsageError(f"{where}: the {what} is not valid ({err}): an IPv6 address goes in brackets, "
                         f"{example}") from None
    hostport = parts.netloc.rpartition("@")[2]
    if hostport.startswith("["):
        inside = hostport[1:hostport.find("]")] if "]" in hostport else hostport[1:]
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise UsageError(f"{where}: [{inside}] is not an IPv6 address: write a valid one in brackets, "
                             f"{example}") from None
    elif "[" in hostport or "]" in hostport:
        raise UsageError(f"{where}: the host {hostport!r} has a stray bracket: an IPv6 address goes in "
                         f"brackets, {example}")
    return uri


def resolve_uri(uri: str | None) -> str:
    """``-c URI``, else ``LIBVIRT_DEFAULT_URI``, else qemu:///system: as virsh does; refused in one
    line (:func:`check_uri`) when it is not a URI libvirt can be asked about."""
    if uri:
        return check_uri(uri)
    env = os.environ.get("LIBVIRT_DEFAULT_URI")
    if env:
        return check_uri(env, "LIBVIRT_DEFAULT_URI")
    return DEFAULT_URI


def is_local_uri(uri: str | None) -> bool:
    """Whether a libvirt URI names this machine: no host, or ``localhost``, as libvirt's own
    remote driver decides. Any other host (127.0.0.1 included) is another machine."""
    return urlsplit(resolve_uri(uri)).hostname in (None, "", "localhost")
