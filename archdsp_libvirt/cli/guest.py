"""``guest``: what runs in the DSP VM's own guest so that it joins the link (``unit``, ``nixos``), and
the guest seen from inside through its agent (``check``, in cli/guestcheck.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..service import guest_nixos, guest_unit
from .guestcheck import check
from .options import Count, config_argument

rtprio_option = click.option("--rtprio", type=Count(1, 89), default=70, show_default=True,
                             help="The guest jackd's real-time priority (jackd -R -P).")
user_option = click.option("--user", metavar="NAME",
                           help="Run the slave as this guest user (default: root). The DMI fallback needs "
                                "root, so systemd >= 252 is needed then.")


@click.group()
def guest() -> None:
    """What runs in the DSP VM's own guest: its NETJACK slave, as a systemd unit or a NixOS module.

    The link's settings are not in what these print: the guest reads them at every start from the
    domain's SMBIOS OEM string, the credential archdsp.netjack (docs/guest-contract.md)."""


@guest.command()
@config_argument
@rtprio_option
@user_option
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write the files under DIR (DIR/etc/systemd/system/..., DIR/usr/local/lib/archdsp/..., "
                   "modes 0644 and 0755) instead of printing them; --root / in the guest itself.")
def unit(config: Path, rtprio: int, user: str | None, root: Path | None) -> None:
    """Print the systemd unit and helper that join a JACK2 guest to CONFIG's link.

    For the guest install jackd2 (and qemu-guest-agent, rt-tests). Printed, each file follows a line "# --- PATH ---" naming where it goes: the unit
    /etc/systemd/system/archdsp-netjack.service and its helper /usr/local/lib/archdsp/netjack-slave
    (executable). Then, in the guest: systemctl daemon-reload; systemctl enable --now archdsp-netjack.
    The helper runs jackd -d net towards the master's unicast address, the DSP pass-through client
    (dsp=thru) and the loop's connections; the unit restarts it when it fails."""
    text, written = guest_unit(config, rtprio=rtprio, user=user, root=root)
    click.echo(text, nl=False)
    for path in written:
        click.echo(f"wrote {path}")


@guest.command()
@config_argument
@rtprio_option
@user_option
def nixos(config: Path, rtprio: int, user: str | None) -> None:
    """Print the NixOS module for ArchibaldOS that does what guest unit does, for CONFIG.

    systemd.services.archdsp-netjack runs the helper of `guest unit` with pkgs.jack2, beside
    services.qemuGuest.enable and rt-tests. Save it as archdsp-netjack.nix and add it to configuration.nix's imports. It is checked with
    nix-instantiate --parse, not evaluated against nixpkgs."""
    click.echo(guest_nixos(config, rtprio=rtprio, user=user), nl=False)


guest.add_command(check)
