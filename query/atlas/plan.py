"""What an atlas holds and where each file goes: the selection of layers and units, the site's manifest, and
everything the pages need from the index, read once.

Site layout (all links relative, so the folder opens from disk and can be copied to any web server):
    index.html                       front page
    layers/<slug>.html               one per layer: a tile per unit
    units/<slug>/<unit>.html         one per unit with a page
    images/index.html, images/<id>.html   images that are some unit's hit, with their nearest images
    img/u/<slug>/<unit>/p<r>.<ext>   hit r's receptive-field patch (p0 is also the unit's tile)
    img/u/<slug>/<unit>/g<r>.<ext>   hit r's guided-backprop crop
    img/u/<slug>/<unit>/<method>-<r>.<ext>   hit r's crop of another attribution method (atlas --methods)
    img/u/<slug>/<unit>/a<r>.<ext>   the unit's activation map over hit r's whole image
    img/u/<slug>/<unit>/m<r>.<ext>   hit r's image where the map reaches the unit's p99 (indexes with histograms)
    img/u/<slug>/<unit>/dream.<ext>  the unit's dream (--dream)
    img/i/<id>.<ext>                 a whole image, small
    atlas.json                       the manifest: which index, which settings, which layers and units
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actindex.indexer.atomic import atomic_write
from actindex.indexer.index_file import IndexInfo, IndexReader, LayerHits, LayerProfile, UnitClasses
from actindex.kernels.errors import UserError, not_found

from ..attribution import DEFAULT, Method, Settings

MANIFEST = "atlas.json"
_PATH_BLOCK = 65536  # image paths hashed at a time: memory stays bounded whatever the number of images
MANIFEST_FORMAT = "actindex-atlas"
MANIFEST_VERSION = 1
FORMATS = ("webp", "png")
# What a run may leave in the site folder; --overwrite removes these and nothing else.
OWN = ("index.html", "atlas.css", "atlas.js", MANIFEST, "layers", "units", "images", "img")


def slug(name: str) -> str:
    """A layer name as a file name: dots and dashes stay, anything else outside [A-Za-z0-9_] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def parse_units(spec: str | None, layers: dict[str, int]) -> dict[str, set[int]]:
    """'0-15,40,classifier:967,blocks.2:3-5' -> units per layer. Plain entries apply to every layer in
    `layers` (name -> channel count); 'LAYER:...' entries to that layer only. None or '' -> no units."""
    chosen: dict[str, set[int]] = {name: set() for name in layers}
    for entry in (spec or "").split(","):
        entry = entry.strip()
        if not entry:
            continue
        layer, _, numbers = entry.rpartition(":")
        targets = [layer] if layer else list(layers)
        if layer and layer not in layers:
            raise not_found("layer", layer, layers, hint=f"in --units '{entry}'; these are the atlas's layers")
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", numbers)
        if not match:
            raise UserError(f"--units entry '{entry}' is not N, A-B, LAYER:N or LAYER:A-B")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise UserError(f"--units range '{numbers}' is empty; write the lower number first")
        for name in targets:
            if last >= layers[name]:
                raise UserError(f"--units '{entry}': layer '{name}' has units 0-{layers[name] - 1}")
            chosen[name].update(range(first, last + 1))
    return chosen


def index_identity(reader: IndexReader) -> str:
    """sha256 of what the site shows from the index: its attributes, image list and every top-k table."""
    digest = hashlib.sha256()
    attrs = {key: value for key, value in reader.attrs.items() if not key.startswith("faiss_")}
    digest.update(json.dumps(attrs, sort_keys=True, default=str).encode())
    paths = reader.h5["images/path"].asstr()
    for start in range(0, reader.num_images, _PATH_BLOCK):  # the same bytes as all paths joined by newlines
        block = "\n".join(paths[start:start + _PATH_BLOCK])
        digest.update(("\n" + block if start else block).encode())
    for name in reader.layer_names:
        hits = reader.layer(name)
        for array in (hits.value, hits.image, hits.box):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass
class SiteManifest:
    """atlas.json: the index a site shows, how its images are encoded, and what it holds so far."""

    index: str
    identity: str
    image_format: str
    data_root: str = ""  # the full local paths the front page shortens (a site is often shared)
    weights: str = ""
    layers: list[str] = field(default_factory=list)
    units: dict[str, list[int]] = field(default_factory=dict)  # units with a page, per layer
    dreams: dict[str, list[int]] = field(default_factory=dict)  # units with a dream, per layer
    unguided: dict[str, dict[str, int]] = field(default_factory=dict)  # per layer, from the last run on it
    sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # original (height, width) of thumbnails
    methods: list[str] = field(default_factory=lambda: ["guided"])  # attribution maps on the unit pages
    cam_layer: str = ""  # grad-cam's layer, "" without grad-cam

    def to_json(self) -> dict[str, Any]:
        return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "index": self.index,
                "identity": self.identity, "image_format": self.image_format, "data_root": self.data_root,
                "weights": self.weights, "layers": self.layers,
                "units": self.units, "dreams": self.dreams, "unguided": self.unguided,
                "sizes": {str(k): list(v) for k, v in sorted(self.sizes.items())}, "methods": self.methods,
                "cam_layer": self.cam_layer}

    def write(self, site: Path) -> None:
        atomic_write(site / MANIFEST, (json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n").encode())

    @staticmethod
    def read(site: Path) -> SiteManifest | None:
        """The site's manifest, None for an empty or new folder; anything else is refused."""
        path = site / MANIFEST
        if site.exists() and not site.is_dir():
            raise UserError(f"--out '{site}' is a file; give a folder for the site")
        if not path.is_file():
            if site.is_dir() and any(site.iterdir()):
                raise UserError(f"'{site}' is not empty and holds no {MANIFEST}: it is not an actindex atlas; "
                                "give a new or empty folder")
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"'{path}' cannot be read ({error}); give a new folder, or delete the site") from error
        if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
            raise UserError(f"'{path}' is not an actindex atlas manifest of version {MANIFEST_VERSION} "
                            f"(format {data.get('format')!r}, version {data.get('version')!r}); give a new folder")
        return SiteManifest(index=data["index"], identity=data["identity"], image_format=data["image_format"],
                        data_root=str(data.get("data_root", "")), weights=str(data.get("weights", "")),
                        layers=list(data["layers"]), units={k: list(v) for k, v in data["units"].items()},
                        dreams={k: list(v) for k, v in data["dreams"].items()},
                        unguided={k: dict(v) for k, v in data["unguided"].items()},
                        sizes={int(k): (int(v[0]), int(v[1])) for k, v in data["sizes"].items()},
                        methods=list(data.get("methods", ["guided"])), cam_layer=str(data.get("cam_layer", "")))


@dataclass(frozen=True)
class Layer:
    """One layer as the atlas shows it: the index's top-k table, plus its file-name slug."""

    hits: LayerHits
    slug: str
    mean: np.ndarray | None  # (C,) mean score over the indexed images, when the index records it
    profile: LayerProfile  # each unit's distribution and class selectivity (NaN where not recorded)

    def level(self, unit: int) -> float | None:
        """The unit's p99 score, which its masks are drawn at; None without a histogram."""
        level = float(self.profile.p99[unit])
        return level if np.isfinite(level) else None

    @property
    def name(self) -> str:
        return self.hits.grid.layer


@dataclass(frozen=True)
class NearestUnits:
    """Each unit's nearest units over all the atlas's layers (by overlap of their top-k image sets). Global unit g
    is (layer[g], channel[g]); a layer's unit 0 is global unit first[layer]."""

    layer: list[str]
    channel: np.ndarray  # (U,) int64
    index: np.ndarray  # (U, n) global units, -1 where fewer share an image
    count: np.ndarray  # (U, n) images shared
    first: dict[str, int]


@dataclass(frozen=True)
class PatchLink:
    """One of an image page's strongest boxes, and the patches of other images most like it: a patch search
    (`similar --box`) made when the site is built."""

    y: int  # the position in the patch layer's map
    x: int
    box: tuple[int, int, int, int]  # its receptive field on the network input
    hits: tuple[tuple[int, float, tuple[int, int, int, int]], ...]  # (image id, score, box on its input), best first


@dataclass(frozen=True)
class Plan:
    """Everything a worker or a page needs, read from the index and the manifest once, complete; picklable."""

    index: Path
    site: Path
    image_format: str
    info: IndexInfo
    paths: dict[int, str]  # of the images the site shows (hits, neighbours), by id: never the whole list
    labels: dict[int, int]  # class index of the images with a page, -1 without classes
    classes: list[str]
    skipped: list[tuple[str, str]]  # the first SKIPPED_SHOWN files that could not be read
    skipped_count: int
    layers: dict[str, Layer]  # the atlas's layers, in index order
    pages: dict[str, list[int]]  # units with a page, per layer, sorted
    dreams: dict[str, set[int]]
    nearest: NearestUnits
    image_pages: list[int]  # ids with a page, sorted
    neighbours: dict[int, list[tuple[int, float]]] | None  # per image page; None: the index has no FAISS file
    similarity_layer: str  # the layer the neighbours are nearest by
    unit_classes: dict[str, dict[int, UnitClasses]] = field(default_factory=dict)  # of units with a page
    settings: Settings = DEFAULT  # the attribution methods the unit pages show
    patch_links: dict[int, list[PatchLink]] | None = None  # per image page; None: the index has no patch vectors
    patch_layer: str = ""  # the layer they are alike by

    @staticmethod
    def method_file(method: Method, rank: int) -> str:
        """The name of hit `rank`'s crop of `method`'s map ('g<r>' for guided backprop, as sites always had)."""
        return f"g{rank}" if method is Method.GUIDED else f"{method.value}-{rank}"

    @property
    def ext(self) -> str:
        return self.image_format

    def hit_count(self, layer: str, unit: int) -> int:
        return int((self.layers[layer].hits.image[unit] >= 0).sum())

    # Paths relative to the site root.
    def layer_url(self, layer: str) -> str:
        return f"layers/{self.layers[layer].slug}.html"

    def unit_url(self, layer: str, unit: int) -> str:
        return f"units/{self.layers[layer].slug}/{unit}.html"

    def image_url(self, image_id: int) -> str:
        return f"images/{image_id}.html"

    def unit_file(self, layer: str, unit: int, name: str) -> str:
        return f"img/u/{self.layers[layer].slug}/{unit}/{name}.{self.ext}"

    def image_file(self, image_id: int) -> str:
        return f"img/i/{image_id}.{self.ext}"

    def unit_files(self, layer: str, unit: int) -> list[str]:
        """The images a unit page shows, whose presence means the unit's work is done."""
        count = self.hit_count(layer, unit)
        names = [f"{kind}{r}" for kind in ("p", "a") for r in range(count)]
        names += [self.method_file(m, r) for m in self.settings.methods for r in range(count)]
        if self.layers[layer].level(unit) is not None:
            names += [f"m{r}" for r in range(count)]
        if unit in self.dreams.get(layer, set()):
            names.append("dream")
        return [self.unit_file(layer, unit, name) for name in names]

    def unit_done(self, layer: str, unit: int) -> bool:
        return all((self.site / name).is_file() for name in self.unit_files(layer, unit))
