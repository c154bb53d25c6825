from hypothesis import given
from hypothesis import strategies as st
import pytest

from archdsp_libvirt.cpuset import format_cpuset, parse_cpuset


@given(st.frozensets(st.integers(min_value=0, max_value=511)))
def test_round_trip(cpus):
    assert parse_cpuset(format_cpuset(cpus)) == cpus


@pytest.mark.parametrize(
    "spec, cpus",
    [("0-3,^2", {0, 1, 3}), ("", set()), ("\n", set()), ("5", {5}), ("0-1,8-9", {0, 1, 8, 9}), (" 1 , 3 ", {1, 3})],
)
def test_parse(spec, cpus):
    assert parse_cpuset(spec) == cpus


@pytest.mark.parametrize("cpus, spec", [({0, 1, 2, 5}, "0-2,5"), (set(), ""), ({7}, "7"), ({1, 3}, "1,3")])
def test_format(cpus, spec):
    assert format_cpuset(cpus) == spec


@pytest.mark.parametrize("bad", ["a", "3-1", "-1", "1-x"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        parse_cpuset(bad)
