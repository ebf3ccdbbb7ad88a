"""An index opened once for many queries, from a notebook or a script: its description, its layers, its image
paths by id, and, loaded the first time a query needs them, its network and its similarity index.

    with Index("val.h5", device="cuda") as index:
        unit = index.neuron("layer4", 42)          # the unit's hits, checked, with their maps
        near = index.similar(image_id=7, k=9)       # the nearest images by cosine of their vectors
        eyes = index.patches(image_id=7, box=(40, 60, 90, 120))  # the nearest patches (--patch-layer)

A warm query costs its search and the network's own forward and backward passes on its hits; nothing of it
grows with the number of images in the index (paths are read by id, the embeddings matrix is never loaded).
The `actindex neuron` and `actindex similar` commands open one for a single query.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from actindex.indexer.index_file import IndexReader, LayerHits
from actindex.indexer.similarity import SimilarityIndex, open_vector_index

if TYPE_CHECKING:
    from actindex.indexer.models import LoadedModel

    from .attribution import Settings
    from .loading import LoadedImage
    from .neuron import NeuronResult
    from .patches import PatchResult
    from .similar import SimilarResult


class Index:
    """One index, opened once: `data` and `weights` point at images and a weights file that moved since the build;
    `device` is where the network runs."""

    def __init__(self, path: Path | str, *, data: Path | None = None, weights: str | None = None,
                 device: str = "cpu") -> None:
        self.path = Path(path)
        self.reader = IndexReader(self.path)
        self.info = self.reader.info
        self.data, self.weights, self.device = data, weights, device
        self._loaded: LoadedModel | None = None
        self._layers: dict[tuple[str, bool], LayerHits] = {}
        self._similarity: dict[tuple[str | None, bool], SimilarityIndex] = {}

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for similarity in self._similarity.values():
            similarity.close()
        self._similarity.clear()
        self.reader.close()

    @property
    def loaded(self) -> LoadedModel:
        """The index's network (its weights checked against the build's), loaded on first use."""
        if self._loaded is None:
            from .loading import load_index_model

            self._loaded = load_index_model(self.info, self.weights, self.device)
        return self._loaded

    def layer(self, name: str, lowest: bool = False) -> LayerHits:
        """Layer `name`'s top-k table, or with `lowest` its lowest-k table (indexes built with --bottom-k)."""
        if (name, lowest) not in self._layers:
            self._layers[name, lowest] = self.reader.layer(name, lowest=lowest)
        return self._layers[name, lowest]

    def paths(self, ids: Any) -> list[str]:
        return self.reader.paths_of(ids)

    def images(self, ids: Any) -> list[LoadedImage]:
        """Images `ids` decoded and cropped as the build did; a moved or changed file is a one-line error."""
        from .loading import data_root, load_index_images

        return load_index_images(data_root(self.info, self.data), self.paths(ids), self.info, self.data is not None,
                                 self.device)

    def similarity(self, layer: str | None = None, patches: bool = False) -> SimilarityIndex:
        """The similarity index of `layer` (default: the one built), opened on first use; with `patches`, the
        patch vectors' index."""
        if (layer, patches) not in self._similarity:
            self._similarity[layer, patches] = open_vector_index(self.reader, layer, patches)
        return self._similarity[layer, patches]

    def neuron(self, layer: str, unit: int, k: int | None = None, lowest: bool = False,
               settings: Settings | None = None, sanity: int = 0, seed: int = 0) -> NeuronResult:
        """`actindex neuron`: the unit's top (or `lowest`) hits, each re-run through the network and checked, with
        the maps of `settings` (`actindex.query.attribution.Settings`; default guided backprop and the gradient)
        and, with `sanity` steps, the cascading-randomization check."""
        from .attribution import DEFAULT
        from .neuron import unit_hits

        return unit_hits(self, layer, unit, k, lowest, settings or DEFAULT, sanity, seed)

    def similar(self, image: Path | None = None, image_id: int | None = None, k: int = 9, layer: str | None = None,
                explain: bool = False, pictures: bool = True) -> SimilarResult:
        """`actindex similar`: the k images nearest to a new image or an indexed one, best first."""
        from .similar import nearest

        return nearest(self, image, image_id, k, layer, explain, pictures)

    def patches(self, image: Path | None = None, image_id: int | None = None,
                box: tuple[float, float, float, float] | None = None, from_unit: str | None = None, k: int = 9,
                per_image: int = 2, layer: str | None = None, explain: bool = False) -> PatchResult:
        """`actindex similar --box`: the k patches nearest to `box` (y0, x0, y1, x1, original-image pixels) of a new
        image or an indexed one, or to unit hit `from_unit` ("LAYER:UNIT:RANK", rank 1 the best), at most
        `per_image` from one image; indexes built with --patch-layer."""
        from .patches import UnitHit, search_patches

        return search_patches(self, image, image_id, box, UnitHit.parse(from_unit) if from_unit else None, k,
                              per_image, layer, explain)
