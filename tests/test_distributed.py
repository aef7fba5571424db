"""DDP and FSDP2 (``fully_shard``) with sampled layers: 2 CPU processes on the gloo backend.

One spawn runs every multi-process scenario (starting processes is the slow part) and writes each rank's
findings to a file; the tests below check them. Each rank feeds its own fixed batch; the gradient the engine
averages over ranks, averaged again over many steps, must match the exact gradient of the whole (global) batch.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import max_abs_z, z_threshold
from torch import nn
from torch.utils.checkpoint import checkpoint

import wtacrs
from wtacrs.app.demo import heavy_tailed_rows
from wtacrs.distributed import rank_seed, seed_ranks, unwrap
from wtacrs.memory import SavedTensors

WORLD = 2
DRAWS = 300  # steps averaged per engine
BATCH, SEQ, D_IN, CLASSES = 4, 16, 8, 4  # 64 rows per rank: 20 kept at budget 0.3


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, CLASSES))


def rank_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch per rank, heavy-tailed rows like real activations."""
    g = torch.Generator().manual_seed(100 + rank)
    x = heavy_tailed_rows(BATCH * SEQ, D_IN, 1.5, g).reshape(BATCH, SEQ, D_IN)
    return x, torch.randint(0, CLASSES, (BATCH, SEQ), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, CLASSES), y.reshape(-1))


def exact_global_gradient() -> dict[str, torch.Tensor]:
    """Plain PyTorch, one process, the batches of all ranks together (equal sizes: the mean of rank means)."""
    model = tiny_net()
    xs, ys = zip(*(rank_batch(r) for r in range(WORLD)))
    loss_of(model, torch.cat(xs), torch.cat(ys)).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with SavedTensors() as saved:  # parameters (FSDP2's gathered ones too) are nn.Parameter: left out
        loss = loss_of(model, x, y)
    del loss
    return saved.nbytes


def gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def gather_list(values: list) -> list[list]:
    """Lists of any length (how many distinct rows a rank kept varies)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return out


def flat_params(model: nn.Module, full) -> torch.Tensor:
    return torch.cat([full(p).detach().reshape(-1) for p in model.parameters()])


def train_draws(model: nn.Module, x, y, sharded: bool) -> torch.Tensor:
    """(DRAWS, #params) gradients: the engine's averaged gradient at the same weights, step after step.

    FSDP2 leaves each rank a dim-0 shard of every gradient; the shards are gathered once, after all steps.
    """
    rows = []
    for _ in range(DRAWS):
        model.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        rows.append([(p.grad.to_local() if sharded else p.grad).clone() for p in model.parameters()])
    per_param = [torch.stack(draws) for draws in zip(*rows)]  # (DRAWS, *shard shape)
    if sharded:
        per_param = [torch.cat(gather(t), dim=1) for t in per_param]
    return torch.cat([t.reshape(DRAWS, -1) for t in per_param], dim=1)


def sgd_steps(model: nn.Module, x, y, steps: int = 3) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        opt.step()


def fsdp_wrap(model: nn.Module, mesh, reshard: bool, **kwargs) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, **kwargs)
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard, **kwargs)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    # FSDP2 warns that Linear outputs of 3-D inputs are views (stock nn.Linear too); nothing here edits them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = run_scenarios(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_scenarios(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    res: dict = {}
    x, y = rank_batch(rank)

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    # Independent rows per rank: the same input, seeded alike vs by seed_ranks.
    same = heavy_tailed_rows(64, D_IN, 1.5, torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    res["same_seed_rows"] = gather_list(wtacrs.keep_rows(same, 0.3).indices.tolist())
    seed_ranks(0)
    res["rank_seed_rows"] = gather_list(wtacrs.keep_rows(same, 0.3).indices.tolist())

    # DDP: patched, then wrapped.
    stock = tiny_net()
    res["stock_bytes"] = saved_bytes(stock, x, y)
    single = wtacrs.apply_wtacrs(tiny_net(), budget=0.3, targets="all-linear")
    res["single_bytes"] = saved_bytes(single, x, y)
    ddp = nn.parallel.DistributedDataParallel(wtacrs.apply_wtacrs(tiny_net(), budget=0.3, targets="all-linear"))
    res["ddp_bytes"] = saved_bytes(ddp, x, y)
    seed_ranks(1)
    start = time.perf_counter()
    res["ddp_draws"] = train_draws(ddp, x, y, sharded=False)
    res["ddp_s_per_step"] = (time.perf_counter() - start) / DRAWS
    sgd_steps(ddp, x, y)
    res["ddp_params"] = [t.clone() for t in gather(flat_params(ddp, full))]

    # DDP wrapped first, patched afterwards: the parameters are the same objects, so this works too.
    ddp_first = nn.parallel.DistributedDataParallel(tiny_net())
    wtacrs.apply_wtacrs(ddp_first, budget=0.3, targets="all-linear")
    res["ddp_first_sampled"] = sum(isinstance(m, wtacrs.SampledLinear) for m in unwrap(ddp_first).modules())
    res["ddp_first_bytes"] = saved_bytes(ddp_first, x, y)
    sgd_steps(ddp_first, x, y)
    res["ddp_first_params"] = [t.clone() for t in gather(flat_params(ddp_first, full))]

    # FSDP2: each sampled layer sharded on its own, parameters gathered around forward and backward.
    mesh = init_device_mesh("cpu", (WORLD,))
    fsdp = fsdp_wrap(wtacrs.apply_wtacrs(tiny_net(), budget=0.3, targets="all-linear"), mesh, reshard=True)
    res["fsdp_bytes"] = saved_bytes(fsdp, x, y)
    seed_ranks(2)
    start = time.perf_counter()
    res["fsdp_draws"] = train_draws(fsdp, x, y, sharded=True)
    res["fsdp_s_per_step"] = (time.perf_counter() - start) / DRAWS
    sgd_steps(fsdp, x, y)
    res["fsdp_params"] = [t.clone() for t in gather(flat_params(fsdp, full))]
    res["fsdp_local_shard"] = fsdp[0].weight.to_local().shape[0]

    # Resharding after forward or not: the same rows are drawn, so the same gradient, bit for bit.
    grads = {}
    for reshard in (True, False):
        model = fsdp_wrap(wtacrs.apply_wtacrs(tiny_net(), budget=0.3, targets="all-linear"), mesh, reshard)
        seed_ranks(3)
        loss_of(model, x, y).backward()
        grads[reshard] = torch.cat([full(p.grad).reshape(-1) for p in model.parameters()])
    res["reshard_equal"] = torch.equal(grads[True], grads[False])

    # FSDP2 mixed precision: bf16 compute, fp32 gradient reduction; forward unchanged by sampling.
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    losses, nbytes, dtypes = {}, {}, set()

    def record(saved: dict, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = (t.dtype, t.untyped_storage().nbytes(), tuple(t.shape))
        return t

    for patched in (False, True):
        saved: dict = {}
        model = tiny_net()
        if patched:
            wtacrs.apply_wtacrs(model, budget=0.3, targets="all-linear")
        model = fsdp_wrap(model, mesh, reshard=True, mp_policy=policy)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: record(saved, t), lambda t: t):
            loss = loss_of(model, x, y)
        loss.backward()
        losses[patched], nbytes[patched] = loss.detach(), sum(b for _, b, _ in saved.values())
        if patched:
            dtypes = {dtype for dtype, _, _ in saved.values()}
            res["bf16_saved_shapes"] = {shape for dtype, _, shape in saved.values() if dtype == torch.bfloat16}
        res[f"bf16_grad_finite_{patched}"] = all(torch.isfinite(full(p.grad)).all() for p in model.parameters())
    res["bf16_loss_equal"] = torch.equal(losses[False], losses[True])
    res["bf16_bytes"] = nbytes
    res["bf16_saved_dtypes"] = dtypes

    # Patching after fully_shard cannot work (the engine swaps parameters on the modules it wrapped): refused.
    late = fsdp_wrap(tiny_net(), mesh, reshard=True)
    try:
        wtacrs.apply_wtacrs(late, targets="all-linear")
        res["late_fsdp_error"] = None
    except ValueError as e:
        res["late_fsdp_error"] = str(e)
    res["late_fsdp_untouched"] = not any(isinstance(m, wtacrs.SampledLinear) for m in late.modules())

    # Tensor-parallel (DTensor) weights: refused too.
    from torch.distributed.tensor import Shard, distribute_tensor

    tp = tiny_net()
    tp[0].weight = nn.Parameter(distribute_tensor(tp[0].weight.detach(), mesh, [Shard(0)]))
    try:
        wtacrs.apply_wtacrs(tp, targets="all-linear")
        res["dtensor_error"] = None
    except ValueError as e:
        res["dtensor_error"] = str(e)
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-process run did not finish in 240 s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_draw_independent_rows_from_one_seed(ranks):
    same, independent = ranks[0]["same_seed_rows"], ranks[0]["rank_seed_rows"]
    assert same[0] == same[1], "ranks seeded alike keep the same rows of the same input"
    assert independent[0] != independent[1], "seed_ranks must give each rank its own draws"


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_averaged_gradient_is_unbiased_for_the_global_batch(ranks, engine):
    exact = exact_global_gradient()
    target = torch.cat([g.reshape(-1) for g in exact.values()])
    draws = ranks[0][f"{engine}_draws"]
    assert torch.equal(draws, ranks[1][f"{engine}_draws"]), "every rank must see the same averaged gradient"
    assert draws.std(0).max() > 0, "nothing was sampled"
    z = max_abs_z(draws, target)
    limit = z_threshold(target.numel())
    print(f"\n{engine}: max |z| {z:.2f} over {target.numel()} entries (limit {limit:.2f}), "
          f"{ranks[0][f'{engine}_s_per_step'] * 1e3:.1f} ms/step")
    assert z <= limit


def test_the_check_flags_a_biased_average(ranks):
    """Same data, a wrong target (one rank's exact gradient instead of the global one): the check must fail."""
    model = tiny_net()
    loss_of(model, *rank_batch(0)).backward()
    wrong = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert max_abs_z(ranks[0]["ddp_draws"], wrong) > z_threshold(wrong.numel())


@pytest.mark.parametrize("key", ["ddp_params", "ddp_first_params", "fsdp_params"])
def test_parameters_identical_across_ranks_after_optimizer_steps(ranks, key):
    for r in ranks:
        assert torch.equal(r[key][0], r[key][1])
    before = torch.cat([p.detach().reshape(-1) for p in tiny_net().parameters()])
    assert not torch.equal(ranks[0][key][0], before), "the optimizer did not move the weights"


def test_ddp_wrapped_before_patching_samples_all_layers(ranks):
    assert ranks[0]["ddp_first_sampled"] == 3
    assert ranks[0]["ddp_first_bytes"] == ranks[0]["ddp_bytes"]


def test_saved_activation_bytes_per_rank_as_on_one_process(ranks):
    for r in ranks:
        print(f"\nstock {r['stock_bytes']} B; patched: one process {r['single_bytes']} B, DDP {r['ddp_bytes']} B, "
              f"FSDP2 {r['fsdp_bytes']} B")
        assert r["ddp_bytes"] == r["single_bytes"] == r["fsdp_bytes"]
        assert r["single_bytes"] < 0.7 * r["stock_bytes"]
    assert ranks[0]["fsdp_local_shard"] == 16, "FSDP2 did not shard the first layer's weight across the 2 ranks"


def test_fsdp_reshard_after_forward_gives_the_same_gradient(ranks):
    assert all(r["reshard_equal"] for r in ranks)


def test_fsdp_bf16_mixed_precision(ranks):
    r = ranks[0]
    assert r["bf16_loss_equal"], "forward must not change with sampling"
    assert r["bf16_grad_finite_True"] and r["bf16_grad_finite_False"]
    assert r["bf16_bytes"][True] < r["bf16_bytes"][False]
    assert {torch.bfloat16, torch.float32, torch.int64} <= r["bf16_saved_dtypes"], "rows bf16, scales fp32, indices"
    kept = 20  # ceil(0.3 * 64) rows of each sampled input, in the bf16 compute dtype; the first layer's whole input
    assert {(kept, D_IN), (kept, 32)} <= r["bf16_saved_shapes"] and (BATCH * SEQ, D_IN) not in r["bf16_saved_shapes"]


def test_patching_after_fully_shard_is_refused(ranks):
    message = ranks[0]["late_fsdp_error"]
    assert message is not None and "already wrapped by FSDPModule" in message and "apply_wtacrs(model) first" in message
    assert ranks[0]["late_fsdp_untouched"]
    assert "parameter '0.weight' is a DTensor" in ranks[0]["dtensor_error"]


# ------------------------------------------------------------------------------------------- one process


def test_rank_seeds_are_distinct_and_reproducible():
    seeds = {rank_seed(s, r) for s in range(4) for r in range(8)}
    assert len(seeds) == 32
    assert rank_seed(0, 1) != rank_seed(1, 0)
    assert seed_ranks(5, rank=3) == rank_seed(5, 3)
    first = torch.rand(3)
    seed_ranks(5, rank=3)
    assert torch.equal(torch.rand(3), first)


@pytest.mark.parametrize("seed,rank", [(-1, 0), (0, -2), (1.5, 0), (0, True)])
def test_bad_seed_or_rank_is_refused(seed, rank):
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        rank_seed(seed, rank)


def test_the_same_input_fed_again_gets_fresh_rows():
    """Layers reading one tensor share one sample within a forward, never across forwards (fixed inputs)."""
    model = wtacrs.apply_wtacrs(tiny_net(), budget=0.3, targets="all-linear")
    x, y = rank_batch(0)
    grads = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
        grads.append(model[0].weight.grad.clone())
    assert not torch.equal(grads[0], grads[1]) and not torch.equal(grads[1], grads[2])


def test_checkpoint_recomputation_keeps_the_same_rows():
    """Sampling uses the default generator, which checkpointing restores: recomputation draws the first forward's
    rows, so a checkpointed patched model gets the same gradient as an uncheckpointed one from the same seed."""
    model = wtacrs.apply_wtacrs(tiny_net(), budget=0.3, targets="all-linear")
    x, y = rank_batch(0)
    grads = []
    for use_checkpoint in (False, True):
        model.zero_grad(set_to_none=True)
        seed_ranks(9, rank=1)
        out = checkpoint(model, x, use_reentrant=False) if use_checkpoint else model(x)
        F.cross_entropy(out.reshape(-1, CLASSES), y.reshape(-1)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_unwrap_sees_through_compile_and_plain_models_pass_the_check():
    model = tiny_net()
    assert unwrap(model) is model
    assert unwrap(torch.compile(model)) is model
    wtacrs.distributed.check_patchable(model)


def test_torchrun_script_refuses_accelerate_with_fsdp(capsys):
    path = Path(__file__).resolve().parents[1] / "scripts" / "torchrun_finetune.py"
    spec = importlib.util.spec_from_file_location("torchrun_finetune", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_args(["--engine", "fsdp"]).engine == "fsdp"
    with pytest.raises(SystemExit):
        script.parse_args(["--accelerate", "--engine", "fsdp"])
    assert "--accelerate wraps with DDP here" in capsys.readouterr().err
