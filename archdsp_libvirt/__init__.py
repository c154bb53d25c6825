"""archdsp-libvirt: a real-time DSP coprocessor VM defined and run through libvirt.

>>> from archdsp_libvirt import load_config, render_domain, HostFacts
>>> rendered = render_domain(load_config("domains/minimal.toml"), HostFacts.local())
>>> print(rendered.xml)
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import DspConfig, load_config, parse_config
from .errors import ArchdspError, ConfigError, HostError, RenderError, UsageError
from .policy import HostFacts, Plan, plan
from .render import domain, to_xml
from .schema import validate_domain

__all__ = [
    "ArchdspError",
    "ConfigError",
    "DspConfig",
    "HostError",
    "HostFacts",
    "Plan",
    "RenderError",
    "Rendered",
    "UsageError",
    "load_config",
    "parse_config",
    "render_domain",
]

__version__ = "0.1.0"


@dataclass(frozen=True)
class Rendered:
    """A validated domain definition and the plan it was rendered from."""

    xml: str
    plan: Plan

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.plan.warnings


def render_domain(cfg: DspConfig, host: HostFacts, uuid: str | None = None) -> Rendered:
    """Render ``cfg`` for ``host`` as libvirt domain XML, validated against libvirt's schema."""
    p = plan(cfg, host, uuid=uuid)
    root = domain(p)
    validate_domain(root)
    return Rendered(xml=to_xml(root), plan=p)
