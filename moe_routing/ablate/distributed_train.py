"""The training loop of one run on several processes (torchrun): `train.py`'s loop with the global batch split
over the ranks, FSDP2 + expert parallelism (`parallel.py`), and every file written by rank 0.

What equals a single-process run: each rank's rows are the same micro-batches a single process with
``micro_batch = global_batch / W`` would accumulate, so per-micro-batch aux losses, the gradient (the mean over
micro-batches), the controllers' statistics (summed over all ranks by `control.step`'s all-reduce) and the logged
losses (summed over ranks) are the same sums, added in another order. Router noise draws from a per-rank stream.
Evaluation runs the full validation set on every rank (the forward is collective), so all ranks agree on it.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..control import attach, aux_losses, routing_context, set_aux_loss_scale, total_aux_loss
from .checkpoint import _dedup, read_checkpoint, remove_stale_temporaries, write_checkpoint
from .config import Preset
from .data import _mix, get_batch
from .model import count_params, ffn_flops_per_token
from .parallel import (Parallel, all_reduce_sum, check_batch, clip_grad_norm, gather_model_state,
                       gather_optimizer_state, gather_rng_states, parallelize, reduce_expert_grads,
                       shard_optimizer_state)
from .registry import build_model
from .train import (CKPT_NAME, RESULT_NAME, Data, _autocast, _check_fingerprint, _fresh_state, _micro_batch_stats,
                    _relu_state, evaluate, make_optimizer)


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
    from .checkpoint import atomic_write_checked_json

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
    state["fingerprint"], state["library_digest"] = fingerprint, digest
    full_model = build_model(p, router, seed, data.vocab_size)  # only for the parameter counts
    active, total = count_params(full_model, p.top_k)
    del full_model
    end = p.steps if stop_at is None else min(stop_at, p.steps)
    model.train()
    attach(model, optimizer)  # controllers: statistics all-reduced over every rank (data parallel)

    from tqdm.auto import tqdm

    bar = tqdm(total=p.steps, initial=start, desc=f"{router} seed {seed}", disable=not (progress and par.is_main),
               leave=False, dynamic_ncols=True)
    rows_of_rank = par.local_rows(p.global_batch)
    pending: list[Tensor] = []

    def flush() -> list[list[float]]:
        rows = torch.stack(pending).tolist() if pending else []
        pending.clear()
        for loss_sum, _, ept_mean_sum, ept_layer_sum, _ in rows:
            state["train_losses"].append(loss_sum / (accum * par.world))
            state["ept_sum"] += ept_mean_sum
            state["flops_sum"] += ffn_flops_per_token(p.d_model, p.expert_hidden, ept_layer_sum)
        return rows

    for step in range(start, end):
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = p.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        x_all, y_all = get_batch(data.train_N, p.global_batch, p.seq_len, seed, step)
        x_rank, y_rank = x_all[rows_of_rank], y_all[rows_of_rank]
        for m in range(accum):
            rows = slice(m * micro, (m + 1) * micro)
            x, y = x_rank[rows].to(dev), y_rank[rows].to(dev)
            with _autocast(p, dev), routing_context(model):
                logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss / accum).backward()
            ept_mean, ept_layers = _micro_batch_stats(model, p, dev)
            sums = sums + torch.stack([loss.detach().to(torch.float64),
                                       total_aux_loss(model).to(dev, torch.float64), ept_mean, ept_layers])
        state["micro_steps"] += accum * par.world
        reduce_expert_grads(model, par)
        clip_grad_norm(model, par, p.clip)
        optimizer.step()
        pending.append(torch.cat([all_reduce_sum(sums), ept_mean.reshape(1)]))
        state["train_time_s"] += time.perf_counter() - t0
        state["tokens"] += p.global_batch * p.seq_len
        done = step + 1
        if done % p.log_interval == 0 or done == p.steps:
            _, aux_sum, _, _, last_ept = flush()[-1]
            train_loss = state["train_losses"][-1]
            row = {"step": done, "loss": train_loss, "aux": aux_sum / (accum * par.world), "lr": p.lr_at(step),
                   "experts_per_token": last_ept}
            for losses in aux_losses(model).values():  # this rank's last micro-batch
                for name, value in losses.items():
                    row[f"aux/{name}"] = row.get(f"aux/{name}", 0.0) + float(value)
            relu = _relu_state(model)
            if relu is not None:
                row["relu_sparsity"], row["relu_lambda"] = relu
            state["history"].append(row)
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if done % p.eval_interval == 0 or done == p.steps:
            state["val_curve"].append([done, evaluate(model, data, p, dev)["val_loss"]])
            flush()
            state.setdefault("val_compute_curve", []).append(state["flops_sum"] * micro * p.seq_len)
        bar.update(1)
        if done % p.ckpt_interval == 0 or done == end:
            flush()
            _save(ckpt_path, model, optimizer, done, state, par)
    bar.close()
    if end < p.steps:
        return None
    final = evaluate(model, data, p, dev, with_routing=True)
    n = max(1, state["micro_steps"])
    result = {"router": router, "seed": seed, "fingerprint": fingerprint, "library_digest": digest,
              "final_val_loss": final["val_loss"], "val_curve": state["val_curve"],
              "val_compute_curve": state.get("val_compute_curve", []),
              "train_losses": state["train_losses"], "history": state["history"],
              "tokens_per_s": state["tokens"] / max(state["train_time_s"], 1e-9),
              "train_time_s": state["train_time_s"], "active_params": active, "total_params": total,
              "torch_threads": torch.get_num_threads(), "world_size": par.world, "expert_parallel": par.ep,
              "experts_per_token_train_avg": state["ept_sum"] / n,
              "expert_flops_per_token_train_avg": state["flops_sum"] / n,
              **{f"final_{k}": v for k, v in final.items() if k != "val_loss"}}
    if par.is_main:
        atomic_write_checked_json(result_path, result)
    torch.distributed.barrier()  # the result file exists on every rank's return
    return result
