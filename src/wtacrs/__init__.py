"""wtacrs: fine-tune transformers with less activation memory via unbiased Winner-Take-All Column-Row Sampling."""

from .layers import SampledLinear
from .ops import KeptRows, keep_rows, sampled_linear
from .sampling import METHODS, approx_matmul, num_kept_rows, sample_rows

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "KeptRows",
    "SampledLinear",
    "approx_matmul",
    "keep_rows",
    "num_kept_rows",
    "sample_rows",
    "sampled_linear",
]
