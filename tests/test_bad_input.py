"""Bad input: exit code 2, one short line naming the file, the key and what is expected; no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from archdsp_libvirt.cli import cli
from conftest import assert_config_refused

GOOD = """
isolated_cores = [1]
memory_mb = 1024
"""

# (id, TOML text, substrings the one-line message must contain)
CASES = [
    ("broken-toml", "isolated_cores = [1\nmemory_mb = 1", ["invalid TOML"]),
    ("unknown-key", GOOD + "memroy_mb = 3\n", ["memroy_mb", "unknown key"]),
    ("unknown-nested-key", GOOD + "[realtime]\nfifo = true\n", ["realtime.fifo", "unknown key"]),
    ("missing-cores", "memory_mb = 1024\n", ["isolated_cores", "required key is missing"]),
    ("missing-memory", "isolated_cores = [1]\n", ["memory_mb", "required key is missing"]),
    ("cores-empty", "isolated_cores = []\nmemory_mb = 1024\n", ["isolated_cores", "at least one"]),
    ("cores-negative", "isolated_cores = [-1]\nmemory_mb = 1024\n", ["isolated_cores[0]", ">= 0"]),
    ("cores-duplicate", "isolated_cores = [1, 1]\nmemory_mb = 1024\n", ["isolated_cores", "twice"]),
    ("cores-string", "isolated_cores = \"0-1\"\nmemory_mb = 1024\n", ["isolated_cores", "expected a list"]),
    ("memory-zero", "isolated_cores = [1]\nmemory_mb = 0\n", ["memory_mb", ">= 1"]),
    ("memory-string", "isolated_cores = [1]\nmemory_mb = \"4G\"\n", ["memory_mb", "expected an integer"]),
    ("memory-float", "isolated_cores = [1]\nmemory_mb = 1.5\n", ["memory_mb", "expected an integer"]),
    ("name-slash", GOOD + "name = \"a/b\"\n", ["name", "letters, digits"]),
    ("name-newline", GOOD + "name = \"a\\nb\"\n", ["name", "letters, digits"]),
    ("name-markup", GOOD + "name = \"<dsp>\"\n", ["name", "letters, digits"]),
    ("buffer-not-pow2", GOOD + "[archibaldos.netjack]\nenable = true\nbuffer_size = 100\n",
     ["archibaldos.netjack.buffer_size", "power of two"]),
    ("rate-unsupported", GOOD + "[archibaldos.netjack]\nsample_rate = 12345\n",
     ["archibaldos.netjack.sample_rate", "96000"]),
    ("channels-zero", GOOD + "[archibaldos.netjack]\nchannels = 0\n", ["archibaldos.netjack.channels", ">= 1"]),
    ("port-zero", GOOD + "[archibaldos.netjack]\nsource_port = 0\n", ["archibaldos.netjack.source_port", ">= 1"]),
    ("port-too-big", GOOD + "[archibaldos.netjack]\nsource_port = 70000\n", ["source_port", "<= 65535"]),
    ("hostfwd-port-bad", GOOD + "[network]\nhostfwd = { \"99999\" = 22 }\n", ["network.hostfwd", "1 to 65535"]),
    ("hostfwd-guest-port-bad", GOOD + "[network]\nhostfwd = { \"2222\" = 0 }\n", ["network.hostfwd.2222", ">= 1"]),
    ("nice-low", GOOD + "[realtime]\nnice = -21\n", ["realtime.nice", ">= -20"]),
    ("nice-high", GOOD + "[realtime]\nnice = 20\n", ["realtime.nice", "<= 19"]),
    ("mlock-string", GOOD + "[realtime]\nmlock = \"yes\"\n", ["realtime.mlock", "true or false"]),
    ("pci-malformed", GOOD + "[audio_device]\nenable = true\npci_id = \"00:1b.0\"\n", ["audio_device.pci_id", "DDDD:BB:SS.F"]),
    ("vendor-malformed", GOOD + "[audio_device]\npci_id = \"0000:00:1b.0\"\nvendor_device = \"1022-15e3\"\n",
     ["audio_device.vendor_device", "vendor:device"]),
    ("vfio-without-pci", GOOD + "[audio_device]\nenable = true\n", ["audio_device", "pci_id is required"]),
    ("disk-relative", GOOD + "[archibaldos]\ndisk_image = \"vms/dsp.qcow2\"\n", ["archibaldos.disk_image", "absolute"]),
    ("disk-format-bad", GOOD + "[archibaldos]\ndisk_format = \"vmdk\"\n", ["archibaldos.disk_format", "'qcow2' or 'raw'"]),
    ("hugepages-short", "isolated_cores = [1]\nmemory_mb = 1024\nhugepages = 10\n", ["hugepages", "do not cover"]),
    ("hugepage-size-bad", GOOD + "hugepage_size = \"4K\"\n", ["hugepage_size", "'2M' or '1G'"]),
    ("domain-type-bad", GOOD + "domain_type = \"xen\"\n", ["domain_type", "'auto', 'kvm' or 'qemu', got 'xen'"]),
    ("network-mode-bad", GOOD + "[network]\nmode = \"macvtap\"\n", ["network.mode"]),
    ("hostfwd-exposed", GOOD + "[network]\nhostfwd_address = \"0.0.0.0\"\n", ["network.hostfwd_address", "loopback"]),
    ("master-multicast", GOOD + "[archibaldos.netjack]\nmaster_ip = \"225.3.19.154\"\n",
     ["archibaldos.netjack.master_ip", "unicast"]),
    ("master-broadcast", GOOD + "[archibaldos.netjack]\nmaster_ip = \"255.255.255.255\"\n",
     ["archibaldos.netjack.master_ip", "unicast", "broadcast"]),
    ("master-this-network", GOOD + "[archibaldos.netjack]\nmaster_ip = \"0.0.0.1\"\n",
     ["archibaldos.netjack.master_ip", "0.0.0.0/8"]),
    ("master-reserved", GOOD + "[archibaldos.netjack]\nmaster_ip = \"240.0.0.1\"\n",
     ["archibaldos.netjack.master_ip", "240.0.0.0/4"]),
    ("guest-is-master", GOOD + "[archibaldos.netjack]\nmaster_ip = \"192.168.122.1\"\nguest_ip = \"192.168.122.1/24\"\n",
     ["archibaldos.netjack.guest_ip", "master_ip's address"]),
    ("guest-broadcast", GOOD + "[archibaldos.netjack]\nguest_ip = \"192.168.122.255/24\"\n",
     ["archibaldos.netjack.guest_ip", "broadcast address of 192.168.122.0/24"]),
    ("guest-multicast", GOOD + "[archibaldos.netjack]\nguest_ip = \"224.0.0.9/4\"\n",
     ["archibaldos.netjack.guest_ip", "unicast"]),
    ("guest-loopback", GOOD + "[archibaldos.netjack]\nguest_ip = \"127.0.0.2/8\"\n",
     ["archibaldos.netjack.guest_ip", "loopback"]),
    ("emulator-priority-without-realtime", GOOD + "[realtime]\nenable = false\nemulator_priority = 3\n",
     ["realtime.emulator_priority", "realtime.enable = true", "emulator_priority = 0"]),
    ("nothing-to-boot", GOOD + "[archibaldos]\nenable = false\n", ["nothing to boot"]),
    ("emulator-overlap", "isolated_cores = [1]\nmemory_mb = 1024\nemulator_cores = [1]\n", ["emulator_cores", "overlap"]),
    ("vhost-overlap", GOOD + "[realtime]\nvhost_cores = [1]\n", ["realtime.vhost_cores", "overlap isolated_cores"]),
    ("vhost-cores-empty", GOOD + "[realtime]\nvhost_cores = []\n", ["realtime.vhost_cores", "distinct"]),
    ("vhost-priority-not-below", GOOD + "[realtime]\npriority = 2\nvhost_priority = 2\n",
     ["realtime.vhost_priority", "below realtime.priority = 2", "vhost_priority = 1"]),
    ("vhost-priority-without-realtime", GOOD + "[realtime]\nenable = false\npriority = 5\nvhost_priority = 3\n",
     ["realtime.vhost_priority", "realtime.enable = true"]),
    ("netjack-user-mode", GOOD + "[network]\nmode = \"user\"\n[archibaldos.netjack]\nenable = true\n",
     ["netjack", "nat"]),
    ("control-char-arg", GOOD + "qemu_extra_args = [\"-a\\u0007\"]\n", ["qemu_extra_args", "control characters"]),
    ("section-not-table", GOOD + "realtime = true\n", ["realtime", "expected a table"]),
]


@pytest.mark.parametrize("case_id, text, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_config(tmp_path, case_id, text, needles):
    path = tmp_path / f"{case_id}.toml"
    path.write_text(text)
    result = CliRunner().invoke(cli, ["xml", "--host-cpus", "0-3", str(path)])
    assert_config_refused(result, path, needles)


def test_table_is_large_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize(
    "args, needle",
    [
        (["xml", "{missing}"], "no such file"),
        (["xml", "{dir}"], "is a directory"),
        (["xml", "--host-cpus", "x-y", "{good}"], "--host-cpus"),
        (["xml", "--port-forwards", "slirp", "{good}"], "--port-forwards"),
    ],
)
def test_bad_arguments(tmp_path, args, needle):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    subst = {"missing": str(tmp_path / "nope.toml"), "dir": str(tmp_path), "good": str(good)}
    result = CliRunner().invoke(cli, [a.format(**subst) for a in args])
    assert result.exit_code == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_installed_entry_point_exit_code_and_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(GOOD + "[archibaldos.netjack]\nbuffer_size = 96\n")
    proc = subprocess.run(
        [sys.executable, "-m", "archdsp_libvirt", "xml", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "archibaldos.netjack.buffer_size" in proc.stderr and "power of two" in proc.stderr
    assert "Traceback" not in proc.stderr
