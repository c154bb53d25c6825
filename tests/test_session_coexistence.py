"""The test session's demo guest coexists with what else runs (scripts/demo among them): its own
JACK server name and a vCPU core no other domain's vCPU holds."""

from __future__ import annotations

import pytest

from conftest import JACK_SERVER_NAMES, free_jack_server_name, pick_guest_cores


def test_the_guest_avoids_the_core_of_the_demos_vcpu():
    # The CI machine: 2 cores, the demo's FIFO vCPU on core 1.
    assert pick_guest_cores(frozenset({0, 1}), frozenset({1})) == (0, True)
    # Nothing else runs: core 1, as before.
    assert pick_guest_cores(frozenset({0, 1}), frozenset()) == (1, True)
    assert pick_guest_cores(frozenset(range(8)), frozenset({6, 7})) == (5, True)


def test_without_a_free_core_the_guest_shares_without_fifo():
    assert pick_guest_cores(frozenset({0, 1}), frozenset({0, 1})) == (1, False)
    # A single free core would leave the host nothing: share instead.
    assert pick_guest_cores(frozenset({0}), frozenset()) == (0, False)


def test_the_jack_server_name_is_one_no_running_server_holds():
    taken = {JACK_SERVER_NAMES[0]}
    assert free_jack_server_name(lambda n: n in taken) == JACK_SERVER_NAMES[1]
    assert free_jack_server_name(lambda n: False) == JACK_SERVER_NAMES[0]
    assert "default" not in JACK_SERVER_NAMES  # the demo's server (JACK_DEFAULT_SERVER unset)
    with pytest.raises(RuntimeError, match="in use"):
        free_jack_server_name(lambda n: True)
