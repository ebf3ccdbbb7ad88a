"""Which images does the network see as alike, and why? Nearest images by cosine similarity of their activation
vectors (the FAISS index beside the HDF5 file), and for each hit the pixels and units that make it similar.

A vector is the spatial mean of the embedding layer's output (the build's `/embeddings/<layer>`); similarity
is the cosine, q̂ · v̂. The explanation of a hit is guided backprop of that score, with the query's q̂ fixed, with
respect to the hit image's normalized input, and the units with the largest terms q̂_i · v̂_i (they sum to the
score).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actindex.indexer.index_file import IndexInfo
from actindex.indexer.similarity import normalize, require_vectors
from actindex.kernels.errors import UserError, not_found

if TYPE_CHECKING:  # torch and the network load only when a query needs them (a new image, --explain)
    import torch
    from torch import nn

    from .index import Index
    from .loading import LoadedImage

TOP_UNITS = 5


def embed(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """(B, D) spatial mean of `layer`'s output for the normalized batch `x` (differentiable if x requires grad)."""
    from actindex.indexer.taps import layer_value
    from actindex.kernels.spatial import spatial_mean

    return layer_value(model, layer, x, lambda out: spatial_mean(out) if out.ndim == 4 else out.float())


@dataclass(frozen=True)
class SimilarHit:
    rank: int
    image_id: int
    path: str
    score: float  # cosine similarity to the query
    units: list[tuple[int, float]] = field(default_factory=list)  # (unit, q̂_i·v̂_i), largest first, with --explain


@dataclass
class SimilarResult:
    index: Path
    layer: str
    query: dict[str, object]  # {"id": N, "path": …} or {"image": path}
    query_image: Any  # PIL image of the query at its own resolution; None unless pictures were asked for
    hits: list[SimilarHit]
    images: list[LoadedImage]  # the hits' images, as the build preprocessed them; [] unless pictures were asked for
    maps: np.ndarray | None = None  # (k, 3, S, S) guided backprop of each hit's score, with --explain
    unguided: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"index": str(self.index), "layer": self.layer, "query": self.query,
                "hits": [{"rank": h.rank, "image_id": h.image_id, "path": h.path, "score": h.score,
                          "units": [{"unit": u, "contribution": c} for u, c in h.units]} for h in self.hits],
                "unguided_activations": self.unguided}


def find_similar(index: Path, image: Path | None = None, image_id: int | None = None, k: int = 9,
                 layer: str | None = None, data: Path | None = None, weights: str | None = None,
                 device: str = "cpu", explain: bool = False, pictures: bool = True) -> SimilarResult:
    """The k images nearest to a new image (`image`) or an indexed one (`image_id`) in the index at `index`, best
    first; for many queries, open the index once (`actindex.query.index.Index`) and ask it."""
    from .index import Index

    with Index(index, data=data, weights=weights, device=device) as opened:
        return nearest(opened, image, image_id, k, layer, explain, pictures)


def nearest(opened: Index, image: Path | None = None, image_id: int | None = None, k: int = 9,
            layer: str | None = None, explain: bool = False, pictures: bool = True) -> SimilarResult:
    """`Index.similar`. What a query loads is what it needs: the query's stored vector and the FAISS file always,
    and the candidates' stored vectors to re-rank them; the network only to embed a new image or to explain the
    hits; the images only for `pictures` (the query's and the hits', for a picture) or `explain`."""
    if (image is None) == (image_id is None):
        raise UserError("give either --image PATH or --id N")
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    reader, info = opened.reader, opened.info
    require_vectors(reader)
    name = layer or (info.faiss.layer if info.faiss else "") or info.embed_layer
    if name not in reader.embedding_names:
        raise not_found("embedding layer", name, reader.embedding_names,
                        hint=f"'{opened.path}' stores vectors of these layers")
    similarity = opened.similarity(name)
    query: dict[str, object] = {}
    query_image = None
    if image_id is not None:
        if not 0 <= image_id < info.num_images:
            raise UserError(f"--id {image_id} is out of range: the index has images 0-{info.num_images - 1}")
        query_vector = reader.embeddings(name)[image_id][None, :].astype(np.float32)  # (1, D)
        path = opened.paths([image_id])[0]
        if not np.isfinite(query_vector).all():
            raise UserError(f"image {image_id} ('{path}') could not be read at build time and has no vector; "
                            "'actindex info' lists why")
        query = {"id": image_id, "path": path}
    else:
        assert image is not None
        loaded = read_query(image, info, opened.device)
        query_image = loaded.original
        with running(info, opened.device):
            query_vector = _embed_query(opened.loaded.module, name, normalized(loaded, info, opened.device))
        query = {"image": str(image)}
    scores, ids = similarity.search(query_vector, k)
    found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
    paths = opened.paths([i for i, _ in found])
    hits = [SimilarHit(rank, i, path, s) for rank, ((i, s), path) in enumerate(zip(found, paths, strict=True))]
    result = SimilarResult(opened.path, name, query, query_image, hits, [])
    if pictures or explain:
        result.images = opened.images([i for i, _ in found])
        if image_id is not None:
            result.query_image = opened.images([image_id])[0].original
    if explain and hits:
        with running(info, opened.device):
            _explain(result, opened.loaded.module, normalize(query_vector)[0], info, opened.device)
    return result


def running(info: IndexInfo, device: str) -> contextlib.AbstractContextManager[None]:
    """The index's precision around a forward pass (autocast for bf16 and fp16 indexes)."""
    import torch

    from .loading import query_numerics

    return query_numerics(info, device).running(torch.device(device))


def read_query(image: Path, info: IndexInfo, device: str) -> LoadedImage:
    """A new image, decoded and cropped as the build made its own network inputs."""
    from actindex.indexer.images import ImageReadError, crop_geometry, load_rgb

    from .loading import LoadedImage, index_pixels

    try:
        picture = load_rgb(image)
        pixels = index_pixels([image], [picture], info, device)[0]  # (3, S, S) uint8
    except (ImageReadError, OSError) as error:
        raise UserError(f"cannot read --image '{image}': {error}") from error
    return LoadedImage(str(image), pixels, crop_geometry(picture.width, picture.height, info.input_size), picture)


def normalized(images: LoadedImage | list[LoadedImage], info: IndexInfo, device: str) -> torch.Tensor:
    """The (B, 3, S, S) normalized network input of one image or several, on `device`."""
    import torch

    from actindex.indexer.images import Normalize

    batch = torch.stack([image.pixels for image in (images if isinstance(images, list) else [images])])
    return Normalize(info.mean, info.std, device)(batch)


def _embed_query(model: nn.Module, layer: str, x: torch.Tensor) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return embed(model, layer, x).cpu().numpy().astype(np.float32)  # (1, D)


def _explain(result: SimilarResult, model: nn.Module, query: np.ndarray, info: IndexInfo, device: str) -> None:
    """Guided backprop of q̂ · v̂(x) for every hit image x at once, and the units with the largest terms."""
    x = normalized(result.images, info, device)  # (k, 3, S, S)
    found = explain_cosines(model, x, query, lambda batch: embed(model, result.layer, batch))
    result.hits = [SimilarHit(hit.rank, hit.image_id, hit.path, hit.score, list(units))
                   for hit, units in zip(result.hits, found.units, strict=True)]
    result.maps, result.unguided = found.maps, found.unguided


@dataclass(frozen=True)
class Explanation:
    maps: np.ndarray  # (k, 3, S, S) guided backprop of each image's score with respect to its normalized input
    units: list[tuple[tuple[int, float], ...]]  # per image, the TOP_UNITS (unit, q̂_i·v̂_i), largest first
    unguided: dict[str, int]  # activations guided backprop could not guide, and how often they ran


def explain_cosines(model: nn.Module, x: torch.Tensor, query: np.ndarray,
                    vectors_of: Callable[[torch.Tensor], torch.Tensor]) -> Explanation:
    """Why each of the images `x` (k, 3, S, S) scores q̂ · v̂: guided backprop of its score with the query's unit
    vector q̂ fixed, all images in one pass (their scores do not interact), and the units with the largest terms
    q̂_i · v̂_i (they sum to the score). `vectors_of(x)` gives the (k, D) vectors v, differentiably."""
    import torch

    from actindex.kernels.freeze import frozen
    from actindex.kernels.guided import GuidedBackprop

    x = x.detach().requires_grad_(True)
    q = torch.as_tensor(query, dtype=torch.float32, device=x.device)  # (D,)
    with frozen(model):
        with GuidedBackprop() as mode:
            vectors = vectors_of(x)  # (k, D)
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        scores = unit @ q  # (k,)
        (maps,) = torch.autograd.grad(scores.sum(), x)
    terms = (unit.detach() * q).cpu().numpy()  # (k, D), each row sums to that image's score
    units = []
    for row in terms:
        top = np.argsort(-row, kind="stable")[:TOP_UNITS]
        units.append(tuple((int(u), float(row[u])) for u in top))
    return Explanation(maps.cpu().numpy(), units, dict(mode.unguided))
