"""The package's errors: one root, translated once at each boundary.

Every error carries an exit code for the CLI: 2 for bad input (the user's
file or arguments), 1 for a failure of the host or of libvirt.
"""

from __future__ import annotations


def shown(text: str, limit: int | None = None) -> str:
    """``text`` fit for a one-line message: each character that does not print (a newline, an escape)
    as its escape, and cut after ``limit`` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if limit is None or len(text) <= limit else text[:limit] + "..."


class ArchdspError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ArchdspError):
    """A DSP VM description that cannot be used as written."""

    exit_code = 2


class UsageError(ArchdspError):
    """A command-line argument that cannot be used as written."""

    exit_code = 2


class RenderError(ArchdspError):
    """The rendered domain XML is not what libvirt accepts."""

    exit_code = 2


class HostError(ArchdspError):
    """The host cannot do what the configuration asks."""


class LibvirtFailure(ArchdspError):
    """A libvirt call failed; ``code`` is libvirt's ``VIR_ERR_*`` number, ``transient`` whether a retry may cure it."""

    def __init__(self, message: str, code: int = 0, transient: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.transient = transient


class BridgeError(ArchdspError):
    """The NETJACK bridge cannot do what was asked."""


class Invalid(ValueError):
    """A value a config check refused (raised inside msgspec's validation, reported as a ConfigError). ``key`` is where, relative to the table checked: a field name, a
    field and a table key (``("hostfwd", "2222")``), or ``()`` for the table as a whole."""

    def __init__(self, message: str, key: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


class GuestAgentError(ArchdspError):
    """The QEMU guest agent answered, but not what was asked (a command that failed or did not finish)."""


class AgentUnavailable(GuestAgentError):
    """No QEMU guest agent answers in the guest (no channel, none connected, or not responding)."""
