"""The service package's face: each name is a small function that calls through to the module doing
the work, with that function's own signature, so a reader (or a tool) follows the CLI into it."""

from __future__ import annotations

import importlib
import inspect

import pytest

import archdsp_libvirt.service as service

MODULES = ("domain", "audio", "host", "guest")


def _real(name: str):
    """The function ``name`` in the one service module that defines it."""
    found = []
    for m in MODULES:
        mod = importlib.import_module(f"archdsp_libvirt.service.{m}")
        fn = getattr(mod, name, None)
        if fn is not None and getattr(fn, "__module__", None) == mod.__name__:
            found.append(fn)
    assert len(found) == 1, f"{name}: defined in {len(found)} service modules"
    return found[0]


@pytest.mark.parametrize("name", service.__all__)
def test_each_name_has_the_real_function_s_signature(name):
    stub = getattr(service, name)
    assert stub.__module__ == "archdsp_libvirt.service", f"{name} is not the face's own function"
    assert inspect.signature(stub) == inspect.signature(_real(name))


@pytest.mark.parametrize("name", service.__all__)
def test_each_name_calls_through_with_every_argument(name, monkeypatch):
    """Every argument reaches the real function under its own name (a stub that drops or swaps one fails)."""
    real = _real(name)
    seen = {}

    def record(*args, **kwargs):
        seen.update(inspect.signature(real).bind(*args, **kwargs).arguments)
        return "result"

    monkeypatch.setattr(importlib.import_module(real.__module__), name, record)
    params = inspect.signature(real).parameters
    args = {p: f"<{p}>" for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD}
    extra = {"extra_option": "<x>"} if any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values()) else {}
    assert getattr(service, name)(**args, **extra) == "result"
    expected = dict(args)
    if extra:
        expected[next(p for p, v in params.items() if v.kind is inspect.Parameter.VAR_KEYWORD)] = extra
    assert seen == expected


def test_the_face_exports_every_public_command_function():
    """A command function added to a service module without a face of its own is caught here."""
    public = set()
    for m in MODULES:
        mod = importlib.import_module(f"archdsp_libvirt.service.{m}")
        public |= {n for n, v in vars(mod).items() if inspect.isfunction(v) and v.__module__ == mod.__name__
                   and not n.startswith("_") and (n.endswith("_command") or m != "domain")}
    assert public <= set(service.__all__), sorted(public - set(service.__all__))
