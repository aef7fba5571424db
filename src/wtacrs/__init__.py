"""wtacrs: fine-tune transformers with less activation memory via unbiased Winner-Take-All Column-Row Sampling."""

from .gradcache import GradNormCache
from .health import NonFiniteInputError
from .layers import SampledConv1D, SampledLinear
from .ops import KeptRows, keep_rows, sampled_linear
from .patch import apply_wtacrs, describe, is_patched, remove_wtacrs
from .sampling import METHODS, approx_matmul, num_kept_rows, sample_rows

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "GradNormCache",
    "KeptRows",
    "NonFiniteInputError",
    "SampledConv1D",
    "SampledLinear",
    "apply_wtacrs",
    "approx_matmul",
    "describe",
    "is_patched",
    "keep_rows",
    "num_kept_rows",
    "remove_wtacrs",
    "sample_rows",
    "sampled_linear",
]
