"""domain_type = "auto": KVM where a stock guest boots under it, TCG otherwise, said in one line.

Fake host trees stand for the three kinds of host: hardware KVM (/dev/kvm, no kvm_pvm), nested PVM
(/sys/module/kvm_pvm: only PVM guest kernels boot) and no KVM at all (no /dev/kvm). The libvirt side
runs on the in-process test driver, whose capabilities offer no KVM guests.
"""

from __future__ import annotations

import json
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner
from lxml import etree

from archdsp_libvirt import parse_config, render_domain
from archdsp_libvirt.cli import cli
from archdsp_libvirt.host.accel import TCG_CAUSE, accelerator_name, resolve
from archdsp_libvirt.host.files import Host
from archdsp_libvirt.host.model import HostModel
from archdsp_libvirt.virt import rttest
from archdsp_libvirt.virt.connection import Session
from archdsp_libvirt.virt.hostfacts import _kvm_pvm, gather
from archdsp_libvirt.virt.inspect import accelerator, accelerator_of
from conftest import DOMAINS

PVM_LINE = ("KVM here is nested PVM: stock kernels cannot boot; running under TCG, software emulation: "
            "expect xruns, and figures that say nothing about a KVM host")
BASE = {"isolated_cores": [1], "memory_mb": 128, "boot": {"kernel": "/boot/vmlinuz-test"},
        "realtime": {"mlock": False}}


def tree(root: Path, kind: str) -> Host:
    """A fake host of ``kind``: "kvm" (hardware KVM), "pvm" (nested PVM) or "none" (no /dev/kvm)."""
    (root / "sys/devices/system/cpu").mkdir(parents=True)
    (root / "sys/devices/system/cpu/online").write_text("0-3\n")
    if kind in ("kvm", "pvm"):
        (root / "dev").mkdir()
        (root / "dev/kvm").write_text("")
    if kind == "pvm":
        (root / "sys/module/kvm_pvm").mkdir(parents=True)
        (root / "sys/module/kvm_pvm/refcnt").write_text("1\n")
    (root / "proc").mkdir()
    (root / "proc/cmdline").write_text("console=ttyS0" + (" nested_pvm=1" if kind == "pvm" else "") + "\n")
    return Host(root)


def model_of(tmp_path: Path, kind: str) -> HostModel:
    return gather(None, files=tree(tmp_path, kind))


def cfg(**over):
    return parse_config({**BASE, **over})


def domain_type(xml: str) -> str:
    return etree.fromstring(xml.encode()).get("type")


# --- the config -------------------------------------------------------------------------------------

def test_auto_is_the_default_and_the_demo_uses_it():
    assert cfg().domain_type == "auto"
    assert 'domain_type = "auto"' in (DOMAINS / "demo-dsp.toml").read_text()


# --- resolution against the host model --------------------------------------------------------------

def test_pvm_host_falls_back_to_tcg_with_the_reason(tmp_path):
    model = model_of(tmp_path, "pvm")
    assert model.kvm is True and model.kvm_pvm is True
    accel = resolve("auto", model)
    assert (accel.domain_type, accel.name, accel.fallback) == ("qemu", "tcg", True)
    assert accel.reason == PVM_LINE


def test_host_without_kvm_falls_back_to_tcg_with_its_own_reason(tmp_path):
    accel = resolve("auto", model_of(tmp_path, "none"))
    assert accel.fallback and accel.domain_type == "qemu"
    assert accel.reason.startswith("no KVM here (no /dev/kvm); running under TCG, software emulation")


def test_hardware_kvm_host_picks_kvm(tmp_path):
    accel = resolve("auto", model_of(tmp_path, "kvm"))
    assert (accel.domain_type, accel.fallback, accel.assumed) == ("kvm", False, False)


@pytest.mark.parametrize("kind", ["kvm", "pvm", "none"])
def test_kvm_and_qemu_mean_exactly_that(tmp_path, kind):
    model = model_of(tmp_path, kind)
    assert resolve("kvm", model).domain_type == "kvm"
    assert resolve("qemu", model).domain_type == "qemu"
    assert not resolve("kvm", model).fallback and not resolve("qemu", model).fallback


def test_unknown_kvm_renders_kvm_as_the_offline_default():
    accel = resolve("auto", HostModel(online_cpus=frozenset(range(4))))
    assert accel.domain_type == "kvm" and accel.assumed and "offline default" in accel.reason


def test_remote_host_is_decided_from_libvirt_never_from_this_machine(tmp_path):
    """A remote URI: this machine's files (here a PVM tree) are not read; libvirt's KVM is trusted and
    what cannot be read (PVM) is said to be assumed."""
    from archdsp_libvirt.service.domain import host_model

    tree(tmp_path, "pvm")
    offline = host_model(cfg(), None, host_root=str(tmp_path), uri="qemu+ssh://dsp-host/system")
    assert offline.files is None and offline.kvm is None and offline.kvm_pvm is None
    remote = HostModel(uri="qemu+ssh://dsp-host/system", source="libvirt", kvm=True, kvm_from="libvirt")
    accel = resolve("auto", remote)
    assert accel.domain_type == "kvm" and accel.assumed
    assert "libvirt at qemu+ssh://dsp-host/system offers KVM guests; assumed not nested PVM" in accel.reason
    no_kvm = resolve("auto", HostModel(uri="qemu+ssh://dsp-host/system", source="libvirt", kvm=False,
                                       kvm_from="libvirt"))
    assert no_kvm.fallback
    assert "libvirt at qemu+ssh://dsp-host/system offers no KVM guests on that host" in no_kvm.reason


def test_capabilities_with_vmx_or_svm_rule_out_pvm():
    def caps(features: str):
        return etree.fromstring(f"<capabilities><host><cpu><arch>x86_64</arch>{features}</cpu></host>"
                                "</capabilities>".encode())

    assert _kvm_pvm(caps("<feature name='svm'/><feature name='x2apic'/>")) is False
    assert _kvm_pvm(caps("<feature name='vmx'/>")) is False
    assert _kvm_pvm(caps("<feature name='hypervisor'/>")) is None  # libvirt cannot tell PVM: unknown


def test_kvm_is_offered_for_the_domain_s_arch_only():
    from archdsp_libvirt.virt.hostfacts import _kvm

    def caps(arch: str, types: str):
        domains = "".join(f"<domain type='{t}'/>" for t in types.split())
        return etree.fromstring(f"<capabilities><guest><os_type>hvm</os_type><arch name='{arch}'>{domains}"
                                "</arch></guest></capabilities>".encode())

    assert _kvm(caps("x86_64", "qemu kvm")) is True
    assert _kvm(caps("x86_64", "qemu")) is False
    assert _kvm(caps("aarch64", "qemu kvm")) is False  # KVM for another arch does not run an x86_64 guest


def test_local_session_asks_libvirt_whether_it_offers_kvm(tmp_path, test_uri):
    """On this machine with a connection, libvirt's capabilities decide: the test driver offers no KVM
    guests, so /dev/kvm alone does not make auto pick KVM."""
    with Session(test_uri) as session:
        model = gather(session, files=tree(tmp_path, "kvm"), passt=False)
    assert model.kvm is False and model.kvm_from == "libvirt"
    accel = resolve("auto", model)
    assert accel.fallback and "offers no KVM guests with /dev/kvm present" in accel.reason


# --- rendering --------------------------------------------------------------------------------------

def test_rendered_xml_uses_the_resolved_type(tmp_path):
    pvm = model_of(tmp_path, "pvm")
    xml = render_domain(cfg(), pvm).xml
    assert domain_type(xml) == "qemu"
    assert "host-passthrough" not in xml and "kvmclock" not in xml
    kvm_xml = render_domain(cfg(), HostModel(online_cpus=frozenset(range(4)), kvm=True, kvm_pvm=False)).xml
    assert domain_type(kvm_xml) == "kvm" and "host-passthrough" in kvm_xml
    # explicit kvm stays kvm even where auto would not pick it
    assert domain_type(render_domain(cfg(domain_type="kvm"), pvm).xml) == "kvm"


def test_xml_with_host_cpus_renders_kvm_and_says_why(tmp_path):
    config = tmp_path / "dsp.toml"
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    config.write_text(f'isolated_cores = [1]\nmemory_mb = 128\nconsole_log = "{tmp_path}/c.log"\n'
                      f'[boot]\nkernel = "{kernel}"\n')
    r = CliRunner().invoke(cli, ["xml", "--host-cpus", "0-3", str(config)])
    assert r.exit_code == 0, r.output
    assert domain_type(r.stdout) == "kvm"
    assert ('note: domain_type = "auto" renders KVM: the host\'s KVM was not read, so KVM is assumed (offline '
            'default' in r.stderr)


# --- up says the fallback once ------------------------------------------------------------------------

def _up_config(tmp_path: Path, name: str) -> Path:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    config = tmp_path / f"{name}.toml"
    config.write_text(f'name = "{name}"\nisolated_cores = [1]\nmemory_mb = 128\nconsole_log = "{tmp_path}/c.log"\n'
                      f'[boot]\nkernel = "{kernel}"\n[realtime]\nmlock = false\n')
    return config


def test_up_says_the_fallback_once(tmp_path, test_uri):
    from archdsp_libvirt.service.domain import up_command

    root = tmp_path / "host"
    tree(root, "pvm")
    lines: list[str] = []
    up_command(_up_config(tmp_path, "accel-up"), test_uri, restart=False, autostart=False, skip=set(),
               preflight=False, say=lines.append, host_root=str(root))
    assert lines.count(PVM_LINE) == 1, lines
    assert sum("running under TCG" in line for line in lines) == 1, lines
    assert any(line.startswith("defined accel-up") for line in lines), lines


def _up_here(cfg_, session, root: Path):
    """``up`` as the command runs it, on one session (the test driver's node lives as long as it does)."""
    from archdsp_libvirt.service.domain import host_model
    from archdsp_libvirt.virt.lifecycle import up

    model = host_model(cfg_, session, host_root=str(root))
    up(cfg_, session, model, lambda uuid: render_domain(cfg_, model, uuid=uuid), autostart=False)
    return model


def test_up_says_nothing_of_tcg_for_an_explicit_domain_type(tmp_path, test_uri):
    from archdsp_libvirt.service.domain import up_command

    root = tmp_path / "host"
    tree(root, "pvm")
    config = _up_config(tmp_path, "accel-qemu")
    config.write_text('domain_type = "qemu"\n' + config.read_text())
    lines: list[str] = []
    up_command(config, test_uri, restart=False, autostart=False, skip=set(), preflight=False, say=lines.append,
               host_root=str(root))
    assert not any("running under TCG" in line for line in lines), lines


# --- the accelerator in use: status, rt-test, latency --------------------------------------------------

def test_accelerator_is_read_from_the_domain_type():
    assert accelerator_of("<domain type='qemu'><name>x</name></domain>") == "tcg"
    assert accelerator_of("<domain type='kvm'><name>x</name></domain>") == "kvm"
    assert accelerator_name(None) is None


def test_status_shows_the_accelerator_read_from_the_running_domain(tmp_path, test_uri):
    from archdsp_libvirt.virt.status import format_status, status

    root = tmp_path / "host"
    tree(root, "pvm")
    c = cfg(name="accel-status")
    with Session(test_uri) as session:
        model = _up_here(c, session, root)
        assert accelerator(session, "accel-status") == "tcg"
        info = status(c, session, model)
    assert info["accelerator"] == "tcg"
    assert "  accelerator: tcg (software emulation, no KVM: expect xruns)" in format_status(info)
    assert info["drift"] == []  # status renders auto the same way up did


def test_status_names_tcg_as_the_cause_of_the_bridge_s_xruns(tmp_path, monkeypatch):
    from archdsp_libvirt.audio import servers
    from archdsp_libvirt.service import domain as service_domain

    config = tmp_path / "dsp.toml"
    config.write_text("isolated_cores = [1]\nmemory_mb = 128\n[boot]\nkernel = \"/k\"\n[network]\nenable = true\n"
                      "[archibaldos.netjack]\nenable = true\n")

    class FakeSession:  # status() itself is above; here only what the command adds to it
        is_local = True
        uri = "qemu:///system"

        def __init__(self, *a, **k): ...
        def __enter__(self): return self
        def __exit__(self, *a): return False

    monkeypatch.setattr("archdsp_libvirt.virt.connection.Session", FakeSession)
    monkeypatch.setattr(service_domain, "host_model", lambda cfg, session, **k: HostModel(files=object()))
    monkeypatch.setattr("archdsp_libvirt.virt.status.status", lambda cfg, session, model: {
        "name": cfg.name, "uri": session.uri, "defined": False, "state": "running", "accelerator": "tcg",
        "isolation": {"config_cores": "1", "host_isolated": "", "missing": "", "source": "local"},
        "hugepages": {"page_size_kib": 2048, "wanted": 0, "total": 0, "free": 0}})
    monkeypatch.setattr(servers, "status", lambda name: {"running": True, "xruns": 12})
    monkeypatch.setattr(servers, "format_status", lambda info: ["=== NETJACK Bridge ===", "  xruns: 12"])
    info = json.loads(service_domain.status_command(config, None, as_json=True))
    assert info["accelerator"] == "tcg" and info["cause"] == f"12 xruns on the bridge: {TCG_CAUSE}"
    assert f"  cause: 12 xruns on the bridge: {TCG_CAUSE}" in service_domain.status_command(config, None, False)
    monkeypatch.setattr(servers, "status", lambda name: {"running": True, "xruns": 0})
    assert "cause" not in json.loads(service_domain.status_command(config, None, as_json=True))


RT_OUTPUT = """ARCHDSP-RT-BEGIN
# Total: 000010000
# Min Latencies: 00012
# Avg Latencies: 00150
# Max Latencies: {max}
# Histogram Overflows: 00000
ARCHDSP-RT-END rc=0
"""


def test_rt_test_names_tcg_as_the_cause_of_a_late_wakeup():
    late = rttest.parse(RT_OUTPUT.format(max="05000"), 10, 1333.3, "serial console", accelerator="tcg")
    assert not late.holds and late.verdict.endswith(f"; cause: {TCG_CAUSE}")
    assert late.as_dict()["accelerator"] == "tcg"
    assert "accelerator tcg" in rttest.format_result(late).splitlines()[0]
    on_kvm = rttest.parse(RT_OUTPUT.format(max="05000"), 10, 1333.3, "serial console", accelerator="kvm")
    assert "TCG" not in on_kvm.verdict
    held = rttest.parse(RT_OUTPUT.format(max="00900"), 10, 1333.3, "serial console", accelerator="tcg")
    assert held.holds and "cause" not in held.verdict


def test_latency_shows_the_accelerator_and_names_tcg_for_a_bad_measurement(tmp_path, monkeypatch):
    from archdsp_libvirt.audio import latency as audio_latency
    from archdsp_libvirt.service import audio as service_audio

    config = tmp_path / "dsp.toml"
    config.write_text((DOMAINS / "demo-dsp.toml").read_text())
    budget = audio_latency.budget(parse_config({**BASE, "network": {"enable": True},
                                                "archibaldos": {"netjack": {"enable": True, "network_latency": 0}}}))
    measured = {"measured_frames": budget.predicted_frames, "readings": [], "reading_times": [], "xruns": 3,
                "xrun_times": [], "seconds": 6.0}
    monkeypatch.setattr(audio_latency, "measure", lambda *a, **k: dict(measured))
    monkeypatch.setattr(service_audio, "_running_accelerator", lambda cfg, uri: "tcg")
    monkeypatch.setattr(service_audio, "_local_model", lambda cfg: HostModel())
    args = dict(measure=True, seconds=6.0, target_ms=None, host_backend="dummy", nperiods=2, audio_server="jack",
                plot_path=None)
    rep = json.loads(service_audio.latency_command(config, as_json=True, **args))
    assert rep["accelerator"] == "tcg" and rep["cause"] == TCG_CAUSE
    text = service_audio.latency_command(config, as_json=False, **args)
    assert "accelerator: tcg\n" in text and f"cause: {TCG_CAUSE}\n" in text
    measured["xruns"] = 0  # as predicted and no xruns: nothing to blame
    rep = json.loads(service_audio.latency_command(config, as_json=True, **args))
    assert rep["accelerator"] == "tcg" and "cause" not in rep
