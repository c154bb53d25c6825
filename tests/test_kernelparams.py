"""Kernel parameters: golden output per format, and the diff against /proc/cmdline."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from archdsp_libvirt.config import load_config, parse_config
from archdsp_libvirt.errors import UsageError
from archdsp_libvirt.host.files import Host, split_cmdline
from archdsp_libvirt.host.kernelparams import FORMATS, diff_cmdline, format_params, kernel_params
from conftest import DOMAINS

DESIGN = DOMAINS / "archibaldos-dsp.toml"


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden(fmt, golden):
    params = kernel_params(load_config(DESIGN), "AuthenticAMD")
    golden(f"kernel-params.{fmt}.txt", format_params(params, fmt))


def test_the_design_list_in_its_order():
    assert kernel_params(load_config(DESIGN), "AuthenticAMD") == [
        "amd_iommu=on", "iommu=pt", "isolcpus=0-1", "nohz_full=0-1", "rcu_nocbs=0-1", "threadirqs",
        "hugepagesz=2M", "hugepages=2048", "default_hugepagesz=2M",
        "skew_tick=1", "kvm.kvmclock_periodic_sync=0", "kvm_amd.pause_filter_count=0",
    ]


def test_the_real_time_host_knobs_follow_the_vendor_and_the_online_cpus():
    c = parse_config({"isolated_cores": [2, 3], "memory_mb": 2048})
    intel = kernel_params(c, "GenuineIntel", frozenset(range(6)))
    assert intel[-4:] == ["skew_tick=1", "kvm.kvmclock_periodic_sync=0", "kvm_intel.ple_gap=0", "irqaffinity=0-1,4-5"]
    assert "irqaffinity=0-1,4-5" in diff_cmdline(intel, split_cmdline("irqaffinity=0,1,4,5")).present
    assert not any(p.startswith("irqaffinity=") for p in kernel_params(c, "AuthenticAMD"))  # online unknown


def test_vendor_and_page_size():
    c = parse_config({"isolated_cores": [3, 1, 2], "memory_mb": 2048, "hugepages": 2, "hugepage_size": "1G"})
    params = kernel_params(c, "GenuineIntel")
    assert params[0] == "intel_iommu=on"
    assert "isolcpus=1-3" in params
    assert params[6:9] == ["hugepagesz=1G", "hugepages=2", "default_hugepagesz=1G"]


def test_no_hugepage_parameters_without_hugepages():
    params = kernel_params(load_config(DOMAINS / "minimal.toml"), "AuthenticAMD")
    assert params[:7] == ["amd_iommu=on", "iommu=pt", "isolcpus=1", "nohz_full=1", "rcu_nocbs=1", "threadirqs",
                          "skew_tick=1"]


def test_unknown_vendor_asks_for_one():
    with pytest.raises(UsageError, match="--cpu-vendor"):
        kernel_params(load_config(DESIGN), "CentaurHauls")


def test_diff_missing_conflicting_present():
    params = kernel_params(load_config(DESIGN), "AuthenticAMD")
    tokens = split_cmdline("root=/dev/sda1 amd_iommu=on iommu=soft isolcpus=domain,managed_irq,0,1 nohz_full=1 "
                           "threadirqs hugepagesz=1G hugepages=4 hugepagesz=2M hugepages=4096 -- rcu_nocbs=0-1")
    d = diff_cmdline(params, tokens)
    assert d.missing == ["rcu_nocbs=0-1", "default_hugepagesz=2M", "skew_tick=1", "kvm.kvmclock_periodic_sync=0",
                         "kvm_amd.pause_filter_count=0"]
    assert d.conflicting == [("iommu=pt", "iommu=soft"), ("nohz_full=0-1", "nohz_full=1")]
    assert d.present == ["amd_iommu=on", "isolcpus=0-1", "threadirqs", "hugepagesz=2M", "hugepages=2048"]
    assert d.differs


def test_diff_hugepages_pool_too_small_or_for_another_size():
    params = ["hugepagesz=2M", "hugepages=2048", "default_hugepagesz=2M"]
    small = diff_cmdline(params, split_cmdline("hugepagesz=2M hugepages=512 default_hugepagesz=2M"))
    assert small.conflicting == [("hugepages=2048", "hugepages=512")]
    other = diff_cmdline(params, split_cmdline("hugepagesz=1G hugepages=4096"))
    assert other.missing == ["hugepagesz=2M", "hugepages=2048", "default_hugepagesz=2M"]
    default_pool = diff_cmdline(params, split_cmdline("hugepages=4096 default_hugepagesz=2M"))
    assert "hugepages=2048" in default_pool.present


def test_diff_everything_present():
    params = kernel_params(load_config(DESIGN), "AuthenticAMD")
    assert not diff_cmdline(params, params).differs


def fake_host(tmp_path, cmdline: str, vendor: str = "AuthenticAMD") -> Host:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "cmdline").write_text(cmdline + "\n")
    (tmp_path / "proc" / "cpuinfo").write_text(f"processor\t: 0\nvendor_id\t: {vendor}\n")
    return Host(tmp_path)


def test_cli_formats_and_diff(tmp_path):
    host = fake_host(tmp_path, "quiet amd_iommu=on iommu=pt isolcpus=1 nohz_full=1 rcu_nocbs=1 threadirqs skew_tick=1 "
                               "kvm.kvmclock_periodic_sync=0 kvm_amd.pause_filter_count=0")
    root = ["--host-root", str(host.root)]
    run = CliRunner().invoke
    nix = run(cli, ["host", "kernel-params", "--format", "nix", str(DESIGN), *root])
    assert nix.exit_code == 0 and nix.output.startswith("boot.kernelParams = [\n")
    intel = run(cli, ["host", "kernel-params", "--cpu-vendor", "GenuineIntel", str(DESIGN), *root])
    assert intel.output.startswith("intel_iommu=on iommu=pt")
    same = run(cli, ["host", "kernel-params", "--diff", str(DOMAINS / "minimal.toml"), *root])
    assert same.exit_code == 0 and "missing" not in same.output
    differs = run(cli, ["host", "kernel-params", "--diff", str(DESIGN), *root])
    assert differs.exit_code == 1
    assert "conflicting  isolcpus=0-1 (/proc/cmdline has isolcpus=1)" in differs.output
    assert "missing      hugepagesz=2M" in differs.output
    bad = run(cli, ["host", "kernel-params", "--format", "yaml", str(DESIGN), *root])
    assert bad.exit_code == 2


def test_cli_unknown_vendor_is_one_line(tmp_path):
    host = fake_host(tmp_path, "quiet", vendor="CentaurHauls")
    res = CliRunner().invoke(cli, ["host", "kernel-params", str(DESIGN), "--host-root", str(host.root)])
    assert res.exit_code == 2
    assert res.output.strip().startswith("Error: unknown CPU vendor CentaurHauls")
