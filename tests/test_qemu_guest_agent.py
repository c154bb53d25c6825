"""The guest agent's answers, the status guest section and guest check's findings, from recorded outputs."""

from __future__ import annotations

import base64
import json

import pytest

from archdsp_libvirt.config import load_config
from archdsp_libvirt.errors import AgentUnavailable, GuestAgentError
from archdsp_libvirt.virt import agent, guest, guestcheck
from archdsp_libvirt.virt.connection import Session
from archdsp_libvirt.virt.rttest import parse

from test_rttest import OUTPUT as CYCLICTEST_OUTPUT

B64 = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731

# What the probe printed in the demo guest (PREEMPT_RT kernel, TCG, one vCPU), trimmed.
SLAVE_ARGV = "\x1f".join(["jackd", "-R", "-P", "70", "-d", "net", "-a", "192.168.122.1", "-p", "19000", "-n", "dsp",
                          "-l", "0", "-C", "2", "-P", "2", "-i", "0", "-o", "0"]) + "\x1f"
DEMO_PROBE = f"""@uname_r
6.1.0-57-rt-amd64
@uname_v
#1 SMP PREEMPT_RT Debian 6.1.192-3 (2026-11-20)
@realtime
1
@cmdline
console=ttyS0 archdsp.shell=1
@clocksource
refined-jiffies
@clocksources
refined-jiffies jiffies
@flags
flags		: fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 syscall nx lm
@cpus
1
@cpuidle
none
@isolated

@nohz_full
@slave
204 {SLAVE_ARGV}
@affinity
204 0
@programs
jackd /usr/bin/jackd
cyclictest /usr/bin/cyclictest
chrt /usr/bin/chrt
@irqthreads
irq/9-acpi 50 1
irq/24-virtio0-config 50 1
irq/25-virtio0-input.0 75 1
@xruns
jackd log /tmp/jackd.log 3
@end
"""


@pytest.fixture
def demo_cfg():
    return load_config("domains/demo-dsp.toml")


def test_a_guest_exec_status_is_decoded_once_it_has_exited():
    assert agent.exec_status({"exited": False}) is None
    r = agent.exec_status({"exited": True, "exitcode": 3, "out-data": B64("out\n"), "err-data": B64("err\n")})
    assert (r.exitcode, r.signal, r.out, r.err, r.ok) == (3, None, "out\n", "err\n", False)
    r = agent.exec_status({"exited": True, "signal": 9})
    assert (r.exitcode, r.signal, r.out, r.err) == (None, 9, "", "")


def test_an_agent_error_reply_becomes_one_line():
    assert agent.decode_reply('{"return": {"pid": 7}}', "vm", "guest-exec") == {"pid": 7}
    with pytest.raises(GuestAgentError, match="vm: the guest agent's guest-exec failed: Failed to execute child"):
        agent.decode_reply(json.dumps({"error": {"class": "GenericError", "desc": "Failed to execute child"}}),
                           "vm", "guest-exec")
    with pytest.raises(GuestAgentError, match="is not JSON"):
        agent.decode_reply("{", "vm", "guest-ping")


def test_a_driver_without_agents_or_a_missing_domain_says_what_is_missing():
    with Session("test:///default") as session:
        with pytest.raises(AgentUnavailable, match="cannot reach a guest agent"):
            agent.ping(session, "test")
        with pytest.raises(AgentUnavailable, match="no such domain"):
            agent.ping(session, "nope")
        g = guest.status(session, "test", True)
        assert g["agent"] == "unavailable" and g["kernel"] == "unknown" and g["problem"]
        assert guest.status(session, "test", False) == {"agent": "not asked (the domain is not running)",
                                                         "kernel": "unknown"}


def test_the_unavailable_line_names_the_package_for_debian_and_nixos():
    assert "apt-get install qemu-guest-agent" in agent.HOW_TO_ADD
    assert "services.qemuGuest.enable = true" in agent.HOW_TO_ADD


def test_the_probe_parses_into_the_status_guest_section():
    g = guest.section(guest.parse_probe(DEMO_PROBE))
    assert g["kernel"] == "6.1.0-57-rt-amd64" and g["preempt_rt"] is True
    assert g["slave"]["pid"] == 204
    assert g["slave"]["settings"] == {"master": "192.168.122.1", "port": "19000", "name": "dsp", "latency": "0",
                                      "channels": "2", "sync": "0"}
    assert (g["xruns"], g["xruns_source"]) == (3, "jackd log /tmp/jackd.log")
    text = "\n".join(guest.format_section(g))
    assert "kernel 6.1.0-57-rt-amd64 (PREEMPT_RT)" in text and "NETJACK slave: pid 204" in text
    assert "guest xruns: 3" in text


def test_slave_settings_read_jackd_argv_forms():
    assert guest.slave_settings(["/usr/bin/jackd", "-S", "-d", "net", "-a", "10.0.0.1", "-l1", "--client-name=x"]) == {
        "sync": "1", "master": "10.0.0.1", "latency": "1", "name": "x"}
    assert guest.slave_settings(["jackd", "-d", "dummy"]) is None
    assert guest.slave_settings(["sh", "-c", "jackd -d net"]) is None


def test_a_probe_without_slave_or_log_says_none_and_unknown():
    g = guest.section(guest.parse_probe("@uname_r\n6.1.0\n@uname_v\n#1 SMP PREEMPT_DYNAMIC\n@end\n"))
    assert g["slave"] is None and g["xruns"] == "unknown" and g["preempt_rt"] is False
    assert "none running" in "\n".join(guest.format_section(g))


def test_guest_check_on_the_demo_guest_probe(demo_cfg):
    found = {f.id: f for f in guestcheck.findings(demo_cfg, guest.parse_probe(DEMO_PROBE))}
    assert found["guest.kernel"].status == "ok"
    assert found["guest.jackd"].status == found["guest.cyclictest"].status == "ok"
    assert found["guest.threadirqs"].status == "ok"
    assert found["guest.isolation"].status == "skip"  # one vCPU
    # TCG: no TSC clocksource, no tsc-deadline: warnings with their fixes
    assert found["guest.clocksource"].status == "warn" and found["guest.clocksource"].fix
    assert found["guest.tsc_deadline"].status == "warn" and "tsc-deadline" in found["guest.tsc_deadline"].fix
    assert found["guest.idle"].status == "warn" and "cpuidle-haltpoll" in found["guest.idle"].fix
    # the config's link settings against the slave's argv
    assert found["guest.slave"].status == "ok", found["guest.slave"]  # demo-dsp.toml: dsp, port 19000, latency 0
    irq = found["guest.irq_threads"]
    assert irq.status == "ok" and "irq/25-virtio0-input.0 FIFO 75" in irq.observed
    assert "virtio0-config" not in irq.observed  # a config-change IRQ is not on the data path


def test_the_haltpoll_cpuidle_driver_or_idle_on_the_command_line_is_enough(demo_cfg):
    haltpoll = guest.parse_probe(DEMO_PROBE.replace("@cpuidle\nnone", "@cpuidle\nhaltpoll"))
    assert guestcheck.check_idle(haltpoll).status == "ok"
    poll = guest.parse_probe(DEMO_PROBE.replace("archdsp.shell=1", "archdsp.shell=1 idle=poll"))
    assert guestcheck.check_idle(poll).observed == "idle=poll on the kernel command line"


def test_guest_check_flags_a_wrong_slave_low_irq_threads_and_no_isolation(demo_cfg):
    probe = (DEMO_PROBE.replace("\x1f-l\x1f0\x1f", "\x1f-l\x1f7\x1f").replace("@cpus\n1", "@cpus\n2")
             .replace("@affinity\n204 0", "@affinity\n204 0-1").replace("irq/25-virtio0-input.0 75 1",
                                                                        "irq/25-virtio0-input.0 50 1"))
    found = {f.id: f for f in guestcheck.findings(demo_cfg, guest.parse_probe(probe))}
    assert found["guest.slave"].status == "fail" and "latency=7" in found["guest.slave"].observed
    assert found["guest.isolation"].status == "warn" and "isolcpus=1" in found["guest.isolation"].fix
    assert found["guest.irq_threads"].status == "warn" and "chrt -f -p" in found["guest.irq_threads"].fix


def test_guest_check_with_no_slave_and_no_programs_fails_with_fixes(demo_cfg):
    probe = "@uname_r\n6.1\n@uname_v\n#1 SMP\n@clocksource\ntsc\n@flags\nflags : tsc tsc_deadline_timer\n@end\n"
    found = {f.id: f for f in guestcheck.findings(demo_cfg, guest.parse_probe(probe))}
    assert found["guest.slave"].status == "fail" and "guest unit" in found["guest.slave"].fix
    assert found["guest.jackd"].status == "fail" and "jackd2" in found["guest.jackd"].fix
    assert found["guest.cyclictest"].status == "warn" and "rt-tests" in found["guest.cyclictest"].fix
    assert found["guest.kernel"].status == "warn" and "linux-image-rt-amd64" in found["guest.kernel"].fix
    assert found["guest.clocksource"].status == found["guest.tsc_deadline"].status == "ok"
    assert found["guest.threadirqs"].status == "warn" and "threadirqs" in found["guest.threadirqs"].fix


def test_guest_check_without_an_agent_is_one_fail_row(demo_cfg):
    with Session("test:///default") as session:
        found = guestcheck.run(demo_cfg, session)
    assert [(f.id, f.status) for f in found] == [("guest.agent", "fail")]
    assert found[0].fix == "start the domain: archdsp-virt up CONFIG"  # no such domain on the test driver


def test_rt_test_json_names_the_channel():
    d = parse(CYCLICTEST_OUTPUT, 5, 1333.3, agent.VIA).as_dict()
    assert d["via"] == d["channel"] == "guest-agent"
