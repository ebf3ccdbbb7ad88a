"""The actindex HDF5 file: writing it atomically, and reading it back with its version checked.

docs/FORMAT.md is the contract; the names here follow it. Writers create the file under a temporary name in
the target folder and rename it into place only when it is complete, so a crash never leaves a file at the
target path that looks valid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from actindex.kernels.errors import UserError

from .choices import Decoder, Precision

if TYPE_CHECKING:
    from actindex.kernels.receptive_field import LayerGeometry

FORMAT_NAME = "actindex"
FORMAT_VERSION = 1
PATCH_PREFIX = "patch_faiss"  # root attributes of the patch vectors' FAISS file: patch_faiss_index, …
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class LayerGrid:
    """A layer's feature grid and receptive field, as an index stores them (`/layers/<layer>`'s attributes, and
    `/patches/<layer>`'s with --patch-layer). Position (y, x) sees the network-input pixels of its receptive field
    (size, stride, padding per axis, as `kernels.receptive_field` defines them). With patch vectors, position (y, x)
    of image i is row (and FAISS id) `i * height * width + y * width + x` of `/patches/<layer>`."""

    layer: str
    channels: int
    height: int
    width: int
    rf_size: tuple[int, int]
    rf_stride: tuple[int, int]
    rf_padding: tuple[int, int]

    @property
    def positions(self) -> int:
        return self.height * self.width

    def ids(self, image: np.ndarray | int, y: np.ndarray | int, x: np.ndarray | int) -> np.ndarray:
        """Row numbers (= FAISS ids) of positions (y, x) of images `image`, int64, broadcast."""
        return (np.asarray(image, dtype=np.int64) * self.positions + np.asarray(y, dtype=np.int64) * self.width
                + np.asarray(x, dtype=np.int64))

    def unravel(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, y, x) of row numbers `ids`, each int64."""
        image, position = np.divmod(np.asarray(ids, dtype=np.int64), self.positions)
        y, x = np.divmod(position, self.width)
        return image, y, x

    def field(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(size, stride, padding) per axis, y then x, as `kernels.upsample` takes it."""
        return ((self.rf_size[0], self.rf_stride[0], self.rf_padding[0]),
                (self.rf_size[1], self.rf_stride[1], self.rf_padding[1]))

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Where the receptive fields' centres lie on the network input, as continuous coordinates (pixel u spans
        [u, u + 1)): rows (height,) and columns (width,) float64, y S - P + r / 2."""
        (sy, ty, py), (sx, tx, px) = self.field()
        return (np.arange(self.height) * ty - py + sy / 2, np.arange(self.width) * tx - px + sx / 2)

    def boxes(self, y: np.ndarray, x: np.ndarray, input_size: int) -> np.ndarray:
        """(..., 4) int32 (y0, x0, y1, x1) network-input boxes of positions (y, x), half-open, clipped."""
        import torch

        from actindex.kernels.receptive_field import AxisField, boxes

        field = (AxisField(*self.field()[0]), AxisField(*self.field()[1]))
        return boxes(field, torch.as_tensor(np.asarray(y)), torch.as_tensor(np.asarray(x)),
                     (input_size, input_size)).numpy()

    @classmethod
    def of(cls, geometry: LayerGeometry) -> LayerGrid:
        """The grid of a traced layer with a receptive field."""
        if geometry.field is None:
            raise ValueError(f"layer {geometry.name!r} has no receptive field: {geometry.note}")
        fy, fx = geometry.field
        return cls(geometry.name, geometry.channels, geometry.height, geometry.width, (fy.size, fx.size),
                   (fy.stride, fx.stride), (fy.padding, fx.padding))

    @classmethod
    def from_attrs(cls, layer: str, attrs: Any) -> LayerGrid:
        """Read back from a group's or dataset's attributes (`to_attrs`)."""
        return cls(layer, int(attrs["channels"]), int(attrs["height"]), int(attrs["width"]),
                   _stored_yx(attrs["rf_size"]), _stored_yx(attrs["rf_stride"]), _stored_yx(attrs["rf_padding"]))

    def to_attrs(self) -> dict[str, Any]:
        return {"channels": self.channels, "height": self.height, "width": self.width,
                "rf_size": list(self.rf_size), "rf_stride": list(self.rf_stride),
                "rf_padding": list(self.rf_padding)}


@dataclass(frozen=True)
class LayerHits:
    """One layer's top-k table (or its lowest-k table), as stored, with the layer's grid."""

    grid: LayerGrid
    value: np.ndarray  # (C, k) float32, descending per row (the lowest-k: ascending), NaN in empty slots
    image: np.ndarray  # (C, k) int64, -1 in empty slots
    y: np.ndarray  # (C, k) int32
    x: np.ndarray  # (C, k) int32
    box: np.ndarray  # (C, k, 4) int32 (y0, x0, y1, x1), network-input pixels, half-open


def check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise UserError(f"--out '{out}' is a directory; give a file path such as {out / 'index.h5'}")
    if out.exists() and not overwrite:
        raise UserError(f"'{out}' already exists; pass --overwrite to replace it")


@dataclass(frozen=True)
class UnitDistribution:
    """A unit's scores over the readable images, from its histogram (`kernels.histogram`): exact counts, the
    fraction of images where it fires (score > 0, exact), and quantiles within 0.78 % of the exact ones."""

    count: int  # readable images (NaN scores left out)
    firing_rate: float
    quantiles: dict[float, float]  # q -> score: 0.5, 0.9, 0.99, 0.999

    QUANTILES = (0.5, 0.9, 0.99, 0.999)


@dataclass(frozen=True)
class LayerProfile:
    """Every unit of a layer in a few numbers, for overviews and sorting: its distribution (NaN, and count -1,
    for indexes from before histograms) and its class selectivity (NaN where undefined or without classes)."""

    count: np.ndarray  # (C,) int64 readable images with a score (NaN scores left out)
    firing_rate: np.ndarray  # (C,) fraction of them with score > 0
    quantiles: np.ndarray  # (C, len(UnitDistribution.QUANTILES)) float64, capped at the unit's best score
    selectivity: np.ndarray  # (C,) class-selectivity index

    @classmethod
    def from_tables(cls, counts: np.ndarray | None, best: np.ndarray, class_means: np.ndarray | None,
                    ) -> LayerProfile:
        """From (C, BINS) histogram counts, each unit's (C,) best score (exact, from its top-k: a bin's value may
        lie above every score in it) and its (K, C) class means."""
        import torch

        from actindex.kernels import histogram
        from actindex.kernels.class_sums import selectivity

        channels = best.shape[0]
        count, firing = np.full(channels, -1, dtype=np.int64), np.full(channels, np.nan)
        levels = np.full((channels, len(UnitDistribution.QUANTILES)), np.nan)
        if counts is not None:
            tensor = torch.as_tensor(np.asarray(counts, dtype=np.int64))
            count = tensor[:, :histogram.NAN].sum(1).numpy()
            firing = histogram.firing_rate(tensor).numpy()
            levels = np.fmin(histogram.quantiles(tensor, list(UnitDistribution.QUANTILES)).numpy(),
                             best.astype(np.float64)[:, None])
        index = np.full(channels, np.nan) if class_means is None else \
            selectivity(torch.as_tensor(np.asarray(class_means, dtype=np.float64))).numpy()
        return cls(count, firing, levels, index)

    def distribution(self, unit: int) -> UnitDistribution | None:
        if self.count[unit] < 0:
            return None
        return UnitDistribution(int(self.count[unit]), float(self.firing_rate[unit]),
                                dict(zip(UnitDistribution.QUANTILES, self.quantiles[unit].tolist(), strict=True)))

    @property
    def p99(self) -> np.ndarray:
        return self.quantiles[:, UnitDistribution.QUANTILES.index(0.99)]


@dataclass(frozen=True)
class UnitClasses:
    """A unit's preferred classes: per class, its mean score over that class's readable images (exact to 3e-8)."""

    selectivity: float  # (μ_max − μ_rest) / (μ_max + μ_rest), Morcos et al. 2018; NaN where undefined
    top: tuple[tuple[str, float, int], ...]  # (class name, mean score, images), best first


def class_names(folders: Sequence[str], categories: Sequence[str]) -> list[str]:
    """Display names of the class folders: the folder names, or the weights' category names when the folders are
    ImageNet's 1 000 synset ids (n01440764 …), whose sorted order is the order of ImageNet's class indices."""
    synsets = len(folders) == len(categories) == 1000 and all(
        len(f) == 9 and f[0] == "n" and f[1:].isdigit() for f in folders)
    return [f"{c} ({f})" for f, c in zip(folders, categories, strict=True)] if synsets else list(folders)


@dataclass(frozen=True)
class FaissRecord:
    """What an index records about the FAISS file beside it (the `faiss_*` attributes)."""

    name: str  # file name, in the index's folder
    layer: str  # the embedding layer it indexes
    factory: str
    nprobe: int | None  # None: not an IVF index
    count: int  # vectors in it
    recall_at_10: float | None  # measured against exact search; None for exact indexes
    rerank: int = 1  # candidates re-ranked exactly on the stored vectors per result asked for; 1: none
    note: str = ""  # set when the calibration could not reach its target: what it reached, what to do

    def to_attrs(self, prefix: str = "faiss") -> dict[str, Any]:
        """The root attributes: `faiss_*` for the image vectors' file, `patch_faiss_*` for the patch vectors'."""
        return {f"{prefix}_index": self.name, f"{prefix}_layer": self.layer, f"{prefix}_factory": self.factory,
                f"{prefix}_nprobe": -1 if self.nprobe is None else self.nprobe, f"{prefix}_count": self.count,
                f"{prefix}_recall_at_10": -1.0 if self.recall_at_10 is None else self.recall_at_10,
                f"{prefix}_rerank": self.rerank, f"{prefix}_note": self.note}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], prefix: str = "faiss") -> FaissRecord | None:
        if not attrs.get(f"{prefix}_index"):
            return None
        nprobe, recall = int(attrs.get(f"{prefix}_nprobe", -1)), float(attrs.get(f"{prefix}_recall_at_10", -1.0))
        return cls(str(attrs[f"{prefix}_index"]), str(attrs.get(f"{prefix}_layer", "")),
                   str(attrs.get(f"{prefix}_factory", "")), nprobe if nprobe >= 0 else None,
                   int(attrs.get(f"{prefix}_count", 0)), recall if recall >= 0 else None,
                   int(attrs.get(f"{prefix}_rerank", 1)), str(attrs.get(f"{prefix}_note", "")))

    def describe(self, path: Path) -> dict[str, Any]:
        """JSON-ready, for `actindex info`; `path` is the file it names, which may be missing."""
        return {"index": self.name, "layer": self.layer, "factory": self.factory,
                "nprobe": -1 if self.nprobe is None else self.nprobe, "count": self.count,
                "recall_at_10": -1.0 if self.recall_at_10 is None else self.recall_at_10,
                "rerank": self.rerank, "note": self.note, "present": path.is_file()}


@dataclass(frozen=True)
class BuildRecord:
    """How and when the index was built (informational attributes)."""

    created: str
    seconds: float
    images_per_second: float
    device: str
    world_size: int
    actindex_version: str
    torch_version: str
    jpeg_backend: str = ""  # the library behind --decoder turbo/gpu ("" for pil)


@dataclass(frozen=True)
class IndexInfo:
    """An index's root attributes, typed: what it was built from and with (docs/FORMAT.md names each)."""

    path: Path  # the HDF5 file
    format_version: int
    model: str  # model spec as given
    weights: str  # torchvision enum, 'timm:NAME', absolute path of a state-dict file, or "" (random init)
    weights_sha256: str  # of a weights file, else ""
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    k: int
    data_root: Path
    num_images: int
    num_skipped: int
    layers: tuple[str, ...]  # indexed layers, in build order
    embed_layer: str  # "" when no vectors were stored
    categories: tuple[str, ...]  # class names of the weights, may be empty
    build: BuildRecord
    faiss: FaissRecord | None  # None: no FAISS file was built
    decoder: Decoder = Decoder.PIL  # how its images were decoded; files from before the option: pil
    precision: Precision = Precision.FP32  # what the network computed in; files from before the option: fp32
    memory_format: str = "contiguous"  # "channels_last" or "contiguous" (informational: changes only rounding)
    bottom_k: int = 0  # images kept per unit with the lowest scores (--bottom-k); 0: none, as in older files
    patch_layer: str = ""  # the layer whose every position's vector is stored (--patch-layer); "": none
    patch_faiss: FaissRecord | None = None  # the FAISS file over the patch vectors; None: none was built

    @property
    def faiss_path(self) -> Path | None:
        return self.path.parent / self.faiss.name if self.faiss is not None else None

    @property
    def patch_faiss_path(self) -> Path | None:
        return self.path.parent / self.patch_faiss.name if self.patch_faiss is not None else None

    @classmethod
    def from_attrs(cls, path: Path, attrs: dict[str, Any]) -> IndexInfo:
        """The one place that reads root attributes by name; informational ones may be absent in old files."""
        faiss = FaissRecord.from_attrs(attrs)
        build = BuildRecord(str(attrs.get("created", "")), float(attrs.get("seconds", 0.0)),
                            float(attrs.get("images_per_second", 0.0)), str(attrs.get("device", "")),
                            int(attrs.get("world_size", 1)), str(attrs.get("actindex_version", "")),
                            str(attrs.get("torch_version", "")), str(attrs.get("jpeg_backend", "")))
        mean, std = (tuple(float(v) for v in attrs[key]) for key in ("mean", "std"))
        return cls(path=path, format_version=int(attrs["format_version"]), model=str(attrs["model"]),
                   weights=str(attrs.get("weights", "")), weights_sha256=str(attrs.get("weights_sha256", "")),
                   input_size=int(attrs["input_size"]), mean=mean, std=std,  # type: ignore[arg-type]
                   k=int(attrs["k"]), data_root=Path(str(attrs["data_root"])), num_images=int(attrs["num_images"]),
                   num_skipped=int(attrs.get("num_skipped", 0)),
                   layers=tuple(json.loads(attrs.get("layers", "[]"))), embed_layer=str(attrs.get("embed_layer", "")),
                   categories=tuple(json.loads(attrs.get("categories", "[]"))), build=build, faiss=faiss,
                   decoder=_known(Decoder, attrs.get("decoder", "pil"), path),
                   precision=_known(Precision, attrs.get("precision", "fp32"), path),
                   memory_format=str(attrs.get("memory_format", "contiguous")),
                   bottom_k=int(attrs.get("bottom_k", 0)), patch_layer=str(attrs.get("patch_layer", "")),
                   patch_faiss=FaissRecord.from_attrs(attrs, PATCH_PREFIX))


def _known(kind: Any, value: Any, path: Path) -> Any:
    """An enum member from its stored value; a value this version does not know is a newer writer's."""
    try:
        return kind(str(value))
    except ValueError:
        raise UserError(f"'{path}' was built with {kind.__name__.lower()} '{value}', which this version of actindex "
                        "does not know; upgrade actindex to read it") from None


class IndexWriter:
    """Writes one index file; the caller owns the h5py.File lifetime via `open`."""

    def __init__(self, h5: h5py.File) -> None:
        self.h5 = h5

    def write_attrs(self, attrs: dict[str, Any]) -> None:
        self.h5.attrs["format"] = FORMAT_NAME
        self.h5.attrs["format_version"] = FORMAT_VERSION
        for key, value in attrs.items():
            self.h5.attrs[key] = value

    def write_images(self, paths: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> None:
        group = self.h5.create_group("images")
        group.create_dataset("path", data=np.array(paths, dtype=object), dtype=_STR)
        group.create_dataset("label", data=np.asarray(labels, dtype=np.int32).reshape(len(labels)))
        group.attrs["classes"] = json.dumps(list(classes))

    def write_skipped(self, skipped: Sequence[tuple[str, str]]) -> None:
        group = self.h5.create_group("skipped")
        group.create_dataset("path", data=np.array([p for p, _ in skipped], dtype=object), dtype=_STR)
        group.create_dataset("reason", data=np.array([r for _, r in skipped], dtype=object), dtype=_STR)

    def create_embeddings(self, name: str, rows: int, dim: int) -> h5py.Dataset:
        """An (N, D) little-endian float32 dataset, stored contiguously so that a query can read any row at its
        offset in the file (`similarity.StoredVectors`). The writer writes every row (NaN for unreadable images):
        nothing is filled in first, which would write the whole matrix twice."""
        return self.h5.create_dataset(f"embeddings/{name}", shape=(rows, dim), dtype="<f4", fillvalue=np.nan,
                                      fill_time="never")

    def create_patches(self, grid: LayerGrid, images: int) -> h5py.Dataset:
        """The (N * H * W, C) little-endian float16 patch vectors, contiguous like the embeddings (read by row at
        its offset), with the grid's shape and receptive field as attributes."""
        dataset = self.h5.create_dataset(f"patches/{grid.layer}", shape=(images * grid.positions, grid.channels),
                                         dtype="<f2", fillvalue=np.nan, fill_time="never")
        for key, value in grid.to_attrs().items():
            dataset.attrs[key] = value
        return dataset

    def write_mean(self, name: str, mean: np.ndarray) -> None:
        self.h5.create_dataset(f"layers/{name}/mean", data=np.asarray(mean, dtype=np.float64))

    def write_histogram(self, name: str, counts: np.ndarray) -> None:
        """(C, BINS) int64 score histograms, with the bin layout's parameters; compressed (most bins are empty)."""
        from actindex.kernels import histogram

        rows = max(1, min(counts.shape[0], (1 << 20) // (8 * counts.shape[1])))  # chunks of about 1 MB
        dataset = self.h5.create_dataset(f"layers/{name}/hist", data=np.asarray(counts, dtype=np.int64),
                                         chunks=(rows, counts.shape[1]), compression="gzip", compression_opts=1,
                                         shuffle=True)
        dataset.attrs.update(min_exponent=histogram.MIN_EXPONENT, max_exponent=histogram.MAX_EXPONENT,
                             sub_bins=histogram.SUB_BINS)

    def write_class_means(self, name: str, means: np.ndarray) -> None:
        """(K, C) float64 mean score of each unit over the images of each class of /images."""
        self.h5.create_dataset(f"layers/{name}/class_mean", data=np.asarray(means, dtype=np.float64))

    def write_layer(self, hits: LayerHits, lowest: bool = False) -> None:
        """The layer's group, its attributes and its top-k table; with `lowest`, its lowest-k table in the
        subgroup `bottom` (after the top-k's), in the same layout."""
        if lowest:
            group = self.h5.create_group(f"layers/{hits.grid.layer}/bottom")
        else:
            group = self.h5.create_group(f"layers/{hits.grid.layer}")
            group.attrs.update(hits.grid.to_attrs())
        group.create_dataset("value", data=hits.value.astype(np.float32))
        group.create_dataset("image", data=hits.image.astype(np.int64))
        group.create_dataset("y", data=hits.y.astype(np.int32))
        group.create_dataset("x", data=hits.x.astype(np.int32))
        group.create_dataset("box", data=hits.box.astype(np.int32))


class IndexReader:
    """Read access to an index file; refuses files that are not actindex indexes or of unknown versions."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            inside = sorted(p.name for p in self.path.glob("*.h5"))
            hint = f" (it holds {', '.join(inside[:5])})" if inside else ""
            raise UserError(f"'{self.path}' is a folder, not an index; give the .h5 file 'actindex build' wrote"
                            f"{hint}")
        if not self.path.is_file():
            raise UserError(f"index '{self.path}' does not exist")
        try:
            self.h5 = h5py.File(self.path, "r")
        except OSError as error:
            raise UserError(f"'{self.path}' is not an HDF5 file ({error}); give an index made by "
                            "'actindex build'") from error
        fmt = self.h5.attrs.get("format")
        version = self.h5.attrs.get("format_version")
        if fmt != FORMAT_NAME:
            self.h5.close()
            raise UserError(f"'{self.path}' is an HDF5 file but not an actindex index (format attribute "
                            f"{fmt!r}); give an index made by 'actindex build'")
        if version != FORMAT_VERSION:
            self.h5.close()
            raise UserError(f"'{self.path}' has actindex format version {version}, this actindex reads version "
                            f"{FORMAT_VERSION}; rebuild the index or use a matching actindex release")

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.h5.close()

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes as stored, by name; `info` is the typed view every query uses."""
        return {key: _plain(value) for key, value in self.h5.attrs.items()}

    @property
    def info(self) -> IndexInfo:
        return IndexInfo.from_attrs(self.path, self.attrs)

    @property
    def config(self) -> dict[str, Any]:
        """The whole build configuration, as recorded (JSON of `BuildConfig`)."""
        return json.loads(self.h5.attrs["config"])

    @property
    def layer_names(self) -> list[str]:
        return list(json.loads(self.h5.attrs["layers"]))

    @property
    def embedding_names(self) -> list[str]:
        return list(self.h5["embeddings"].keys()) if "embeddings" in self.h5 else []

    def image_paths(self) -> list[str]:
        """Every image path, in id order: N strings (a query reads the few it needs with `paths_of`)."""
        return list(self.h5["images/path"].asstr()[()])

    def paths_of(self, ids: Sequence[int]) -> list[str]:
        """The paths of images `ids` (any order, repeats allowed), read by id: the cost does not grow with N."""
        return [str(path) for path in self._by_id("images/path", ids, text=True)]

    def labels_of(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids),) int32 class labels of images `ids`, read by id."""
        return np.asarray(self._by_id("images/label", ids), dtype=np.int32)

    @property
    def num_images(self) -> int:
        return int(self.h5["images/path"].shape[0])

    def _by_id(self, name: str, ids: Sequence[int], text: bool = False) -> np.ndarray:
        wanted = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(wanted) == 0:
            return np.zeros(0, dtype=object if text else np.int32)
        if wanted.min() < 0 or wanted.max() >= self.num_images:
            raise UserError(f"image id out of range: '{self.path}' has images 0-{self.num_images - 1}")
        unique, inverse = np.unique(wanted, return_inverse=True)  # h5py reads increasing ids only
        dataset = self.h5[name].asstr() if text else self.h5[name]
        return np.asarray(dataset[unique], dtype=object if text else None)[inverse]

    def image_labels(self) -> np.ndarray:
        return self.h5["images/label"][()]

    def classes(self) -> list[str]:
        return list(json.loads(self.h5["images"].attrs["classes"]))

    def skipped(self, limit: int | None = None) -> list[tuple[str, str]]:
        """The files that could not be read, and why: all of them, or the first `limit`."""
        group = self.h5["skipped"]
        rows = slice(None, limit)
        return list(zip(group["path"].asstr()[rows], group["reason"].asstr()[rows], strict=True))

    @property
    def num_skipped(self) -> int:
        return int(self.h5["skipped/path"].shape[0])

    def layer(self, name: str, lowest: bool = False) -> LayerHits:
        """Layer `name`'s top-k table; with `lowest`, its lowest-k table (ascending), which only indexes built with
        --bottom-k have."""
        from actindex.kernels.errors import not_found

        if name not in self.layer_names:
            raise not_found("layer", name, self.layer_names, hint=f"these are the layers in '{self.path}'")
        group = self.h5[f"layers/{name}"]
        if lowest and "bottom" not in group:
            raise UserError(f"'{self.path}' keeps no lowest responses (it was built without --bottom-k); rebuild it "
                            "with --bottom-k K to keep each unit's K lowest-scoring images")
        table = group["bottom"] if lowest else group
        return LayerHits(grid=LayerGrid.from_attrs(name, group.attrs), value=table["value"][()],
                         image=table["image"][()], y=table["y"][()], x=table["x"][()], box=table["box"][()])

    def layer_mean(self, name: str) -> np.ndarray | None:
        """(C,) each unit's mean score over the readable images; None for indexes that do not record it."""
        key = f"layers/{name}/mean"
        return self.h5[key][()] if key in self.h5 else None

    def _histograms(self, name: str) -> h5py.Dataset | None:
        """Layer `name`'s (C, BINS) score histograms; None for indexes from before them."""
        key = f"layers/{name}/hist"
        if key not in self.h5:
            return None
        from actindex.kernels import histogram

        dataset = self.h5[key]
        layout = (int(dataset.attrs["min_exponent"]), int(dataset.attrs["max_exponent"]),
                  int(dataset.attrs["sub_bins"]))
        if layout != (histogram.MIN_EXPONENT, histogram.MAX_EXPONENT, histogram.SUB_BINS):
            raise UserError(f"'{self.path}' stores score histograms with bins {layout}, which this version of "
                            "actindex does not read; upgrade actindex")
        return dataset

    def distribution(self, name: str, unit: int) -> UnitDistribution | None:
        """Unit `unit`'s score distribution over the readable images; None for indexes from before it."""
        histograms = self._histograms(name)
        if histograms is None:
            return None
        best = self.h5[f"layers/{name}/value"][unit:unit + 1, 0]
        return LayerProfile.from_tables(histograms[unit:unit + 1], best, None).distribution(0)

    @functools.cached_property
    def _class_names_and_sizes(self) -> tuple[list[str], np.ndarray]:
        """The classes' display names and their images (read once: the labels of all images)."""
        names = class_names(self.classes(), self.info.categories)
        labels = self.image_labels()
        return names, np.bincount(labels[labels >= 0], minlength=len(names))

    def layer_profile(self, name: str) -> LayerProfile:
        """Distribution and class selectivity of every unit of layer `name` (one read of its tables)."""
        histograms = self._histograms(name)
        key = f"layers/{name}/class_mean"
        return LayerProfile.from_tables(None if histograms is None else histograms[()],
                                        self.h5[f"layers/{name}/value"][:, 0],
                                        self.h5[key][()] if key in self.h5 else None)

    def unit_classes(self, name: str, unit: int, top: int = 5) -> UnitClasses | None:
        """Which classes unit `unit` fires for: its `top` classes by mean score and its selectivity; None for
        indexes without classes (or from before the class means)."""
        key = f"layers/{name}/class_mean"
        if key not in self.h5:
            return None
        import torch

        from actindex.kernels.class_sums import selectivity

        means = self.h5[key][:, unit]  # (K,)
        names, images = self._class_names_and_sizes
        order = [int(i) for i in np.argsort(-np.nan_to_num(means, nan=-np.inf), kind="stable")[:top]]
        index = float(selectivity(torch.from_numpy(means).unsqueeze(1))[0])
        return UnitClasses(index, tuple((names[i], float(means[i]), int(images[i])) for i in order))

    def embeddings(self, name: str) -> h5py.Dataset:
        """The (N, D) dataset itself, so callers can read it in blocks."""
        if name not in self.embedding_names:
            from actindex.kernels.errors import not_found

            raise not_found("embedding layer", name, self.embedding_names)
        return self.h5[f"embeddings/{name}"]

    @property
    def patch_names(self) -> list[str]:
        return list(self.h5["patches"].keys()) if "patches" in self.h5 else []

    def patch_grid(self, name: str) -> LayerGrid:
        """The grid of layer `name`'s stored patch vectors; a one-line error when the index has none."""
        if name not in self.patch_names:
            if not self.patch_names:
                raise UserError(f"'{self.path}' stores no patch vectors, so it cannot be searched by patch: build "
                                "it again with --patch-layer LAYER (for example the last indexed layer)")
            from actindex.kernels.errors import not_found

            raise not_found("patch layer", name, self.patch_names, hint=f"'{self.path}' stores patches of these")
        return LayerGrid.from_attrs(name, self.h5[f"patches/{name}"].attrs)

    def patches(self, name: str) -> h5py.Dataset:
        """The (N * H * W, C) float16 dataset itself (`patch_grid` gives its row numbers)."""
        self.patch_grid(name)
        return self.h5[f"patches/{name}"]

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary, used by `actindex info`."""
        info = self.info
        layers = []
        for name in self.layer_names:
            a = self.h5[f"layers/{name}"].attrs
            value = self.h5[f"layers/{name}/value"]
            layers.append({"name": name, "channels": int(a["channels"]), "height": int(a["height"]),
                           "width": int(a["width"]), "rf_size": list(_stored_yx(a["rf_size"])),
                           "rf_stride": list(_stored_yx(a["rf_stride"])),
                           "rf_padding": list(_stored_yx(a["rf_padding"])),
                           "k": int(value.shape[1])})
        summary: dict[str, Any] = {
            "format": FORMAT_NAME, "format_version": info.format_version, "model": info.model,
            "weights": info.weights, "input_size": info.input_size, "mean": list(info.mean), "std": list(info.std),
            "k": info.k, "bottom_k": info.bottom_k, "data_root": str(info.data_root), "num_images": info.num_images,
            "num_skipped": info.num_skipped, "path": str(self.path), "layers": layers,
            "decoder": info.decoder.value, "precision": info.precision.value, "memory_format": info.memory_format,
            "embeddings": {name: list(self.h5[f"embeddings/{name}"].shape) for name in self.embedding_names},
            "patches": {name: list(self.h5[f"patches/{name}"].shape) for name in self.patch_names},
            "faiss": {}, "patch_faiss": {}, "build": dataclasses.asdict(info.build)}
        # Each names its file, which may have been deleted, or not copied with the index.
        if info.faiss is not None and info.faiss_path is not None:
            summary["faiss"] = info.faiss.describe(info.faiss_path)
        if info.patch_faiss is not None and info.patch_faiss_path is not None:
            summary["patch_faiss"] = info.patch_faiss.describe(info.patch_faiss_path)
        return summary


def _stored_yx(value: Any) -> tuple[int, int]:
    y, x = (int(v) for v in np.asarray(value).reshape(2))
    return y, x


def _plain(value: Any) -> Any:
    """HDF5 attribute -> JSON-ready Python value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value
