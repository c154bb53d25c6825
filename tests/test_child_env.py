"""What the package's children inherit, and where the bridge's state folder comes from, as root."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from archdsp_libvirt.errors import UsageError
from archdsp_libvirt.procs import SAFE_PATH, child_env, run_dir, spawn_detached

REPO = Path(__file__).resolve().parent.parent
HOSTILE = {
    "PIPEWIRE_MODULE_DIR": "/tmp/evil", "SPA_PLUGIN_DIR": "/tmp/evil", "JACK_DRIVER_DIR": "/tmp/evil",
    "LD_PRELOAD": "/tmp/evil.so", "LD_LIBRARY_PATH": "/tmp/evil", "PYTHONPATH": "/tmp/evil",
    "ARCHDSP_RUN_DIR": "/tmp/evil", "PATH": "/tmp/evil:/usr/bin", "HOME": "/tmp/evil",
    "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm",
}


def test_the_allow_list_as_root():
    env = child_env({"JACK_DEFAULT_SERVER": "s"}, environ=HOSTILE, euid=0)
    assert env["PATH"] == SAFE_PATH and env["HOME"] != "/tmp/evil"
    assert {k: env[k] for k in ("LANG", "LC_ALL", "TERM", "JACK_DEFAULT_SERVER")} == {
        "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TERM": "xterm", "JACK_DEFAULT_SERVER": "s"}
    assert not set(env) & {"PIPEWIRE_MODULE_DIR", "SPA_PLUGIN_DIR", "JACK_DRIVER_DIR", "LD_PRELOAD",
                           "LD_LIBRARY_PATH", "PYTHONPATH", "ARCHDSP_RUN_DIR"}
    assert child_env(environ={**HOSTILE, "SSH_AUTH_SOCK": "/a"}, keep=("SSH_AUTH_SOCK",), euid=0)["SSH_AUTH_SOCK"] == "/a"


def test_an_unprivileged_caller_keeps_its_path_and_home():
    env = child_env(environ=HOSTILE, euid=1000)
    assert env["PATH"] == "/tmp/evil:/usr/bin" and env["HOME"] == "/tmp/evil"
    assert "SPA_PLUGIN_DIR" not in env and "LD_PRELOAD" not in env


def test_a_detached_child_gets_only_the_allow_list(tmp_path, monkeypatch):
    for key in ("PIPEWIRE_MODULE_DIR", "SPA_PLUGIN_DIR", "JACK_DRIVER_DIR", "ARCHDSP_RUN_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "evil"))
    out = tmp_path / "env.txt"
    child = spawn_detached(["sh", "-c", f"env > {out}"], tmp_path / "log")
    deadline = time.monotonic() + 10
    while child.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)
    assert not set(seen) & {"PIPEWIRE_MODULE_DIR", "SPA_PLUGIN_DIR", "JACK_DRIVER_DIR", "ARCHDSP_RUN_DIR"}, seen


def test_jack_and_pipewire_tools_get_only_what_the_code_sets(monkeypatch):
    from archdsp_libvirt.audio.jack2.bridge import jack_env
    from archdsp_libvirt.audio.pipewire import server as pw

    for key in ("PIPEWIRE_MODULE_DIR", "SPA_PLUGIN_DIR", "JACK_DRIVER_DIR", "JACK_PROMISCUOUS_SERVER"):
        monkeypatch.setenv(key, "/tmp/evil")
    jenv = jack_env("srv")
    assert jenv["JACK_DEFAULT_SERVER"] == "srv" and "JACK_DRIVER_DIR" not in jenv
    assert not {k for k in jenv if k.startswith("JACK_")} - {"JACK_DEFAULT_SERVER", "JACK_NO_START_SERVER",
                                                            "JACK_NO_AUDIO_RESERVATION"}
    penv = pw.pw_env(pw.Target("/run/user/1000", "pipewire-0", "u", 1000, "test"))
    assert penv["XDG_RUNTIME_DIR"] == "/run/user/1000"
    assert "PIPEWIRE_MODULE_DIR" not in penv and "SPA_PLUGIN_DIR" not in penv and "JACK_DRIVER_DIR" not in penv


def test_the_state_folder_from_the_environment_as_root(tmp_path):
    assert run_dir({}, euid=0) == Path("/run/archdsp-libvirt")
    mine = tmp_path / "run"
    mine.mkdir(mode=0o700)
    os.chown(mine, 0, 0) if os.geteuid() == 0 else None
    if os.geteuid() == 0:
        assert run_dir({"ARCHDSP_RUN_DIR": str(mine)}, euid=0) == mine
    link = tmp_path / "link"
    link.symlink_to(mine)
    for value, why in (("/tmp", "writable by others"), ("run", "not an absolute path"),
                       (str(link), "symbolic link"), (str(tmp_path / "none"), "no such file")):
        with pytest.raises(UsageError, match=why):
            run_dir({"ARCHDSP_RUN_DIR": value}, euid=0)
    if os.geteuid() == 0:
        os.chown(mine, 1234, 1234)
        with pytest.raises(UsageError, match="owned by uid 1234"):
            run_dir({"ARCHDSP_RUN_DIR": str(mine)}, euid=0)
    assert run_dir({"ARCHDSP_RUN_DIR": "/tmp"}, euid=1000) == Path("/tmp")  # a user may only kill their own


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for root")
def test_stop_as_root_refuses_a_world_writable_state_folder(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "archdsp-test-rundir"\nisolated_cores = [1]\nmemory_mb = 256\n'
                   "[archibaldos.netjack]\nenable = true\n")
    env = {**os.environ, "ARCHDSP_RUN_DIR": "/tmp"}
    r = subprocess.run([sys.executable, "-m", "archdsp_libvirt", "netjack", "stop", str(cfg)], cwd=REPO,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ARCHDSP_RUN_DIR=/tmp is writable by others" in lines[0] and "Traceback" not in r.stderr
