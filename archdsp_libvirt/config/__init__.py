"""The DSP VM description: the TOML model, its loading, and the QEMU-argument rules."""

from .load import load_config, parse_config
from .model import (
    DEFAULT_NAME,
    PAGE_SIZES_KIB,
    SAMPLE_RATES,
    AudioDeviceConfig,
    BootConfig,
    DspConfig,
    NetjackConfig,
    NetworkConfig,
    RealtimeConfig,
)
from ..errors import ConfigError

__all__ = [
    "DEFAULT_NAME", "PAGE_SIZES_KIB", "SAMPLE_RATES", "AudioDeviceConfig", "BootConfig", "ConfigError",
    "DspConfig", "NetjackConfig", "NetworkConfig", "RealtimeConfig", "load_config", "parse_config",
]
