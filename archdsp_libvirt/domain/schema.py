"""Validation against libvirt's own RelaxNG schema (shipped by libvirt0)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from lxml import etree

from ..errors import HostError, RenderError

SCHEMA_DIR = Path(os.environ.get("ARCHDSP_LIBVIRT_SCHEMAS", "/usr/share/libvirt/schemas"))


@functools.cache
def _domain_schema(path: Path) -> etree.RelaxNG:
    try:
        return etree.RelaxNG(etree.parse(str(path)))
    except OSError:
        raise HostError(
            f"libvirt's domain schema {path} is missing: install libvirt0 (apt-get install libvirt0) "
            "or set ARCHDSP_LIBVIRT_SCHEMAS to the folder holding domain.rng"
        ) from None


def validate_domain(root: etree._Element) -> None:
    """Raise :class:`RenderError` unless ``root`` is valid libvirt domain XML."""
    schema = _domain_schema(SCHEMA_DIR / "domain.rng")
    if not schema.validate(root):
        err = schema.error_log.last_error
        where = f" (element {err.path})" if err is not None and err.path else ""
        msg = err.message if err is not None else "unknown error"
        raise RenderError(f"rendered domain XML is not valid for libvirt's schema: {msg}{where}")
