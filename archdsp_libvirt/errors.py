"""The package's errors: one root, translated once at each boundary.

Every error carries an exit code for the CLI: 2 for bad input (the user's
file or arguments), 1 for a failure of the host or of libvirt.
"""

from __future__ import annotations


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
