"""Which PipeWire server root joins: a runtime directory others could have planted a socket in is refused,
relative paths are never taken from the current folder, SUDO_UID is ASCII digits, and --pipewire-user is
never dropped or overridden in silence. Fake runtime directories under tmp_path, with the owners and
modes each case needs (the fast tier runs as root)."""

from __future__ import annotations

import os
import pwd
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from archdsp_libvirt.audio.pipewire import server as pw
from archdsp_libvirt.errors import UsageError

ROOT = pwd.getpwuid(0).pw_name
OTHER = 4242  # a uid nobody on this machine needs to have

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making directories owned by other users needs root")


def runtime_dir(base: Path, mode: int, uid: int = 0, name: str = "xdg", socket_too: bool = True) -> Path:
    d = base / name
    d.mkdir()
    if socket_too:  # a planted socket: what an attacker would leave for root to join
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "pipewire-0"))
        s.close()
    os.chown(d, uid, -1)
    os.chmod(d, mode)
    return d


def one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    text = str(err.value)
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2
    assert "\n" not in text and all(c.isprintable() for c in text), repr(text)
    for needle in needles:
        assert needle in text, text
    return text


# --- the runtime directory's mode and owner --------------------------------------------------------

@needs_root
@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o750, 0o705, 0o701], ids=lambda m: f"{m:04o}")
@pytest.mark.parametrize("euid", [0, OTHER])
def test_a_runtime_dir_others_may_enter_is_refused(tmp_path, mode, euid):
    d = runtime_dir(tmp_path, mode, uid=euid)
    for var in ("XDG_RUNTIME_DIR", "PIPEWIRE_RUNTIME_DIR"):
        with pytest.raises(UsageError) as err:
            pw.find_target(env={var: str(d)}, euid=euid)
        one_line(err, str(d), var, f"{mode:04o}", "0700")
    with pytest.raises(UsageError) as err:
        pw.find_target(env={"PIPEWIRE_REMOTE": str(d / "pipewire-0")}, euid=euid)
    one_line(err, str(d), "PIPEWIRE_REMOTE", "0700")


@needs_root
def test_a_runtime_dir_of_another_user_is_refused_to_a_user(tmp_path):
    d = runtime_dir(tmp_path, 0o700, uid=OTHER + 1)
    with pytest.raises(UsageError) as err:
        pw.find_target(env={"XDG_RUNTIME_DIR": str(d)}, euid=OTHER)
    one_line(err, str(d), f"uid {OTHER + 1}", f"uid {OTHER}")


@needs_root
def test_a_private_runtime_dir_is_taken(tmp_path):
    mine = runtime_dir(tmp_path, 0o700, uid=OTHER, name="mine")
    t = pw.find_target(env={"XDG_RUNTIME_DIR": str(mine)}, euid=OTHER)
    assert (t.runtime_dir, t.uid, t.how) == (str(mine), OTHER, "XDG_RUNTIME_DIR")
    roots = runtime_dir(tmp_path, 0o700, uid=0, name="roots")
    assert pw.find_target(env={"XDG_RUNTIME_DIR": str(roots)}, euid=OTHER).uid == 0
    # as root a private directory's owner is whose server it is
    assert pw.find_target(env={"XDG_RUNTIME_DIR": str(mine)}, euid=0).uid == OTHER
    t = pw.find_target(env={"PIPEWIRE_REMOTE": str(mine / "pipewire-0")}, euid=0)
    assert (t.remote, t.uid) == (str(mine / "pipewire-0"), OTHER)


@needs_root
def test_a_file_is_no_runtime_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(UsageError) as err:
        pw.find_target(env={"XDG_RUNTIME_DIR": str(f)}, euid=0)
    one_line(err, str(f), "not a directory")


@needs_root
@pytest.mark.parametrize("how", ["sudo", "user"])
def test_run_user_uid_is_checked_too(tmp_path, monkeypatch, how):
    monkeypatch.setattr(pw, "RUN_USER", str(tmp_path))
    uid = 0 if how == "user" else OTHER
    find = (lambda: pw.find_target(ROOT, env={}, euid=0)) if how == "user" else \
        (lambda: pw.find_target(env={"SUDO_UID": str(OTHER)}, euid=0))
    d = runtime_dir(tmp_path, 0o777, uid=uid, name=str(uid))
    with pytest.raises(UsageError) as err:
        find()
    one_line(err, str(d), "0777")
    os.chmod(d, 0o700)
    assert find().runtime_dir == str(d)
    if how == "sudo":
        os.chown(d, OTHER + 1, -1)  # /run/user/UID of someone else
        with pytest.raises(UsageError) as err:
            find()
        one_line(err, str(d), f"uid {OTHER + 1}", f"uid {OTHER}")


# --- relative paths --------------------------------------------------------------------------------

@needs_root
def test_a_relative_runtime_dir_is_ignored_not_taken_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runtime_dir(tmp_path, 0o700, name="rel")  # what a relative XDG_RUNTIME_DIR would find in the cwd
    good = runtime_dir(tmp_path, 0o700, name="abs")
    assert pw.find_target(env={"XDG_RUNTIME_DIR": "rel"}, euid=0) is None
    assert pw.find_target(env={"XDG_RUNTIME_DIR": "./rel", "PIPEWIRE_RUNTIME_DIR": "rel"}, euid=0) is None
    t = pw.find_target(env={"XDG_RUNTIME_DIR": "rel", "PIPEWIRE_RUNTIME_DIR": str(good)}, euid=0)
    assert (t.runtime_dir, t.how) == (str(good), "PIPEWIRE_RUNTIME_DIR")


@needs_root
def test_a_relative_remote_is_a_name_in_the_runtime_dir_never_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = runtime_dir(tmp_path, 0o700, name="abs")
    t = pw.find_target(env={"XDG_RUNTIME_DIR": str(good), "PIPEWIRE_REMOTE": "pipewire-1"}, euid=0)
    assert t.remote == str(good / "pipewire-1")
    for remote in ("abs/pipewire-0", "./pipewire-0", "../x", ".", "..", "a\nb"):
        with pytest.raises(UsageError) as err:
            pw.find_target(env={"XDG_RUNTIME_DIR": str(good), "PIPEWIRE_REMOTE": remote}, euid=0)
        one_line(err, "PIPEWIRE_REMOTE", "absolute path")


# --- SUDO_UID --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["١٠٠٠", "²", "1000²", "9" * 5000, "4294967295", "1e3", "-1", " 1000",
                                   "1000\n", "0x10"])
def test_sudo_uid_must_be_ascii_digits(value):
    with pytest.raises(UsageError) as err:
        pw.find_target(env={"SUDO_UID": value, "XDG_RUNTIME_DIR": "/nonexistent-xdg"}, euid=0)
    text = one_line(err, "SUDO_UID", "ASCII digits")
    assert len(text) < 300


def test_good_sudo_uid_and_a_bad_one_when_not_root(tmp_path, monkeypatch):
    monkeypatch.setattr(pw, "RUN_USER", str(tmp_path))
    t = pw.find_target(env={"SUDO_UID": "1000", "SUDO_USER": "alice"}, euid=0)
    assert (t.runtime_dir, t.uid, t.how) == (f"{tmp_path}/1000", 1000, "sudo (SUDO_UID)")
    # not root: SUDO_UID is not read at all
    t = pw.find_target(env={"SUDO_UID": "١٠٠٠", "XDG_RUNTIME_DIR": "/nonexistent-xdg"}, euid=1000)
    assert t.how == "XDG_RUNTIME_DIR"


# --- --pipewire-user -------------------------------------------------------------------------------

@pytest.mark.parametrize("user", ["", "a\nb"])
def test_an_empty_pipewire_user_is_refused(user):
    with pytest.raises(UsageError) as err:
        pw.find_target(user, env={"XDG_RUNTIME_DIR": "/nonexistent-xdg"}, euid=0)
    one_line(err, "--pipewire-user", "name a user")


def test_an_empty_pipewire_user_is_exit_2_on_the_command_line(tmp_path, monkeypatch):
    from archdsp_libvirt.cli import cli

    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    # reached only when --pipewire-user '' was let through: nothing may be probed or started then
    monkeypatch.setattr(pw, "probe", lambda *_a, **_k: None)
    monkeypatch.setattr(pw, "choose_server", lambda *_a: (_ for _ in ()).throw(AssertionError("not refused")))
    config = Path(__file__).parent.parent / "domains" / "demo-dsp.toml"
    result = CliRunner().invoke(cli, ["netjack", "start", "--pipewire-user", "", str(config)],
                                env={"ARCHDSP_RUN_DIR": str(run), "XDG_RUNTIME_DIR": "/nonexistent-xdg"})
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.output.count("\n") == 1 and "--pipewire-user" in result.output, result.output


def test_pipewire_user_wins_over_pipewire_remote_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(pw, "RUN_USER", str(tmp_path))
    elsewhere = "/nonexistent-other/pipewire-0"
    t = pw.find_target(ROOT, env={"PIPEWIRE_REMOTE": elsewhere}, euid=0)
    assert t.remote == f"{tmp_path}/0/pipewire-0" and t.how.startswith("--pipewire-user")
    assert elsewhere in t.how and "ignored" in t.how
    # the same server's socket by path, or a socket name, is kept
    t = pw.find_target(ROOT, env={"PIPEWIRE_REMOTE": f"{tmp_path}/0/pipewire-1"}, euid=0)
    assert (t.remote, t.how) == (f"{tmp_path}/0/pipewire-1", "--pipewire-user")
    t = pw.find_target(ROOT, env={"PIPEWIRE_REMOTE": "pipewire-2"}, euid=0)
    assert t.remote == f"{tmp_path}/0/pipewire-2"
