"""The one writer of a user's config file: checked before writing, atomic, never through a link."""

from __future__ import annotations

from pathlib import Path

import pytest

from archdsp_libvirt.config.write import same_line_endings, update_config
from archdsp_libvirt.errors import ConfigError

MINIMAL = "# mine\nisolated_cores = [1]\nmemory_mb = 256 # MiB\n\n[boot]\nkernel = \"/k\"\n"


def _set_memory(mb: int):
    def edit(doc):
        doc["memory_mb"] = mb
        return mb
    return edit


def test_an_edit_is_written_with_the_comments(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL)
    assert update_config(cfg, _set_memory(512)) == 512
    assert cfg.read_text() == MINIMAL.replace("256", "512")


def test_an_unchanged_document_is_not_written(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL)
    ino = cfg.stat().st_ino
    update_config(cfg, _set_memory(256))
    assert cfg.stat().st_ino == ino


def test_a_file_changed_while_the_edit_ran_is_not_overwritten(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL)

    def edit(doc):
        doc["memory_mb"] = 512
        cfg.write_text(MINIMAL + "# someone else's line\n")

    with pytest.raises(ConfigError, match="changed by something else"):
        update_config(cfg, edit)
    assert cfg.read_text().endswith("# someone else's line\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


def test_a_new_value_the_loader_refuses_is_not_written(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(MINIMAL)
    with pytest.raises(ConfigError, match=r"memory_mb: must be >= 1, got 0.*unchanged"):
        update_config(cfg, _set_memory(0))
    assert cfg.read_text() == MINIMAL


@pytest.mark.parametrize(("old", "new", "out"), [
    ("a\r\nb\r\n", "a\r\nb\r\nc\n", "a\r\nb\r\nc\r\n"),
    ("a\nb\n", "a\nb\nc\n", "a\nb\nc\n"),
    ("a\r\nb\n", "a\r\nb\nc\n", "a\r\nb\nc\n"),  # mixed: left as the editor made it
])
def test_line_endings_follow_the_file(old, new, out):
    assert same_line_endings(old, new) == out


def test_a_folder_that_is_not_there_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot open its folder"):
        update_config(Path(tmp_path / "nowhere" / "c.toml"), _set_memory(1))
