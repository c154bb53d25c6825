"""Hostile input: configs and arguments written to break out of what a DSP VM description may ask.

Each refusal is exit code 2 and one line on stderr naming the file and the
key, with no traceback and nothing on stdout (nothing reached libvirt).
Values that are allowed although they hold markup reach libvirt escaped,
and come back from it intact.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner
from lxml import etree

from archdsp_libvirt import ConfigError, HostFacts, load_config, parse_config, render_domain
from archdsp_libvirt.cli import cli
from archdsp_libvirt.domain.render import QEMU_NS
from conftest import assert_config_refused, remove_domain

GOOD = """
isolated_cores = [1]
memory_mb = 1024
"""
BOOT = GOOD + "[boot]\nkernel = \"/boot/vmlinuz\"\n"


def qemu_args(*args: str) -> str:
    """A config whose qemu_extra_args are ``args`` (TOML literal strings: no escapes to worry about)."""
    return GOOD + "qemu_extra_args = [" + ", ".join(f"'{a}'" for a in args) + "]\n"


# (id, TOML text ({tmp} is the test's folder), substrings the one-line message must contain)
CASES = [
    # --- markup and control characters wherever a string goes ---------------------------------------
    ("name-ampersand-quote", GOOD + "name = \"dsp&'x\"\n", ["name", "letters, digits"]),
    ("name-nul", GOOD + "name = \"dsp\\u0000x\"\n", ["name", "letters, digits"]),
    ("name-rtl-override", GOOD + "name = \"dsp\\u202ex\"\n", ["name", "letters, digits"]),
    ("disk-newline", GOOD + "[archibaldos]\ndisk_image = \"/var/lib/x\\n.qcow2\"\n",
     ["archibaldos.disk_image", "control characters"]),
    ("disk-nul", GOOD + "[archibaldos]\ndisk_image = \"/var/lib/x\\u0000.qcow2\"\n",
     ["archibaldos.disk_image", "control characters"]),
    ("kernel-ansi-escape", GOOD + "[boot]\nkernel = \"/boot/\\u001b[31mvmlinuz\"\n", ["boot.kernel", "control characters"]),
    ("initrd-tab", BOOT + "initrd = \"/boot/init\\trd\"\n", ["boot.initrd", "control characters"]),
    ("cmdline-newline", BOOT + "cmdline = \"console=ttyS0\\ninit=/bin/sh\"\n", ["boot.cmdline", "control characters"]),
    ("cmdline-escape", BOOT + "cmdline = \"console=ttyS0 \\u001b]0;x\\u0007\"\n", ["boot.cmdline", "control characters"]),
    ("console-log-cr", GOOD + "console_log = \"/var/log/x\\r.log\"\n", ["console_log", "control characters"]),
    ("qemu-arg-nul", GOOD + "qemu_extra_args = [\"-name\", \"x\\u0000y\"]\n", ["qemu_extra_args", "control characters"]),
    ("network-source-markup", GOOD + "[network]\nsource = \"<br/>\"\n", ["network.source", "network or bridge name"]),
    ("network-source-attr-injection", GOOD + "[network]\nsource = \"default'/><x y='\"\n",
     ["network.source", "network or bridge name"]),
    ("client-name-markup", GOOD + "[archibaldos.netjack]\nclient_name = \"dsp<x>\"\n",
     ["archibaldos.netjack.client_name", "letters, digits"]),
    ("client-name-newline", GOOD + "[archibaldos.netjack]\nclient_name = \"dsp\\n\"\n",
     ["archibaldos.netjack.client_name", "letters, digits"]),
    ("master-ip-markup", GOOD + "[archibaldos.netjack]\nmaster_ip = \"192.168.122.1<\"\n",
     ["archibaldos.netjack.master_ip", "IPv4 address"]),
    ("guest-ip-newline", GOOD + "[archibaldos.netjack]\nguest_ip = \"192.168.122.50/24\\n\"\n",
     ["archibaldos.netjack.guest_ip", "IPv4 address"]),
    ("cpu-feature-markup", GOOD + "cpu_disable_features = [\"<x>\"]\n", ["cpu_disable_features", "CPU feature name"]),
    ("hostfwd-port-markup", GOOD + "[network]\nhostfwd = { \"22<\" = 22 }\n", ["network.hostfwd", "1 to 65535"]),
    ("hostfwd-port-escape", GOOD + "[network]\nhostfwd = { \"\\u001b[2J\" = 22 }\n", ["network.hostfwd", "'\\x1b[2J'"]),
    ("key-with-newline", GOOD + "\"a\\nb\" = 1\n", ["'a\\nb'", "unknown key"]),
    ("pci-markup", GOOD + "[audio_device]\nenable = true\npci_id = \"0000:00:1b.0'/>\"\n", ["audio_device.pci_id", "DDDD:BB:SS.F"]),
    ("display-listen-markup", GOOD + "display_listen = \"127.0.0.1'/>\"\n", ["display_listen", "IP address"]),
    ("display-password-newline", GOOD + "display_password = \"a\\nb\"\n", ["display_password", "control characters"]),
    ("hostfwd-address-quote", GOOD + "[network]\nhostfwd_address = \"127.0.0.1\\\"\"\n", ["network.hostfwd_address", "IPv4"]),
    # --- huge numbers ------------------------------------------------------------------------------
    ("memory-10e30", "isolated_cores = [1]\nmemory_mb = 1000000000000000000000000000000\n", ["memory_mb", "<= 16777216"]),
    ("core-10e9", "isolated_cores = [1000000000]\nmemory_mb = 1024\n", ["isolated_cores[0]", "<= 4095"]),
    ("hugepages-10e30", GOOD + "hugepages = 1000000000000000000000000000000\n", ["hugepages", "<= 16777216"]),
    ("priority-10e30", GOOD + "[realtime]\npriority = 1000000000000000000000000000000\n", ["realtime.priority", "<= 99"]),
    ("nice-minus-10e30", GOOD + "[realtime]\nnice = -1000000000000000000000000000000\n", ["realtime.nice", ">= -20"]),
    ("port-10e30", GOOD + "[archibaldos.netjack]\nsource_port = 1000000000000000000000000000000\n",
     ["archibaldos.netjack.source_port", "<= 65535"]),
    ("channels-10e30", GOOD + "[archibaldos.netjack]\nchannels = 1000000000000000000000000000000\n",
     ["archibaldos.netjack.channels", "<= 64"]),
    ("hostfwd-port-huge", GOOD + "[network]\nhostfwd = { \"99999999999999999999999\" = 22 }\n", ["network.hostfwd", "1 to 65535"]),
    ("memory-inf", "isolated_cores = [1]\nmemory_mb = inf\n", ["memory_mb", "expected an integer"]),
    ("memory-nan", "isolated_cores = [1]\nmemory_mb = nan\n", ["memory_mb", "expected an integer"]),
    ("path-5000-chars", GOOD + "[archibaldos]\ndisk_image = \"/" + "a" * 5000 + "\"\n",
     ["archibaldos.disk_image", "at most 4096"]),
    ("cmdline-3000-chars", BOOT + "cmdline = \"" + "x" * 3000 + "\"\n", ["boot.cmdline", "at most 2048"]),
    ("toml-nested-too-deep", GOOD + "a = " + "[" * 5000 + "]" * 5000 + "\n", ["invalid TOML", "nested too deeply"]),
    ("config-over-1mib", GOOD + "# " + "x" * (1024 * 1024) + "\n", ["larger than 1024 KiB"]),
    # --- paths through .. and symlinks -------------------------------------------------------------
    ("disk-dotdot", GOOD + "[archibaldos]\ndisk_image = \"/var/lib/libvirt/images/../../../etc/shadow\"\n",
     ["archibaldos.disk_image", "'..' segments"]),
    ("kernel-dotdot", GOOD + "[boot]\nkernel = \"/boot/../etc/passwd\"\n", ["boot.kernel", "'..' segments"]),
    ("initrd-home-dotdot", BOOT + "initrd = \"~/../root/initrd.img\"\n", ["boot.initrd", "'..' segments"]),
    ("console-log-dotdot", GOOD + "console_log = \"/var/log/../../etc/cron.d/x.log\"\n", ["console_log", "'..' segments"]),
    ("console-log-system-file", GOOD + "console_log = \"/etc/shadow\"\n", ["console_log", "ending in .log"]),
    ("disk-symlink-to-char-device", GOOD + "[archibaldos]\ndisk_image = \"{tmp}/null.qcow2\"\n",
     ["archibaldos.disk_image", "a character device (through a symlink to /dev/null)"]),
    ("disk-is-a-folder", GOOD + "[archibaldos]\ndisk_image = \"{tmp}\"\n", ["archibaldos.disk_image", "a folder"]),
    ("disk-symlink-to-fifo", GOOD + "[archibaldos]\ndisk_image = \"{tmp}/fifo.raw\"\n",
     ["archibaldos.disk_image", "a FIFO or socket"]),
    ("kernel-symlink-to-zero", GOOD + "[boot]\nkernel = \"{tmp}/zero\"\n", ["boot.kernel", "a character device"]),
    ("console-log-symlink", GOOD + "console_log = \"{tmp}/console.log\"\n",
     ["console_log", "is a symlink to", "truncate"]),
    # --- devices and QEMU arguments that go around libvirt -----------------------------------------
    ("qemu-sandbox-off", qemu_args("-sandbox", "off"), ["qemu_extra_args", "seccomp sandbox", "qemu_extra_args_allow_unsafe"]),
    ("qemu-double-dash-sandbox", qemu_args("--sandbox", "off"), ["qemu_extra_args", "seccomp sandbox"]),
    ("qemu-runas", qemu_args("-runas", "nobody"), ["qemu_extra_args", "the user QEMU runs as"]),
    ("qemu-chroot", qemu_args("-chroot", "/"), ["qemu_extra_args", "root folder"]),
    ("qemu-vfio-pci", qemu_args("-device", "vfio-pci,host=0000:00:1b.0"),
     ["qemu_extra_args", "device 'vfio-pci'", "audio_device"]),
    ("qemu-vfio-pci-json", qemu_args("-device", '{"driver":"vfio-pci","host":"0000:00:1b.0"}'),
     ["qemu_extra_args", "device 'vfio-pci'"]),
    ("qemu-vfio-pci-driver-key", qemu_args("-device", "driver=vfio-pci,host=0000:00:1b.0"),
     ["qemu_extra_args", "device 'vfio-pci'"]),
    ("qemu-usb-host", qemu_args("-device", "usb-host,hostbus=1,hostaddr=2"), ["qemu_extra_args", "device 'usb-host'"]),
    ("qemu-9p-share", qemu_args("-device", "virtio-9p-pci,fsdev=f,mount_tag=host"), ["qemu_extra_args", "virtio-9p-pci"]),
    ("qemu-romfile", qemu_args("-device", "virtio-net-pci,romfile=/etc/shadow"), ["qemu_extra_args", "romfile="]),
    ("qemu-drive-host-file", qemu_args("-drive", "file=/etc/shadow,format=raw,if=virtio"), ["qemu_extra_args", "as a disk"]),
    ("qemu-blockdev-json", qemu_args("-blockdev", '{"driver":"file","filename":"/etc/shadow","node-name":"x"}'),
     ["qemu_extra_args", "as a disk"]),
    ("qemu-bare-positional-disk", qemu_args("/etc/shadow"), ["qemu_extra_args", "not an option", "disk image"]),
    ("qemu-netdev-tap", qemu_args("-netdev", "tap,id=t0,ifname=tap9"), ["qemu_extra_args", "host network outside libvirt"]),
    ("qemu-netdev-bridge", qemu_args("-netdev", "bridge,id=b0,br=virbr0"), ["qemu_extra_args", "host network outside libvirt"]),
    ("qemu-hostfwd-all-addresses", qemu_args("-netdev", "user,id=u0,hostfwd=tcp::2222-:22"),
     ["qemu_extra_args", "loopback", "[network] hostfwd"]),
    ("qemu-guestfwd-command", qemu_args("-netdev", "user,id=u0,guestfwd=tcp:10.0.2.100:1-cmd:/bin/sh"),
     ["qemu_extra_args", "host sockets or commands"]),
    ("qemu-monitor-tcp", qemu_args("-monitor", "tcp:0.0.0.0:4444,server=on,wait=off"), ["qemu_extra_args", "monitor"]),
    ("qemu-qmp-tcp", qemu_args("-qmp", "tcp:0.0.0.0:4444,server=on,wait=off"), ["qemu_extra_args", "monitor"]),
    ("qemu-chardev-tcp", qemu_args("-chardev", "socket,id=c0,host=0.0.0.0,port=4444,server=on"),
     ["qemu_extra_args", "host file, device or socket"]),
    ("qemu-memory-backend-file", qemu_args("-object", "memory-backend-file,id=m0,size=128M,mem-path=/dev/shm/x"),
     ["qemu_extra_args", "memory-backend-file"]),
    ("qemu-add-fd", qemu_args("-add-fd", "fd=3,set=1"), ["qemu_extra_args", "file descriptors"]),
    ("qemu-incoming", qemu_args("-incoming", "tcp:0:4444"), ["qemu_extra_args", "guest state"]),
    ("qemu-loadvm", qemu_args("-loadvm", "snap1"), ["qemu_extra_args", "snapshot"]),
    ("qemu-gdb", qemu_args("-s"), ["qemu_extra_args", "debugger"]),
    ("qemu-plugin", qemu_args("-plugin", "/tmp/evil.so"), ["qemu_extra_args", "shared library"]),
    ("qemu-global-romfile", qemu_args("-global", "virtio-net-pci.romfile=/etc/shadow"), ["qemu_extra_args", "romfile="]),
    ("qemu-readconfig", qemu_args("-readconfig", "/etc/qemu.cfg"), ["qemu_extra_args", "host file"]),
    ("qemu-option-without-value", qemu_args("-msg"), ["qemu_extra_args", "needs a value"]),
    ("qemu-vnc-outside-libvirt", qemu_args("-vnc", "0.0.0.0:0"), ["qemu_extra_args", "display_password"]),
    ("qemu-allow-unsafe-not-bool", qemu_args("-sandbox", "off") + "qemu_extra_args_allow_unsafe = 1\n",
     ["qemu_extra_args_allow_unsafe", "true or false"]),
    # --- reachable from other hosts without an explicit opt-in --------------------------------------
    ("hostfwd-all-addresses", GOOD + "[network]\nhostfwd = { \"2222\" = 22 }\nhostfwd_address = \"0.0.0.0\"\n",
     ["network.hostfwd_address", "hostfwd_allow_external"]),
    ("hostfwd-lan-address", GOOD + "[network]\nhostfwd_address = \"192.168.1.5\"\n",
     ["network.hostfwd_address", "loopback"]),
    ("hostfwd-opt-in-not-bool", GOOD + "[network]\nhostfwd_allow_external = \"yes\"\n",
     ["network.hostfwd_allow_external", "true or false"]),
    ("spice-outside-no-password", GOOD + "spice = true\ndisplay_listen = \"0.0.0.0\"\n",
     ["display_listen = '0.0.0.0'", "display_password"]),
    ("vnc-ipv6-any-no-password", GOOD + "vnc = true\ndisplay_listen = \"::\"\n", ["display_listen = '::'", "display_password"]),
    ("display-lan-no-password", GOOD + "display_listen = \"10.0.0.1\"\n", ["display_listen", "display_password"]),
    ("vnc-password-too-long", GOOD + "vnc = true\ndisplay_password = \"123456789\"\n", ["display_password", "8 characters"]),
    ("display-password-empty", GOOD + "display_password = \"\"\n", ["display_password", "1 to 64"]),
]


def _prepare(tmp: Path) -> None:
    """The symlinks and special files the path cases point at."""
    (tmp / "null.qcow2").symlink_to("/dev/null")
    os.mkfifo(tmp / "fifo")
    (tmp / "fifo.raw").symlink_to(tmp / "fifo")
    (tmp / "zero").symlink_to("/dev/zero")
    (tmp / "real.log").write_text("")
    (tmp / "console.log").symlink_to(tmp / "real.log")


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, text, needles", CASES, ids=[c[0] for c in CASES])
def test_hostile_config_is_refused(tmp_path, case_id, text, needles):
    _prepare(tmp_path)
    path = tmp_path / f"{case_id}.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)))
    result = CliRunner().invoke(cli, ["xml", "--host-cpus", "0-3", "--port-forwards", "hostfwd", str(path)])
    assert_config_refused(result, path, needles)


# --- hostile command-line arguments ---------------------------------------------------------------

def _cli(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "archdsp_libvirt", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(
    "args, code, needle",
    [
        (["xml", "--host-cpus", "0-99999999", "{good}"], 2, "above 8191"),  # not 100 million ints in memory
        (["xml", "--host-cpus", "<x>&", "{good}"], 2, "--host-cpus"),
        (["xml", "--port-forwards", "<x>", "{good}"], 2, "--port-forwards"),
        (["xml", "/dev/zero"], 2, "not a regular file"),  # would be read for ever
        (["xml", "{fifo}"], 2, "not a regular file"),  # would block for ever
        (["xml", "{newline}"], 2, "'"),  # the file's name, quoted: still one line
        (["host", "kernel-params", "/dev/zero"], 2, "not a regular file"),
        (["-c", "<x>&'\"", "status", "{good}"], 1, "connecting to"),
        (["-c", "test:///default", "console", "--expect", "x", "--send", "\\x", "{good}"], 2, "--send"),
    ],
    ids=["host-cpus-huge-range", "host-cpus-markup", "port-forwards-markup", "dev-zero", "fifo",
         "file-name-with-newline", "kernel-params-dev-zero", "uri-markup", "send-bad-escape"],
)
def test_hostile_arguments(tmp_path, args, code, needle):
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    fifo = tmp_path / "config.toml"
    os.mkfifo(fifo)
    newline = tmp_path / "bad\nname.toml"
    newline.write_text(GOOD + "memroy_mb = 1\n")
    subst = {"good": str(good), "fifo": str(fifo), "newline": str(newline)}
    proc = _cli([a.format(**subst) if a.startswith("{") else a for a in args])
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    # Ours are one line; click's own usage errors add its "Usage:" lines before the one error line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0]
    if not proc.stderr.startswith("Usage: "):
        assert proc.stderr.strip() == errors[0]
    assert proc.stdout == ""


# --- allowed, although they hold markup: escaped on the way in, intact on the way back -------------

MARKUP = "<a href='x'>&amp;\"</a>"


def allowed_with_markup(name: str, tmp: Path) -> dict:
    return {
        "name": name,
        "isolated_cores": [1],
        "memory_mb": 256,
        "console_log": f"/var/log/libvirt/qemu/{name}-{MARKUP.replace('/', '_')}.log",
        "boot": {"kernel": f"{tmp}/vmlinuz-{MARKUP.replace('/', '_')}", "cmdline": f"console=ttyS0 x={MARKUP}"},
        "vnc": True,
        "display_password": "<&'\">",
        "qemu_extra_args": ["-smbios", f"type=1,serial={MARKUP}"],
    }


def _values(xml: str) -> dict:
    root = etree.fromstring(xml.encode())
    return {
        "cmdline": root.findtext("os/cmdline"),
        "kernel": root.findtext("os/kernel"),
        "log": root.xpath("string(devices/serial/log/@file)"),
        "passwd": root.xpath("string(devices/graphics/@passwd)"),
        "args": root.xpath("//q:commandline/q:arg/@value", namespaces={"q": QEMU_NS}),
    }


def test_markup_is_escaped_and_comes_back_intact_from_the_test_driver(test_uri, unique_name, tmp_path):
    data = allowed_with_markup(unique_name, tmp_path)
    xml = render_domain(parse_config(data), HostFacts(online_cpus=frozenset(range(4)))).xml
    assert MARKUP not in xml  # never verbatim: it would be markup
    got = _values(xml)
    assert got["cmdline"] == data["boot"]["cmdline"] and got["kernel"] == data["boot"]["kernel"]
    assert got["log"] == data["console_log"] and got["passwd"] == data["display_password"]
    assert got["args"] == data["qemu_extra_args"]
    conn = libvirt.open(test_uri)
    try:
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        back = _values(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
        dom.undefine()
    finally:
        conn.close()
    assert back["cmdline"] == data["boot"]["cmdline"] and back["kernel"] == data["boot"]["kernel"]
    assert back["log"] == data["console_log"] and back["passwd"] == data["display_password"]


@pytest.mark.real
def test_markup_comes_back_intact_from_libvirtd(system_libvirt, unique_name, tmp_path):
    """qemu:///system keeps qemu:commandline (the test driver drops it): define only, never start."""
    data = allowed_with_markup(unique_name, tmp_path)
    xml = render_domain(parse_config(data), HostFacts.local()).xml
    conn = libvirt.open(system_libvirt)
    try:
        dom = conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        back = _values(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
    finally:
        conn.close()
        remove_domain(unique_name)
    assert back == _values(xml)
    assert back["args"] == data["qemu_extra_args"]


# --- the opt-ins: what they allow, and what they still say ------------------------------------------

def test_unsafe_qemu_args_pass_with_the_opt_in_and_a_warning():
    cfg = parse_config({"isolated_cores": [1], "memory_mb": 256, "qemu_extra_args": ["-sandbox", "off"],
                        "qemu_extra_args_allow_unsafe": True})
    rendered = render_domain(cfg, HostFacts(online_cpus=frozenset(range(4))))
    assert "<qemu:arg value=\"-sandbox\"/>" in rendered.xml
    assert any("unchecked" in w for w in rendered.warnings)


@pytest.mark.parametrize("args", [
    ["-overcommit", "cpu-pm=on"], ["-cpu", "host,+invtsc"], ["-msg", "timestamp=on"], ["-S"], ["-no-hpet"],
    ["-device", "intel-hda"], ["-fw_cfg", "name=opt/dsp,string=1"],
    ["-netdev", "user,id=u0,hostfwd=tcp:127.0.0.1:2222-:22"], ["-smbios", "type=1,serial=<x>&"],
])
def test_harmless_qemu_args_pass(args):
    parse_config({"isolated_cores": [1], "memory_mb": 256, "qemu_extra_args": args})


def test_external_port_forward_with_the_opt_in_renders_and_warns():
    cfg = parse_config({"isolated_cores": [1], "memory_mb": 256,
                        "network": {"hostfwd": {"2222": 22}, "hostfwd_address": "0.0.0.0",
                                    "hostfwd_allow_external": True}})
    rendered = render_domain(cfg, HostFacts(online_cpus=frozenset(range(4))))
    assert "hostfwd=tcp:0.0.0.0:2222-:22" in rendered.xml
    assert any("other hosts can reach" in w for w in rendered.warnings)


def test_display_outside_with_a_password_renders_listen_and_passwd():
    cfg = parse_config({"isolated_cores": [1], "memory_mb": 256, "spice": True, "display_listen": "0.0.0.0",
                        "display_password": "s3cret"})
    root = etree.fromstring(render_domain(cfg, HostFacts(online_cpus=frozenset(range(4)))).xml.encode())
    g = root.find("devices/graphics")
    assert g.get("type") == "spice" and g.get("listen") == "0.0.0.0" and g.get("passwd") == "s3cret"
    assert g.find("listen").get("address") == "0.0.0.0"


def test_display_defaults_to_loopback_without_password():
    cfg = parse_config({"isolated_cores": [1], "memory_mb": 256, "vnc": True})
    g = etree.fromstring(render_domain(cfg, HostFacts(online_cpus=frozenset(range(4)))).xml.encode()).find(
        "devices/graphics")
    assert g.get("listen") == "127.0.0.1" and g.get("passwd") is None


def test_symlink_to_a_regular_file_is_allowed_and_rendered_as_written(tmp_path):
    image = tmp_path / "real.qcow2"
    image.write_bytes(b"QFI\xfb" + b"\0" * 100)
    link = tmp_path / "dsp.qcow2"
    link.symlink_to(image)
    cfg = parse_config({"isolated_cores": [1], "memory_mb": 256, "archibaldos": {"disk_image": str(link)}})
    xml = render_domain(cfg, HostFacts(online_cpus=frozenset(range(4)))).xml
    assert f'<source file="{link}"/>' in xml and 'type="qcow2"' in xml


def test_a_remote_hosts_paths_are_not_judged_by_this_machines_files(tmp_path):
    """What a disk path is on this machine says nothing of the remote host it will be opened on: over a
    remote URI the loader leaves the file checks to that host (the path's own rules still hold)."""
    _prepare(tmp_path)
    path = tmp_path / "remote.toml"
    path.write_text(GOOD + f"[archibaldos]\ndisk_image = \"{tmp_path}/null.qcow2\"\n")
    args = ["xml", "--host-cpus", "0-3", "--port-forwards", "hostfwd", str(path)]
    here = CliRunner().invoke(cli, args)
    assert_config_refused(here, path, ["archibaldos.disk_image"])
    there = CliRunner().invoke(cli, ["-c", "qemu+ssh://127.0.0.1/system", *args])
    assert there.exit_code == 0, there.output
    assert f"{tmp_path}/null.qcow2" in there.output
    with pytest.raises(ConfigError):
        load_config(path)
    assert load_config(path, files_here=False).disk_image == f"{tmp_path}/null.qcow2"
