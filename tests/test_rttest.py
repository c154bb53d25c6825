"""rt-test's parsing of cyclictest's histogram output and its verdict against the period."""

from __future__ import annotations

import pytest

from archdsp_libvirt import parse_config
from archdsp_libvirt.errors import ArchdspError
from archdsp_libvirt.virt.rttest import HOW_TO_ADD, budget_us, command, format_result, parse, ssh_port

ECHOED = "# printf 'ARCHDSP-RT\\055BEGIN\\n'; cyclictest -m -q ... printf 'ARCHDSP-RT\\055END rc=%s\\n' $?\r\n"
OUTPUT = ECHOED + """ARCHDSP-RT-BEGIN\r
# /dev/cpu_dma_latency set to 0us\r
# Histogram\r
000010 000002\r
000014 000495\r
001500 000003\r
# Total: 000000500\r
# Min Latencies: 00010\r
# Avg Latencies: 00022\r
# Max Latencies: 01500\r
# Histogram Overflows: 00000\r
ARCHDSP-RT-END rc=0\r
"""


def test_parse_reads_samples_summary_and_histogram_between_the_markers():
    r = parse(OUTPUT, 5, 1333.3, "console")
    assert (r.samples, r.min_us, r.avg_us, r.max_us) == (500, 10, 22, 1500)
    assert r.histogram == ((10, 2), (14, 495), (1500, 3))
    assert not r.holds and "1500 us > the period budget 1333 us" in r.verdict
    d = r.as_dict()
    assert {"samples", "min_us", "avg_us", "max_us", "histogram"} <= d.keys()
    assert d["histogram"][1] == [14, 495]
    assert "TOO LATE" in format_result(r)


def test_a_max_within_the_period_holds():
    r = parse(OUTPUT.replace("01500", "00900").replace("001500 000003", "000900 000003"), 5, 1333.3, "x")
    assert r.holds and format_result(r).splitlines()[-1].startswith("OK: max 900 us <=")


def test_missing_cyclictest_says_how_to_add_it():
    with pytest.raises(ArchdspError) as e:
        parse("ARCHDSP-RT-BEGIN\nsh: cyclictest: not found\nARCHDSP-RT-END rc=0\n", 5, 1333.3, "x")
    assert e.value.message == HOW_TO_ADD and "rt-tests" in HOW_TO_ADD


def test_no_summary_is_an_error_with_what_was_printed():
    with pytest.raises(ArchdspError, match="no histogram summary: boom"):
        parse("ARCHDSP-RT-BEGIN\nboom\nARCHDSP-RT-END rc=1\n", 5, 1333.3, "x")


def test_the_typed_line_does_not_contain_the_markers_it_waits_for():
    line = command(5)
    assert "ARCHDSP-RT-BEGIN" not in line and "ARCHDSP-RT-END" not in line
    assert "-a 0" in line and "-D 5" in line and "-h 2000" in line


def demo_data() -> dict:
    import tomllib
    from pathlib import Path

    return tomllib.loads((Path(__file__).parent.parent / "domains/demo-dsp.toml").read_text())


def test_budget_and_ssh_forward():
    data = demo_data()
    cfg = parse_config(data)
    assert round(budget_us(cfg)) == 1333
    assert ssh_port(cfg) is None
    data["network"]["hostfwd"] = {"2222": 22}
    assert ssh_port(parse_config(data)) == 2222


def test_rt_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install archdsp-libvirt[plot])")
    from archdsp_libvirt.virt.rttest import plot

    out = plot(parse(OUTPUT, 5, 1333.3, "x"), tmp_path / "rt.png")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
