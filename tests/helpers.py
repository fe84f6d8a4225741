"""Small helpers several test files share; the naive references they check against are in `reference.py`.

`gen` seeded generators, `OpLog` (the top-level ops a block runs: host syncs show up there), `random_routing`,
`HYP` (the ops property tests' hypothesis settings), `moe` (a small layer with decisive routing; its sizes are
D, F, E, K), `loss_layer` (the float64 layer of the loss tests; sizes `LOSS_SIZES`), `backend_results` (a layer
run once per kernel backend), `run_on_gloo_ranks` (a worker on two CPU processes), and the moe-ablate training
data and step recorder (`ablate_data`, `recorded_steps`).
"""
from __future__ import annotations

import contextlib
import os
import tempfile

import pytest
import torch
from hypothesis import settings
from torch.utils._python_dispatch import TorchDispatchMode

from moe_routing import MoELayer

HYP = settings(max_examples=25, deadline=None)
D, F, E, K = 16, 32, 4, 2  # the sizes of `moe`: fp32 rows of 64/128 bytes, so the grouped_mm path applies
LOSS_SIZES = (12, 8, 6)  # D, F, E of `loss_layer`


def gen(seed):
    return torch.Generator().manual_seed(seed)


class OpLog(TorchDispatchMode):
    """Top-level aten/custom ops a block runs (what would sync or break a graph shows up here)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), args))
        return func(*args, **(kwargs or {}))

    def syncing(self) -> list[str]:
        """bincount (sizes from data), nonzero/masked_select, boolean indexing, host scalar reads."""
        bad = []
        for name, args in self.ops:
            if any(s in name for s in ("bincount", "nonzero", "masked_select", "_local_scalar_dense")):
                bad.append(name)
            if name.startswith("aten.index.Tensor") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                bad.append(name + "[bool]")
        return bad


def random_routing(T, E, k, seed):
    """Fixed-k routing: k distinct experts per token, token-sorted pairs."""
    g = gen(seed)
    experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    token_N = torch.arange(T).repeat_interleave(k)
    return token_N, experts.reshape(-1).long()


def moe(**kw) -> MoELayer:
    torch.manual_seed(kw.pop("seed", 0))
    layer = MoELayer(D, F, E, kw.pop("top_k", K), **kw)
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.5)
    return layer


def loss_layer(losses, top_k=2, num_experts=LOSS_SIZES[2], hidden=LOSS_SIZES[0], seed=0, dtype=torch.float64,
               **kw):
    torch.manual_seed(seed)
    layer = MoELayer(hidden, LOSS_SIZES[1], num_experts, top_k, losses=losses, **kw)
    with torch.no_grad():  # a router spread wide enough that top-k choices are unambiguous
        layer.router.weight.normal_(0, 0.5)
    return layer.to(dtype)


def backend_results(layer, x, backends):
    """Per backend: the layer's output and the gradients of its squared sum w.r.t. x, the router weight, w_gate
    and w_down."""
    params = [x, layer.router.weight, layer.experts.w_gate, layer.experts.w_down]
    results = []
    for backend in backends:
        layer.backend = backend
        y = layer(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), params)))
    return results


def run_on_gloo_ranks(worker, world=2):
    """Run ``worker(rank, world, init_file)`` in ``world`` processes that join one gloo process group."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as d:
        tmp.spawn(worker, args=(world, os.path.join(d, "init")), nprocs=world, join=True)


@contextlib.contextmanager
def megatron_cpu():
    """megatron-core's MoE code on the CPU (moe_routing.integrations.megatron_cpu: ``cpu_device`` in a gloo world
    of size 1 with Megatron's parallel state), its aux-loss tracker emptied before and after. Yields the
    `ProcessGroupCollection`. Skips when megatron-core is absent or a process group already exists."""
    pytest.importorskip("megatron.core", reason="megatron-core not installed (extra 'megatron')")
    import torch.distributed as dist

    from moe_routing.integrations import megatron as mg
    from moe_routing.integrations.megatron_cpu import cpu_device, cpu_process_group

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    mg.clear_logged_losses()
    try:
        with cpu_device(), cpu_process_group() as pg:
            yield pg
    finally:
        mg.clear_logged_losses()


def megatron_router(pg, weight_ED: torch.Tensor, top_k: int, **config):
    """megatron-core's ``TopKRouter`` (inside `megatron_cpu`) with gate weight ``weight_ED`` (routing in its
    dtype: float64 gives ``moe_router_dtype='fp64'``); ``config``: further `TransformerConfig` fields."""
    import warnings

    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    E, D = weight_ED.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its config warns about unset fields these tests do not use
        cfg = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=1, num_moe_experts=E,
                                moe_router_topk=top_k, use_cpu_initialization=True, add_bias_linear=False,
                                moe_router_dtype="fp64" if weight_ED.dtype == torch.float64 else "fp32",
                                **config)
    router = TopKRouter(cfg, pg)
    router.set_layer_number(1)
    router.weight.data = weight_ED.detach().clone()
    return router


def megatron_aux_value(name: str) -> float:
    """The loss (without coefficient) Megatron's tracker logged under ``name`` since the last read; clears it."""
    from moe_routing.integrations.megatron import logged_losses

    values = logged_losses()[name]
    value = float(values[0])
    values.zero_()
    return value


def ablate_data():
    """Random byte tokens as moe-ablate data: 16k training tokens, 4k validation tokens in 2 batches of 4 x 32."""
    from moe_routing.ablate.data import val_batches
    from moe_routing.ablate.train import Data

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (20_000,), generator=g)
    return Data(tokens[:16_000], tokens[16_000:], val_batches(tokens[16_000:], 2, 4, 32), 256, "byte")


@contextlib.contextmanager
def recorded_steps(crash_at=None):
    """Record the step of every training batch drawn; raise (a crash without a final save) at ``crash_at``."""
    import moe_routing.ablate.train as train_module

    steps = []
    real = train_module.get_batch

    def spy(tokens_N, batch, seq_len, seed, step):
        if step == crash_at:
            raise KeyboardInterrupt("simulated crash")
        steps.append(step)
        return real(tokens_N, batch, seq_len, seed, step)

    train_module.get_batch = spy
    try:
        yield steps
    finally:
        train_module.get_batch = real


def half_expert_routing(T: int, E: int, K: int, variable: bool, g: torch.Generator):
    """Pairs in token order over the first max(E//2, K) experts only (the rest get no pair): K distinct experts
    per token, or 0..K when ``variable``. Returns int64 token_N, expert_N."""
    token, expert = [], []
    for t in range(T):
        k = int(torch.randint(0, K + 1, (1,), generator=g)) if variable else K
        for e in torch.randperm(max(E // 2, K), generator=g)[:k].tolist():
            token.append(t)
            expert.append(e)
    return torch.tensor(token, dtype=torch.long), torch.tensor(expert, dtype=torch.long)


GLOO_JOIN_TIMEOUT_S = 600  # generous for a slow shared machine; a real failure raises long before


def run_gloo_workers(worker, world: int, *args, timeout_s: float = GLOO_JOIN_TIMEOUT_S) -> None:
    """``worker(rank, world, *args)`` on ``world`` spawned processes in one gloo group (60 s collective timeout);
    a failure on any rank raises here with its traceback; workers alive after ``timeout_s`` are killed and the
    test fails (a hang never blocks CI)."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed unavailable")
    import time

    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as d:
        ctx = tmp.start_processes(_gloo_entry, args=(worker, world, os.path.join(d, "init"), args), nprocs=world,
                                  join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=2):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"gloo workers still running after {timeout_s} s (a hang)")


def _gloo_entry(rank, worker, world, init_file, args):
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()
