"""PipeWire as the host's audio server: which server to join, and what to load into it.

PipeWire's JACK has no internal clients, so JACK2's ``netmanager`` cannot be loaded there. PipeWire
has its own NETJACK2 master, ``libpipewire-module-netjack2-manager``, which speaks the protocol the
guest's ``jackd -d net`` slave speaks. The bridge runs it in a ``pipewire -c FILE`` process of its
own, a client of the user's PipeWire daemon: killing that process by PID removes every node it added.

What PipeWire 1.4.2's manager does, found by experiment (README, "PipeWire"):

- ``net.ip``: a multicast address is joined; a unicast address joins nothing, but the listening
  socket is bound to INADDR_ANY all the same (``ss -uln``: ``0.0.0.0:PORT``). No option binds it to
  one address: the bridge's supervisor binds it to master_ip from outside (:mod:`.sockhook`), and
  where that cannot run refuses to start unless told otherwise (:func:`address_guard`).
- ``local.ifname``: the interface of the multicast join, and SO_BINDTODEVICE of each slave's data socket.
- the slave's nodes are never removed when the slave stops, and a pair is made for every join packet
  a slave sends: the supervisor's hook lets a replaced slave's pair go and refuses repeated join
  packets (:mod:`.sockhook`); it restarts the manager process when more than one pair stays anyway
  or the VM restarts.
- node names come from ``source.props``/``sink.props`` (the arguments: :mod:`.conf`); port names are fixed by the module:
  ``send_<position>`` (host -> VM) and ``receive_<position>`` (VM -> host).

Everything here but :func:`probe`, :func:`nodes` and the nftables calls is pure and tested fast.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import stat
import subprocess
from pathlib import Path

from msgspec import Struct

from ...errors import BridgeError, UsageError
from ...errors import shown as _shown
from ...procs import child_env
from .. import guard
from ..guard import drop as drop_guard  # noqa: F401  (the bridge's name for it)
from ..guard import nft_rules, nft_table  # noqa: F401

MODULE = "libpipewire-module-netjack2-manager"
CAPTURE_NODE = "netjack-capture"    # host -> VM: the manager's sink; its ports are send_AUXn
PLAYBACK_NODE = "netjack-playback"  # VM -> host: the manager's source; its ports are receive_AUXn
JACK_PROPS = "{ jack.short-name = true }"  # JACK clients then see the node.nick names above


class Target(Struct, frozen=True):
    """The PipeWire server to join: its runtime directory and socket, whose it is and how it was found."""

    runtime_dir: str
    socket: str
    user: str | None
    uid: int | None
    how: str

    @property
    def remote(self) -> str:
        return str(Path(self.runtime_dir) / self.socket)


def _user_of(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError, ValueError):
        return None


RUN_USER = "/run/user"  # where logind makes each user's runtime directory
_MAX_UID = 2**32 - 2  # (uid_t)-1 is "no user"


def _sudo_uid(value: str) -> int | None:
    """$SUDO_UID as a uid: ASCII digits only (``str.isdigit`` takes '١٠٠٠' and '²', and ``int`` fails on some)."""
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 10 and int(value) <= _MAX_UID):
        raise UsageError(f"SUDO_UID {shown(value)!r} is not a user id (ASCII digits, at most {_MAX_UID}): "
                         "unset it, or pass --pipewire-user USER")
    return int(value)


def shown(text: str) -> str:
    return _shown(text, 120)


def check_runtime_dir(path: str, how: str, uid: int | None, euid: int) -> int | None:
    """The owner of the runtime directory ``path`` (found by ``how``), once it is safe to join a server there:
    a directory with no group or other access (0700, as the XDG spec and systemd make it), owned by ``uid``
    (whose server it is) or root; with no ``uid``, by the caller or root (as root: the owner is whose server
    it is). None when there is nothing there: no server answers in it. Anything else is a one-line
    :class:`UsageError`: another user could have planted the socket in it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    where = f"the PipeWire runtime directory {shown(path)} (from {how})"
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{where} is not a directory: point {how} at the user's runtime directory (/run/user/UID)")
    if st.st_mode & 0o077:
        raise UsageError(f"{where} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may use it, so anyone "
                         "could have planted the socket; it must be 0700 (chmod 0700, or use /run/user/UID)")
    if uid is None:
        if euid == 0:
            return st.st_uid
        uid = euid
    if st.st_uid not in (0, uid):
        owner = _user_of(st.st_uid) or "another user"
        raise UsageError(f"{where} belongs to {owner} (uid {st.st_uid}), not to {_user_of(uid) or 'the user'} "
                         f"(uid {uid}) or root: it is not that user's server")
    return st.st_uid


def _remote(env) -> str | None:
    """$PIPEWIRE_REMOTE: an absolute socket path, a socket name in the runtime directory (as libpipewire
    reads a relative one), or None when unset. A relative path with folders is refused: libpipewire would
    take it under the runtime directory, a careless reader under the current folder."""
    remote = env.get("PIPEWIRE_REMOTE") or None
    if remote is None or remote.startswith("/"):
        return remote
    if "/" in remote or remote in (".", "..") or not remote.isprintable():
        raise UsageError(f"PIPEWIRE_REMOTE {shown(remote)!r}: give a socket name in the runtime directory "
                         "(pipewire-0) or an absolute path (/run/user/UID/pipewire-0)")
    return remote


def find_target(user: str | None = None, env: dict[str, str] | None = None, euid: int | None = None) -> Target | None:
    """Where the desktop user's PipeWire listens.

    ``--pipewire-user USER`` -> /run/user/UID (it wins over $PIPEWIRE_REMOTE: a path there is ignored and
    ``how`` says so); else an absolute $PIPEWIRE_REMOTE; as root through sudo, the invoking user's
    /run/user/$SUDO_UID; else an absolute $XDG_RUNTIME_DIR; else an absolute $PIPEWIRE_RUNTIME_DIR (a
    relative one is ignored, as the XDG spec says). The socket is $PIPEWIRE_REMOTE's name when it is one,
    else ``pipewire-0``. The runtime directory is checked (:func:`check_runtime_dir`) before it is used.
    """
    env = os.environ if env is None else env
    euid = os.geteuid() if euid is None else euid
    remote = _remote(env)
    if user is not None:
        if not user or not user.isprintable():
            raise UsageError(f"--pipewire-user {shown(user)!r}: name a user of this host (--pipewire-user alice)")
        try:
            pw = pwd.getpwnam(user)
        except (KeyError, ValueError):
            raise BridgeError(f"--pipewire-user {user}: no such user on this host") from None
        runtime = f"{RUN_USER}/{pw.pw_uid}"
        how = "--pipewire-user"
        name = "pipewire-0"
        if remote and remote.startswith("/"):
            path = Path(remote)
            if str(path.parent) == runtime:
                name = path.name
            else:
                how = f"--pipewire-user; PIPEWIRE_REMOTE {shown(remote)} ignored"  # the option wins
        elif remote:
            name = remote
        check_runtime_dir(runtime, "--pipewire-user", pw.pw_uid, euid)
        return Target(runtime, name, user, pw.pw_uid, how)
    if remote and remote.startswith("/"):  # a full path: that is the server
        path = Path(remote)
        st_uid = check_runtime_dir(str(path.parent), "PIPEWIRE_REMOTE", None, euid)
        return Target(str(path.parent), path.name, _user_of(st_uid) if st_uid is not None else None, st_uid,
                      "PIPEWIRE_REMOTE")
    name = remote or "pipewire-0"
    if euid == 0:
        uid = _sudo_uid(env.get("SUDO_UID", ""))
        if uid is not None and uid != 0:
            runtime = f"{RUN_USER}/{uid}"
            check_runtime_dir(runtime, "SUDO_UID", uid, euid)
            return Target(runtime, name, env.get("SUDO_USER") or _user_of(uid), uid, "sudo (SUDO_UID)")
    for var in ("XDG_RUNTIME_DIR", "PIPEWIRE_RUNTIME_DIR"):
        value = env.get(var) or ""
        if value.startswith("/"):  # a relative one is ignored (XDG Base Directory spec)
            st_uid = check_runtime_dir(value, var, None, euid)
            return Target(value, name, _user_of(st_uid) if st_uid is not None else None, st_uid, var)
    return None


def pw_env(target: Target, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for PipeWire tools and our manager process: that server, and nothing else's."""
    env = child_env() if base is None else dict(base)
    env.update({"PIPEWIRE_RUNTIME_DIR": target.runtime_dir, "PIPEWIRE_REMOTE": target.remote,
                "XDG_RUNTIME_DIR": target.runtime_dir, "PIPEWIRE_PROPS": JACK_PROPS})
    return env


def probe(target: Target, timeout: float = 5.0) -> dict | None:
    """The server's core info (version, user-name, ...) when it answers, else None."""
    if not shutil.which("pw-dump") or not Path(target.remote).exists():
        return None
    try:
        out = subprocess.run(["pw-dump", "-r", target.remote, "0"], capture_output=True, text=True,
                             timeout=timeout, env=pw_env(target))
    except subprocess.TimeoutExpired:
        return None
    try:
        objs = json.loads(out.stdout or "[]")
    except ValueError:
        return None
    for obj in objs:
        if obj.get("type") == "PipeWire:Interface:Core":
            return obj.get("info", {})
    return None


def module_installed() -> bool:
    """Whether this host's PipeWire has the NETJACK2 manager (Debian 12's own 0.3.65 has not)."""
    for d in ("/usr/lib/x86_64-linux-gnu/pipewire-0.3", "/usr/lib/aarch64-linux-gnu/pipewire-0.3",
              "/usr/lib64/pipewire-0.3", "/usr/lib/pipewire-0.3"):
        if (Path(d) / f"{MODULE}.so").exists():
            return True
    return False


def choose_server(requested: str, pipewire_answers: bool, jack_options: bool) -> str:
    """``auto``: PipeWire when a PipeWire server answers and no JACK option was given, else JACK."""
    if requested in ("pipewire", "jack"):
        return requested
    if requested != "auto":
        raise BridgeError(f"--audio-server {requested}: choose auto, pipewire or jack")
    return "pipewire" if pipewire_answers and not jack_options else "jack"


# --- what is in the graph ---------------------------------------------------------------------

def dump(target: Target, timeout: float = 5.0) -> list[dict]:
    try:
        out = subprocess.run(["pw-dump", "-r", target.remote], capture_output=True, text=True, timeout=timeout,
                             env=pw_env(target))
        return json.loads(out.stdout or "[]")
    except (subprocess.TimeoutExpired, ValueError):
        return []


def netjack_nodes(objs: list[dict], manager_pid: int | None) -> list[dict]:
    """Our manager's nodes in a pw-dump: ``{id, name, slave, state}``, by the client's process id."""
    clients = {o["id"]: (o.get("info", {}).get("props", {}) or {}) for o in objs
               if o.get("type") == "PipeWire:Interface:Client"}
    out = []
    for o in objs:
        if o.get("type") != "PipeWire:Interface:Node":
            continue
        info = o.get("info", {}) or {}
        props = info.get("props", {}) or {}
        if props.get("node.name") not in (CAPTURE_NODE, PLAYBACK_NODE):
            continue
        owner = clients.get(props.get("client.id"), {})
        if manager_pid is not None and str(owner.get("application.process.id")) != str(manager_pid):
            continue
        desc = str(props.get("node.description", ""))
        out.append({"id": o["id"], "name": props["node.name"], "state": info.get("state"),
                    "slave": desc.split(" NETJACK2 ")[0] if " NETJACK2 " in desc else None})
    return out


def pairs(nodes: list[dict]) -> int:
    return max(sum(n["name"] == CAPTURE_NODE for n in nodes), sum(n["name"] == PLAYBACK_NODE for n in nodes))


_PORT = re.compile(r"^(?P<node>netjack-capture|netjack-playback):(?P<dir>send|receive)_AUX(?P<n>\d+)$")


def logical_ports(port_names: list[str]) -> dict[str, str]:
    """``netjack:capture_N`` / ``netjack:playback_N`` -> the real JACK port name on PipeWire."""
    out = {}
    for name in port_names:
        m = _PORT.match(name)
        if m and (m["node"], m["dir"]) in ((CAPTURE_NODE, "send"), (PLAYBACK_NODE, "receive")):
            kind = "capture" if m["node"] == CAPTURE_NODE else "playback"
            out[f"netjack:{kind}_{int(m['n']) + 1}"] = name
    return out


# --- keeping the port to the VM's bridge (nftables: :mod:`..guard`) ----------------------------

def address_guard(domain: str, master_ip: str, ifname: str, port: int, allow_any: bool,
                  hook_missing: str | None) -> str | None:
    """How the port stays on master_ip: None when the bind hook can bind it there (:mod:`.sockhook`);
    else refuse (the default), or install the nftables table that keeps the port to master_ip's
    interface ``ifname`` and return the table's name."""
    if hook_missing is None:
        return None
    if not allow_any:
        raise BridgeError(
            f"PipeWire's netjack2 manager cannot be bound to {master_ip} here ({hook_missing}): it would listen "
            f"on 0.0.0.0:{port}/udp (every address); pass --allow-any-address to start it behind an nftables "
            "rule that keeps the port to the VM's bridge, or use JACK (--audio-server jack)")
    return guard.install(domain, ifname, master_ip, port, otherwise="or use --audio-server jack")
