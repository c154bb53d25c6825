"""The package's rooms depend on each other one way: config -> host -> domain -> guest/virt/audio -> service -> cli.

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
    "guest": {"config", "host", "domain"},
    "virt": {"config", "host", "domain"},
    "audio": {"config", "host", "domain", "virt"},
    "service": {"config", "host", "domain", "guest", "virt", "audio"},
    "cli": {"service", "config", "host"},
}
BASE = {"errors", "cpuset", "procs", "lazy"}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "archdsp_libvirt" else None


def _imports(path: Path, root: Path = PKG.parent) -> set[str]:
    rel = path.relative_to(root).with_suffix("")
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


# --- the bridge backends: named by their own packages and the registry alone -----------------------

AUDIO = PKG / "audio"
BACKEND_PACKAGES = ("jack2", "pipewire")
REGISTRY = "servers.py"
# A backend's registry key in code ("jack", "pipewire"), or PipeWire however it is written. "JACK" in prose
# names the audio API every backend and the guest speak, not a backend.
_BACKEND_WORD = __import__("re").compile(r"\b(jack2?)\b|(?i:\bpipewire\b)")


def backend_names(path: Path, root: Path = PKG.parent) -> list[str]:
    """Where a module names a bridge backend: an import of a backend package, or a string (not a docstring)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    found = [f"imports {t}" for t in _imports(path, root)
             if any(p in BACKEND_PACKAGES for p in t.split(".")[2:3]) and t.startswith("archdsp_libvirt.audio.")]
    found += [f"line {n.lineno}: {n.value[:60]!r}" for n in ast.walk(tree)
              if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
              and _BACKEND_WORD.search(n.value)]
    return found


def test_only_the_backends_and_the_registry_name_a_backend():
    wrong = []
    for path in sorted(AUDIO.rglob("*.py")):
        rel = path.relative_to(AUDIO)
        if rel.parts[0] in BACKEND_PACKAGES or rel.as_posix() == REGISTRY:
            continue
        wrong += [f"audio/{rel.as_posix()} {where}" for where in backend_names(path)]
    assert wrong == [], ("outside audio/jack2/, audio/pipewire/ and audio/servers.py, go through the backend "
                         "contract (audio/backend.py) instead of naming a backend:\n" + "\n".join(wrong))


def test_the_backend_rule_can_fail(tmp_path):
    """The rule catches an import of a backend package and a backend's key in a string."""
    probe = tmp_path / "archdsp_libvirt" / "audio" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text('"""Docstrings may say PipeWire."""\nfrom .pipewire import server\n\nKIND = "jack"\n')
    found = backend_names(probe, tmp_path)
    assert "imports archdsp_libvirt.audio.pipewire" in found and "line 4: 'jack'" in found, found
    assert not any("Docstrings" in f for f in found)
