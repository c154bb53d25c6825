"""``netjack`` (the host side of the NETJACK2 link, on JACK2 or PipeWire) and ``latency``.

Thin, like the rest of the CLI: each command parses its options and calls one function of the
service layer.
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import service
from .options import Finite, config_argument, json_option, nperiods_option, plot_file


@click.group()
def netjack() -> None:
    """The host side of the NETJACK2 link (dsp-netjack-bridge)."""


jack_server_option = click.option("--jack-server", metavar="NAME",
                                  help="JACK server to join (default: $JACK_DEFAULT_SERVER, else 'default').")
server_option = click.option("--server", "start_server", type=click.Choice(["dummy", "alsa"]),
                             help="Start a jackd with this backend at the config's rate and period if none runs.")
wait_option = click.option("--wait", type=Finite(0, 3600), default=0.0, show_default=True,
                           help="Wait this many seconds for the VM to join; exit 1 if it does not.")


audio_server_option = click.option(
    "--audio-server", type=click.Choice(["auto", "pipewire", "jack"]), default="auto", show_default=True,
    help="Host audio server: auto takes the user's PipeWire when one answers (and no JACK option is given), "
    "else JACK.")
pipewire_user_option = click.option("--pipewire-user", metavar="USER",
                                    help="Join USER's PipeWire (default: sudo's user, else $XDG_RUNTIME_DIR).")
any_address_option = click.option(
    "--allow-any-address", is_flag=True,
    help="Start a NETJACK2 master that cannot be bound to master_ip (a JACK server the bridge did not start; "
    "PipeWire's manager on a kernel with no bind hook) although it listens on every address, behind an "
    "nftables rule that keeps the port to master_ip's interface (refused without this flag).")


def server_options(f):
    """The options choosing (and starting) the host's audio server, shared by start and restart."""
    for option in reversed((audio_server_option, pipewire_user_option, any_address_option, jack_server_option,
                            server_option)):
        f = option(f)
    return f


@netjack.command("start")
@config_argument
@server_options
@click.option("--device", default="hw:0", show_default=True, help="ALSA device for --server alsa.")
@nperiods_option
@wait_option
def netjack_start(config: Path, audio_server: str, pipewire_user: str | None, allow_any_address: bool,
                  jack_server: str | None, start_server: str | None, device: str, nperiods: int,
                  wait: float) -> None:
    """Join the host's audio server (PipeWire or JACK) and start the NETJACK master for CONFIG's VM."""
    service.netjack_start(config, say=click.echo, audio_server=audio_server, pipewire_user=pipewire_user,
          allow_any_address=allow_any_address, server=jack_server, start_server=start_server, device=device,
          nperiods=nperiods, wait=wait)


@netjack.command("stop")
@config_argument
def netjack_stop(config: Path) -> None:
    """Stop the bridge: its supervisor, the NETJACK master, and a jackd it started."""
    service.netjack_stop(config, say=click.echo)


@netjack.command("restart")
@config_argument
@server_options
@wait_option
def netjack_restart(config: Path, audio_server: str, pipewire_user: str | None, allow_any_address: bool,
                    jack_server: str | None, start_server: str | None, wait: float) -> None:
    """Stop and start the bridge again (dsp-netjack-restart)."""
    service.netjack_restart(config, say=click.echo, wait=wait, audio_server=audio_server, pipewire_user=pipewire_user,
            allow_any_address=allow_any_address, server=jack_server, start_server=start_server)


@netjack.command("status")
@config_argument
@json_option()
def netjack_status(config: Path, as_json: bool) -> None:
    """Server, link up/down, the VM's ports and xruns since start."""
    click.echo(service.netjack_status(config, as_json), nl=False)


@netjack.command("unit")
@config_argument
@click.option("--audio-server", type=click.Choice(["jack", "pipewire"]), default="jack", show_default=True,
              help="The host audio server the unit's bridge joins.")
@pipewire_user_option
@jack_server_option
@server_option
def netjack_unit(config: Path, audio_server: str, pipewire_user: str | None, jack_server: str | None,
                 start_server: str | None) -> None:
    """Print a systemd unit that runs the bridge at boot."""
    click.echo(service.netjack_unit(config, audio_server, pipewire_user, jack_server, start_server), nl=False)


@netjack.command("dropin")
@config_argument
@click.option("--nixos", is_flag=True, help="Print it as NixOS configuration (services.pipewire.extraConfig).")
@any_address_option
def netjack_dropin(config: Path, nixos: bool, allow_any_address: bool) -> None:
    """Print the PipeWire drop-in that loads the NETJACK2 manager at login (~/.config/pipewire/pipewire.conf.d/)."""
    click.echo(service.netjack_dropin(config, nixos, allow_any_address, note=lambda m: click.echo(m, err=True)), nl=False)


@click.command()
@config_argument
@click.option("--measure", is_flag=True, help="Measure the round trip through the VM with jack_iodelay.")
@click.option("--seconds", type=Finite(2, 86400), default=6.0, show_default=True,
              help="How long --measure listens (a soak: xruns per minute and the round trip over time).")
@click.option("--target-ms", type=Finite(0, 1000), help="Say whether this round trip can be met.")
@click.option("--host-backend", type=click.Choice(["dummy", "alsa"]), default="dummy", show_default=True,
              help="The host JACK backend: alsa adds its periods of buffering.")
@nperiods_option
@click.option("--audio-server", type=click.Choice(["auto", "pipewire", "jack"]), default="auto", show_default=True,
              help="Whose model: auto follows the running bridge (JACK when none runs).")
@click.option("--plot", "plot_path", type=plot_file,
              help="With --measure: draw the round trip and xruns over time into this PNG.")
@json_option("Print JSON (measured_frames, predicted_frames, xruns, ...).")
def latency(config: Path, measure: bool, seconds: float, target_ms: float | None, host_backend: str,
            nperiods: int, audio_server: str, as_json: bool, plot_path: Path | None) -> None:
    """The latency budget of CONFIG's link, and with --measure the real round trip."""
    if plot_path and not measure:
        raise click.UsageError("--plot draws a measurement: add --measure")
    uri = getattr(click.get_current_context().find_root().obj, "uri", None)  # -c: where the VM runs
    click.echo(service.latency_command(config, measure, seconds, target_ms, host_backend, nperiods, audio_server, as_json,
                               plot_path, uri=uri), nl=False)


# --- netjack headless: a headless PipeWire of our own for scripts/demo (plumbing, hidden from --help) -----

@netjack.group("headless", hidden=True)
def netjack_headless() -> None:
    """A headless PipeWire + WirePlumber in a runtime directory of its own (for scripts/demo --pipewire)."""


@netjack_headless.command("start")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--user", metavar="USER", help="Run PipeWire and WirePlumber as USER (default: the caller).")
def netjack_headless_start(directory: Path, user: str | None) -> None:
    """Start pipewire and wireplumber with XDG_RUNTIME_DIR=DIR (their PIDs in DIR/pids.json)."""
    service.headless_pipewire_start(directory, user, say=click.echo)


@netjack_headless.command("stop")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
def netjack_headless_stop(directory: Path) -> None:
    """Stop the headless PipeWire started in DIR (by root's record of its PIDs in the run folder)."""
    if not service.headless_pipewire_stop(directory, say=click.echo):
        click.echo(f"no headless PipeWire recorded in {directory}")
