"""``check``, ``host kernel-params``, ``host tuned-profile``, ``vfio`` and ``host prepare`` (``apply`` and
``undo``; the rest hidden: what scripts/host-services asks): the host side of the CLI.

Thin, like the rest of it: each command parses its options and calls one
library function. ``--host-root`` (hidden) reads a fake host tree instead
of this machine's /sys, /proc, /dev and /etc.
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import service
from ..host.kernelparams import FORMATS
from .options import config_argument, host_root_option, json_option

pci_argument = click.argument("pci", metavar="PCI")
dry_run_option = click.option("--dry-run", is_flag=True, help="Print the sysfs writes without making them.")


@click.command()
@config_argument
@json_option("Print the findings as a JSON list.")
@host_root_option
@click.pass_obj
def check(obj, config: Path, as_json: bool, host_root: Path) -> None:
    """Check that this host can run CONFIG's DSP VM (exit 1 on any fail)."""
    text, failed = service.check_command(config, getattr(obj, "uri", None), host_root=str(host_root), as_json=as_json)
    click.echo(text, nl=False)
    if failed:
        raise click.exceptions.Exit(1)


@click.group()
def host() -> None:
    """Prepare the host for a DSP VM."""


@host.command("kernel-params")
@config_argument
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="plain", show_default=True,
              help="plain: one line; nix: boot.kernelParams; grub: a line for /etc/default/grub.")
@click.option("--diff", is_flag=True,
              help="Compare with /proc/cmdline: missing and conflicting parameters (exit 1 when any).")
@click.option("--cpu-vendor", type=click.Choice(["AuthenticAMD", "GenuineIntel", "HygonGenuine"]),
              help="Render for this CPU vendor (default: /proc/cpuinfo's vendor_id).")
@host_root_option
def kernel_params(config: Path, fmt: str, diff: bool, cpu_vendor: str | None, host_root: Path) -> None:
    """Print the kernel command line CONFIG needs."""
    text, differs = service.kernel_params(config, host_root, fmt=fmt, diff=diff, cpu_vendor=cpu_vendor)
    click.echo(text, nl=False)
    if differs:
        raise click.exceptions.Exit(1)


@host.command("tuned-profile")
@config_argument
def tuned_profile(config: Path) -> None:
    """Print tuned's realtime-virtual-host variables for CONFIG's cores
    (/etc/tuned/realtime-virtual-host-variables.conf)."""
    click.echo(service.tuned_profile(config), nl=False)


@click.group()
def vfio() -> None:
    """Show a PCI device, bind it to vfio-pci, give it back (for managed = false)."""


@vfio.command("show")
@pci_argument
@host_root_option
def vfio_show(pci: str, host_root: Path) -> None:
    """Driver, vendor:device, class and IOMMU group (with every member) of PCI."""
    click.echo(service.vfio_show(pci, host_root), nl=False)


def _print_writes(writes, dry_run: bool, nothing: str) -> None:
    if not writes:
        click.echo(nothing, err=True)
        return
    if dry_run:
        click.echo("# dry run: these writes were not made", err=True)
    for w in writes:
        click.echo(str(w))


@vfio.command("bind")
@pci_argument
@dry_run_option
@host_root_option
def vfio_bind(pci: str, dry_run: bool, host_root: Path) -> None:
    """Bind PCI to vfio-pci, remembering its driver for unbind."""
    _print_writes(service.vfio_bind(pci, host_root, dry_run=dry_run), dry_run, f"{pci}: already bound to vfio-pci")


@vfio.command("unbind")
@pci_argument
@dry_run_option
@click.option("--force", is_flag=True, help="Unbind even when libvirt cannot say whether a running VM has PCI.")
@host_root_option
@click.pass_obj
def vfio_unbind(obj, pci: str, dry_run: bool, force: bool, host_root: Path) -> None:
    """Give PCI back to the driver it had before vfio bind (refused while a running VM has it)."""
    writes = service.vfio_unbind(pci, host_root, dry_run=dry_run, uri=getattr(obj, "uri", None), force=force,
                    say=lambda m: click.echo(m, err=True))
    _print_writes(writes, dry_run, f"{pci}: not bound to vfio-pci")


# --- host prepare: what scripts/host-services asks (plumbing, hidden from --help) ----------------------

NO = 3  # the answer "no" (nothing to fix, not ours, no such process): never 1 (an error) or 2 (bad input)
pid_argument = click.argument("pid", type=click.IntRange(min=1))


@host.group("prepare")
def prepare() -> None:
    """Make the runtime fixes check names (apply), and put back what they changed (undo).

    The other subcommands are what scripts/host-services asks: exit 0 for yes, 3 for no, anything else is an error.
    """


state_option = click.option("--state", "state", type=click.Path(dir_okay=False, path_type=Path), default=None,
                            help="Where apply records what it changed "
                                 "(default /run/archdsp-libvirt/host-prepare.json).")


@prepare.command("apply")
@config_argument
@click.option("--dry-run", is_flag=True, help="Print the changes without making them.")
@state_option
@host_root_option
def prepare_apply(config: Path, dry_run: bool, state: Path | None, host_root: Path) -> None:
    """Make the runtime fixes CONFIG's check rows name (RT throttling, kernel threads' priorities, IRQs, KVM and
    latency knobs), recording each value before it; boot-time ones are host kernel-params'."""
    service.prepare_apply(config, host_root, state, dry_run=dry_run, say=click.echo)


@prepare.command("undo")
@state_option
@host_root_option
def prepare_undo(state: Path | None, host_root: Path) -> None:
    """Put back what apply changed, each only while it is still what apply made it (exit 1 if one fails)."""
    if not service.prepare_undo(host_root, state, say=click.echo):
        raise click.exceptions.Exit(1)


@prepare.command("rt-budget", hidden=True)
@host_root_option
def prepare_rt_budget(host_root: Path) -> None:
    """Exit 0 when SCHED_FIFO vCPUs need the qemu.conf cgroup fix, 3 when not; print what was seen."""
    needed, seen = service.qemu_conf_fix(host_root)
    click.echo(seen)
    if not needed:
        raise click.exceptions.Exit(NO)


@prepare.command("qemu-conf-line", hidden=True)
def prepare_qemu_conf_line() -> None:
    """The cgroup_controllers line the qemu.conf fix writes."""
    click.echo(service.qemu_conf_line())


@prepare.command("start-time", hidden=True)
@pid_argument
def prepare_start_time(pid: int) -> None:
    """PID's start time (clock ticks since boot); exit 3 when there is no such process."""
    ticks = service.process_start_time(pid)
    if ticks is None:
        raise click.exceptions.Exit(NO)
    click.echo(ticks)


@prepare.command("owned", hidden=True)
@click.argument("name")
@pid_argument
@click.argument("start", type=click.IntRange(min=0))
def prepare_owned(name: str, pid: int, start: int) -> None:
    """Exit 0 when PID is still the NAME process that started at START, 3 when not (a reused PID is not)."""
    if not service.daemon_still_ours(name, pid, start):
        raise click.exceptions.Exit(NO)
