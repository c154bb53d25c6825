"""The text that loads PipeWire's NETJACK2 manager: its arguments, the bridge's own ``pipewire -c``
configuration, the user's ``pipewire.conf.d/`` drop-in and its NixOS form."""

from __future__ import annotations

import json

from .server import CAPTURE_NODE, MODULE, PLAYBACK_NODE


def manager_args(master_ip: str, port: int, rate: int, period: int, channels: int) -> dict:
    """The manager's arguments: the slave joins master_ip:port; while it is linked its nodes force the
    graph to rate/period (node.force-rate/-quantum: nothing else in the user's settings changes)."""
    positions = [f"AUX{i}" for i in range(channels)]

    def props(name: str) -> dict:
        return {"node.name": name, "node.nick": name, "midi.ports": 0, "audio.position": positions,
                "node.force-rate": rate, "node.force-quantum": period}

    return {
        "net.ip": master_ip, "net.port": port,
        "netjack2.sample-rate": rate, "netjack2.period-size": period,
        "audio.channels": channels, "midi.ports": 0,
        "sink.props": props(CAPTURE_NODE),
        "source.props": props(PLAYBACK_NODE),
    }


def _value(value, indent: str, nix: bool = False) -> str:
    """``value`` in PipeWire's SPA-JSON config syntax, or (``nix``) as a Nix expression."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[ " + " ".join(_value(v, indent, nix) for v in value) + " ]"
    inner = indent + ("  " if nix else "    ")
    body = "".join(f"{inner}{json.dumps(k)} = {_value(v, inner, nix)};\n" if nix
                   else f"{inner}{k} = {_value(v, inner)}\n" for k, v in value.items())
    return "{\n" + body + indent + "}"


def _module_entry(args: dict, indent: str) -> str:
    return f"{indent}{{ name = {MODULE}\n{indent}    args = {_value(args, indent + '    ')}\n{indent}}}\n"


def client_conf(args: dict) -> str:
    """The ``pipewire -c FILE`` the bridge runs: a client of the user's daemon hosting the manager."""
    return (
        "# archdsp-virt netjack: the NETJACK2 master, hosted in a PipeWire client process of its own\n"
        "context.properties = {\n    log.level = 2\n}\n"
        "context.spa-libs = {\n"
        "    audio.convert.* = audioconvert/libspa-audioconvert\n"
        "    support.*       = support/libspa-support\n}\n"
        "context.modules = [\n"
        "    { name = libpipewire-module-rt args = { } flags = [ ifexists nofail ] }\n"
        "    { name = libpipewire-module-protocol-native }\n"
        "    { name = libpipewire-module-client-node }\n"
        "    { name = libpipewire-module-adapter }\n"
        + _module_entry(args, "    ") + "]\n"
    )


def _warning(domain: str, master_ip: str, port: int, latency: int) -> str:
    return (
        f"# NETJACK2 master for the DSP VM {domain} (archdsp-virt netjack dropin).\n"
        f"# Network latency {latency} is the guest slave's (jackd -d net -l {latency}); the manager has no such option.\n"
        f"# WARNING: PipeWire 1.4.2's manager listens on 0.0.0.0:{port}/udp, every address, not only {master_ip};\n"
        "# a firewall must keep that port to the VM's bridge. It also keeps a stopped slave's nodes until\n"
        "# the daemon restarts: prefer `archdsp-virt netjack start --audio-server pipewire` (which restarts\n"
        "# the manager when the VM restarts) in a systemd unit (archdsp-virt netjack unit).\n"
    )


def dropin(domain: str, args: dict, latency: int) -> str:
    """A ``~/.config/pipewire/pipewire.conf.d/`` file: the user's daemon loads the manager at login."""
    return (_warning(domain, args["net.ip"], args["net.port"], latency)
            + "context.modules = [\n" + _module_entry(args, "    ") + "]\n")


def dropin_name(domain: str) -> str:
    return f"60-archdsp-netjack-{domain}.conf"


def nixos(domain: str, args: dict, latency: int, ifname: str = "virbr0") -> str:
    """The same drop-in as NixOS configuration (services.pipewire.extraConfig.pipewire), with NixOS's
    firewall (on by default, dropping every port not allowed) opening the port on the VM's bridge only."""
    comment = "".join(f"  {line}\n" for line in _warning(domain, args["net.ip"], args["net.port"], latency).splitlines())
    entry = _value({"name": MODULE, "args": args}, "    ", nix=True)
    key = json.dumps(dropin_name(domain).removesuffix(".conf"))
    return (
        "{\n" + comment
        + f"  services.pipewire.extraConfig.pipewire.{key} = {{\n"
        + f"    \"context.modules\" = [ {entry} ];\n  }};\n"
        + "  networking.firewall.enable = true;  # the port stays closed everywhere but on the VM's bridge\n"
        + f"  networking.firewall.interfaces.{json.dumps(ifname)}.allowedUDPPorts = [ {args['net.port']} ];\n"
        + "}\n"
    )
