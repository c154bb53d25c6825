"""``guest nixos``: the guest's NETJACK slave as a NixOS module for ArchibaldOS: the same helper and
service settings as :mod:`.unit`'s ``archdsp-netjack.service``, with the QEMU guest agent and the
real-time test tools.

Checked here with ``nix-instantiate --parse`` and evaluated with stand-ins for ``pkgs`` (nixpkgs
itself is not at hand), so the options' names are nixpkgs' as documented, not evaluated against it.
"""

from __future__ import annotations

from ..config import DspConfig
from ..domain.contract import CREDENTIAL
from . import unit


def indented_string(text: str, indent: str) -> str:
    """``text`` as the body of a Nix ``''...''`` string, each line after ``indent`` (which Nix strips):
    ``''`` is written ``'''`` and ``${`` ``''${``, so Nix reads the text back byte for byte."""
    escaped = text.replace("''", "'''").replace("${", "''${")
    return "".join(f"{indent}{line}\n" if line else "\n" for line in escaped.split("\n")[:-1]) + indent


def _nix_string(text: str) -> str:
    """A one-line Nix string (the config's names are plain words already; this keeps them so)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


def module_text(cfg: DspConfig, rtprio: int = unit.RTPRIO, user: str | None = None) -> str:
    """The NixOS module for ``cfg``'s guest (its name in the comments and the description only)."""
    unit.check_options(cfg, rtprio, user)
    interval, burst = unit.START_LIMIT
    user_line = f"      User = {_nix_string(user)};\n" if user else ""
    script = unit.helper_script()
    return (
        f"# archdsp-netjack for ArchibaldOS (NixOS): the NETJACK slave in the guest of the DSP VM {cfg.name},\n"
        "# printed by `archdsp-virt guest nixos`. Save it beside configuration.nix as archdsp-netjack.nix\n"
        "# and add it to its imports: imports = [ ./archdsp-netjack.nix ];\n"
        "# No link setting is in this file: the service's helper reads them at every start from the\n"
        f"# domain's SMBIOS OEM string, the credential {CREDENTIAL} (docs/guest-contract.md), so the\n"
        "# same module serves any config.\n"
        "# Checked with nix-instantiate --parse and evaluated with stand-ins for pkgs: it was NOT\n"
        "# evaluated against nixpkgs (services.qemuGuest, systemd.services, pkgs.jack2, pkgs.rt-tests\n"
        "# are nixpkgs' options and packages as documented).\n"
        "{ pkgs, ... }:\n"
        "\n"
        "{\n"
        "  # the QEMU guest agent on the domain's org.qemu.guest_agent.0 channel (guest check, rt-test)\n"
        "  services.qemuGuest.enable = true;\n"
        "  # jackd, jack_thru, jack_lsp ...; cyclictest\n"
        "  environment.systemPackages = [ pkgs.jack2 pkgs.rt-tests ];\n"
        "\n"
        "  systemd.services.archdsp-netjack = {\n"
        f"    description = {_nix_string(f'NETJACK slave of the DSP VM {cfg.name} (jackd -d net)')};\n"
        '    wantedBy = [ "multi-user.target" ];\n'
        '    wants = [ "network-online.target" ];\n'
        '    after = [ "network-online.target" ];\n'
        f"    startLimitIntervalSec = {interval};\n"
        f"    startLimitBurst = {burst};\n"
        "    # besides what every NixOS service has (coreutils, grep, sed): JACK2's tools and awk\n"
        "    path = [ pkgs.jack2 pkgs.gawk ];\n"
        f'    environment.ARCHDSP_RTPRIO = "{rtprio}";\n'
        "    serviceConfig = {\n"
        '      Type = "exec";\n'
        + user_line +
        f"      ImportCredential = \"{CREDENTIAL}\";\n"
        f"      LoadCredential = \"{CREDENTIAL}\";\n"
        '      RuntimeDirectory = "archdsp-netjack";\n'
        f"      LimitRTPRIO = {unit.LIMIT_RTPRIO};\n"
        '      LimitMEMLOCK = "infinity";\n'
        '      Restart = "on-failure";\n'
        f"      RestartSec = {unit.RESTART_SEC};\n"
        f"      # {unit.EX_CONFIG}: the settings are missing or of a version the helper does not read\n"
        f"      RestartPreventExitStatus = {unit.EX_CONFIG};\n"
        f"      # the same helper as `archdsp-virt guest unit` installs at {unit.HELPER_PATH}\n"
        "      ExecStart = pkgs.writeScript \"archdsp-netjack-slave\" ''\n"
        + indented_string(script, "        ") + "'';\n"
        "    };\n"
        "  };\n"
        "}\n"
    )
