"""The guest commands: what runs in the DSP VM's own guest (``guest unit``, ``guest nixos``)."""

from __future__ import annotations

from pathlib import Path

from ..config import load_config


def guest_unit(config: Path, rtprio: int, user: str | None, root: Path | None) -> tuple[str, list[Path]]:
    """``guest unit``: the unit and its helper as one listing, or, with ``root``, written under it
    (then the listing is empty and the paths written are returned)."""
    from ..guest import unit

    cfg = load_config(config, files_here=False)
    files = unit.files(cfg, rtprio=rtprio, user=user)
    if root is None:
        return unit.listing(files), []
    return "", unit.write_tree(root, files)


def guest_nixos(config: Path, rtprio: int, user: str | None) -> str:
    """``guest nixos``: the NixOS module of CONFIG's guest slave."""
    from ..guest import nixos

    return nixos.module_text(load_config(config, files_here=False), rtprio=rtprio, user=user)
