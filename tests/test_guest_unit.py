"""``guest unit``: the systemd unit and its helper for a user's own guest.

The printed text against its golden file; the unit verified by systemd-analyze in a tree written by
``--root``; the helper run by the system's sh on a fake credential or DMI tree with fake JACK tools on
PATH that record what they are asked (jackd's argv, the loop's connections).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt import load_config
from archdsp_libvirt.cli import cli
from archdsp_libvirt.domain import contract
from archdsp_libvirt.guest import unit
from conftest import DOMAINS

DEMO = DOMAINS / "demo-dsp.toml"
SYSTEM_UNITS = Path("/lib/systemd/system")


def printed(*args: str) -> str:
    result = CliRunner().invoke(cli, ["guest", "unit", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def test_the_demo_s_unit_and_helper_are_the_golden_text(golden):
    golden("guest-unit.demo-dsp.txt", printed(str(DEMO)))


def test_the_listing_names_each_file_s_place():
    text = printed(str(DEMO))
    assert text.startswith(f"# --- {unit.UNIT_PATH} ---\n")
    assert f"\n# --- {unit.HELPER_PATH} ---\n#!/bin/sh\n" in text
    assert text.count("# --- ") == 2


def test_no_link_setting_is_baked_into_the_unit():
    """Two configs with different links print the same unit but for the lines naming the domain."""
    demo, other = (unit.unit_text(load_config(DOMAINS / n, files_here=False))
                   for n in ("demo-dsp.toml", "archibaldos-dsp.toml"))
    assert load_config(DEMO, files_here=False).name in demo
    differing = [(a, b) for a, b in zip(demo.splitlines(), other.splitlines()) if a != b]
    assert differing and all("DSP VM" in a for a, _ in differing)
    for word in ("192.168.122.1", "19000", "-l ", "latency"):
        assert word not in demo
    assert unit.helper_script() in printed(str(DEMO))


def test_options_are_the_guest_s_own(tmp_path):
    text = unit.unit_text(load_config(DEMO, files_here=False), rtprio=80, user="audio")
    assert "Environment=ARCHDSP_RTPRIO=80\n" in text and "User=audio\n" in text
    assert "User=" not in unit.unit_text(load_config(DEMO, files_here=False))


@pytest.mark.parametrize("args, word", [
    (["--rtprio", "90"], "--rtprio"),
    (["--user", "Not A User"], "--user"),
    (["--user", "root"], "--user"),
])
def test_bad_options_are_one_line_exit_2(args, word):
    result = CliRunner().invoke(cli, ["guest", "unit", *args, str(DEMO)])
    assert result.exit_code == 2, result.output
    assert word in result.stderr and "Traceback" not in result.stderr


def test_a_missing_config_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(cli, ["guest", "unit", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no such file" in lines[0], result.stderr


def test_a_config_without_a_link_is_refused(tmp_path):
    cfg = tmp_path / "nolink.toml"
    cfg.write_text('name = "nolink"\nisolated_cores = [1]\nmemory_mb = 256\n')
    result = CliRunner().invoke(cli, ["guest", "unit", str(cfg)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "[archibaldos.netjack] enable = false" in lines[0], result.stderr


# --- the tree --root writes, verified by systemd ---------------------------------------------------


def write_root(root: Path) -> None:
    result = CliRunner().invoke(cli, ["guest", "unit", "--root", str(root), str(DEMO)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert result.output.splitlines() == [f"wrote {root}{unit.UNIT_PATH}", f"wrote {root}{unit.HELPER_PATH}"]


def test_root_writes_the_files_with_their_modes(tmp_path):
    write_root(tmp_path)
    unit_file, helper = tmp_path / unit.UNIT_PATH.lstrip("/"), tmp_path / unit.HELPER_PATH.lstrip("/")
    assert stat.S_IMODE(unit_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(helper.stat().st_mode) == 0o755
    assert helper.read_text() == unit.helper_script()
    assert f"ExecStart={unit.HELPER_PATH}\n" in unit_file.read_text()
    write_root(tmp_path)  # again, over the files there
    assert sorted(p.name for p in unit_file.parent.iterdir()) == [unit.UNIT_NAME]


def test_root_must_exist(tmp_path):
    result = CliRunner().invoke(cli, ["guest", "unit", "--root", str(tmp_path / "no"), str(DEMO)])
    assert result.exit_code == 2 and "no such directory" in result.stderr


def test_systemd_analyze_verifies_the_unit_in_the_tree(tmp_path):
    """Against a root holding the unit, its helper and this system's own units (sysinfo.target & co.)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None or not SYSTEM_UNITS.is_dir():
        pytest.skip("systemd-analyze or /lib/systemd/system is not here (apt-get install systemd)")
    write_root(tmp_path)
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    unit_file = tmp_path / unit.UNIT_PATH.lstrip("/")
    proc = subprocess.run([analyze, "verify", "--man=no", f"--root={tmp_path}", str(unit_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # systemd < 254 does not know ImportCredential= (and says so); nothing else may be said
    other = [line for line in proc.stderr.splitlines() if "Unknown key 'ImportCredential'" not in line
             and "Unknown key name 'ImportCredential'" not in line]
    assert other == [], proc.stderr
    # the check has teeth: without the helper the unit does not verify
    (tmp_path / unit.HELPER_PATH.lstrip("/")).unlink()
    proc = subprocess.run([analyze, "verify", "--man=no", f"--root={tmp_path}", str(unit_file)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "netjack-slave" in proc.stderr


# --- the helper, run by sh with fake JACK tools ----------------------------------------------------


def test_the_helper_is_sh_syntax(tmp_path):
    script = tmp_path / "netjack-slave"
    script.write_text(unit.helper_script())
    for shell in ("sh", "dash", "bash"):
        if shutil.which(shell):
            proc = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
            assert proc.returncode == 0, (shell, proc.stderr)


def type11(handle: int, strings: list[str]) -> bytes:
    """One SMBIOS type 11 structure as /sys/firmware/dmi/entries/11-N/raw holds it."""
    body = b"".join(s.encode() + b"\0" for s in strings) + b"\0"
    return struct.pack("<BBHB", 11, 5, handle, len(strings)) + body


_FAKE_JACKD = """
import json, os, pathlib, sys, time
d = pathlib.Path(os.environ["FAKE"])
(d / "jackd.argv").write_text(json.dumps(sys.argv[1:]))
(d / "up").touch()  # the server is up and the master answered: jack_lsp lists the ports
want = int(os.environ["FAKE_CONNECTIONS"])
for _ in range(800):  # until the helper made the loop (at most ~20 s)
    c = d / "connections"
    if c.exists() and len(c.read_text().splitlines()) >= want:
        break
    time.sleep(0.025)
sys.exit(3)
"""
_FAKE_LSP = """
import json, os, pathlib, sys
d = pathlib.Path(os.environ["FAKE"])
if not (d / "up").exists():
    sys.exit(1)
argv = json.loads((d / "jackd.argv").read_text())
n = int(argv[argv.index("-C") + 1])
ports = [f"system:capture_{i}" for i in range(1, n + 1)] + [f"system:playback_{i}" for i in range(1, n + 1)]
if (d / "thru").exists():
    name = (d / "thru").read_text()
    ports += [f"{name}:input_1", f"{name}:input_2", f"{name}:output_1", f"{name}:output_2"]
pairs = [line.split() for line in (d / "connections").read_text().splitlines()] if (d / "connections").exists() else []
for p in ports:
    print(p)
    if "-c" in sys.argv:
        for a, b in pairs:
            if p in (a, b):
                print("   " + (b if p == a else a))
"""
_FAKE_CONNECT = """
import os, pathlib, sys
with open(pathlib.Path(os.environ["FAKE"]) / "connections", "a") as f:
    f.write(f"{sys.argv[1]} {sys.argv[2]}\\n")
"""
_FAKE_THRU = """
import os, pathlib, sys, time
(pathlib.Path(os.environ["FAKE"]) / "thru").write_text(sys.argv[1])
time.sleep(20)
"""


@pytest.fixture
def helper(tmp_path):
    """run(value=..., dmi=..., env=...) -> (returncode, stderr, jackd argv or None, connections, thru name)."""
    script = tmp_path / "netjack-slave"
    script.write_text(unit.helper_script())
    script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, code in (("jackd", _FAKE_JACKD), ("jack_lsp", _FAKE_LSP), ("jack_connect", _FAKE_CONNECT),
                       ("jack_thru", _FAKE_THRU)):
        (bin_dir / name).write_text(f"#!{sys.executable} -S\n{code}")
        (bin_dir / name).chmod(0o755)
    (bin_dir / "jack_evmon").write_text(f"#!{sys.executable} -S\nimport time\ntime.sleep(20)\n")
    (bin_dir / "sleep").write_text("#!/bin/sh\nexec /bin/sleep 0.02\n")  # the helper's ticks, quicker
    for fake in bin_dir.iterdir():
        fake.chmod(0o755)
    runs = iter(range(100))

    def run(value: str | None = None, dmi: dict[str, bytes] | None = None, connections: int = 1,
            env: dict[str, str] | None = None):
        here = tmp_path / f"run{next(runs)}"
        fake, creds, entries = here / "fake", here / "creds", here / "dmi"
        fake.mkdir(parents=True)
        environ = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE": str(fake), "FAKE_CONNECTIONS": str(connections),
                   "ARCHDSP_DMI_ENTRIES": str(entries), "RUNTIME_DIRECTORY": str(here), **(env or {})}
        if value is not None:
            creds.mkdir()
            (creds / "archdsp.netjack").write_text(value)
            environ["CREDENTIALS_DIRECTORY"] = str(creds)
        if dmi is not None:
            for entry, raw in dmi.items():
                (entries / entry).mkdir(parents=True)
                (entries / entry / "raw").write_bytes(raw)
        proc = subprocess.run(["sh", str(script)], env=environ, capture_output=True, text=True, timeout=60)
        argv = json.loads((fake / "jackd.argv").read_text()) if (fake / "jackd.argv").exists() else None
        conns = (fake / "connections").read_text().splitlines() if (fake / "connections").exists() else []
        thru = (fake / "thru").read_text() if (fake / "thru").exists() else None
        return proc.returncode, proc.stderr, argv, conns, thru

    return run


def demo_value(**changes: str) -> str:
    values = contract.settings(load_config(DEMO, files_here=False))
    assert values is not None
    return contract.encode({**values, **{k: str(v) for k, v in changes.items()}})


NET = ["-d", "net", "-a", "192.168.122.1", "-p", "19000", "-n", "dsp"]
THRU_LOOP = ["system:capture_1 archdsp_thru:input_1", "archdsp_thru:output_1 system:playback_1",
             "system:capture_2 archdsp_thru:input_2", "archdsp_thru:output_2 system:playback_2"]


def test_the_demo_s_settings_from_the_credential(helper):
    rc, err, argv, conns, thru = helper(value=demo_value(), connections=4)
    assert argv == ["-R", "-P", "70", *NET, "-l", "0", "-C", "2", "-P", "2", "-i", "0", "-o", "0"], err
    assert thru == "archdsp_thru" and conns == THRU_LOOP
    assert rc == 1 and "jackd exited (status 3)" in err  # the unit restarts it
    assert "link settings from the credential archdsp.netjack" in err and "ready: dsp joined" in err


@pytest.mark.parametrize("changes, connections, tail, loop", [
    ({"latency": 2, "sync": 1, "channels": 4, "dsp": "direct"}, 4, ["-l", "2", "-C", "4", "-P", "4"],
     [f"system:capture_{i} system:playback_{i}" for i in range(1, 5)]),
    ({"channels": 3}, 5, ["-l", "0", "-C", "3", "-P", "3"], [*THRU_LOOP, "system:capture_3 system:playback_3"]),
    ({"channels": 1}, 1, ["-l", "0", "-C", "1", "-P", "1"], ["system:capture_1 system:playback_1"]),
])
def test_latency_sync_channels_and_dsp_reach_jackd_and_the_loop(helper, changes, connections, tail, loop):
    rc, err, argv, conns, thru = helper(value=demo_value(**changes), connections=connections)
    sync = ["-S"] if changes.get("sync") == 1 else []
    assert argv == ["-R", "-P", "70", *sync, *NET, *tail, "-i", "0", "-o", "0"], err
    assert conns == loop
    assert (thru is not None) == any("archdsp_thru" in c for c in loop)


def test_tune_s_override_takes_latency_and_sync_over_the_credential(helper, tmp_path):
    override = tmp_path / "netjack.override"
    override.write_text("LATENCY=3\nSYNC=1\n")  # what archdsp-virt tune writes (docs/guest-contract.md)
    _rc, err, argv, _c, _t = helper(value=demo_value(dsp="direct"), connections=2,
                                    env={"ARCHDSP_NETJACK_OVERRIDE": str(override)})
    assert argv is not None and argv[:4] == ["-R", "-P", "70", "-S"] and argv[argv.index("-l") + 1] == "3", err
    override.write_text("LATENCY=99\n")  # checked as the credential's own
    rc, err, argv, _c, _t = helper(value=demo_value(dsp="direct"), env={"ARCHDSP_NETJACK_OVERRIDE": str(override)})
    assert argv is None and "bad latency=99" in err and str(override) in err


def test_the_priority_is_the_unit_s(helper):
    _rc, err, argv, _c, _t = helper(value=demo_value(dsp="direct"), connections=2, env={"ARCHDSP_RTPRIO": "80"})
    assert argv is not None and argv[:3] == ["-R", "-P", "80"], err


def test_the_dmi_tables_when_there_is_no_credential(helper):
    oem = contract.OEM_PREFIX + demo_value(latency=1)
    dmi = {"11-0": type11(0x0B00, ["io.systemd.credential:other=1"]), "11-1": type11(0x0B01, ["x", oem, "y"])}
    rc, err, argv, conns, _thru = helper(dmi=dmi, connections=4)
    assert argv is not None and argv[argv.index("-l") + 1] == "1", err
    assert "the SMBIOS OEM string in" in err and conns == THRU_LOOP
    # the credential first, where there is one
    _rc, err, argv, _c, _t = helper(value=demo_value(latency=3), dmi=dmi, connections=4)
    assert argv is not None and argv[argv.index("-l") + 1] == "3", err


@pytest.mark.parametrize("value, says", [
    ("v=2 master=192.168.122.1 port=19000 name=dsp latency=0 channels=2 sync=0 dsp=thru", "v=2; this slave reads v=1"),
    (None, "no link settings"),
    (demo_value(master="225.3.19.154"), "not a unicast address"),
    (demo_value(dsp="fancy"), "bad dsp=fancy"),
    (demo_value(latency="x"), "bad latency=x"),
])
def test_what_the_helper_refuses_it_never_starts(helper, value, says):
    rc, err, argv, _c, _t = helper(value=value)
    assert rc == unit.EX_CONFIG and says in err, err
    assert argv is None  # jackd never ran
    assert f"RestartPreventExitStatus={unit.EX_CONFIG}\n" in unit.unit_text(load_config(DEMO, files_here=False))


def test_unknown_keys_of_v1_are_ignored(helper):
    value = demo_value() + " later_key=1"
    _rc, err, argv, _c, _t = helper(value=value, connections=4)
    assert argv is not None and "-S" not in argv, err


def test_sigterm_stops_jackd_and_the_client(helper, tmp_path):
    """The unit stops with SIGTERM: the helper ends its children and exits 0."""
    script = tmp_path / "netjack-slave"
    creds = tmp_path / "c"
    creds.mkdir()
    (creds / "archdsp.netjack").write_text(demo_value())
    fake = tmp_path / "f"
    fake.mkdir()
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "FAKE": str(fake), "FAKE_CONNECTIONS": "999",
           "CREDENTIALS_DIRECTORY": str(creds), "ARCHDSP_DMI_ENTRIES": str(tmp_path / "none"),
           "RUNTIME_DIRECTORY": str(tmp_path)}
    proc = subprocess.Popen(["sh", str(script)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(400):  # until the loop is made (at most ~20 s)
            c = fake / "connections"
            if c.exists() and len(c.read_text().splitlines()) == 4:
                break
            subprocess.run(["/bin/sleep", "0.05"])
        proc.terminate()
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, err
    assert not list(tmp_path.glob("archdsp-evmon.*"))
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "bin")], capture_output=True, text=True).stdout.split()
    assert pids == [], f"left running: {pids}"


def test_the_helper_file_is_package_data():
    path = Path(unit.__file__).with_name("netjack-slave.sh")
    assert path.is_file() and os.access(path, os.R_OK)
