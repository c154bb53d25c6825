"""Shared fixtures: golden files, private test-driver connections."""

from __future__ import annotations

import difflib
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOMAINS = REPO / "domains"
GOLDEN = Path(__file__).resolve().parent / "golden"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regenerate-golden",
        action="store_true",
        default=False,
        help="rewrite tests/golden/*.xml from the current renderer instead of comparing",
    )


@pytest.fixture
def golden(request: pytest.FixtureRequest):
    """``golden(name, text)``: exact compare with a unified diff, or rewrite with --regenerate-golden."""
    regenerate = request.config.getoption("--regenerate-golden")

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if regenerate:
            path.write_text(text)
            return
        if not path.exists():
            pytest.fail(f"no golden file {path}; run pytest --regenerate-golden and review it")
        expected = path.read_text()
        if text != expected:
            diff = "".join(
                difflib.unified_diff(
                    expected.splitlines(keepends=True), text.splitlines(keepends=True),
                    fromfile=f"golden/{name}", tofile="rendered",
                )
            )
            pytest.fail(f"rendered XML differs from golden/{name}:\n{diff}")

    return check


@pytest.fixture
def test_uri(tmp_path: Path) -> str:
    """A private in-process libvirt test driver (its own empty node), not the shared test:///default."""
    node = tmp_path / "node.xml"
    node.write_text(
        "<node>\n"
        "  <cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads></cpu>\n"
        "  <memory>8388608</memory>\n"
        "</node>\n"
    )
    return f"test://{node}"


@pytest.fixture
def unique_name() -> str:
    return f"archdsp-test-{uuid.uuid4().hex[:8]}"
