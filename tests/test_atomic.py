"""Atomic files and directory swaps: a failure at any point leaves the old version whole."""

from __future__ import annotations

import os

import pytest

from glmtune import atomic


def _hidden(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith("."))


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.jsonl"
    atomic.write_text(target, "old\n")

    def pieces():
        yield "new, half"
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_lines(target, pieces())
    assert target.read_text() == "old\n" and _hidden(tmp_path) == []
    atomic.write_lines(target, ["a\n", "b\n"])
    assert target.read_text() == "a\nb\n" and _hidden(tmp_path) == []


def test_staged_path_is_renamed_only_when_the_writer_succeeds(tmp_path):
    target = tmp_path / "loss.png"
    with pytest.raises(ValueError):
        with atomic.staged_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise ValueError("savefig failed")
    assert not target.exists() and _hidden(tmp_path) == []
    with atomic.staged_path(target) as tmp:
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"


def test_publish_files_moves_the_marker_last(tmp_path, monkeypatch):
    staged, target = tmp_path / "staged", tmp_path / "adapter"
    staged.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (staged / name).write_text(name)
    moved, real = [], os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    atomic.publish_files(staged, target, last="adapter_config.json")
    assert moved[-1] == "adapter_config.json" and len(moved) == 3
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]


def test_replace_dir_puts_the_old_version_back_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    with atomic.staging_dir(out) as staged:
        (staged / "model.safetensors").write_text("new")
        real = os.replace

        def fail_second(a, b):
            if str(a) == str(staged):
                raise OSError("rename failed")
            return real(a, b)

        monkeypatch.setattr(atomic.os, "replace", fail_second)
        with pytest.raises(OSError):
            atomic.replace_dir(staged, out)
    assert (out / "model.safetensors").read_text() == "old" and _hidden(tmp_path) == []
    monkeypatch.undo()
    with atomic.staging_dir(out) as staged:
        (staged / "model.safetensors").write_text("new")
        atomic.replace_dir(staged, out, shared=True)
    assert (out / "model.safetensors").read_text() == "new" and _hidden(tmp_path) == []
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
