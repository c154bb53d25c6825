"""archdsp-libvirt: a real-time DSP coprocessor VM defined and run through libvirt.

>>> from archdsp_libvirt import load_config, render_domain, HostModel
>>> rendered = render_domain(load_config("domains/minimal.toml"), HostModel.local())
>>> print(rendered.xml)

The errors are imported here; the other names from their modules when first
used (the ``TYPE_CHECKING`` block below names each one's module), so that
``archdsp-virt --help`` or ``archdsp-virt netjack status`` do not pay for
the config model, lxml and the schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ArchdspError, ConfigError, HostError, RenderError, UsageError
from .lazy import lazy_exports

if TYPE_CHECKING:
    from .config import DspConfig, load_config, parse_config
    from .domain.build import Rendered, render_domain
    from .domain.policy import Plan, plan
    from .domain.render import to_xml
    from .domain.schema import validate_domain
    from .host.model import HostFacts, HostModel

__version__ = "0.1.0"

# public name -> the module that defines it (imported on first use)
_EXPORTS = {
    "DspConfig": "config",
    "load_config": "config",
    "parse_config": "config",
    "HostModel": "host.model",
    "HostFacts": "host.model",
    "Plan": "domain.policy",
    "plan": "domain.policy",
    "Rendered": "domain.build",
    "render_domain": "domain.build",
    "to_xml": "domain.render",
    "validate_domain": "domain.schema",
}

__all__ = sorted(["ArchdspError", "ConfigError", "HostError", "RenderError", "UsageError",
                  *(n for n in _EXPORTS if n not in ("plan", "to_xml", "validate_domain"))])


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))

