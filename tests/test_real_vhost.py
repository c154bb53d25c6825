"""The real tier: the network data path of the test run's demo guest (demo_domain), a TCG guest on libvirt's
network. TCG cannot use vhost-net (libvirt opens it for KVM guests only) and this machine kind has
no /dev/vhost-net: `status` must say so, and QEMU's real thread list must hold no vhost worker.
Nothing here measures a vhost thread: none can be had on this machine."""

from __future__ import annotations

import json
import os

import pytest

from archdsp_libvirt.virt import threads as qthreads
from archdsp_libvirt.virt import vhost
from conftest import SYSTEM_URI, archdsp

pytestmark = pytest.mark.real


def test_status_says_why_the_tcg_demo_guest_has_no_vhost_thread(demo_domain):
    cfg, name, _server = demo_domain
    r = archdsp("-c", SYSTEM_URI, "status", "--json", str(cfg), timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["accelerator"] == "tcg"
    net = info["network_thread"]
    assert net["threads"] == []
    assert net["reason"].startswith("no vhost: TCG cannot use it"), net
    assert ("/dev/vhost-net absent" in net["reason"]) is (not os.path.exists("/dev/vhost-net"))
    # The same answer from the QEMU process's own thread list, and from the kernel threads.
    pid = info["qemu_pid"]
    comms = [t.comm for t in qthreads.threads(pid)]
    assert "CPU 0/TCG" in comms, comms
    assert qthreads.vhost_comm(pid) not in comms
    assert vhost.find(pid) == []
    text = archdsp("-c", SYSTEM_URI, "status", str(cfg), timeout=120).stdout
    assert f"  network data path: {net['reason']}" in text


def test_kvm_domain_with_a_nic_where_there_is_no_dev_vhost_net(kvm_config):
    """A KVM domain (firmware only here) on libvirt's default network: with no /dev/vhost-net the
    NIC gets no vhost driver (a warning says so), `up` and `status` say why there is no vhost thread.
    Where /dev/vhost-net exists this machine is not the one this test describes: skipped."""
    if os.path.exists("/dev/vhost-net"):
        pytest.skip("/dev/vhost-net exists here: the no-vhost path of a KVM domain cannot be shown")
    cfg, name = kvm_config
    cfg.write_text(cfg.read_text().replace("[network]\nenable = false", "[network]\nenable = true"))
    xml = archdsp("-c", SYSTEM_URI, "xml", str(cfg))
    assert xml.returncode == 0, xml.stderr
    assert "<interface type=\"network\">" in xml.stdout and "name=\"vhost\"" not in xml.stdout
    assert "<topology sockets=\"1\" dies=\"1\" cores=\"1\" threads=\"1\"/>" in xml.stdout
    assert "no /dev/vhost-net on the host" in xml.stderr
    up = archdsp("-c", SYSTEM_URI, "up", "--no-autostart", str(cfg))
    assert up.returncode == 0, up.stdout + up.stderr
    assert "network data path: no vhost: /dev/vhost-net absent" in up.stdout
    info = json.loads(archdsp("-c", SYSTEM_URI, "status", "--json", str(cfg)).stdout)
    assert info["accelerator"] == "kvm" and info["drift"] == []
    assert info["network_thread"] == {"threads": [], "reason": "no vhost: /dev/vhost-net absent"}
    assert vhost.find(info["qemu_pid"]) == []
