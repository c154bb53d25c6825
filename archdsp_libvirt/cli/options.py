"""Options and arguments more than one command takes, defined once."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import click

_ASCII_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")


class Finite(click.FloatRange):
    """A FloatRange that takes only a finite number in ASCII digits: click's float() also takes
    "nan" (which passes every range check), "inf", "1_0" and other scripts' digits."""

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, str) and not _ASCII_NUMBER.fullmatch(value.strip()):
            self.fail(f"{value[:20]!r} is not a number in ASCII digits (e.g. 2.5)", param, ctx)
        return super().convert(value, param, ctx)


class Count(click.IntRange):
    """An IntRange that takes only ASCII digits (int() also takes other scripts' digits and "1_0")."""

    def convert(self, value, param, ctx):  # type: ignore[override]
        if isinstance(value, str) and not re.fullmatch(r"[+-]?[0-9]{1,6}", value.strip()):
            self.fail(f"{value[:20]!r} is not a whole number in ASCII digits", param, ctx)
        return super().convert(value, param, ctx)


config_argument = click.argument("config", type=click.Path(dir_okay=True, path_type=Path))
nperiods_option = click.option("--nperiods", type=Count(2, 8), default=2, show_default=True, help="ALSA periods.")
host_root_option = click.option(
    "--host-root",
    type=click.Path(file_okay=False, path_type=Path),
    default="/",
    hidden=True,
    help="Read the host (sysfs, procfs, /dev, /etc) under this directory instead of /.",
)


def json_option(help: str = "Print JSON for scripts."):  # noqa: A002 - click's own word
    return click.option("--json", "as_json", is_flag=True, help=help)


class OutputFile(click.ParamType):
    """A file a command writes for the user (a plot), refused while the options are read, before any
    measurement: by the config paths' rules (:func:`archdsp_libvirt.config.paths.output_file`), and
    when the optional package that writes it is not installed. One line, exit 2."""

    name = "file"

    def __init__(self, suffixes: tuple[str, ...], needs: str | None = None, extra: str | None = None) -> None:
        self.suffixes = suffixes
        self.needs = needs  # the module that writes it (an optional dependency)
        self.extra = extra  # the package extra that installs it

    def get_metavar(self, param, *args, **kwargs) -> str:  # type: ignore[override]
        return "FILE"  # click 8.2 passes ctx, by keyword since 8.5

    def convert(self, value, param, ctx):  # type: ignore[override]
        from ..config.paths import output_file, shorten  # only when the option is given
        from ..errors import Invalid, UsageError

        option = param.opts[0] if param is not None and param.opts else "the output file"
        text = os.fsdecode(value)
        try:
            path = output_file(text, self.suffixes)
        except Invalid as err:
            shown = shorten(text) if text.isprintable() else repr(shorten(text))
            raise UsageError(f"{option} {shown}: {err.message}") from None
        if self.needs and importlib.util.find_spec(self.needs) is None:
            raise UsageError(f"{option} needs {self.needs}, which is not installed: pip install "
                             f"'archdsp-libvirt[{self.extra}]' (or leave out {option})")
        return Path(path)


plot_file = OutputFile((".png",), needs="matplotlib", extra="plot")
