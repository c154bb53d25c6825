"""Per-element tests of the renderer and the policy behind it."""

from __future__ import annotations

import pytest
from lxml import etree

from archdsp_libvirt import HostFacts, parse_config, render_domain
from archdsp_libvirt.errors import ConfigError
from archdsp_libvirt.domain.policy import detect_disk_format, mac_for, plan
from archdsp_libvirt.domain import render

BASE = {"isolated_cores": [2, 3], "memory_mb": 2048, "boot": {"kernel": "/k"}}
HOST4 = HostFacts(online_cpus=frozenset(range(4)))


def cfg(**over):
    data = {**BASE}
    for k, v in over.items():
        data[k] = v
    return parse_config(data)


def xml_of(c, host=HOST4):
    return etree.fromstring(render_domain(c, host).xml.encode())


def test_vcpupin_one_to_one_and_emulator_on_the_rest():
    root = xml_of(cfg())
    pins = [(p.get("vcpu"), p.get("cpuset")) for p in root.iterfind("cputune/vcpupin")]
    assert pins == [("0", "2"), ("1", "3")]
    assert root.find("cputune/emulatorpin").get("cpuset") == "0-1"
    assert root.findtext("vcpu") == "2"
    assert root.find("vcpu").get("cpuset") is None


def test_emulatorpin_from_config_overrides_the_host():
    root = xml_of(cfg(emulator_cores=[0]))
    assert root.find("cputune/emulatorpin").get("cpuset") == "0"


def test_no_housekeeping_core_omits_emulatorpin_with_a_warning():
    c = cfg(isolated_cores=[0, 1])
    r = render_domain(c, HostFacts(online_cpus=frozenset({0, 1})))
    assert "emulatorpin" not in r.xml
    assert any("emulatorpin omitted" in w for w in r.warnings)


def test_unknown_host_omits_emulatorpin_with_a_warning():
    r = render_domain(cfg(), HostFacts(online_cpus=None))
    assert "emulatorpin" not in r.xml
    assert any("host's CPUs are unknown" in w for w in r.warnings)


def test_vcpusched_fifo_only_when_realtime():
    assert xml_of(cfg()).find("cputune/vcpusched").attrib == {"vcpus": "0-1", "scheduler": "fifo", "priority": "1"}
    assert xml_of(cfg(realtime={"enable": False})).find("cputune/vcpusched") is None
    assert xml_of(cfg(realtime={"priority": 10})).find("cputune/vcpusched").get("priority") == "10"


def test_memory_backing():
    root = xml_of(cfg(hugepages=1024))
    mb = root.find("memoryBacking")
    assert [c.tag for c in mb] == ["hugepages", "nosharepages", "locked"]
    assert mb.find("hugepages/page").attrib == {"size": "2048", "unit": "KiB"}
    assert root.find("memtune/hard_limit").text == str(2048 + 1024)
    root = xml_of(cfg(realtime={"mlock": False}))
    assert [c.tag for c in root.find("memoryBacking")] == ["nosharepages"]
    assert root.find("memtune") is None


def test_gigantic_pages():
    root = xml_of(cfg(hugepages=2, hugepage_size="1G"))
    assert root.find("memoryBacking/hugepages/page").get("size") == str(1024 * 1024)


def test_hugepages_must_cover_memory():
    with pytest.raises(ConfigError, match=r"1000 x 2M pages = 2000 MiB do not cover memory_mb = 2048; set hugepages >= 1024"):
        cfg(hugepages=1000)


def test_hostdev():
    root = xml_of(cfg(audio_device={"enable": True, "pci_id": "0000:0a:1b.3"}))
    hd = root.find("devices/hostdev")
    assert hd.attrib == {"mode": "subsystem", "type": "pci", "managed": "yes"}
    assert hd.find("source/address").attrib == {"domain": "0x0000", "bus": "0x0a", "slot": "0x1b", "function": "0x3"}
    root = xml_of(cfg(audio_device={"enable": True, "pci_id": "0000:0a:1b.3", "managed": False}))
    assert root.find("devices/hostdev").get("managed") == "no"
    assert xml_of(cfg()).find("devices/hostdev") is None


def test_virtio_nic_with_stable_mac():
    root = xml_of(cfg())
    nic = root.find("devices/interface")
    assert nic.get("type") == "network"
    assert nic.find("source").get("network") == "default"
    assert nic.find("model").get("type") == "virtio"
    assert nic.find("mac").get("address") == mac_for("archibaldos-dsp", 0)
    # Pinned: a MAC that changed between releases would give the guest a new NIC (and DHCP lease).
    assert mac_for("archibaldos-dsp", 0) == "52:54:00:1d:a2:fb"
    assert mac_for("archibaldos-dsp", 1) == "52:54:00:ef:60:34"
    assert mac_for("a", 0) != mac_for("b", 0)
    assert xml_of(cfg()).find("devices/interface/mac").get("address") == "52:54:00:1d:a2:fb"  # a second render: the same


def test_bridge_and_user_modes():
    nic = xml_of(cfg(network={"mode": "bridge", "source": "br0"})).find("devices/interface")
    assert nic.get("type") == "bridge" and nic.find("source").get("bridge") == "br0"
    nic = xml_of(cfg(network={"mode": "user"})).find("devices/interface")
    assert nic.get("type") == "user" and nic.find("backend") is None


def test_port_forwards_passt():
    r = render_domain(cfg(network={"hostfwd": {"2222": 22, "8080": 80}}), HostFacts(frozenset(range(4)), passt=True))
    root = etree.fromstring(r.xml.encode())
    user = root.find("devices/interface[@type='user']")
    assert user.find("backend").get("type") == "passt"
    fwds = [(f.get("address"), f.find("range").get("start"), f.find("range").get("to")) for f in user.iterfind("portForward")]
    assert fwds == [("127.0.0.1", "2222", "22"), ("127.0.0.1", "8080", "80")]
    assert r.plan.port_forward_backend == "passt"
    assert "qemu:commandline" not in r.xml


def test_port_forwards_hostfwd_fallback():
    r = render_domain(cfg(network={"hostfwd": {"2222": 22}}), HOST4)
    root = etree.fromstring(r.xml.encode())
    args = root.xpath("//qemu:commandline/qemu:arg/@value", namespaces={"qemu": render.QEMU_NS})
    assert args[0] == "-netdev" and "hostfwd=tcp:127.0.0.1:2222-:22" in args[1]
    assert args[2] == "-device" and "bus=pcie.0,addr=0x10" in args[3]
    assert root.find("devices/interface[@type='user']") is None
    assert r.plan.port_forward_backend == "hostfwd"
    assert any("tainted" in w for w in r.warnings)


def test_serial_console_log_and_balloon():
    root = xml_of(cfg(name="dsp1"))
    assert root.find("devices/serial/log").attrib == {"file": "/var/log/libvirt/qemu/dsp1-console.log", "append": "off"}
    assert root.find("devices/console/target").get("type") == "serial"
    assert root.find("devices/memballoon").get("model") == "none"
    assert root.find("devices/controller[@type='usb']").get("model") == "none"
    assert xml_of(cfg(console_log="/tmp/c.log")).find("devices/serial/log").get("file") == "/tmp/c.log"


def test_kvm_cpu_clock_and_pmu():
    root = xml_of(cfg(cpu_disable_features=["arch-capabilities"]))
    assert root.get("type") == "kvm"
    assert root.find("cpu").get("mode") == "host-passthrough"
    assert root.find("cpu/feature[@name='arch-capabilities']").get("policy") == "disable"
    assert root.find("clock/timer[@name='kvmclock']").get("present") == "yes"
    assert root.find("features/pmu").get("state") == "off"


def test_tcg_has_no_passthrough_or_kvmclock():
    root = xml_of(cfg(domain_type="qemu"))
    assert root.get("type") == "qemu"
    assert root.find("cpu") is None
    assert root.find("clock/timer[@name='kvmclock']") is None


def test_graphics_only_on_loopback_when_enabled():
    assert xml_of(cfg()).find("devices/graphics") is None
    root = xml_of(cfg(spice=True, vnc=True))
    kinds = [(g.get("type"), g.get("listen"), g.find("listen").get("address")) for g in root.iterfind("devices/graphics")]
    assert kinds == [("spice", "127.0.0.1", "127.0.0.1"), ("vnc", "127.0.0.1", "127.0.0.1")]


def test_direct_kernel_boot_keeps_the_link_off_the_command_line():
    c = cfg(boot={"kernel": "/g/vmlinuz", "initrd": "/g/initrd.img", "cmdline": "console=ttyS0 quiet"},
            archibaldos={"netjack": {"enable": True, "source_port": 4713, "network_latency": 0, "guest_ip": "192.168.122.50/24"}})
    root = xml_of(c)
    assert root.findtext("os/kernel") == "/g/vmlinuz"
    assert root.findtext("os/initrd") == "/g/initrd.img"
    # the link reaches the guest as the domain's OEM string (tests/test_guest_contract.py), not here
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet"
    assert root.find("os/boot") is None and root.find("devices/disk") is None


def test_qemu_extra_args_go_to_commandline_with_a_warning():
    r = render_domain(cfg(qemu_extra_args=["-overcommit", "cpu-pm=on"]), HOST4)
    assert '<qemu:arg value="-overcommit"/>' in r.xml
    assert any("qemu_extra_args" in w and "tainted" in w for w in r.warnings)


def test_markup_in_values_is_escaped():
    c = cfg(boot={"kernel": "/k<'\"&>", "cmdline": "a=<b> & 'c'"})
    r = render_domain(c, HOST4)
    root = etree.fromstring(r.xml.encode())
    assert root.findtext("os/kernel") == "/k<'\"&>"
    assert "&lt;b&gt; &amp;" in r.xml


def test_uuid_is_rendered_when_given():
    r = render_domain(cfg(), HOST4, uuid="4dea22b3-1d52-d8f3-2516-782e98ab3fa0")
    assert "<uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>" in r.xml


def test_disk_format(tmp_path):
    from archdsp_libvirt.host.files import Host

    q = tmp_path / "img.raw"
    q.write_bytes(b"QFI\xfb" + b"\0" * 60)
    assert detect_disk_format(str(q), None, Host().head(str(q), 4)) == "qcow2"  # the header wins over the extension
    r = tmp_path / "img.qcow2"
    r.write_bytes(b"\0" * 64)
    assert detect_disk_format(str(r), None, Host().head(str(r), 4)) == "raw"
    assert detect_disk_format(str(tmp_path / "missing.qcow2"), None, Host().head(str(tmp_path / "missing.qcow2"), 4)) == "qcow2"
    assert detect_disk_format(str(tmp_path / "missing.img"), None) == "raw"
    assert detect_disk_format(str(r), "qcow2", b"\0\0\0\0") == "qcow2"
    with pytest.raises(ConfigError, match="archibaldos.disk_format"):
        detect_disk_format(str(tmp_path / "missing.bin"), None)


def test_disk_header_is_read_only_through_the_hosts_own_files(tmp_path):
    """A local model reads the image's header; a remote one cannot (this machine's file of that name is
    another file) and goes by the extension."""
    from archdsp_libvirt.host.files import Host

    image = tmp_path / "img.raw"
    image.write_bytes(b"QFI\xfb" + b"\0" * 60)
    c = cfg(archibaldos={"disk_image": str(image)})
    local = HostFacts(online_cpus=frozenset(range(4)), source="local", files=Host())
    remote = HostFacts(online_cpus=frozenset(range(4)), source="libvirt", uri="qemu+ssh://far/system")
    assert plan(c, local).disk_format == "qcow2"
    assert plan(c, remote).disk_format == "raw"


def test_rendering_needs_no_disk_image():
    c = parse_config({"isolated_cores": [1], "memory_mb": 512, "archibaldos": {"disk_image": "/nonexistent/x.qcow2"}})
    p = plan(c, HOST4)
    assert p.disk_path == "/nonexistent/x.qcow2" and p.disk_format == "qcow2"


def test_emulatorsched_fifo_on_the_housekeeping_cores():
    root = xml_of(cfg(realtime={"emulator_priority": 5}))
    sched = root.find("cputune/emulatorsched")
    assert (sched.get("scheduler"), sched.get("priority")) == ("fifo", "5")
    tags = [el.tag for el in root.find("cputune")]
    assert tags.index("emulatorpin") < tags.index("vcpusched") < tags.index("emulatorsched")
    assert xml_of(cfg()).find("cputune/emulatorsched") is None  # default: SCHED_OTHER
    # realtime.enable = false with an emulator_priority is refused by the config (tests/test_bad_input.py)


def test_emulatorsched_needs_a_housekeeping_core():
    c = cfg(isolated_cores=[0, 1, 2, 3], realtime={"emulator_priority": 5})
    result = render_domain(c, HOST4)
    assert "<emulatorsched" not in result.xml
    assert any("emulatorsched omitted" in w for w in result.warnings)


def test_disk_gets_an_iothread_pinned_and_scheduled_with_the_emulator(tmp_path):
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 512)
    root = xml_of(cfg(archibaldos={"disk_image": str(disk)}, realtime={"emulator_priority": 3}))
    assert root.findtext("iothreads") == "1"
    assert root.find("devices/disk/driver").get("iothread") == "1"
    assert root.find("cputune/iothreadpin").attrib == {"iothread": "1", "cpuset": "0-1"}
    assert root.find("cputune/iothreadsched").attrib == {"iothreads": "1", "scheduler": "fifo", "priority": "3"}
    none = xml_of(cfg(archibaldos={"disk_image": str(disk)}, realtime={"iothreads": 0}))
    assert none.find("iothreads") is None and none.find("devices/disk/driver").get("iothread") is None
    assert xml_of(cfg()).find("iothreads") is None  # no disk, no I/O thread


@pytest.mark.parametrize("key,value", [("emulator_priority", 100), ("emulator_priority", -1), ("iothreads", 17)])
def test_bad_realtime_scheduling_keys(key, value):
    with pytest.raises(ConfigError, match=f"realtime.{key}"):
        cfg(realtime={key: value})


# --- the network data path: vhost-net under KVM -----------------------------------------------------

KVM_HOST = HostFacts(online_cpus=frozenset(range(4)), kvm=True, kvm_pvm=False)
NAT = {"enable": True, "mode": "nat"}


def test_vhost_driver_on_a_tap_nic_under_kvm():
    root = xml_of(cfg(domain_type="kvm", network=NAT))
    nic = root.find("devices/interface")
    assert [c.tag for c in nic] == ["mac", "source", "model", "driver"]
    assert nic.find("driver").attrib == {"name": "vhost"}


def test_no_vhost_driver_under_tcg_nor_on_a_user_nic():
    assert xml_of(cfg(domain_type="qemu", network=NAT)).find("devices/interface/driver") is None
    user = xml_of(cfg(domain_type="kvm", network={"enable": True, "mode": "user"}))
    assert user.find("devices/interface") is not None
    assert user.find("devices/interface/driver") is None


def test_a_host_without_dev_vhost_net_gets_no_vhost_driver_and_a_warning():
    host = HostFacts(online_cpus=frozenset(range(4)), kvm=True, kvm_pvm=False, vhost_net=False)
    r = render_domain(cfg(domain_type="kvm", network=NAT), host)
    assert "<driver name=\"vhost\"/>" not in r.xml
    assert any("no /dev/vhost-net" in w and "modprobe vhost_net" in w for w in r.warnings)
    # unknown (a remote host, a host given by hand): rendered, libvirt at that host decides
    unknown = render_domain(cfg(domain_type="kvm", network=NAT), HostFacts(online_cpus=frozenset(range(4))))
    assert "<driver name=\"vhost\"/>" in unknown.xml and not any("vhost" in w for w in unknown.warnings)


def test_vhost_tuning_follows_the_emulator_below_the_vcpus():
    p = plan(cfg(), HOST4)
    # vCPUs at FIFO 1: nothing below it is FIFO, so SCHED_OTHER at the emulator's nice
    assert (p.vhost.cpus, p.vhost.priority, p.vhost.nice) == (frozenset({0, 1}), 0, -20)
    p = plan(cfg(realtime={"priority": 10, "nice": -5}), HOST4)
    assert (p.vhost.cpus, p.vhost.priority, p.vhost.nice) == (frozenset({0, 1}), 9, None)
    p = plan(cfg(isolated_cores=[3], realtime={"priority": 10, "vhost_priority": 4, "vhost_cores": [2]}), HOST4)
    assert (p.vhost.cpus, p.vhost.priority, p.vhost.nice) == (frozenset({2}), 4, None)
    p = plan(cfg(realtime={"enable": False}), HOST4)
    assert (p.vhost.cpus, p.vhost.priority, p.vhost.nice) == (frozenset({0, 1}), 0, None)  # pinned, not rescheduled


def test_vhost_net_is_read_from_the_hosts_files_and_never_for_a_host_given_by_hand(tmp_path):
    from archdsp_libvirt.host.files import Host
    from archdsp_libvirt.virt.hostfacts import gather

    (tmp_path / "dev").mkdir()
    assert gather(None, files=Host(tmp_path)).vhost_net is False
    (tmp_path / "dev/vhost-net").write_text("")
    assert gather(None, files=Host(tmp_path)).vhost_net is True
    # --host-cpus: this machine's /dev says nothing of the host given by hand
    assert gather(None, files=Host(tmp_path), online_cpus=frozenset({0, 1})).vhost_net is None


def test_kvm_cpu_and_features_follow_libvirts_realtime_guide():
    """kbase/kvm-realtime: host-passthrough with a topology matching the placement and tsc-deadline
    required, the PMU off; TCG keeps QEMU's CPU model (the PMU stays off there too)."""
    root = xml_of(cfg(domain_type="kvm", isolated_cores=[1, 2, 3]))
    c = root.find("cpu")
    assert (c.get("mode"), c.get("check"), c.get("migratable")) == ("host-passthrough", "none", "off")
    assert c.find("topology").attrib == {"sockets": "1", "dies": "1", "cores": "3", "threads": "1"}
    assert c.find("feature[@name='tsc-deadline']").get("policy") == "require"
    assert root.find("features/pmu").get("state") == "off"
    tcg = xml_of(cfg(domain_type="qemu"))
    assert tcg.find("cpu") is None and tcg.find("features/pmu").get("state") == "off"
