"""A browsable static site of an index: `build_atlas(AtlasConfig(index, out))`, or `actindex atlas`."""

from .build import AtlasConfig, AtlasSummary, build_atlas

__all__ = ["AtlasConfig", "AtlasSummary", "build_atlas"]
