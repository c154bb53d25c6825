"""The DSP VM description: a TOML file, checked into a typed model.

The keys are the snake_case mirror of the NixOS ``custom.vm.dsp`` options
(``isolatedCores`` -> ``isolated_cores``), plus the few keys a libvirt
domain needs that the NixOS module decided on its own (domain type, page
size, direct kernel boot, network mode, console log).

Every problem becomes one :class:`~archdsp_libvirt.errors.ConfigError`
line: ``FILE: KEY: what is wrong; what is expected``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field

from ..errors import Invalid
from .paths import CONTROL_RE, existing_console_log, existing_file, shorten
from .paths import clean_text as _clean_text
from .paths import console_log_path as _console_log
from .paths import host_path as _host_path
from .qemuargs import unsafe_qemu_args

DEFAULT_NAME = "archibaldos-dsp"
SAMPLE_RATES = (22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
PAGE_SIZES_KIB = {"2M": 2048, "1G": 1024 * 1024}
CONFIG_MAX_BYTES = 1024 * 1024

# Matched with fullmatch: "$" would also match before a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_PCI_RE = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])")
_VENDOR_DEVICE_RE = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{4}")
_CONTROL_RE = CONTROL_RE

Port = Annotated[int, Meta(ge=1, le=65535)]


def _check(obj: Struct, checks: dict[str, Callable[[Any], object]]) -> None:
    """Run each field's check on its value; a refusal names the field."""
    for key, check in checks.items():
        try:
            check(getattr(obj, key))
        except Invalid as exc:
            raise Invalid(exc.message, (key, *exc.key)) from None


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def _ip(parse, v: str, expected: str):
    """``parse(v)`` (an ipaddress constructor), or the one-line error saying what is expected."""
    try:
        return parse(v)
    except ValueError:
        raise Invalid(f"must be {expected}") from None


class _Section(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A TOML table: unknown keys are errors, values are checked strictly (no "1" for 1)."""


def _power_of_two(v: int) -> None:
    if v < 16 or v > 4096 or v & (v - 1):
        raise Invalid("must be a power of two from 16 to 4096 (e.g. 128)")


def _known_rate(v: int) -> None:
    if v not in SAMPLE_RATES:
        raise Invalid("must be one of " + ", ".join(map(str, SAMPLE_RATES)))


_NOT_UNICAST = (ipaddress.IPv4Network("0.0.0.0/8"), ipaddress.IPv4Network("224.0.0.0/4"),
                ipaddress.IPv4Network("240.0.0.0/4"))  # "this network", multicast, reserved and broadcast


def _unicast(addr: ipaddress.IPv4Address, what: str) -> None:
    if any(addr in net for net in _NOT_UNICAST):
        raise Invalid(f"must be {what} unicast address, not multicast, broadcast (255.255.255.255), 0.0.0.0/8 "
                      "or reserved (240.0.0.0/4)")


def _master_ip(v: str) -> None:
    # Loopback stays allowed: a slave on the host itself (the bridge's own tests run one on 127.0.0.1);
    # whether the address is on a VM-only network is `check`'s netjack.master row.
    _unicast(_ip(ipaddress.IPv4Address, v, "an IPv4 address such as 192.168.122.1"), "the master's")


def _guest_ip(v: str | None) -> None:
    if v is None:
        return
    iface = _ip(ipaddress.IPv4Interface, v, "an IPv4 address with prefix such as 192.168.122.50/24")
    _unicast(iface.ip, "the guest's")
    if iface.ip.is_loopback:
        raise Invalid("must be the guest NIC's address, not a loopback address (127.0.0.0/8)")
    net = iface.network
    if net.prefixlen <= 30 and iface.ip in (net.network_address, net.broadcast_address):
        raise Invalid(f"is the {'network' if iface.ip == net.network_address else 'broadcast'} address of {net}; "
                      "give the guest a host address in it (e.g. "
                      f"{net.network_address + 50 if net.num_addresses > 52 else net.network_address + 1}/{net.prefixlen})")


def _client_name(v: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", v):
        raise Invalid("must be 1-32 letters, digits, '_' or '-'")


class NetjackConfig(_Section, kw_only=True):
    """``[archibaldos.netjack]``: the NETJACK2 link between host and VM."""

    enable: bool = False
    source_port: Port = 19000
    buffer_size: int = 128
    sample_rate: int = 96000
    channels: Annotated[int, Meta(ge=1, le=64)] = 2
    network_latency: Annotated[int, Meta(ge=0, le=10)] = 1
    sync: bool = False
    dsp_client: bool = True
    master_ip: str = "192.168.122.1"
    allow_lan: bool = False  # the master may listen on an address other machines reach
    guest_ip: str | None = None
    client_name: str = "netjack"

    def __post_init__(self) -> None:
        _check(self, {"buffer_size": _power_of_two, "sample_rate": _known_rate, "master_ip": _master_ip,
                      "guest_ip": _guest_ip, "client_name": _client_name})
        if self.guest_ip is not None and ipaddress.IPv4Interface(self.guest_ip).ip == ipaddress.IPv4Address(self.master_ip):
            raise Invalid("is master_ip's address: the guest needs an address of its own on the VM's network",
                          ("guest_ip",))


class ArchibaldosConfig(_Section, kw_only=True):
    """``[archibaldos]``: the guest OS image and its NETJACK link."""

    enable: bool = True
    disk_image: str | None = None
    disk_format: Literal["qcow2", "raw"] | None = None
    netjack: NetjackConfig = field(default_factory=NetjackConfig)

    def __post_init__(self) -> None:
        _check(self, {"disk_image": _host_path})


# The demo guest's kernel parameters that were link settings: the link reaches every guest as the
# domain's SMBIOS OEM string now (docs/guest-contract.md), from [archibaldos.netjack] alone.
LINK_CMDLINE_KEYS = ("archdsp.master", "archdsp.port", "archdsp.name", "archdsp.latency", "archdsp.channels",
                     "archdsp.ip", "archdsp.sync", "archdsp.dsp")


def _cmdline(v: str) -> None:
    _clean_text(v, "the kernel command line")
    if len(v) > 2048:
        raise Invalid(f"the kernel command line must be at most 2048 characters (x86 Linux), got {len(v)}")
    for word in v.split():
        if word.split("=", 1)[0] in LINK_CMDLINE_KEYS:
            raise Invalid(f"holds {word.split('=', 1)[0]}=, a link setting: set it in [archibaldos.netjack] "
                          "(the guest reads it from the domain's SMBIOS OEM string, docs/guest-contract.md)")


class BootConfig(_Section, kw_only=True):
    """``[boot]``: direct kernel boot (kernel, initrd, command line)."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = "console=ttyS0"

    def __post_init__(self) -> None:
        _check(self, {"kernel": _host_path, "initrd": _host_path, "cmdline": _cmdline})


def _pci(v: str | None) -> None:
    if v is not None and not _PCI_RE.fullmatch(v):
        raise Invalid("must be a PCI address DDDD:BB:SS.F such as 0000:00:1b.0 (see lspci -D)")


def _vendor_device(v: str | None) -> None:
    if v is not None and not _VENDOR_DEVICE_RE.fullmatch(v):
        raise Invalid("must be vendor:device in hex such as 1022:15e3 (see lspci -nn)")


class AudioDeviceConfig(_Section, kw_only=True):
    """``[audio_device]``: VFIO passthrough of a PCI audio controller."""

    enable: bool = False
    pci_id: str | None = None
    vendor_device: str | None = None
    managed: bool = True

    def __post_init__(self) -> None:
        _check(self, {"pci_id": _pci, "vendor_device": _vendor_device})
        if self.enable and self.pci_id is None:
            raise Invalid("pci_id is required when enable = true (e.g. pci_id = \"0000:00:1b.0\")")

    @property
    def pci_address(self) -> tuple[int, int, int, int]:
        """(domain, bus, slot, function) parsed from :attr:`pci_id`."""
        m = _PCI_RE.fullmatch(self.pci_id or "")
        if not m:
            raise ValueError("no PCI address")
        return tuple(int(g, 16) for g in m.groups())  # type: ignore[return-value]


class RealtimeConfig(_Section, kw_only=True):
    """``[realtime]``: SCHED_FIFO vCPUs, locked memory, emulator niceness, the vhost-net threads."""

    enable: bool = True
    mlock: bool = True
    nice: Annotated[int, Meta(ge=-20, le=19)] = -20
    priority: Annotated[int, Meta(ge=1, le=99)] = 1
    # SCHED_FIFO priority of QEMU's emulator threads (<emulatorsched>) on the housekeeping cores;
    # 0 leaves them SCHED_OTHER. Under TCG the main loop carries virtio-net: it is in the audio path.
    emulator_priority: Annotated[int, Meta(ge=0, le=99)] = 0
    # I/O threads for the disk (<iothreads>, pinned and scheduled like the emulator); 0 = QEMU's main loop.
    iothreads: Annotated[int, Meta(ge=0, le=16)] = 1
    # The network data path under KVM: the vhost-net worker threads, pinned and scheduled after the start
    # (libvirt has no element for them). Cores: left out = the emulator's. Priority: SCHED_FIFO, below the
    # vCPUs'; 0 = SCHED_OTHER at ``nice``; left out = priority - 1 (SCHED_OTHER when the vCPUs run at 1).
    vhost_cores: list[Annotated[int, Meta(ge=0, le=4095)]] | None = None
    vhost_priority: Annotated[int, Meta(ge=0, le=98)] | None = None

    def __post_init__(self) -> None:
        if self.emulator_priority and not self.enable:
            raise Invalid("takes effect only with realtime.enable = true (QEMU's threads stay SCHED_OTHER): "
                          "set emulator_priority = 0, or enable = true", ("emulator_priority",))
        cores = self.vhost_cores
        if cores is not None and (not cores or len(set(cores)) != len(cores)):
            raise Invalid("must list distinct host cores, or be left out to use the emulator's", ("vhost_cores",))
        if self.vhost_priority and not self.enable:
            raise Invalid("takes effect only with realtime.enable = true (the vhost threads stay as the kernel "
                          "made them): leave vhost_priority out, or set enable = true", ("vhost_priority",))
        if self.vhost_priority and self.vhost_priority >= self.priority:
            raise Invalid(f"must be below realtime.priority = {self.priority} (the vCPUs'): set vhost_priority "
                          f"= {self.priority - 1} (0 = SCHED_OTHER), or raise priority", ("vhost_priority",))


def _source(v: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", v):
        raise Invalid("must be a libvirt network or bridge name (letters, digits, '.', '_', '-')")


def _forwards(v: dict[str, object]) -> None:
    for host_port, guest_port in v.items():
        # ASCII digits only (str.isdigit and int() take other scripts' digits), no leading zero:
        # "2222" and "02222" would be two keys for one port.
        if not re.fullmatch(r"[1-9][0-9]{0,4}", host_port) or int(host_port) > 65535:
            raise Invalid(f"host port {shorten(repr(host_port))} must be a number from 1 to 65535 "
                          "(ASCII digits, no leading zero)")
        if type(guest_port) is not int:
            raise Invalid("expected an integer (the guest port)", (host_port,))
        if not 1 <= guest_port <= 65535:
            raise Invalid("must be >= 1 and <= 65535 (the guest port)", (host_port,))


class NetworkConfig(_Section, kw_only=True):
    """``[network]``: the VM's virtio NIC and user-mode port forwards."""

    enable: bool = True
    mode: Literal["nat", "bridge", "user"] = "nat"
    source: str = "default"
    # host port (a TOML key is a string) -> guest port
    hostfwd: dict[str, object] = {}
    hostfwd_allow_external: bool = False
    hostfwd_address: str = "127.0.0.1"
    port_forward_backend: Literal["auto", "passt", "hostfwd"] = "auto"

    def __post_init__(self) -> None:
        _check(self, {"source": _source, "hostfwd": _forwards, "hostfwd_address": self._forward_address})

    def _forward_address(self, v: str) -> None:
        addr = _ip(ipaddress.IPv4Address, v, "an IPv4 address such as 127.0.0.1")
        if not addr.is_loopback and not self.hostfwd_allow_external:
            raise Invalid(
                "must be a loopback address (127.0.0.0/8): other hosts could reach the guest's ports; "
                "set network.hostfwd_allow_external = true to allow that"
            )

    @property
    def forwards(self) -> list[tuple[int, int]]:
        """``(host_port, guest_port)`` pairs, sorted by host port."""
        return sorted((int(h), int(g)) for h, g in self.hostfwd.items())  # type: ignore[call-overload]


Core = Annotated[int, Meta(ge=0, le=4095)]


def _name(v: str) -> None:
    if not _NAME_RE.fullmatch(v):
        raise Invalid("must be 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit")


def _cores(v: list[int]) -> None:
    if not v:
        raise Invalid("must list at least one host core, e.g. [1]")
    if len(set(v)) != len(v):
        raise Invalid("lists a core twice; give each core once (one vCPU per core)")


def _emulator_cores(v: list[int] | None) -> None:
    if v is not None and (not v or len(set(v)) != len(v)):
        raise Invalid("must list distinct host cores, or be left out to use the non-isolated ones")


def _features(v: list[str]) -> None:
    for f in v:
        if not re.fullmatch(r"[a-z0-9_.-]{1,40}", f):
            raise Invalid(f"{shorten(repr(f))} is not a CPU feature name (lowercase, e.g. arch-capabilities)")


def _listen(v: str) -> None:
    addr = _ip(ipaddress.ip_address, v, "an IP address such as 127.0.0.1")
    if getattr(addr, "scope_id", None) is not None:
        raise Invalid("must be an IP address without a %scope (libvirt's listen address takes none)")


def _password(v: str | None) -> None:
    if v is None:
        return
    _clean_text(v, "the password")
    if not 1 <= len(v) <= 64:
        raise Invalid("must be 1 to 64 characters")


class DspConfig(_Section, kw_only=True):
    """The whole DSP VM description (one file in ``domains/``)."""

    name: str = DEFAULT_NAME
    isolated_cores: list[Core]
    emulator_cores: list[Core] | None = None
    memory_mb: Annotated[int, Meta(gt=0, le=16 * 1024 * 1024)]
    hugepages: Annotated[int, Meta(ge=0, le=16 * 1024 * 1024)] = 0
    hugepage_size: Literal["2M", "1G"] = "2M"
    domain_type: Literal["auto", "kvm", "qemu"] = "auto"  # auto: KVM where a stock guest boots, else TCG
    machine: Literal["q35", "pc"] = "q35"
    cpu_disable_features: list[str] = []
    console_log: str | None = None
    spice: bool = False
    vnc: bool = False
    display_listen: str = "127.0.0.1"
    display_password: str | None = None
    qemu_extra_args_allow_unsafe: bool = False
    qemu_extra_args: list[str] = []
    archibaldos: ArchibaldosConfig = field(default_factory=ArchibaldosConfig)
    boot: BootConfig = field(default_factory=BootConfig)
    audio_device: AudioDeviceConfig = field(default_factory=AudioDeviceConfig)
    realtime: RealtimeConfig = field(default_factory=RealtimeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        _check(self, {
            "name": _name, "isolated_cores": _cores, "emulator_cores": _emulator_cores,
            "cpu_disable_features": _features, "console_log": _console_log, "display_listen": _listen,
            "display_password": _password, "qemu_extra_args": self._extra_args,
        })
        self._whole()

    def check_files_here(self) -> None:
        """What the paths are where they exist on this machine (see :mod:`.paths`): run by the loader unless
        the config is loaded for another host (a remote URI), whose files this machine's say nothing of."""
        for key, path, role in ((("archibaldos", "disk_image"), self.disk_image, "disk"),
                                (("boot", "kernel"), self.boot.kernel, "kernel"),
                                (("boot", "initrd"), self.boot.initrd, "initrd")):
            if path:
                try:
                    existing_file(path, role)
                except Invalid as exc:
                    raise Invalid(exc.message, key) from None
        try:
            existing_console_log(self.console_log or f"/var/log/libvirt/qemu/{self.name}-console.log")
        except Invalid as exc:
            raise Invalid(exc.message, ("console_log",)) from None

    def _extra_args(self, v: list[str]) -> None:
        for arg in v:
            _clean_text(arg, "a QEMU argument")
        if not self.qemu_extra_args_allow_unsafe:
            why = unsafe_qemu_args(v)
            if why:
                raise Invalid(f"{why}; remove it, or set qemu_extra_args_allow_unsafe = true")

    def _whole(self) -> None:
        """Checks across keys; each message names the keys."""
        if self.emulator_cores and set(self.emulator_cores) & set(self.isolated_cores):
            raise Invalid("emulator_cores must not overlap isolated_cores")
        if self.realtime.vhost_cores and set(self.realtime.vhost_cores) & set(self.isolated_cores):
            raise Invalid("realtime.vhost_cores must not overlap isolated_cores: a FIFO vCPU starves the network "
                          "thread on its core; name a housekeeping core, or leave vhost_cores out")
        if not _is_loopback(self.display_listen) and not self.display_password:
            raise Invalid(
                f"display_listen = {self.display_listen!r} lets other hosts reach the spice/vnc display: "
                "set display_password, or listen on 127.0.0.1"
            )
        if self.vnc and self.display_password and len(self.display_password) > 8:
            raise Invalid("display_password: VNC uses at most 8 characters; give a shorter one")
        if self.hugepages:
            covered_mb = self.hugepages * PAGE_SIZES_KIB[self.hugepage_size] // 1024
            if covered_mb < self.memory_mb:
                need = -(-self.memory_mb * 1024 // PAGE_SIZES_KIB[self.hugepage_size])
                raise Invalid(
                    f"{self.hugepages} x {self.hugepage_size} pages = {covered_mb} MiB do not cover "
                    f"memory_mb = {self.memory_mb}; set hugepages >= {need} or lower memory_mb"
                )
        if self.memory_mb * 1024 % PAGE_SIZES_KIB[self.hugepage_size] and self.hugepages:
            raise Invalid(f"memory_mb must be a multiple of the {self.hugepage_size} page size")
        if not self.archibaldos.enable and not self.boot.kernel:
            raise Invalid("nothing to boot: set archibaldos.enable = true (with archibaldos.disk_image) or boot.kernel")
        if self.boot.initrd and not self.boot.kernel:
            raise Invalid("boot.initrd needs boot.kernel")
        if self.network.hostfwd and not self.network.enable:
            raise Invalid("network.hostfwd needs network.enable = true")
        if self.netjack.enable and not self.network.enable:
            raise Invalid("archibaldos.netjack needs network.enable = true (the link runs over the VM's NIC)")
        if self.netjack.enable and self.network.mode == "user":
            raise Invalid(
                "archibaldos.netjack needs network.mode = \"nat\" or \"bridge\": the host cannot reach a user-mode guest"
            )

    @property
    def netjack(self) -> NetjackConfig:
        """The NETJACK link (disabled unless ``archibaldos.netjack.enable``)."""
        return self.archibaldos.netjack if self.archibaldos.enable else NetjackConfig()

    @property
    def disk_image(self) -> str | None:
        """The disk to attach: archibaldos.disk_image, or the default image when nothing else boots."""
        if not self.archibaldos.enable:
            return None
        if self.archibaldos.disk_image:
            return self.archibaldos.disk_image
        return None if self.boot.kernel else f"/var/lib/libvirt/images/{self.name}.qcow2"

    @property
    def page_size_kib(self) -> int:
        return PAGE_SIZES_KIB[self.hugepage_size]
