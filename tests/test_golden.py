"""Every file in domains/ renders to its golden XML, is schema-valid, and defines on libvirt."""

from __future__ import annotations

import libvirt
import pytest
from click.testing import CliRunner

from archdsp_libvirt import HostFacts, load_config, render_domain
from archdsp_libvirt.cli import cli
from conftest import DOMAINS

# The host every golden is rendered for: four online CPUs, and a libvirt without passt.
HOST = HostFacts(online_cpus=frozenset(range(4)), passt=False)
CONFIGS = sorted(p.name for p in DOMAINS.glob("*.toml"))
VARIANTS = {
    # name of golden -> (config file, host facts)
    "archibaldos-dsp.passt.xml": ("archibaldos-dsp.toml", HostFacts(online_cpus=frozenset(range(4)), passt=True)),
    "archibaldos-dsp.two-cpus.xml": ("archibaldos-dsp.toml", HostFacts(online_cpus=frozenset({0, 1}))),
    # domain_type = "auto" on a host whose KVM is nested PVM (this build machine's kind): TCG.
    "demo-dsp.tcg.xml": ("demo-dsp.toml", HostFacts(online_cpus=frozenset(range(4)), kvm=True, kvm_pvm=True)),
}


def test_domains_folder_has_the_shipped_examples():
    assert {"archibaldos-dsp.toml", "minimal.toml", "vfio-passthrough.toml"} <= set(CONFIGS)


@pytest.mark.parametrize("config", CONFIGS)
def test_golden(config, golden):
    rendered = render_domain(load_config(DOMAINS / config), HOST)
    golden(config.replace(".toml", ".xml"), rendered.xml)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_golden_variants(name, golden):
    config, host = VARIANTS[name]
    golden(name, render_domain(load_config(DOMAINS / config), host).xml)


@pytest.mark.parametrize("config", CONFIGS)
def test_cli_prints_the_same_bytes(config):
    result = CliRunner().invoke(
        cli, ["xml", "--host-cpus", "0-3", "--port-forwards", "hostfwd", str(DOMAINS / config)]
    )
    assert result.exit_code == 0, result.output
    expected = render_domain(load_config(DOMAINS / config), HOST).xml
    assert result.stdout == expected


@pytest.mark.parametrize("config", CONFIGS)
def test_defines_on_the_test_driver(config, test_uri):
    xml = render_domain(load_config(DOMAINS / config), HOST).xml
    conn = libvirt.open(test_uri)
    try:
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        back = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert "<vcpupin vcpu='0'" in back
        assert "scheduler='fifo'" in back
        dom.undefine()
    finally:
        conn.close()
