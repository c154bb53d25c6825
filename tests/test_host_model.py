"""The host model: its two sources, what a remote host leaves unknown, and other DSP VMs on the host.

Runs on libvirt's in-process test driver (its node has 4 CPUs and no hugepages) and on fake host trees.
"""

from __future__ import annotations

import libvirt
import pytest

from archdsp_libvirt import parse_config, render_domain
from archdsp_libvirt.host.checks import CHECK_IDS, run_checks
from archdsp_libvirt.host.files import Host
from archdsp_libvirt.host.model import HostModel, HugePool
from archdsp_libvirt.host.sources import file_facts
from archdsp_libvirt.virt.hostfacts import dsp_domains, gather, libvirt_facts
from archdsp_libvirt.virt.connection import Session
from archdsp_libvirt.virt.uri import is_local_uri

BASE = {"isolated_cores": [1], "memory_mb": 128, "domain_type": "qemu",
        "boot": {"kernel": "/boot/vmlinuz-test"}, "realtime": {"mlock": False}}


def config(name: str, **over) -> dict:
    data = {**BASE, "name": name, **over}
    return data


@pytest.mark.parametrize("uri, local", [
    ("qemu:///system", True), ("test:///default", True), ("qemu+ssh://localhost/system", True),
    ("qemu+ssh://127.0.0.1/system", False), ("qemu+ssh://root@dsp-host:2222/system", False),
    ("qemu+tcp://[::1]/system", False),
])
def test_which_uris_name_this_machine(uri, local):
    assert is_local_uri(uri) is local


def test_libvirt_source_reads_the_nodes_facts(test_uri):
    conn = libvirt.open(test_uri)
    try:
        facts = libvirt_facts(conn)
    finally:
        conn.close()
    conn = libvirt.open(test_uri)
    try:
        _n, cpumap, _online = conn.getCPUMap()
    finally:
        conn.close()
    assert facts["online_cpus"] == frozenset(i for i, up in enumerate(cpumap) if up) != frozenset()
    assert facts["isolated_cpus"] is None  # isolcpus is the host kernel's: libvirt cannot say
    assert facts["memory_kib"] > 0
    assert facts["libvirt_version"].count(".") == 2


def test_file_source_reads_sysfs(tmp_path):
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/online").write_text("0-7\n")
    (tmp_path / "sys/devices/system/cpu/isolated").write_text("4-7\n")
    pool = tmp_path / "sys/kernel/mm/hugepages/hugepages-2048kB"
    pool.mkdir(parents=True)
    (pool / "nr_hugepages").write_text("512\n")
    (pool / "free_hugepages").write_text("300\n")
    facts = file_facts(Host(tmp_path))
    assert facts["online_cpus"] == frozenset(range(8))
    assert facts["isolated_cpus"] == frozenset(range(4, 8))
    assert facts["hugepages"] == (HugePool(2048, 512, 300),)


def test_housekeeping_cores_leave_out_the_vm_and_every_isolated_core():
    model = HostModel(online_cpus=frozenset(range(8)), isolated_cpus=frozenset({4, 5, 6, 7}))
    assert model.housekeeping(frozenset({4, 5})) == frozenset({0, 1, 2, 3})
    # The renderer uses the same rule: QEMU's own threads never land on another VM's isolated cores.
    cfg = parse_config(config("hk", isolated_cores=[4, 5]))
    xml = render_domain(cfg, model).xml
    assert "<emulatorpin cpuset=\"0-3\"/>" in xml
    assert HostModel(online_cpus=None).housekeeping(frozenset({1})) is None


def test_hugepage_pools_per_numa_node_add_up():
    model = HostModel(hugepages=(HugePool(2048, 100, 40, node=0), HugePool(2048, 100, 60, node=1),
                                 HugePool(1048576, 2, None, node=0)))
    assert model.pool(2048) == HugePool(2048, 200, 100)
    assert model.pool(1048576).free is None  # one node's free count unknown: the whole is unknown
    assert model.pool(4) is None


def test_a_remote_model_skips_what_only_the_host_knows():
    """A host known through libvirt alone: no file is read, and every host-only fact says where to ask."""
    model = HostModel(uri="qemu+ssh://dsp-host/system?keyfile=/secret/key", source="libvirt",
                      online_cpus=frozenset({0, 1, 2, 3}), hugepages=(HugePool(2048, 256, 200),), kvm=True, pci=())
    cfg = parse_config(config("remote", hugepages=64))
    found = {f.id: f for f in run_checks(cfg, model, True, libvirt_detail="connected")}
    assert list(found) == list(CHECK_IDS)
    assert found["cpu.online"].status == "ok"
    assert found["cpu.housekeeping"].observed == "host keeps 0,2-3"
    assert found["hugepages.free"].status == "ok" and found["hugepages.free"].observed == "200 of 256 free"
    for fid in ("cpu.isolated", "cpu.nohz_full", "hugepages.mount", "rt.cgroup", "rt.rtprio", "iommu.param"):
        assert found[fid].status == "skip"
        assert "unknown over qemu+ssh://dsp-host/system (only that host knows it)" in found[fid].observed
        assert "/secret/key" not in found[fid].observed  # the URI's query (key files) is not shown


def _define(conn, data: dict) -> None:
    cfg = parse_config(data)
    conn.defineXML(render_domain(cfg, HostModel(online_cpus=frozenset(range(4)))).xml)


@pytest.fixture
def conn(test_uri):
    """One connection: a test:///FILE driver keeps its domains for the connection's life only."""
    c = libvirt.open(test_uri)
    yield c
    c.close()


def test_other_dsp_vms_on_the_host_are_found_by_their_metadata(conn):
    nj = {"archibaldos": {"netjack": {"enable": True, "source_port": 19100, "client_name": "dsp-a"}}}
    _define(conn, config("dsp-a", isolated_cores=[1, 2], memory_mb=256, hugepages=128, **nj))
    conn.defineXML("<domain type='test'><name>plain</name><memory>65536</memory><vcpu>1</vcpu>"
                   "<os><type>hvm</type></os></domain>")  # not ours: no metadata
    found = dsp_domains(conn)
    assert [d.name for d in found] == ["dsp-a"]
    a = found[0]
    assert (a.cpus, a.hugepages, a.page_size_kib, a.netjack_port, a.netjack_client, a.active) == (
        frozenset({1, 2}), 128, 2048, 19100, "dsp-a", False)


def test_check_reports_collisions_with_other_dsp_vms(conn):
    nj = {"enable": True, "source_port": 19100, "client_name": "dsp-a"}
    _define(conn, config("dsp-a", isolated_cores=[1, 2], memory_mb=256, hugepages=128,
                         archibaldos={"netjack": nj}))
    model = HostModel(online_cpus=frozenset(range(4)), hugepages=(HugePool(2048, 200, 150),),
                      domains=dsp_domains(conn))
    clash = parse_config(config("dsp-b", isolated_cores=[2], memory_mb=64, hugepages=32,
                                archibaldos={"netjack": {"enable": True, "source_port": 19100}}))
    found = {f.id: f for f in run_checks(clash, model, True)}
    assert found["domains.cores"].status == "warn" and "dsp-a (2)" in found["domains.cores"].observed
    assert found["domains.netjack"].status == "fail" and "dsp-a (port 19100)" in found["domains.netjack"].observed
    # 150 free: dsp-b's 32 fit, but not with dsp-a's 128 waiting to start.
    assert found["domains.hugepages"].status == "warn"
    assert "dsp-a 128 (not running)" in found["domains.hugepages"].observed

    apart = parse_config(config("dsp-c", isolated_cores=[3], memory_mb=16, hugepages=8,
                                archibaldos={"netjack": {"enable": True, "source_port": 19200,
                                                         "client_name": "dsp-c"}}))
    found = {f.id: f for f in run_checks(apart, model, True)}
    assert [found[i].status for i in ("domains.cores", "domains.hugepages", "domains.netjack")] == ["ok"] * 3
    # A config checked against its own definition is no collision.
    own = parse_config(config("dsp-a", isolated_cores=[1, 2], memory_mb=256, hugepages=128,
                              archibaldos={"netjack": nj}))
    assert {found.status for found in run_checks(own, model, True) if found.id.startswith("domains.")} <= {"ok"}


def test_gather_over_a_local_uri_reads_files_and_asks_libvirt(test_uri, tmp_path):
    (tmp_path / "sys/devices/system/cpu").mkdir(parents=True)
    (tmp_path / "sys/devices/system/cpu/online").write_text("0-5\n")
    with Session(test_uri) as session:
        model = gather(session, files=Host(tmp_path), passt=None)
    assert model.is_local and model.source == "local"
    assert model.online_cpus == frozenset(range(6))  # from the files, not the test node's map
    assert model.libvirt_version and model.passt is False


def test_the_local_model_is_local(tmp_path):
    online = tmp_path / "online"
    online.write_text("0-5\n")
    model = HostModel.local(sysfs_online=str(online))
    assert model.source == "local" and model.is_local, model
    assert model.online_cpus == frozenset(range(6))
    assert model.files is not None  # this machine's files are its local source
    assert not HostModel(uri="qemu+ssh://dsp-host/system", source="libvirt").is_local


def test_one_memlock_margin_for_the_renderer_and_the_check(tmp_path):
    from lxml import etree

    from archdsp_libvirt.host.checks.memory import check_memlock
    from archdsp_libvirt.host.model import memlock_limit_mb

    cfg = parse_config(config("memlock", memory_mb=3000, realtime={"mlock": True}))
    root = etree.fromstring(render_domain(cfg, HostModel(online_cpus=frozenset(range(4)))).xml.encode())
    limit = int(root.findtext("memtune/hard_limit"))
    assert limit == memlock_limit_mb(3000) > 3000
    # The check asks the host for exactly the limit the domain is rendered with.
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        f"Max locked memory         {limit * 1024 * 1024}           {limit * 1024 * 1024}           bytes\n")
    (tmp_path / "proc/self/status").write_text("CapEff:\t0000000000000000\n")
    model = HostModel(online_cpus=frozenset(range(4)), source="local", files=Host(tmp_path))
    assert check_memlock(cfg, model)[0].status == "ok"
    (tmp_path / "proc/self/limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        f"Max locked memory         {(limit - 1) * 1024 * 1024}           {(limit - 1) * 1024 * 1024}           bytes\n")
    assert check_memlock(cfg, model)[0].status == "fail"
