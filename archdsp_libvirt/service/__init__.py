"""What the commands do, as library functions: the one layer every click command goes through.

Each command of :mod:`archdsp_libvirt.cli` parses its options and calls one function here; the
functions load the config, build the host model once, and call the rooms below (domain, virt,
audio, host). The names are imported from their modules when first used, so that a command pays
only for what it runs.
"""

from __future__ import annotations

from ..lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("host_model", "render_for_cli", "up_command", "run_preflight", "down_command",
                     "status_command", "console_command", "probe_libvirt", "check_command"), "domain"),
    **dict.fromkeys(("netjack_start", "netjack_stop", "netjack_restart", "netjack_status", "netjack_unit",
                     "netjack_dropin", "latency_command", "rt_test_command", "tune_command"), "audio"),
    **dict.fromkeys(("kernel_params", "vfio_show", "vfio_bind", "vfio_unbind"), "host"),
}
__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
