"""Mutation check: do the tests fail when the estimator is broken on purpose?

Each mutant is one small fault (a scale rescaled by 1.05, the winners dropped, the probability floor removed, the
weight gradient zeroed, ...) written as a text replacement in one module. For each, ``src/wtacrs`` is copied to a
temporary folder, the replacement applied there, and the mutant's test files run against the copy (``PYTHONPATH``
puts it first), each stopping at its first failure. A mutant is killed when a test fails; every mutant must be
killed by its own module's test file, and the 5% bias mutants also by the model-level tests. The output is a table
of which test killed which mutant.

    python scripts/mutants.py                  # every mutant: about 4 minutes on 2 cores; CI runs it (make mutants)
    python scripts/mutants.py --only winners-dropped draws-scale-x1.05
    python scripts/mutants.py --list

A pattern that no longer matches the source exactly once (the code moved on) is reported as "stale" and fails the
run, so the list is kept in step with the library.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Model-level cases for the bias mutants: the default probabilities with winners, full fine-tuning and LoRA.
MODEL_CASES = ("tests/test_models_unbiased.py::test_mean_of_sampled_gradients_is_the_exact_gradient[bert-full-tokens]",
               "tests/test_models_unbiased.py::test_mean_of_sampled_gradients_is_the_exact_gradient[llama-lora-tokens]")


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # under src/wtacrs
    old: str  # a regular expression that must match exactly once
    new: str  # its replacement (``re.sub`` syntax)
    own: tuple[str, ...]  # the module's own test files: one of them must kill the mutant
    also: tuple[str, ...] = field(default=())  # further tests expected to kill it (model level)


MUTANTS = [
    Mutant("draws-scale-x1.05", "kernels/draws.py", r"scales = \(mass / ", "scales = (1.05 * mass / ",
           ("tests/test_sampling.py",), ("tests/test_ops.py", *MODEL_CASES)),
    Mutant("winners-scale-x1.05", "kernels/draws.py", r"\.masked_fill\(is_winner, 1\.0\)",
           ".masked_fill(is_winner, 1.05)", ("tests/test_sampling.py",), ("tests/test_ops.py", *MODEL_CASES)),
    Mutant("winners-dropped", "kernels/draws.py", r"\.masked_fill\(is_winner, 1\.0\)",
           ".masked_fill(is_winner, 0.0)", ("tests/test_sampling.py",), ("tests/test_ops.py", *MODEL_CASES)),
    Mutant("no-winners", "kernels/draws.py", r"c = (torch\.argmin\(rest / draws_left, dim=-1, keepdim=True\))",
           r"c = torch.zeros_like(\1)", ("tests/test_sampling.py",), MODEL_CASES),
    # The Triton kernels (run on CPU by Triton's interpreter) are checked against the reference above.
    Mutant("triton-draws-scale-x1.05", "kernels/draws_triton.py", r"scale = tl\.math\.div_rn\(mass, ",
           "scale = 1.05 * tl.math.div_rn(mass, ", ("tests/test_kernels.py",)),
    Mutant("triton-winners-scale-x1.05", "kernels/draws_triton.py", r"tl\.where\(mass == mass, 1\.0, ",
           "tl.where(mass == mass, 1.05, ", ("tests/test_kernels.py",)),
    Mutant("crs-scale-x1.05", "sampling.py", r"scales = p\.sum\(-1, keepdim=True\) / ",
           "scales = 1.05 * p.sum(-1, keepdim=True) / ", ("tests/test_sampling.py",), ("tests/test_ops.py",)),
    Mutant("uniform-scale-x1.05", "sampling.py", r"torch\.full\(drawn\.shape, p\.shape\[-1\] / k",
           "torch.full(drawn.shape, 1.05 * p.shape[-1] / k", ("tests/test_sampling.py",), ("tests/test_ops.py",)),
    # Seen only in the scales themselves: a layer's gradient is all-NaN anyway, since at least one slot is a draw.
    Mutant("nan-scales-dropped", "kernels/draws.py", r"scales = torch\.where\(mass\.isnan\(\), math\.nan, scales\)",
           "pass", ("tests/test_sampling.py",)),
    Mutant("scales-not-applied", "ops.py", r"kernels\.gather_scale_rows\(grad_2d, indices, scales\)",
           "grad_2d.index_select(0, indices)", ("tests/test_ops.py",), MODEL_CASES),
    Mutant("gradient-zeroed", "ops.py", r"(grad_w = _as\(.*, weight\.dtype\))", r"\1 * 0",
           ("tests/test_ops.py",), ("tests/test_layers.py", "tests/test_learning.py", *MODEL_CASES)),
    Mutant("full-input-kept", "ops.py", r"    if k >= n:\n        return KeptRows\(",
           "    if True:\n        return KeptRows(", ("tests/test_ops.py",), ("tests/test_layers.py",)),
    Mutant("needs-input-grad-guard-removed", "ops.py", r"        if ctx\.needs_input_grad\[0\]:", "        if True:",
           ("tests/test_ops.py",)),
    Mutant("floor-removed-row-scores", "ops.py", r"torch\.maximum\(row_scores, row_scores\.mean\(\) \* floor\)",
           "row_scores", ("tests/test_ops.py",), ("tests/test_hf_integration.py",)),
    Mutant("floor-removed-token-stats", "kernels/stats.py", r"\.clamp_min\(mean \* floor\)", "",
           ("tests/test_gradstats.py",)),
    Mutant("token-stats-wrong-tokens", "kernels/rows.py", r"index_add_\(0, ids, per_row\)",
           "index_add_(0, ids.roll(1), per_row)", ("tests/test_gradstats.py",)),
    Mutant("nan-not-reported", "health.py", r"        if bad:\n", "        if False:\n",
           ("tests/test_health.py",), ("tests/test_layers.py",)),
    Mutant("shared-sample-for-another-input", "sampler.py", r"last is not None and last\[0\] is x and ",
           "last is not None and ", ("tests/test_hf_integration.py",)),
    Mutant("attention-operand-kept-whole", "attention.py",
           r"(a_saved = \(a3\.gather\(2, indices\.unsqueeze\(1\)\.expand\(-1, m, -1\)\)),\)",
           r"\1, a3.clone())", ("tests/test_attention.py",)),
]


def _env(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}


def check_copy_is_imported() -> None:
    """The tests must import the copy, not the installed package (else every mutant would survive unseen)."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "src" / "wtacrs", Path(tmp) / "wtacrs")
        where = subprocess.run([sys.executable, "-c", "import wtacrs; print(wtacrs.__file__)"], cwd=ROOT,
                               env=_env(Path(tmp)), capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(Path(tmp).resolve()):
            raise SystemExit(f"the tests would import wtacrs from {where}, not from the mutated copy")


def run_tests(copy: Path, tests: tuple[str, ...]) -> dict[str, str]:
    """Per test file (or node id): '' if it passed, else the first failing test."""
    env = _env(copy)
    results = {}
    for test in tests:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", "--no-header", test],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )
        if proc.returncode == 0:
            results[test] = ""
        else:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
            results[test] = failed[0] if failed else f"exit {proc.returncode}"
    return results


def _torch_version() -> str:
    return subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                          text=True).stdout.strip()


def short(test: str) -> str:
    return test.removeprefix("tests/").replace("test_mean_of_sampled_gradients_is_the_exact_gradient", "mean")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--out", type=Path, help="also write the table here (e.g. results/mutants.txt)")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.module}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        parser.error(f"unknown mutants {sorted(unknown)}; see --list")

    check_copy_is_imported()
    lines, ok = [], True
    started = time.monotonic()
    for mutant in chosen:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp)
            shutil.copytree(ROOT / "src" / "wtacrs", copy / "wtacrs")
            target = copy / "wtacrs" / mutant.module
            mutated, matches = re.subn(mutant.old, mutant.new, target.read_text())
            if matches != 1:
                lines.append(f"{mutant.name}: STALE (its pattern matches {matches} times in {mutant.module})")
                print(lines[-1], flush=True)
                ok = False
                continue
            target.write_text(mutated)
            results = run_tests(copy, mutant.own + mutant.also)
        own_killed = any(results[t] for t in mutant.own)
        also_survived = [t for t in mutant.also if not results[t]]
        verdict = "killed" if own_killed and not also_survived else "NOT KILLED"
        ok &= verdict == "killed"
        lines.append(f"{mutant.name} ({mutant.module}): {verdict} in {time.monotonic() - t0:.0f} s")
        for test, failure in results.items():
            where = "own" if test in mutant.own else "also"
            lines.append(f"    {where:4s} {short(test):60s} " + (f"killed by {short(failure)}" if failure else "SURVIVED"))
        print("\n".join(lines[-1 - len(results):]), flush=True)
    total = time.monotonic() - started
    lines.append(f"{sum('killed in' in l for l in lines)}/{len(chosen)} mutants killed as required; {total:.0f} s")
    print(lines[-1])
    if args.out:
        command = "python scripts/mutants.py" + (f" --only {' '.join(args.only)}" if args.only else "")
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        args.out.write_text(f"$ {command}\n# {when}, commit {commit}, {os.cpu_count()} CPU cores, "
                            f"torch {_torch_version()}\n" + "\n".join(lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
