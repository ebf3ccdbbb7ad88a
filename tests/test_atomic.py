"""Files written whole or not at all (`actindex.indexer.atomic`), and the writers that use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actindex.indexer.atomic import atomic_path, atomic_write
from actindex.query.render import save_png


def test_a_completed_write_replaces_the_file_and_a_failed_one_leaves_it_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, b"first", durable=True)
    assert target.read_bytes() == b"first"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_writers_of_pictures_and_maps_leave_nothing_behind_when_they_fail(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "a.png")
    monkeypatch.setattr(np, "savez_compressed", broken)
    from actindex.query.attribution import Method
    from actindex.query.maps import UnitMaps
    from actindex.query.neuron import NeuronResult, save_maps

    empty = np.zeros((0, 3, 4, 4), dtype=np.float32)
    none = UnitMaps(np.zeros((0, 1, 1), dtype=np.float32), ((4, 1, 0), (4, 1, 0)), 4, 1.0)
    with pytest.raises(OSError, match="disk full"):
        save_maps(NeuronResult(tmp_path / "i.h5", "l", 0, 1, 4, (1, 1), [], [], {Method.GUIDED: empty}, none),
                  tmp_path / "m.npz")
    assert list(tmp_path.iterdir()) == []
