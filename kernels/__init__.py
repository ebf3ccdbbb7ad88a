"""actindex.kernels: the pure tensor primitives the indexer and the queries share, with no I/O.

Running top-k with exact merges (`RunningTopK`), order-independent exact sums (`ExactSum`), exact per-unit
score histograms with quantiles (`UnitHistogram`), spatial max and
mean, receptive-field geometry of any model (`trace_geometry`), guided backprop that sees every ReLU
(`GuidedBackprop`), Gaussian blur, nearest units by top-k overlap, a frozen-model context, exact per-class sums
(`ClassSums`), activation maps at input resolution through receptive fields (`upsample_to_input`), the agreement
of two maps (`spearman`, `ssim`), and `UserError`, the error every layer raises for bad input.
"""

from typing import TYPE_CHECKING

from .lazy import exports

if TYPE_CHECKING:
    from .agreement import spearman as spearman
    from .agreement import ssim as ssim
    from .blur import gaussian_blur as gaussian_blur
    from .class_sums import ClassSums as ClassSums
    from .errors import UserError as UserError
    from .exact_sum import ExactSum as ExactSum
    from .freeze import frozen as frozen
    from .guided import GuidedBackprop as GuidedBackprop
    from .histogram import UnitHistogram as UnitHistogram
    from .overlap import nearest_by_overlap as nearest_by_overlap
    from .receptive_field import LayerGeometry as LayerGeometry
    from .receptive_field import trace_geometry as trace_geometry
    from .topk import RunningTopK as RunningTopK
    from .topk import TopKResult as TopKResult
    from .upsample import upsample_to_input as upsample_to_input

_NAMES = {"gaussian_blur": "blur", "UserError": "errors", "ExactSum": "exact_sum", "frozen": "freeze",
          "GuidedBackprop": "guided", "UnitHistogram": "histogram", "nearest_by_overlap": "overlap",
          "LayerGeometry": "receptive_field", "trace_geometry": "receptive_field", "RunningTopK": "topk",
          "TopKResult": "topk", "spearman": "agreement", "ssim": "agreement", "ClassSums": "class_sums",
          "upsample_to_input": "upsample"}
__all__ = sorted(_NAMES)
__getattr__ = exports(__name__, _NAMES)
