"""actindex.indexer: build an index (one process or every rank of a torchrun job) and read it back.

`build_index(BuildConfig(...))` streams an image folder through a network and writes the HDF5 index with its
FAISS file (docs/FORMAT.md); `IndexReader` reads it, `IndexReader.info` describes it. `python -m
actindex.indexer build …` is the same build as a command, the entry point for torchrun.
"""

from typing import TYPE_CHECKING

from actindex.kernels.lazy import exports

if TYPE_CHECKING:
    from .accumulate import IndexAccumulator as IndexAccumulator
    from .build import BuildSummary as BuildSummary
    from .build import build_index as build_index
    from .choices import Decoder as Decoder
    from .choices import Precision as Precision
    from .index_file import IndexInfo as IndexInfo
    from .index_file import IndexReader as IndexReader
    from .index_file import LayerHits as LayerHits
    from .plan import BuildConfig as BuildConfig
    from .similarity import build_vector_index as build_vector_index
    from .similarity import search as search

_NAMES = {"IndexAccumulator": "accumulate", "BuildSummary": "build", "build_index": "build",
          "Decoder": "choices", "Precision": "choices",
          "IndexInfo": "index_file", "IndexReader": "index_file", "LayerHits": "index_file", "BuildConfig": "plan",
          "build_vector_index": "similarity", "search": "similarity"}
__all__ = sorted(_NAMES)
__getattr__ = exports(__name__, _NAMES)
