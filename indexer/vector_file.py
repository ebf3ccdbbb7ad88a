"""The FAISS file beside an index: where it lives, what the HDF5 file records about it, building and opening it.

`INDEX.h5` keeps its per-image vectors in `/embeddings/<layer>`; `INDEX.faiss`, in the same folder, indexes one
of them for cosine similarity (FAISS ids are image ids). The HDF5 root attributes name it by its path relative
to the HDF5 file's folder (`faiss_index`), with the layer, factory string, nprobe and measured recall, so that
the pair can be moved together and a stale or foreign FAISS file is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from actindex.kernels.errors import UserError

from .index_file import FaissRecord, IndexInfo, IndexReader
from .vectors import Progress, VectorIndexInfo, build_vector_index, read_vector_index, write_vector_index

NONE = "none"  # --faiss-factory none: no FAISS file


def vector_index_path(index: Path) -> Path:
    """INDEX.h5 -> INDEX.faiss beside it."""
    return index.with_name(index.stem + ".faiss")


def index_for(dataset: h5py.Dataset, index: Path, factory: str | None,
              progress: Progress | None = None) -> tuple[Any, dict[str, Any]]:
    """The FAISS index of `dataset`, in memory, and the attributes `index` records about its file. The caller
    writes it with `write_vector_index(…, vector_index_path(index))` before the HDF5 file takes its place, so
    that a complete index never names a missing FAISS file."""
    vectors, info = build_vector_index(dataset, factory, progress)
    return vectors, attributes(info, str(dataset.name).rsplit("/", 1)[-1], vector_index_path(index))


def attributes(info: VectorIndexInfo, layer: str, final: Path) -> dict[str, Any]:
    return FaissRecord(final.name, layer, info.factory, info.nprobe, info.count, info.recall_at_10).to_attrs()


def open_vector_index(info: IndexInfo, layer: str | None, dim: int) -> tuple[Any, str]:
    """The FAISS index of the index `info` describes, for `layer` (default: the one recorded), checked against
    its HDF5 file's vectors of `dim` dimensions. Returns it and the layer it indexes."""
    index, record, path = info.path, info.faiss, info.faiss_path
    if record is None or path is None:
        raise UserError(f"'{index}' has no FAISS index; build one with: actindex faiss {index}")
    if layer is not None and layer != record.layer:
        raise UserError(f"the FAISS index of '{index}' was built from layer '{record.layer}', not '{layer}'; "
                        f"rebuild it with: actindex faiss {index} --layer {layer}")
    if not path.is_file():
        raise UserError(f"the FAISS index '{path}' named by '{index}' is missing; rebuild it with: "
                        f"actindex faiss {index}")
    vectors = read_vector_index(path)
    if vectors.d != dim or vectors.ntotal != record.count:
        raise UserError(f"'{path}' does not belong to '{index}' ({vectors.ntotal} vectors of {vectors.d} "
                        f"dimensions, the index's '{record.layer}' has {dim}); rebuild it with: actindex faiss "
                        f"{index}")
    return vectors, record.layer


def require_vectors(reader: Any) -> None:
    """Raise a UserError that says how to get vectors when the index (an open `IndexReader`) stores none."""
    if not reader.embedding_names:
        raise UserError(f"'{reader.path}' stores no per-image vectors, so it cannot be searched by similarity: it "
                        "was built with --embed-layer ''. Build it again without that option (the vectors of the "
                        "last indexed layer are stored) or with --embed-layer LAYER")


def rebuild(index: Path, layer: str | None = None, factory: str | None = None,
            progress: Progress | None = None) -> tuple[Path, VectorIndexInfo, str]:
    """`actindex faiss`: (re)build the FAISS file of `index` from its stored vectors, without the network."""

    with IndexReader(index) as reader:
        require_vectors(reader)
        names = reader.embedding_names
        recorded = reader.info
        chosen = layer or (recorded.faiss.layer if recorded.faiss else "") or recorded.embed_layer or names[0]
        dataset = reader.embeddings(chosen)  # not_found lists the layers with vectors
        vectors, info = build_vector_index(dataset, factory, progress)
    final = vector_index_path(index)
    write_vector_index(vectors, final)
    with h5py.File(index, "r+") as h5:  # a few small attributes, rewritten in place
        for key, value in attributes(info, chosen, final).items():
            h5.attrs[key] = value
    return final, info, chosen
