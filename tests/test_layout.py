"""The package's rooms depend on each other one way: config -> host -> domain -> virt/audio -> service -> cli.

Read from the code's own imports (module level and inside functions), so that a new import that runs
back up the flow fails here instead of growing a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "archdsp_libvirt"

# room -> the rooms it may import (besides itself). The base modules (errors, cpuset, procs) serve all.
ALLOWED = {
    "config": set(),
    "host": {"config"},
    "domain": {"config", "host"},
    "virt": {"config", "host", "domain"},
    "audio": {"config", "host", "domain", "virt"},
    "service": {"config", "host", "domain", "virt", "audio"},
    "cli": {"service", "config", "host"},
}
BASE = {"errors", "cpuset", "procs", "lazy"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "archdsp_libvirt" else None


def _imports(path: Path) -> set[str]:
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            if not node.module:  # from . import x
                out.update(f"{target}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_every_import_follows_the_flow():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        room = path.relative_to(PKG).parts[0].removesuffix(".py")
        if room not in ALLOWED:
            continue
        for target in _imports(path):
            other = _room(target)
            if other is None or other == room or other in BASE:
                continue
            if other not in ALLOWED[room]:
                wrong.append(f"{path.relative_to(PKG.parent)} imports {target}")
    assert wrong == [], "imports against the flow:\n" + "\n".join(wrong)


def test_the_check_can_fail():
    """The rule catches an import against the flow (a host module reaching the libvirt side)."""
    assert _room("archdsp_libvirt.virt.connection") == "virt" not in ALLOWED["host"]
