"""actindex.query: what an index says about a unit, an image or the whole network.

`Index` (an index opened once for many queries), `query_neuron` (a unit's top patches, checked, with their
attribution maps, activation maps and optionally Adebayo's sanity check), `unit_summary` (a unit's firing
rate, quantiles and classes from the index alone), `find_similar` (nearest images by activation, and why),
`dream.dream` (an input that excites a unit), the filter pictures, and `build_atlas` (a static website of the
index). The `actindex` command is `query.cli`.
"""

from typing import TYPE_CHECKING

from actindex.kernels.lazy import exports

if TYPE_CHECKING:
    from .atlas import AtlasConfig as AtlasConfig
    from .atlas import build_atlas as build_atlas
    from .dream import DreamConfig as DreamConfig
    from .index import Index as Index
    from .neuron import query_neuron as query_neuron
    from .similar import find_similar as find_similar
    from .unit import unit_summary as unit_summary

_NAMES = {"AtlasConfig": "atlas", "build_atlas": "atlas", "DreamConfig": "dream", "Index": "index",
          "query_neuron": "neuron", "find_similar": "similar", "unit_summary": "unit"}
__all__ = sorted(_NAMES)
__getattr__ = exports(__name__, _NAMES)
