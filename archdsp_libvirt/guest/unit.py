"""``guest unit``: the systemd unit ``archdsp-netjack.service`` and its helper, for a Linux guest with
JACK2, as files (:class:`GuestFile`) that :func:`listing` prints and :func:`write_tree` installs.

The unit carries no link setting: its helper (``netjack-slave.sh`` beside this module) reads them
at every start from the credential ``archdsp.netjack`` (the domain's SMBIOS OEM string) or the raw
DMI tables. What the unit does say is the guest's own: its jackd's real-time priority and the user
it runs as.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import DspConfig
from ..domain.contract import CREDENTIAL
from ..errors import ConfigError, UsageError

UNIT_NAME = "archdsp-netjack.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
HELPER_PATH = "/usr/local/lib/archdsp/netjack-slave"
RTPRIO = 70  # the demo guest's jackd priority: below its IRQ threads (75) and rt-test's cyclictest (90)
LIMIT_RTPRIO = 95  # the usual audio limit: room above jackd for its own threads
EX_CONFIG = 78  # the helper's exit status for settings it cannot use: restarting would not help
RESTART_SEC = 2
START_LIMIT = (120, 10)  # seconds, starts: then systemd gives up, as the demo guest does after 10
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class GuestFile:
    """A file for the guest: where it goes, its mode, its text."""

    path: str
    mode: int
    text: str


def helper_script() -> str:
    """The helper's text (POSIX sh): the same for every config."""
    return resources.files(__package__).joinpath("netjack-slave.sh").read_text()


def check_options(cfg: DspConfig, rtprio: int, user: str | None) -> None:
    """Refuse a config without a link (nothing to join) and options out of range, in one line."""
    if not cfg.netjack.enable:
        raise ConfigError(f"{cfg.name}: [archibaldos.netjack] enable = false: the domain carries no link "
                          "settings for a guest to read; set enable = true")
    if not 1 <= rtprio <= 89:
        raise UsageError(f"--rtprio {rtprio}: must be from 1 to 89 (jackd's real-time priority in the guest)")
    if user is not None and (not _USER.fullmatch(user) or user == "root"):
        raise UsageError(f"--user {user[:40]!r}: must be a guest user name (a-z, 0-9, _, -; not root: leave "
                         "--user out to run as root)")


def unit_text(cfg: DspConfig, rtprio: int = RTPRIO, user: str | None = None) -> str:
    """``archdsp-netjack.service`` for ``cfg``'s guest (its name in the header only)."""
    check_options(cfg, rtprio, user)
    user_lines = (f"User={user}\n"
                  "# Not root: the credential is this user's, but /sys/firmware/dmi/entries (the fallback) is\n"
                  "# root's alone, so systemd >= 252 is needed.\n") if user else ""
    interval, burst = START_LIMIT
    return (
        f"# {UNIT_NAME} for the guest of the DSP VM {cfg.name}: its NETJACK slave\n"
        "# (JACK2's jackd -d net), printed by `archdsp-virt guest unit`. No link setting is in this file:\n"
        "# its helper reads them at every start from the domain's SMBIOS OEM string, the credential\n"
        f"# {CREDENTIAL} (docs/guest-contract.md), so the same unit serves any config. Needs JACK2\n"
        "# (Debian: jackd2) and systemd >= 252 (older ones: the helper reads the DMI tables itself).\n"
        f"# Install: this file and {HELPER_PATH} (mode 0755), then\n"
        "#   systemctl daemon-reload && systemctl enable --now archdsp-netjack\n"
        "[Unit]\n"
        f"Description=NETJACK slave of the DSP VM {cfg.name} (jackd -d net)\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        f"StartLimitIntervalSec={interval}\n"
        f"StartLimitBurst={burst}\n"
        "\n"
        "[Service]\n"
        "Type=exec\n"
        f"ExecStart={HELPER_PATH}\n"
        f"Environment=ARCHDSP_RTPRIO={rtprio}\n"
        + user_lines +
        "# systemd >= 254 imports the system credential; 252 and 253 say the key is unknown and go on\n"
        "# with LoadCredential= (no path: the one systemd took from the OEM string; none is no error).\n"
        f"ImportCredential={CREDENTIAL}\n"
        f"LoadCredential={CREDENTIAL}\n"
        "RuntimeDirectory=archdsp-netjack\n"
        f"LimitRTPRIO={LIMIT_RTPRIO}\n"
        "LimitMEMLOCK=infinity\n"
        "Restart=on-failure\n"
        f"RestartSec={RESTART_SEC}\n"
        f"# {EX_CONFIG}: the settings are missing or of a version the helper does not read; a restart would not help.\n"
        f"RestartPreventExitStatus={EX_CONFIG}\n"
        "\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def files(cfg: DspConfig, rtprio: int = RTPRIO, user: str | None = None) -> list[GuestFile]:
    """The unit and its helper."""
    return [GuestFile(UNIT_PATH, 0o644, unit_text(cfg, rtprio, user)), GuestFile(HELPER_PATH, 0o755, helper_script())]


def listing(guest_files: list[GuestFile]) -> str:
    """Every file after a ``# --- PATH ---`` line: what ``guest unit`` prints."""
    return "".join(f"# --- {f.path} ---\n{f.text}" for f in guest_files)


def write_tree(root: Path, guest_files: list[GuestFile]) -> list[Path]:
    """Write the files under ``root`` (``/`` in the guest itself, or an image's tree) with their modes.

    Each is written beside its place and renamed over it (a link there is replaced, never followed);
    its folders are made as needed. Returns the paths written."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"--root {str(root)[:60]}: no such directory; make it first (or give /)")
    written = []
    for f in guest_files:
        dest = root / f.path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if dest.is_dir() and not dest.is_symlink():
            raise UsageError(f"{dest}: is a directory; remove it first")
        tmp = dest.with_name(f".{dest.name}.archdsp-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(f.text)
                fh.flush()
                os.fchmod(fh.fileno(), f.mode)
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        written.append(dest)
    return written
