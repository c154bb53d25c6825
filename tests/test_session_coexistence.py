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


def test_the_session_guest_shares_no_link_with_a_running_demo():
    """scripts/demo runs archdsp-demo (slave 'dsp' on port 19000): the neighbours check must let the
    session's guest start beside it."""
    import tomllib

    from conftest import DOMAINS, session_guest_text

    from archdsp_libvirt import parse_config
    from archdsp_libvirt.host.checks.neighbours import check_domains
    from archdsp_libvirt.host.model import DspDomain, HostModel

    demo = parse_config(tomllib.loads((DOMAINS / "demo-dsp.toml").read_text()))
    running = DspDomain("archdsp-demo", True, frozenset({1}), netjack_port=demo.netjack.source_port,
                        netjack_client=demo.netjack.client_name, master_ip=demo.netjack.master_ip)
    text = session_guest_text((DOMAINS / "demo-dsp.toml").read_text(), "archdsp-test-demo-abc123", "dsp-abc123",
                              19345, 0, False, "/nonexistent/vmlinuz", "/nonexistent/initrd.img")
    guest = parse_config(tomllib.loads(text))
    assert (guest.netjack.client_name, guest.netjack.source_port) == ("dsp-abc123", 19345)
    found = {f.id: f for f in check_domains(guest, HostModel(domains=(running,)))}
    assert found["domains.netjack"].status == "ok", found["domains.netjack"]


def test_a_udp_port_in_use_is_not_picked():
    import socket

    from conftest import free_udp_port

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        busy = held.getsockname()[1]

        class Picks:
            def __init__(self):
                self.seq = [busy, busy, busy + 1 if busy < 65535 else busy - 1]

            def randint(self, _lo, _hi):
                return self.seq.pop(0)

        assert free_udp_port(1024, 65535, rng=Picks()) != busy
        with pytest.raises(RuntimeError, match="no free UDP port"):
            free_udp_port(busy, busy, tries=3)
