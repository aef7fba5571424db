"""``wtacrs demo``: the weight gradient of one linear layer, exact vs sampled, on heavy-tailed token rows.

For each method it prints the rows and bytes the layer keeps for backward (measured with ``SavedTensors``),
the relative error of one step's ``grad_weight`` and the relative error of the mean over all trials (near 0
for the unbiased methods, not for top-k).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from ..memory import SavedTensors
from ..ops import sampled_linear
from ..sampling import METHODS, check_budget


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", type=int, default=1024, help="token rows N (batch x sequence); default 1024")
    parser.add_argument("--features", type=int, default=64, help="input and output features; default 64")
    parser.add_argument(
        "--budget", type=float, nargs="+", default=[0.3, 0.1], help="fractions of rows kept; default 0.3 0.1"
    )
    parser.add_argument("--trials", type=int, default=100, help="independent steps per method; default 100")
    parser.add_argument(
        "--tail", type=float, default=1.5, help="Pareto index of the row norms (smaller = heavier); default 1.5"
    )
    parser.add_argument("--seed", type=int, default=0)


def heavy_tailed_rows(n: int, d: int, tail: float, generator: torch.Generator) -> Tensor:
    """(n, d) rows with Gaussian directions and Pareto(``tail``) norms, like the outlier tokens of real layers."""
    directions = torch.randn(n, d, generator=generator)
    norms = (1.0 - torch.rand(n, 1, generator=generator)).pow(-1.0 / tail)
    return directions * norms


def _one_step(x: Tensor, weight: Tensor, grad_out: Tensor, budget: float, method: str, generator) -> tuple:
    weight.grad = None
    with SavedTensors(exclude=[weight]) as saved:
        y = sampled_linear(x, weight, None, budget, method, generator=generator)
    y.backward(grad_out)
    return weight.grad, saved.nbytes


def run(args: argparse.Namespace) -> int:
    for name in ("rows", "features", "trials"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if not args.tail > 0:
        raise ValueError(f"--tail (Pareto index) must be > 0; got {args.tail}")
    for budget in args.budget:
        check_budget(budget)
    gen = torch.Generator().manual_seed(args.seed)
    n, d = args.rows, args.features
    x = heavy_tailed_rows(n, d, args.tail, gen)
    # Gaussian output gradients: the rows differ by their activation norms, which is what the default
    # probabilities (p_i proportional to ||x_i||) can see at forward time.
    grad_out = torch.randn(n, d, generator=gen)
    weight = torch.nn.Parameter(torch.randn(d, d, generator=gen) / d**0.5)
    exact, exact_bytes = _one_step(x, weight, grad_out, 1.0, "wta_crs", gen)
    exact = exact.clone()

    print(f"grad_weight of a {d}x{d} linear layer, {n} heavy-tailed rows (Pareto index {args.tail}), "
          f"Gaussian output gradients, {args.trials} steps per method")
    header = f"{'budget':>6}  {'method':<8} {'bytes kept':>12} {'% of exact':>10} {'rel. error':>10} {'rel. error of mean':>18}"
    print(header)
    print("-" * len(header))
    print(f"{1.0:>6}  {'exact':<8} {exact_bytes:>12,} {100.0:>9.1f}% {0.0:>10.4f} {0.0:>18.4f}")
    for budget in args.budget:
        for method in METHODS:
            total = torch.zeros_like(exact)
            sq_err = 0.0
            nbytes = 0
            for _ in range(args.trials):
                grad, nbytes_step = _one_step(x, weight, grad_out, budget, method, gen)
                total += grad
                sq_err += float((grad - exact).square().sum())
                nbytes = max(nbytes, nbytes_step)
            norm = float(exact.square().sum())
            rel_err = (sq_err / args.trials / norm) ** 0.5
            rel_err_mean = float((total / args.trials - exact).norm()) / norm**0.5
            print(f"{budget:>6}  {method:<8} {nbytes:>12,} {100.0 * nbytes / exact_bytes:>9.1f}% "
                  f"{rel_err:>10.4f} {rel_err_mean:>18.4f}")
    print("rel. error = sqrt(E||G_hat - G||^2) / ||G||; bytes kept = what autograd saves for backward "
          "(kept rows, int64 indices, fp32 scales; the weight excluded)")
    return 0
