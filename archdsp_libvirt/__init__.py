"""archdsp-libvirt: a real-time DSP coprocessor VM defined and run through libvirt.

>>> from archdsp_libvirt import load_config, render_domain, HostFacts
>>> rendered = render_domain(load_config("domains/minimal.toml"), HostFacts.local())
>>> print(rendered.xml)

The names below are imported from their modules when first used, so that
``archdsp-virt --help`` or ``archdsp-virt netjack status`` do not pay for
the config model, lxml and the schema.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "ArchdspError": "errors",
    "ConfigError": "errors",
    "HostError": "errors",
    "RenderError": "errors",
    "UsageError": "errors",
    "DspConfig": "config",
    "load_config": "config",
    "parse_config": "config",
    "HostFacts": "policy",
    "Plan": "policy",
    "plan": "policy",
    "Rendered": "render",
    "render_domain": "render",
    "domain": "render",
    "to_xml": "render",
    "validate_domain": "schema",
}

__all__ = sorted(n for n in _EXPORTS if n not in ("plan", "domain", "to_xml", "validate_domain"))


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


if TYPE_CHECKING:
    from .config import DspConfig, load_config, parse_config
    from .errors import ArchdspError, ConfigError, HostError, RenderError, UsageError
    from .policy import HostFacts, Plan, plan
    from .render import Rendered, domain, render_domain, to_xml
    from .schema import validate_domain
