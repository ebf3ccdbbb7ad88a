"""A unit's profile from the index's tables alone (no network, no images, instant on a laptop): how often and
how strongly it fires over the whole dataset, for which classes, and its top (and, with --bottom-k, lowest)
images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actindex.indexer.index_file import IndexReader, LayerHits, UnitClasses, UnitDistribution
from actindex.kernels.errors import UserError


@dataclass(frozen=True)
class UnitImage:
    rank: int  # 0 for the unit's best (or, among the lowest, its lowest) image
    image_id: int
    path: str
    score: float
    position: tuple[int, int]  # (y, x) on the feature map
    box: tuple[int, int, int, int]  # network-input pixels, (y0, x0, y1, x1) half-open


@dataclass(frozen=True)
class UnitSummary:
    index: Path
    layer: str
    unit: int
    channels: int
    mean: float | None  # over the readable images; None for indexes from before it
    distribution: UnitDistribution | None
    classes: UnitClasses | None
    top: tuple[UnitImage, ...]
    lowest: tuple[UnitImage, ...] | None  # None when the index was built without --bottom-k

    def to_json(self) -> dict[str, object]:
        def images(rows: tuple[UnitImage, ...]) -> list[dict[str, object]]:
            return [{"rank": r.rank, "image_id": r.image_id, "path": r.path, "score": r.score,
                     "position": list(r.position), "box": list(r.box)} for r in rows]

        return {"index": str(self.index), "layer": self.layer, "unit": self.unit, "channels": self.channels,
                "mean": self.mean, **profile_json(self.distribution, self.classes), "top": images(self.top),
                "lowest": None if self.lowest is None else images(self.lowest)}

    def lines(self) -> list[str]:
        """The summary as text, one fact a line."""
        text = [f"{self.layer} unit {self.unit} of {self.channels}"
                + ("" if self.mean is None else f": mean score {self.mean:.4g}")]
        text += [f"  {line}" for line in profile_lines(self.distribution, self.classes)]
        for title, rows in (("top", self.top), ("lowest", self.lowest or ())):
            if rows:
                text.append(f"  {title} {len(rows)} images:")
                text += [f"    #{r.rank + 1} {r.score:9.4g}  {r.path}  box {list(r.box)}" for r in rows]
        return text


def profile_json(distribution: UnitDistribution | None, classes: UnitClasses | None) -> dict[str, object]:
    """The `distribution` and `classes` keys of the JSON answers of `neuron` and `unit`."""
    return {"distribution": None if distribution is None else {
                "images": distribution.count, "firing_rate": distribution.firing_rate,
                "quantiles": {f"p{100 * q:g}": v for q, v in distribution.quantiles.items()}},
            "classes": None if classes is None else {
                "selectivity": classes.selectivity,
                "top": [{"class": name, "mean": mean, "images": n} for name, mean, n in classes.top]}}


def profile_lines(distribution: UnitDistribution | None, classes: UnitClasses | None) -> list[str]:
    """The unit's dataset-wide profile as text lines (none for what the index does not record)."""
    lines = []
    if distribution is not None:
        levels = ", ".join(f"p{100 * q:g} {v:.4g}" for q, v in distribution.quantiles.items())
        lines.append(f"over all {distribution.count} images: fires (> 0) on {100 * distribution.firing_rate:.1f} %; "
                     f"{levels}")
    if classes is not None:
        top = ", ".join(f"{name} {mean:.4g}" for name, mean, _ in classes.top)
        index = (f"{classes.selectivity:.2f}" if np.isfinite(classes.selectivity)
                 else "undefined (it needs non-negative class means, as after a ReLU)")
        lines.append(f"mean score by class: {top}; class selectivity {index}")
    return lines


def unit_summary(index: Path, layer: str, unit: int, k: int | None = None, classes: int = 5) -> UnitSummary:
    """Unit `unit` of `layer`: its distribution, best classes and top (and lowest) `k` images (default: all the
    index keeps), from the index at `index`."""
    if k is not None and k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    with IndexReader(index) as reader:
        hits = reader.layer(layer)
        if not 0 <= unit < hits.grid.channels:
            raise UserError(f"unit {unit} is out of range: layer '{layer}' has {hits.grid.channels} units "
                            f"(0-{hits.grid.channels - 1})")
        mean = reader.layer_mean(layer)
        lowest = reader.layer(layer, lowest=True) if reader.info.bottom_k > 0 else None
        return UnitSummary(
            reader.path, layer, unit, hits.grid.channels,
            None if mean is None or not np.isfinite(mean[unit]) else float(mean[unit]),
            reader.distribution(layer, unit), reader.unit_classes(layer, unit, top=classes),
            _images(reader, hits, unit, k), None if lowest is None else _images(reader, lowest, unit, k))


def _images(reader: IndexReader, table: LayerHits, unit: int, k: int | None) -> tuple[UnitImage, ...]:
    count = int((table.image[unit] >= 0).sum()) if k is None else min(k, int((table.image[unit] >= 0).sum()))
    ids = [int(i) for i in table.image[unit][:count]]
    return tuple(UnitImage(rank, image_id, path, float(table.value[unit, rank]),
                           (int(table.y[unit, rank]), int(table.x[unit, rank])),
                           tuple(int(v) for v in table.box[unit, rank]))  # type: ignore[arg-type]
                 for rank, (image_id, path) in enumerate(zip(ids, reader.paths_of(ids), strict=True)))
