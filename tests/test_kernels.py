"""The Triton kernels: each equals its reference (``tests/kernel_cases.py``, run in a process where Triton
interprets), and each compiles for a CUDA GPU with Triton's own compiler (no GPU needed: the wheel ships ptxas)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from interpreted import run_interpreted


def test_triton_kernels_equal_their_references():
    run_interpreted(str(Path(__file__).with_name("kernel_cases.py")))


def _row_kernels():
    from wtacrs.kernels import rows_triton as r

    rows = dict(n="i32", d="i32", stride_n="i32", stride_d="i32")
    return [
        (r._row_norms_kernel, dict(x="*bf16", out="*fp32", scores="*fp32", ids="*i64", **rows),
         [dict(SCORED=False, BLOCK_M=16, BLOCK_D=256), dict(SCORED=True, BLOCK_M=16, BLOCK_D=256)]),
        (r._gather_scale_rows_kernel, dict(g="*bf16", indices="*i64", scales="*fp32", out="*bf16", k="i32", d="i32",
                                          stride_n="i32", stride_d="i32"), [dict(BLOCK_M=16, BLOCK_D=256)]),
        (r._token_sums_kernel, dict(norms="*fp32", ids="*i64", out="*fp32", n="i32"), [dict(BLOCK=1024)]),
    ]


def _bit_kernels():
    from wtacrs.kernels import bits_triton as b

    masked = dict(grad="*fp16", packed="*u8", out="*fp16", n="i32")
    return [
        (b._pack_kernel, dict(src="*i1", out="*u8", n="i32", n_bytes="i32"),
         [dict(TEST=0, BLOCK=1024), dict(TEST=1, BLOCK=1024)]),
        (b._unpack_kernel, dict(packed="*u8", out="*i1", n="i32"), [dict(BLOCK=4096)]),
        (b._masked_grad_kernel, dict(**masked, scale="fp32"), [dict(MODE=0, BLOCK=4096), dict(MODE=1, BLOCK=4096)]),
        (b._masked_grad_kernel, dict(grad="*bf16", packed="*u8", out="*bf16", n="i32", scale="*bf16"),
         [dict(MODE=2, BLOCK=4096)]),
        (b._masked_rows_kernel, dict(rows="*bf16", indices="*i64", packed="*u8", value="*bf16", out="*bf16", k="i32",
                                     d="i32"), [dict(HAS_INDICES=True, BLOCK_M=16, BLOCK_D=256)]),
    ]


def _draw_and_stats_kernels():
    from wtacrs.kernels import draws_triton as d, stats_triton as s

    return [
        (d._rest_kernel, dict(p="*fp32", safe="*fp32", top_p="*fp32", top_idx="*i64", rest_p="*fp32", stats="*fp32",
                              counter="*fp32", n="i32", k="i32"),
         [dict(HAS_COUNTER=False, BLOCK=1024), dict(HAS_COUNTER=True, BLOCK=1024)]),
        (d._slots_kernel, dict(safe="*fp32", top_idx="*i64", drawn="*i64", stats="*fp32", indices="*i64",
                               scales="*fp32", x="*bf16", rows="*bf16", n="i32", k="i32", d="i32", stride_n="i32",
                               stride_d="i32"),
         [dict(GATHER=False, BLOCK_K=16, BLOCK_D=256), dict(GATHER=True, BLOCK_K=16, BLOCK_D=256)]),
        (s._fold_kernel, dict(table="*fp32", grad="*fp32", new_table="*fp32", scores="*fp32", v="i32", decay="fp32",
                              floor="fp32"), [dict(BLOCK=1024)]),
    ]


@pytest.mark.parametrize("kernels", [_row_kernels, _bit_kernels, _draw_and_stats_kernels],
                         ids=["rows", "bits", "draws-and-stats"])
def test_triton_kernels_compile_for_cuda(kernels):
    """Every kernel and constexpr branch compiles to a cubin for an H100/H200 (sm_90); the interpreter, which the
    equality tests use, does not type-check as the compiler does."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, signature, constexpr_sets in kernels():
        for constexprs in constexpr_sets:
            source = ASTSource(fn=fn, signature={**signature, **dict.fromkeys(constexprs, "constexpr")},
                               constexprs=constexprs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Triton's notice about its default floating-point fusion
                compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            assert compiled.asm["cubin"], (fn.__name__, constexprs)
