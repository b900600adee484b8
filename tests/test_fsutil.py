"""Nothing half-written: directories appear whole or not at all."""

from __future__ import annotations

import pytest

from tunelab.fsutil import atomic_dir


def test_failure_leaves_the_target_as_it_was_and_no_temp_dir(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "w.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "w.bin").write_text("new, half")
        raise RuntimeError("killed while writing")
    assert (target / "w.bin").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_success_replaces_or_keeps_an_existing_target(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_text("v1")
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_text("v2")
    assert (target / "w.bin").read_text() == "v2"
    with atomic_dir(target, keep_existing=lambda t: (t / "w.bin").is_file()) as tmp:
        (tmp / "w.bin").write_text("v3")
    assert (target / "w.bin").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
