"""scripts/bench --quick: every row runs and prints its figures and its ratio against the reference
measured in the same run, so that the bench cannot rot unseen. No timing is asserted: what the
figures are is the bench's to report, not the suite's.

The bench runs on the venv this suite runs on (ARCHDSP_VENV) and times its installed archdsp-virt.
Rows 0, 1 and 4 need no libvirtd (row 1 renders for test:///default); rows 2 and 3 define and start
KVM domains of their own on qemu:///system (the real tier).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench"
FIGURE = re.compile(r"^\d+(\.\d+)? (ms|s|KiB)\b")
RATIO = re.compile(r"^\d+\.\d+x$")

pytestmark = pytest.mark.skipif(not (Path(sys.prefix) / "pyvenv.cfg").exists(),
                                reason="the bench runs on a venv of scripts/install-test-deps; this suite does not")


def bench(*args: str, timeout: float = 300) -> dict[str, list[str]]:
    """Run scripts/bench --quick ARGS; the table's rows by label (their cells), every line checked."""
    r = subprocess.run([sys.executable, str(BENCH), "--quick", *args], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "ARCHDSP_VENV": sys.prefix})
    assert r.returncode == 0, f"scripts/bench failed (exit {r.returncode}):\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("row "))
    assert set(lines[head + 1]) <= {"-", " "}, lines[head + 1]
    rows = {}
    for line in lines[head + 2:]:
        if not line.strip():
            break
        cells = re.split(r" {2,}", line.strip())
        rows[cells[0]] = cells
    return rows


def assert_measured(rows: dict[str, list[str]], number: str) -> list[str]:
    """Every row NUMBER.* and NUMBER'.* printed its figure, the reference's and their ratio."""
    found = [label for label in rows if re.match(rf"{re.escape(number)}[a-z]?'*\. ", label)]
    assert found, f"no row {number} in {list(rows)}"
    for label in found:
        cells = rows[label]
        assert len(cells) == 6, cells
        _label, ours, ref, ratio, _goal, met = cells
        assert FIGURE.match(ours) and FIGURE.match(ref), cells
        assert RATIO.match(ratio), cells
        assert met in ("yes", "NO", "-"), cells
    return found


@pytest.mark.skipif(not shutil.which("virt-install"), reason="row 1's reference is virt-install (virtinst)")
def test_bench_quick_prints_every_row_that_needs_no_libvirtd():
    rows = bench("--no-real", "--rows", "0,1,2,3,4,5")
    assert_measured(rows, "0")
    assert len(assert_measured(rows, "1")) == 2  # the command, and the in-process call
    assert len(assert_measured(rows, "4")) == 2  # time and memory
    # rows 2 and 3 say why they were not measured; row 5 measures through the demo VM, or says why not
    assert rows["2./3. status, up"][1].startswith("not measured: --no-real")
    five = next(cells for label, cells in rows.items() if label.startswith("5. "))
    assert re.match(r"^\d+ frames \(", five[1]) and RATIO.match(five[3]) or five[1].startswith("not measured: "), five


@pytest.mark.real
def test_bench_quick_rows_2_and_3_run_on_system_libvirt(system_libvirt):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("rows 2 and 3 start KVM domains: no /dev/kvm here")
    rows = bench("--rows", "2,3", timeout=600)
    assert len(assert_measured(rows, "2")) == 2
    assert len(assert_measured(rows, "3")) == 4  # 3a, 3a', 3b, 3b'
