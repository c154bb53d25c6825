"""The domain pipeline: config and host model -> plan -> XML -> checked against libvirt's schema.

Each step is its own module and knows nothing of the next: :mod:`.policy`
decides, :mod:`.render` maps, :mod:`.schema` validates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msgspec import Struct

from .policy import Plan, plan as make_plan
from .render import domain, to_xml
from .schema import validate_domain

if TYPE_CHECKING:
    from ..config import DspConfig
    from ..host.model import HostModel


class Rendered(Struct, frozen=True):
    """A validated domain definition and the plan it was rendered from."""

    xml: str
    plan: Plan

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.plan.warnings


def render_domain(cfg: DspConfig, host: HostModel, uuid: str | None = None) -> Rendered:
    """Render ``cfg`` for ``host`` as libvirt domain XML, validated against libvirt's schema."""
    p = make_plan(cfg, host, uuid=uuid)
    root = domain(p)
    validate_domain(root)
    return Rendered(xml=to_xml(root), plan=p)
