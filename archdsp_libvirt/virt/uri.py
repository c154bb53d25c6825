"""libvirt URIs as virsh reads them, without loading libvirt itself."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

DEFAULT_URI = "qemu:///system"


def resolve_uri(uri: str | None) -> str:
    """``-c URI``, else ``LIBVIRT_DEFAULT_URI``, else qemu:///system: as virsh does."""
    return uri or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def is_local_uri(uri: str | None) -> bool:
    """Whether a libvirt URI names this machine: no host, or ``localhost``, as libvirt's own
    remote driver decides. Any other host (127.0.0.1 included) is another machine."""
    return urlsplit(resolve_uri(uri)).hostname in (None, "", "localhost")
