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
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import ConfigError

DEFAULT_NAME = "archibaldos-dsp"
SAMPLE_RATES = (22050, 32000, 44100, 48000, 88200, 96000, 176400, 192000)
PAGE_SIZES_KIB = {"2M": 2048, "1G": 1024 * 1024}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_PCI_RE = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_VENDOR_DEVICE_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
# Characters that have no place in a path, a kernel argument or an XML attribute.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

Port = Annotated[int, Field(ge=1, le=65535)]


def _fail(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _clean_text(value: str, what: str) -> str:
    if _CONTROL_RE.search(value):
        raise _fail("control_chars", f"{what} must not contain control characters or newlines")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NetjackConfig(_Section):
    """``[archibaldos.netjack]``: the NETJACK2 link between host and VM."""

    enable: bool = False
    source_port: Port = 19000
    buffer_size: int = 128
    sample_rate: int = 96000
    channels: Annotated[int, Field(ge=1, le=64)] = 2
    network_latency: Annotated[int, Field(ge=0, le=10)] = 1
    sync: bool = False
    dsp_client: bool = True
    master_ip: str = "192.168.122.1"
    guest_ip: str | None = None
    client_name: str = "netjack"

    @field_validator("buffer_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v > 4096 or v & (v - 1):
            raise _fail("power_of_two", "must be a power of two from 16 to 4096 (e.g. 128)")
        return v

    @field_validator("sample_rate")
    @classmethod
    def _known_rate(cls, v: int) -> int:
        if v not in SAMPLE_RATES:
            raise _fail("sample_rate", "must be one of " + ", ".join(map(str, SAMPLE_RATES)))
        return v

    @field_validator("master_ip")
    @classmethod
    def _ipv4(cls, v: str) -> str:
        try:
            addr = ipaddress.IPv4Address(v)
        except ValueError:
            raise _fail("ip", "must be an IPv4 address such as 192.168.122.1") from None
        if addr.is_multicast or addr.is_unspecified:
            raise _fail("ip", "must be the master's unicast address, not multicast or 0.0.0.0")
        return v

    @field_validator("guest_ip")
    @classmethod
    def _ipv4_iface(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            ipaddress.IPv4Interface(v)
        except ValueError:
            raise _fail("ip", "must be an IPv4 address with prefix such as 192.168.122.50/24") from None
        return v

    @field_validator("client_name")
    @classmethod
    def _client_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", v):
            raise _fail("client_name", "must be 1-32 letters, digits, '_' or '-'")
        return v


class ArchibaldosConfig(_Section):
    """``[archibaldos]``: the guest OS image and its NETJACK link."""

    enable: bool = True
    disk_image: str | None = None
    disk_format: Literal["qcow2", "raw"] | None = None
    netjack: NetjackConfig = NetjackConfig()

    @field_validator("disk_image")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _clean_text(v, "the path")
        if not (v.startswith("/") or v.startswith("~")):
            raise _fail("relative_path", "must be an absolute path (or start with ~)")
        return v


class BootConfig(_Section):
    """``[boot]``: direct kernel boot (kernel, initrd, command line)."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str = "console=ttyS0"

    @field_validator("kernel", "initrd")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _clean_text(v, "the path")
        if not (v.startswith("/") or v.startswith("~")):
            raise _fail("relative_path", "must be an absolute path (or start with ~)")
        return v

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        return _clean_text(v, "the kernel command line")


class AudioDeviceConfig(_Section):
    """``[audio_device]``: VFIO passthrough of a PCI audio controller."""

    enable: bool = False
    pci_id: str | None = None
    vendor_device: str | None = None
    managed: bool = True

    @field_validator("pci_id")
    @classmethod
    def _pci(cls, v: str | None) -> str | None:
        if v is not None and not _PCI_RE.match(v):
            raise _fail("pci", "must be a PCI address DDDD:BB:SS.F such as 0000:00:1b.0 (see lspci -D)")
        return v

    @field_validator("vendor_device")
    @classmethod
    def _vd(cls, v: str | None) -> str | None:
        if v is not None and not _VENDOR_DEVICE_RE.match(v):
            raise _fail("vendor_device", "must be vendor:device in hex such as 1022:15e3 (see lspci -nn)")
        return v

    @model_validator(mode="after")
    def _needs_address(self) -> AudioDeviceConfig:
        if self.enable and self.pci_id is None:
            raise _fail("missing_pci", "pci_id is required when enable = true (e.g. pci_id = \"0000:00:1b.0\")")
        return self

    @property
    def pci_address(self) -> tuple[int, int, int, int]:
        """(domain, bus, slot, function) parsed from :attr:`pci_id`."""
        m = _PCI_RE.match(self.pci_id or "")
        if not m:
            raise ValueError("no PCI address")
        return tuple(int(g, 16) for g in m.groups())  # type: ignore[return-value]


class RealtimeConfig(_Section):
    """``[realtime]``: SCHED_FIFO vCPUs, locked memory, emulator niceness."""

    enable: bool = True
    mlock: bool = True
    nice: Annotated[int, Field(ge=-20, le=19)] = -20
    priority: Annotated[int, Field(ge=1, le=99)] = 1


class NetworkConfig(_Section):
    """``[network]``: the VM's virtio NIC and user-mode port forwards."""

    enable: bool = True
    mode: Literal["nat", "bridge", "user"] = "nat"
    source: str = "default"
    hostfwd: dict[str, Port] = {}
    hostfwd_address: str = "127.0.0.1"
    port_forward_backend: Literal["auto", "passt", "hostfwd"] = "auto"

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", v):
            raise _fail("source", "must be a libvirt network or bridge name (letters, digits, '.', '_', '-')")
        return v

    @field_validator("hostfwd")
    @classmethod
    def _ports(cls, v: dict[str, int]) -> dict[str, int]:
        for host_port in v:
            if not host_port.isdigit() or not 1 <= int(host_port) <= 65535:
                raise _fail("port", f"host port {host_port!r} must be a number from 1 to 65535")
        return v

    @field_validator("hostfwd_address")
    @classmethod
    def _loopback(cls, v: str) -> str:
        try:
            addr = ipaddress.IPv4Address(v)
        except ValueError:
            raise _fail("ip", "must be an IPv4 address such as 127.0.0.1") from None
        if not addr.is_loopback:
            raise _fail(
                "exposed",
                "must be a loopback address (127.0.0.0/8); forwarding a guest port to other hosts is not supported",
            )
        return v

    @property
    def forwards(self) -> list[tuple[int, int]]:
        """``(host_port, guest_port)`` pairs, sorted by host port."""
        return sorted((int(h), g) for h, g in self.hostfwd.items())


class DspConfig(_Section):
    """The whole DSP VM description (one file in ``domains/``)."""

    name: str = DEFAULT_NAME
    isolated_cores: list[Annotated[int, Field(ge=0, le=4095)]]
    emulator_cores: list[Annotated[int, Field(ge=0, le=4095)]] | None = None
    memory_mb: Annotated[int, Field(gt=0, le=16 * 1024 * 1024)]
    hugepages: Annotated[int, Field(ge=0, le=16 * 1024 * 1024)] = 0
    hugepage_size: Literal["2M", "1G"] = "2M"
    domain_type: Literal["kvm", "qemu"] = "kvm"
    machine: Literal["q35", "pc"] = "q35"
    cpu_disable_features: list[str] = []
    console_log: str | None = None
    spice: bool = False
    vnc: bool = False
    qemu_extra_args: list[str] = []
    archibaldos: ArchibaldosConfig = ArchibaldosConfig()
    boot: BootConfig = BootConfig()
    audio_device: AudioDeviceConfig = AudioDeviceConfig()
    realtime: RealtimeConfig = RealtimeConfig()
    network: NetworkConfig = NetworkConfig()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise _fail(
                "name",
                "must be 1-64 letters, digits, '.', '_', '+' or '-', starting with a letter or digit",
            )
        return v

    @field_validator("isolated_cores")
    @classmethod
    def _cores(cls, v: list[int]) -> list[int]:
        if not v:
            raise _fail("empty", "must list at least one host core, e.g. [1]")
        if len(set(v)) != len(v):
            raise _fail("duplicate", "lists a core twice; give each core once (one vCPU per core)")
        return v

    @field_validator("emulator_cores")
    @classmethod
    def _emu_cores(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise _fail("emulator_cores", "must list distinct host cores, or be left out to use the non-isolated ones")
        return v

    @field_validator("cpu_disable_features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        for f in v:
            if not re.fullmatch(r"[a-z0-9_.-]{1,40}", f):
                raise _fail("feature", f"{f!r} is not a CPU feature name (lowercase, e.g. arch-capabilities)")
        return v

    @field_validator("console_log")
    @classmethod
    def _log(cls, v: str | None) -> str | None:
        if v is not None:
            _clean_text(v, "the path")
            if not v.startswith("/"):
                raise _fail("relative_path", "must be an absolute path")
        return v

    @field_validator("qemu_extra_args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        for arg in v:
            _clean_text(arg, "a QEMU argument")
        return v

    @model_validator(mode="after")
    def _whole(self) -> DspConfig:
        if self.emulator_cores and set(self.emulator_cores) & set(self.isolated_cores):
            raise _fail("overlap", "emulator_cores must not overlap isolated_cores")
        if self.hugepages:
            covered_mb = self.hugepages * PAGE_SIZES_KIB[self.hugepage_size] // 1024
            if covered_mb < self.memory_mb:
                need = -(-self.memory_mb * 1024 // PAGE_SIZES_KIB[self.hugepage_size])
                raise _fail(
                    "hugepages",
                    f"{self.hugepages} x {self.hugepage_size} pages = {covered_mb} MiB do not cover "
                    f"memory_mb = {self.memory_mb}; set hugepages >= {need} or lower memory_mb",
                )
        if self.memory_mb * 1024 % PAGE_SIZES_KIB[self.hugepage_size] and self.hugepages:
            raise _fail("memory_mb", f"memory_mb must be a multiple of the {self.hugepage_size} page size")
        if not self.archibaldos.enable and not self.boot.kernel:
            raise _fail(
                "nothing_to_boot",
                "nothing to boot: set archibaldos.enable = true (with archibaldos.disk_image) or boot.kernel",
            )
        if self.boot.initrd and not self.boot.kernel:
            raise _fail("initrd", "boot.initrd needs boot.kernel")
        if self.network.hostfwd and not self.network.enable:
            raise _fail("hostfwd", "network.hostfwd needs network.enable = true")
        if self.netjack.enable and not self.network.enable:
            raise _fail("netjack", "archibaldos.netjack needs network.enable = true (the link runs over the VM's NIC)")
        if self.netjack.enable and self.network.mode == "user":
            raise _fail(
                "netjack",
                "archibaldos.netjack needs network.mode = \"nat\" or \"bridge\": the host cannot reach a user-mode guest",
            )
        return self

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


# --- loading -----------------------------------------------------------------

# Error kinds whose default pydantic wording we replace with the expectation.
_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table",
    "float_type": "a number",
}


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict[str, Any]) -> tuple[str, str]:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        return _key_path(loc), "unknown key; remove it or check its spelling (see README: Configuration)"
    if kind == "missing":
        return _key_path(loc), "required key is missing"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f", got {got!r}" if len(repr(got)) <= 60 else ""
    if kind in _TYPE_WORDS:
        return _key_path(loc), f"expected {_TYPE_WORDS[kind]}{shown}"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        ctx = err.get("ctx", {})
        bounds = {
            "greater_than_equal": f">= {ctx.get('ge')}",
            "less_than_equal": f"<= {ctx.get('le')}",
            "greater_than": f"> {ctx.get('gt')}",
            "less_than": f"< {ctx.get('lt')}",
        }[kind]
        return _key_path(loc), f"must be {bounds}{shown}"
    if kind == "literal_error":
        return _key_path(loc), f"must be {err['ctx']['expected']}{shown}"
    msg = err["msg"]
    if kind == "value_error" and msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    # Model-level validators have no location of their own: their message names the key.
    if not loc:
        return "", msg
    return _key_path(loc), msg + (shown if kind not in ("nothing_to_boot",) else "")


def _first_error(exc: ValidationError) -> dict[str, Any]:
    errors = exc.errors(include_url=False)
    # Report the most specific problem: the deepest location, in file order.
    return max(errors, key=lambda e: len(e["loc"]))


def parse_config(data: dict[str, Any], source: str = "<config>") -> DspConfig:
    """Check a decoded TOML table; raise :class:`ConfigError` naming the key."""
    try:
        return DspConfig.model_validate(data)
    except ValidationError as exc:
        key, msg = _describe(_first_error(exc))
        where = f"{source}: {key}: " if key else f"{source}: "
        raise ConfigError(where + msg) from None


def load_config(path: str | os.PathLike[str]) -> DspConfig:
    """Read and check a DSP VM description from a TOML file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; pass the path of a TOML file such as domains/minimal.toml") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory; pass the path of a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text; a TOML file is expected") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    return parse_config(data, str(p))
