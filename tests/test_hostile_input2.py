"""Hostile input, second round: the classes an outside probe found mishandled.

Every refused config is refused by every command that loads it (``xml``,
``check``, ``latency``: they share load_config), with the same one line
naming the file and the key, exit code 2 and no traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import libvirt
import pytest
from click.testing import CliRunner

from archdsp_libvirt import parse_config
from archdsp_libvirt.cli import cli
from archdsp_libvirt.host.checks import check_boot_files
from archdsp_libvirt.host.files import Host
from archdsp_libvirt.virt.connection import translate
from conftest import assert_config_refused

GOOD = "isolated_cores = [1]\nmemory_mb = 1024\n"
BOOT = GOOD + "[boot]\nkernel = \"{tmp}/vmlinuz\"\n"
UNSAFE_OK = GOOD + "qemu_extra_args_allow_unsafe = true\n"


def qemu_args(*args: str) -> str:
    """A config whose qemu_extra_args are ``args`` (TOML literal strings)."""
    return GOOD + "qemu_extra_args = [" + ", ".join(f"'{a}'" for a in args) + "]\n"


# (id, TOML text ({tmp} is the test's folder), substrings the one-line message must contain)
CASES = [
    # --- characters XML cannot hold, in any string (values, list items, table keys) -----------------
    ("cmdline-uffff", BOOT + "cmdline = \"console=ttyS0 \\uFFFF\"\n", ["boot.cmdline", "U+FFFF"]),
    ("disk-ufffe", GOOD + "[archibaldos]\ndisk_image = \"/var/lib/x\\uFFFE.qcow2\"\n",
     ["archibaldos.disk_image", "U+FFFE"]),
    ("password-fdd0", GOOD + "display_password = \"ab\\uFDD0\"\n", ["display_password", "U+FDD0"]),
    ("qemu-arg-uffff-even-unchecked", UNSAFE_OK + "qemu_extra_args = [\"-name\", \"x\\uFFFF\"]\n",
     ["qemu_extra_args[1]", "U+FFFF"]),
    ("console-log-c1-control", GOOD + "console_log = \"/var/log/x\\u0085.log\"\n", ["console_log", "U+0085"]),
    ("kernel-plane16-nonchar", GOOD + "[boot]\nkernel = \"/srv/vmlinuz\\U0010FFFF\"\n", ["boot.kernel", "U+10FFFF"]),
    ("hostfwd-key-uffff", GOOD + "[network]\nhostfwd = { \"\\uFFFF\" = 22 }\n", ["network.hostfwd", "1 to 65535"]),
    ("initrd-del", BOOT + "initrd = \"/srv/init\\u007Frd\"\n", ["boot.initrd", "control characters"]),
    # --- qemu_extra_args: only the allow-list passes ---------------------------------------------------
    ("qemu-flag-then-disk", qemu_args("-async-teardown", "/dev/vda"), ["qemu_extra_args", "'-async-teardown'", "allow-list"]),
    ("qemu-netdev-json-guestfwd",
     qemu_args("-netdev", '{"type":"user","id":"u0","guestfwd":[{"str":"tcp:10.0.2.1:1-cmd:/bin/sh"}]}'),
     ["qemu_extra_args", "nested value"]),
    ("qemu-netdev-json-hostfwd",
     qemu_args("-netdev", '{"type":"user","id":"u0","hostfwd":[{"str":"tcp:0.0.0.0:2222-:22"}]}'),
     ["qemu_extra_args", "nested value"]),
    ("qemu-netdev-repeated-type", qemu_args("-netdev", "user,id=u0,type=socket,listen=0.0.0.0:5555"),
     ["qemu_extra_args", "type= twice", "last one"]),
    ("qemu-json-repeated-driver", qemu_args("-device", '{"driver":"intel-hda","driver":"vfio-pci","host":"0000:00:1b.0"}'),
     ["qemu_extra_args", "driver= twice"]),
    ("qemu-u2f-passthru", qemu_args("-device", "u2f-passthru,hidraw=/dev/hidraw0"), ["qemu_extra_args", "'u2f-passthru'"]),
    ("qemu-usb-mtp-rootdir", qemu_args("-device", "usb-mtp,rootdir=/"), ["qemu_extra_args", "'usb-mtp'"]),
    ("qemu-global-rootdir", qemu_args("-global", "usb-mtp.rootdir=/"), ["qemu_extra_args", "DRIVER.PROPERTY=VALUE"]),
    ("qemu-audiodev-host", qemu_args("-audiodev", "alsa,id=a0,out.dev=hw:0"), ["qemu_extra_args", "host audio"]),
    ("qemu-icount-rrfile", qemu_args("-icount", "shift=auto,rr=record,rrfile=/etc/x"), ["qemu_extra_args", "rrfile"]),
    ("qemu-boot-splash", qemu_args("-boot", "splash=/etc/shadow"), ["qemu_extra_args", "'-boot'", "splash"]),
    ("qemu-qtest-tcp", qemu_args("-qtest", "tcp:0.0.0.0:4444"), ["qemu_extra_args", "test socket"]),
    ("qemu-object-rng-file", qemu_args("-object", "rng-random,id=r0,filename=/dev/hwrng"),
     ["qemu_extra_args", "QEMU object"]),
    ("qemu-sdl", qemu_args("-sdl"), ["qemu_extra_args", "display"]),
    ("qemu-curses", qemu_args("-curses"), ["qemu_extra_args", "display"]),
    ("qemu-escaped-comma-hides-key", qemu_args("-device", "virtio-rng-pci,,rng=r0"),
     ["qemu_extra_args", "'virtio-rng-pci,rng=r0'"]),
    ("qemu-allowed-device-romfile", qemu_args("-netdev", "user,id=u0", "-device", "e1000,netdev=u0,romfile=/etc/shadow"),
     ["qemu_extra_args", "'romfile'", "host file"]),
    ("qemu-flag-form-key", qemu_args("-device", "intel-hda,noromfile"), ["qemu_extra_args", "'romfile'"]),
    ("qemu-nic-tap", qemu_args("-nic", "tap,ifname=tap9"), ["qemu_extra_args", "host network"]),
    ("qemu-smbios-file", qemu_args("-smbios", "file=/etc/shadow"), ["qemu_extra_args", "file= reads a host file"]),
    ("qemu-fw-cfg-file", qemu_args("-fw_cfg", "name=opt/x,file=/etc/shadow"), ["qemu_extra_args", "'file'"]),
    ("qemu-netdev-smb", qemu_args("-netdev", "user,id=u0,smb=/"), ["qemu_extra_args", "host folder"]),
    ("qemu-nic-hostfwd-any", qemu_args("-nic", "user,hostfwd=tcp:0.0.0.0:2222-:22"), ["qemu_extra_args", "loopback"]),
    ("qemu-hostfwd-octal-port", qemu_args("-netdev", "user,id=u0,hostfwd=tcp:127.0.0.1:02222-:22"),
     ["qemu_extra_args", "hostfwd="]),
    ("qemu-nic-on-libvirts-netdev", qemu_args("-device", "virtio-net-pci,netdev=hostnet0"),
     ["qemu_extra_args", "not a -netdev user given earlier"]),
    ("qemu-machine-kernel", qemu_args("-machine", "kernel=/etc/shadow"), ["qemu_extra_args", "set by libvirt"]),
    # --- host files as disks, kernels and logs ----------------------------------------------------------
    ("disk-dev-missing-raw", GOOD + "[archibaldos]\ndisk_image = \"/dev/sdz9\"\ndisk_format = \"raw\"\n",
     ["archibaldos.disk_image", "under /dev"]),
    ("disk-proc-kcore", GOOD + "[archibaldos]\ndisk_image = \"/proc/kcore\"\n", ["archibaldos.disk_image", "under /proc"]),
    ("kernel-pci-bar", GOOD + "[boot]\nkernel = \"/sys/bus/pci/devices/0000:00:00.0/resource0\"\n",
     ["boot.kernel", "under /sys"]),
    ("initrd-etc-shadow", BOOT + "initrd = \"/etc/shadow\"\n", ["boot.initrd", "under /etc"]),
    ("disk-symlink-to-kcore", GOOD + "[archibaldos]\ndisk_image = \"{tmp}/kcore.qcow2\"\n",
     ["archibaldos.disk_image", "resolves to a file under /proc", "through a symlink"]),
    ("disk-hard-link", GOOD + "[archibaldos]\ndisk_image = \"{tmp}/hard.raw\"\n", ["archibaldos.disk_image", "hard links"]),
    ("console-log-hard-link", GOOD + "console_log = \"{tmp}/hard.log\"\n", ["console_log", "hard links"]),
    ("console-log-symlinked-folder", GOOD + "console_log = \"{tmp}/logs/dsp.log\"\n", ["console_log", "symlinked folder"]),
    ("kernel-private-file", GOOD + "[boot]\nkernel = \"{tmp}/private-vmlinuz\"\n",
     ["boot.kernel", "not readable by everyone", "chmod o+r"]),
    ("disk-ssh-key", GOOD + "[archibaldos]\ndisk_image = \"~/.ssh/id_ed25519\"\n", ["archibaldos.disk_image", "folder of keys"]),
    ("disk-tilde-user", GOOD + "[archibaldos]\ndisk_image = \"~root/x.qcow2\"\n", ["archibaldos.disk_image", "~user"]),
    ("console-log-in-etc", GOOD + "console_log = \"/etc/cron.d/x.log\"\n", ["console_log", "under /etc"]),
    ("disk-in-run", GOOD + "[archibaldos]\ndisk_image = \"/run/libvirt/x.qcow2\"\n", ["archibaldos.disk_image", "under /run"]),
    # --- identifiers and numbers -------------------------------------------------------------------------
    ("pci-trailing-newline", GOOD + "[audio_device]\nenable = true\npci_id = \"0000:00:02.0\\n\"\n",
     ["audio_device.pci_id", "DDDD:BB:SS.F"]),
    ("pci-trailing-space", GOOD + "[audio_device]\nenable = true\npci_id = \"0000:00:02.0 \"\n",
     ["audio_device.pci_id", "DDDD:BB:SS.F"]),
    ("vendor-device-newline", GOOD + "[audio_device]\nvendor_device = \"1022:15e3\\n\"\n",
     ["audio_device.vendor_device", "vendor:device"]),
    ("name-trailing-newline", GOOD + "name = \"dsp\\n\"\n", ["name", "letters, digits"]),
    ("name-trailing-space", GOOD + "name = \"dsp \"\n", ["name", "letters, digits"]),
    ("hostfwd-arabic-indic-port", GOOD + "[network]\nhostfwd = { \"\u0662\u0662\u0662\u0662\" = 22 }\n",
     ["network.hostfwd", "ASCII digits"]),
    ("hostfwd-superscript-port", GOOD + "[network]\nhostfwd = { \"\u00b2\" = 22 }\n", ["network.hostfwd", "ASCII digits"]),
    ("hostfwd-same-port-twice", GOOD + "[network]\nhostfwd = { \"2222\" = 22, \"02222\" = 23 }\n",
     ["network.hostfwd", "no leading zero"]),
    ("unknown-key-200kb", GOOD + "x" * 200_000 + " = 1\n", ["xxxx...", "unknown key"]),
    ("display-listen-scoped-ipv6", GOOD + "display_listen = \"fe80::1%eth0\"\ndisplay_password = \"pw\"\n",
     ["display_listen", "%scope"]),
    ("bom-then-bad-key", "\ufeff" + GOOD + "memroy_mb = 1\n", ["memroy_mb", "unknown key"]),
]

COMMANDS = [
    ["xml", "--host-cpus", "0-3", "--port-forwards", "hostfwd"],
    ["-c", "test:///default", "check"],
    ["latency"],
]


def _prepare(tmp: Path) -> None:
    """The files the cases point at."""
    (tmp / "vmlinuz").write_bytes(b"kernel")
    (tmp / "kcore.qcow2").symlink_to("/proc/kcore")
    (tmp / "hard.raw").write_bytes(b"\0" * 512)
    os.link(tmp / "hard.raw", tmp / "other-name.raw")
    (tmp / "hard.log").write_text("")
    os.link(tmp / "hard.log", tmp / "other-name.log")
    (tmp / "real-logs").mkdir()
    (tmp / "logs").symlink_to(tmp / "real-logs")
    (tmp / "private-vmlinuz").write_bytes(b"kernel")
    os.chmod(tmp / "private-vmlinuz", 0o600)


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, text, needles", CASES, ids=[c[0] for c in CASES])
def test_refused_alike_by_xml_check_and_latency(tmp_path, case_id, text, needles):
    _prepare(tmp_path)
    path = tmp_path / f"{case_id}.toml"
    path.write_text(text.replace("{tmp}", str(tmp_path)), encoding="utf-8")
    lines = set()
    for command in COMMANDS:
        result = CliRunner().invoke(cli, [*command, str(path)])
        assert_config_refused(result, path, needles)
        line = result.stderr.strip()
        assert len(line) <= 400 + len(str(path)), line[:500]
        lines.add(line)
    assert len(lines) == 1, lines  # one loader, one message


# --- what stays allowed -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["-msg", "timestamp=on"], ["-overcommit", "cpu-pm=on,mem-lock=off"], ["-rtc", "base=utc,driftfix=slew"],
    ["-smbios", "type=1,serial=dsp-01,manufacturer=ArchibaldOS"], ["-cpu", "host,+invtsc,-arch-capabilities"],
    ["-device", "virtio-rng-pci,id=rng0"], ["-device", '{"driver":"intel-hda","id":"hda0"}'],
    ["-netdev", "user,id=u0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp:127.0.0.1:5000-:5000",
     "-device", "virtio-net-pci,netdev=u0"],
    ["-nic", "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2223-:22"], ["-global", "kvm-pit.lost_tick_policy=discard"],
    ["-fw_cfg", "name=opt/dsp,string=1"], ["-S"], ["--no-hpet"],
])
def test_allow_listed_qemu_args_pass(args):
    cfg = parse_config({"isolated_cores": [1], "memory_mb": 256, "qemu_extra_args": args})
    assert cfg.qemu_extra_args == args


def test_bom_is_accepted_by_every_command(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"[archibaldos.netjack]\nenable = true\n")
    xml = CliRunner().invoke(cli, ["xml", "--host-cpus", "0-3", str(path)])
    assert xml.exit_code == 0, xml.output
    for command in (["-c", "test:///default", "check"], ["latency"]):
        result = CliRunner().invoke(cli, [*command, str(path)])
        assert result.exit_code in (0, 1) and "TOML" not in result.output, result.output


@pytest.mark.parametrize("args, needle", [
    (["latency", "--target-ms", "nan"], "--target-ms"),
    (["latency", "--target-ms", "\u0663"], "ASCII digits"),
    (["latency", "--seconds", "inf"], "--seconds"),
    (["latency", "--nperiods", "\u0663"], "ASCII digits"),
    (["xml", "--host-cpus", "\u0660-\u0663"], "--host-cpus"),
    (["xml", "--host-cpus", "0-1_0"], "--host-cpus"),
    (["-c", "test:///default", "down", "--timeout", "nan"], "--timeout"),
])
def test_numbers_on_the_command_line(tmp_path, args, needle):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    result = CliRunner().invoke(cli, [*args, str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.output
    assert result.stdout == ""


def test_latency_json_stays_json_with_a_target(tmp_path):
    path = tmp_path / "nj.toml"
    path.write_text(GOOD + "[archibaldos.netjack]\nenable = true\n")
    result = CliRunner().invoke(cli, ["latency", "--json", "--target-ms", "3", str(path)])
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)


# --- preflight: the boot files ------------------------------------------------------------------------

def _host(tmp: Path, qemu_conf: str = "") -> Host:
    root = tmp / "host"
    (root / "etc/libvirt").mkdir(parents=True)
    (root / "etc/libvirt/qemu.conf").write_text(qemu_conf)
    (root / "etc/passwd").write_text("libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n")
    (root / "etc/group").write_text("kvm:x:994:libvirt-qemu\n")
    (root / "images").mkdir()
    return Host(root)


def _model(host: Host | Path, qemu_conf: str = ""):
    """The host model of a fake tree (a :class:`Host`, or the folder to make one in): the boot check
    reads its files through the model."""
    from archdsp_libvirt.virt.hostfacts import gather

    return gather(None, files=host if isinstance(host, Host) else _host(host, qemu_conf))


def _cfg(**archibaldos):
    return parse_config({"isolated_cores": [1], "memory_mb": 256,
                         "archibaldos": {"disk_image": "/images/dsp.qcow2", **archibaldos}})


def test_boot_files_missing_disk_fails_with_the_fix(tmp_path):
    (f,) = check_boot_files(_cfg(), _model(tmp_path))
    assert f.status == "fail" and "no such file" in f.observed and "qemu-img create" in f.fix


def test_boot_files_root_owned_0600_image_is_fine_with_dynamic_ownership(tmp_path):
    host = _host(tmp_path)
    image = host.path("/images/dsp.qcow2")
    image.write_bytes(b"QFI\xfb")
    os.chmod(image, 0o600)
    (f,) = check_boot_files(_cfg(), _model(host))
    assert f.status == "ok" and "dynamic_ownership" in f.observed


def test_boot_files_unreadable_without_dynamic_ownership(tmp_path):
    host = _host(tmp_path, "dynamic_ownership = 0\n")
    image = host.path("/images/dsp.qcow2")
    image.write_bytes(b"QFI\xfb")
    os.chmod(image, 0o600)
    (f,) = check_boot_files(_cfg(), _model(host))
    assert f.status == "fail" and "chown libvirt-qemu" in f.fix
    assert check_boot_files(_cfg(), _model(tmp_path / "r", 'user = "root"\ndynamic_ownership = 0\n'))[0].status == "fail"


def test_boot_files_folder_the_qemu_user_cannot_enter(tmp_path):
    host = _host(tmp_path)
    host.path("/images/dsp.qcow2").write_bytes(b"QFI\xfb")
    os.chmod(host.path("/images"), 0o700)
    (f,) = check_boot_files(_cfg(), _model(host))
    assert f.status == "fail" and "cannot enter /images" in f.observed and "chmod o+x /images" in f.fix


def test_boot_files_not_a_regular_file_and_root_qemu(tmp_path):
    host = _host(tmp_path, 'user = "root"\n')
    host.path("/images/dsp.qcow2").mkdir()
    (f,) = check_boot_files(_cfg(), _model(host))
    assert f.status == "fail" and "not a regular file" in f.observed


def test_check_cli_reports_a_missing_disk(tmp_path):
    path = tmp_path / "dsp.toml"
    path.write_text(GOOD + f"[archibaldos]\ndisk_image = \"{tmp_path}/absent.qcow2\"\n")
    result = CliRunner().invoke(cli, ["-c", "test:///default", "check", "--json", str(path)])
    assert result.exit_code == 1
    found = {d["id"]: d for d in json.loads(result.stdout)}
    assert found["boot.files"]["status"] == "fail" and "no such file" in found["boot.files"]["observed"]


def test_msr_failure_gets_the_nested_kvm_hint():
    err = libvirt.libvirtError("internal error: qemu unexpectedly closed the monitor: "
                               "kvm: error: failed to set MSR 0x10a to 0x...")
    msg = translate(err, "qemu:///system", "starting dsp").message
    assert 'cpu_disable_features = ["arch-capabilities"]' in msg


def test_readme_lists_the_allow_list():
    from archdsp_libvirt.config.qemuargs import ALLOWED_DEVICES, ALLOWED_FLAGS, ALLOWED_OPTIONS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Paths and QEMU arguments that are refused"):readme.index("### What each option")]
    for name in [*ALLOWED_DEVICES, *(f"-{o}" for o in (*ALLOWED_FLAGS, *ALLOWED_OPTIONS))]:
        assert f"`{name}" in section, name
