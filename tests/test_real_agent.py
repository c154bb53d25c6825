"""The QEMU guest agent on the real demo guest: ping, the status guest section, rt-test and guest check
through it."""

from __future__ import annotations

import json
import time

import pytest

from conftest import SYSTEM_URI, archdsp
from test_real_rt import wait_link

pytestmark = pytest.mark.real


def wait_agent(name, timeout=120):
    from archdsp_libvirt.errors import AgentUnavailable
    from archdsp_libvirt.virt import agent
    from archdsp_libvirt.virt.connection import Session

    deadline = time.monotonic() + timeout
    with Session(SYSTEM_URI) as session:
        for _attempt in range(int(timeout / 2) + 1):
            try:
                agent.ping(session, name, timeout=3)
                return agent.info(session, name)
            except AgentUnavailable as err:
                if time.monotonic() > deadline:
                    raise AssertionError(f"no guest agent in {name} within {timeout} s: {err}") from None
                time.sleep(2)
    raise AssertionError(f"no guest agent in {name}")


def test_the_demo_guest_answers_on_its_agent_and_runs_commands(demo_domain):
    from archdsp_libvirt.virt import agent
    from archdsp_libvirt.virt.connection import Session

    _cfg, name, _server = demo_domain
    info = wait_agent(name)
    assert "guest-exec" in info["supported"] and info["version"], info
    with Session(SYSTEM_URI) as session:
        r = agent.sh(session, name, "echo out; echo err >&2; exit 3", timeout=10)
    assert (r.exitcode, r.out, r.err) == (3, "out\n", "err\n")


def test_status_json_has_the_guest_kernel_from_the_agent(demo_domain):
    cfg, name, _server = demo_domain
    wait_agent(name)
    r = archdsp("-c", SYSTEM_URI, "status", "--json", str(cfg), timeout=60)
    assert r.returncode == 0, r.stderr
    guest = json.loads(r.stdout)["guest"]
    assert guest["agent"] == "connected", guest
    assert guest["kernel"] and guest["kernel"] != "unknown"
    assert guest["preempt_rt"] is ("-rt-" in guest["kernel"])
    wait_link(cfg)
    guest = json.loads(archdsp("-c", SYSTEM_URI, "status", "--json", str(cfg), timeout=60).stdout)["guest"]
    assert guest["slave"] and guest["slave"]["settings"]["latency"] == "0", (guest, probe_dump(name))
    assert isinstance(guest["xruns"], int) and guest["xruns_source"] == "jackd log /tmp/jackd.log", guest
    text = archdsp("-c", SYSTEM_URI, "status", str(cfg), timeout=60).stdout
    assert "=== Guest (through the QEMU guest agent) ===" in text and guest["kernel"] in text


def probe_dump(name):
    from archdsp_libvirt.virt import guest
    from archdsp_libvirt.virt.connection import Session

    with Session(SYSTEM_URI) as session:
        return guest.probe(session, name)


def test_guest_check_runs_through_the_agent_and_reports_rows(demo_domain):
    cfg, name, _server = demo_domain
    wait_agent(name)
    wait_link(cfg)
    r = archdsp("-c", SYSTEM_URI, "guest", "check", "--json", str(cfg), timeout=60)
    found = {f["id"]: f for f in json.loads(r.stdout)}
    assert found["guest.agent"]["status"] == "ok", found
    assert {"guest.kernel", "guest.slave", "guest.jackd", "guest.cyclictest", "guest.clocksource",
            "guest.tsc_deadline", "guest.idle", "guest.threadirqs", "guest.isolation", "guest.irq_threads"} <= found.keys()
    assert found["guest.jackd"]["status"] == found["guest.cyclictest"]["status"] == "ok"
    # the slave runs with the config's settings
    assert found["guest.slave"]["status"] == "ok", (found["guest.slave"], probe_dump(name))
    assert r.returncode == (1 if any(f["status"] == "fail" for f in found.values()) else 0)
    text = archdsp("-c", SYSTEM_URI, "guest", "check", str(cfg), timeout=60).stdout
    assert "guest.kernel" in text and "expected:" in text
