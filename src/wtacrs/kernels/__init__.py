"""The few kernels of the training path, each as Triton and as a plain-PyTorch reference beside it.

Row kernels (``rows``): row norms, row weights with token scores, the gather-and-scale of kept gradient rows and the
per-token gradient norms; the WTA-CRS draw around ``torch.topk`` and ``torch.multinomial`` (``draws``); 1-bit masks
(``bits``); the token-statistics fold (``stats``). The Triton version runs where it can (a CUDA tensor, Triton
installed, eager mode; CPU tensors too under ``TRITON_INTERPRET=1``, Triton's interpreter); the reference runs
everywhere else, and under ``torch.compile``, where Inductor fuses the reference's ops itself. Both compute the same
values (up to the order of float sums); ``tests/kernel_cases.py`` checks each Triton kernel against its reference.
"""

from .bits import masked_grad, masked_rows, pack_bits, relu_with_mask, unpack_bits
from .draws import wta_crs_rest, wta_crs_slots
from .rows import gather_scale_rows, row_norms, row_weights, token_norm_sums
from .stats import fold_token_stats

__all__ = [
    "fold_token_stats", "gather_scale_rows", "masked_grad", "masked_rows", "pack_bits", "relu_with_mask", "row_norms", "row_weights", "token_norm_sums", "unpack_bits", "wta_crs_rest",
    "wta_crs_slots",
]
