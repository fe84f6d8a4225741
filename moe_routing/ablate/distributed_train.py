"""One run on several processes (torchrun): the model built, resumed and sharded with FSDP2 + expert parallelism
(`parallel.py`), then `train.train_loop` (the single-process step loop) run by every rank with its own
`ProcessRole`: its rows of the global batch, gradients reduced over the ranks before clipping, logged sums
all-reduced, every file written by rank 0.

What equals a single-process run: each rank's rows are the same micro-batches a single process with
``micro_batch = global_batch / W`` would accumulate, so per-micro-batch aux losses, the gradient (the mean over
micro-batches), the controllers' statistics (summed over all ranks by `control.step`'s all-reduce) and the logged
losses (summed over ranks) are the same sums, added in another order. Router noise draws from a per-rank stream.
Evaluation runs the full validation set on every rank (the forward is collective), so all ranks agree on it.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

from ..control import set_aux_loss_scale
from .checkpoint import _dedup, atomic_write_checked_json, read_checkpoint, remove_stale_temporaries, write_checkpoint
from .config import Preset
from .data import _mix, get_batch
from .model import count_params
from .parallel import (Parallel, all_reduce_sum, check_batch, clip_grad_norm, gather_model_state,
                       gather_optimizer_state, gather_rng_states, parallelize, reduce_expert_grads,
                       shard_optimizer_state)
from .registry import build_model
from .train import (CKPT_NAME, RESULT_NAME, Data, ProcessRole, _check_fingerprint, _fresh_state, make_optimizer,
                    train_loop)


def _save(path: Path, model, optimizer, step: int, state: dict, par: Parallel) -> None:
    """Gather the single-process checkpoint layout (collective) and write it on rank 0; every rank's RNG state
    is kept (``rng/torch`` is rank 0's, ``rng/torch@rank<r>`` the others')."""
    model_state = gather_model_state(model, par)
    opt_state = gather_optimizer_state(model, optimizer, par)
    rng = gather_rng_states()
    if par.is_main:
        _write(path, model_state, opt_state, rng, step, state)
    # nobody goes on before the file is complete: the next call (a resume) must see it on every rank
    torch.distributed.barrier()


def _write(path: Path, model_state: dict, opt_state: dict, rng: list, step: int, state: dict) -> None:
    kept, aliases = _dedup(model_state)
    tensors = {f"model/{k}": v for k, v in kept.items()}
    for i, st in opt_state.items():
        for key, value in st.items():
            tensors[f"optim/{i}/{key}"] = value.detach().cpu().contiguous().clone()
    tensors["rng/torch"] = rng[0]
    for r, s in enumerate(rng[1:], start=1):
        tensors[f"rng/torch@rank{r}"] = s
    write_checkpoint(path, tensors, aliases, step, state)


def train_parallel(p: Preset, router: str, seed: int, data: Data, run_dir: Path, dev: torch.device,
                   progress: bool, stop_at: Optional[int], fingerprint: dict, digest: str,
                   par: Parallel) -> Optional[dict]:
    """`train._train` on ``par.world`` ranks; returns the same result dict on every rank (rank 0 writes it)."""
    result_path, ckpt_path = run_dir / RESULT_NAME, run_dir / CKPT_NAME
    micro, accum = check_batch(par, p.global_batch, p.micro_batch)
    if par.is_main and run_dir.exists():
        remove_stale_temporaries(run_dir)
    model = build_model(p, router, seed, data.vocab_size)
    state, start, saved = _fresh_state(), 0, None
    if ckpt_path.exists():
        saved = read_checkpoint(ckpt_path)
        _check_fingerprint(saved.run_state.get("fingerprint"), fingerprint, ckpt_path)
        weights = {k[len("model/"):]: v for k, v in saved.tensors.items() if k.startswith("model/")}
        for name, target in saved.aliases.items():
            weights[name] = weights[target]
        model.load_state_dict(weights, strict=True)  # full weights, before sharding
        state = dict(saved.run_state)
        start = state.pop("step")
    starts: list = [None] * par.world
    torch.distributed.all_gather_object(starts, start)
    if len(set(starts)) > 1:  # e.g. a checkpoint folder not shared by all ranks: refuse instead of diverging
        raise RuntimeError(f"ranks would resume {ckpt_path} from different steps {starts}; every rank must see "
                           "the same run folder")
    model = parallelize(model.to(dev), par)
    optimizer = make_optimizer(model, p)
    set_aux_loss_scale(model, 1.0 / accum)  # each rank averages its micro-batches; FSDP averages the ranks
    torch.manual_seed((_mix(seed, "noise") + par.rank) % (1 << 62))
    if saved is not None:
        opt = {}
        for k, v in saved.tensors.items():
            if k.startswith("optim/"):
                _, i, key = k.split("/", 2)
                opt.setdefault(int(i), {})[key] = v.to(dev) if v.dim() else v
        shard_optimizer_state(model, optimizer, opt, par)
        rng_key = "rng/torch" if par.rank == 0 else f"rng/torch@rank{par.rank}"
        if rng_key in saved.tensors:  # a checkpoint of another world size: this rank's stream starts afresh
            torch.set_rng_state(saved.tensors[rng_key])
    full_model = build_model(p, router, seed, data.vocab_size)  # only for the parameter counts
    params = count_params(full_model, p.top_k)
    del full_model
    rows_of_rank = par.local_rows(p.global_batch)

    def batch(step: int) -> tuple[Tensor, Tensor]:
        x_all, y_all = get_batch(data.train_N, p.global_batch, p.seq_len, seed, step)
        return x_all[rows_of_rank], y_all[rows_of_rank]

    def clip_grads(model: nn.Module, max_norm: float) -> None:
        reduce_expert_grads(model, par)
        clip_grad_norm(model, par, max_norm)

    def write_result(result: dict) -> None:
        if par.is_main:
            atomic_write_checked_json(result_path, result)
        torch.distributed.barrier()  # the result file exists on every rank's return

    role = ProcessRole(batch=batch, micro=micro, accum=accum, world=par.world, clip_grads=clip_grads,
                       sum_over_processes=all_reduce_sum, save=functools.partial(_save, ckpt_path, par=par),
                       write_result=write_result, shows_progress=progress and par.is_main,
                       result_extra={"world_size": par.world, "expert_parallel": par.ep})
    return train_loop(p, router, seed, data, dev, model, optimizer, state, start, stop_at, fingerprint, digest,
                      params, role)
