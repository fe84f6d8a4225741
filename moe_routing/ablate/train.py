"""One training run (router x seed): train loop, evaluation, routing statistics, checkpoint and resume."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..control import attach, aux_losses, moe_layers, routing_context, set_aux_loss_scale, total_aux_loss
from ..metrics import max_violation
from ..routers.relu import ReLURouter
from .checkpoint import (atomic_write_checked_json, read_checked_json, read_checkpoint, remove_stale_temporaries,
                         restore_checkpoint, save_checkpoint)
from .config import EVAL_BATCH, Preset
from .data import Corpus, _mix, check_split_sizes, encode_docs, get_batch, make_tokenizer, val_batches
from .lock import folder_lock
from .model import count_params, ffn_flops_per_token
from .parallel import Parallel
from .registry import build_model

CKPT_NAME, RESULT_NAME = "ckpt.safetensors", "result.json"
# what the CLI, the aggregation and the plots read from a result file
RESULT_KEYS = ("router", "seed", "fingerprint", "library_digest", "final_val_loss", "val_curve", "train_losses",
               "history", "tokens_per_s", "train_time_s", "active_params", "total_params",
               "experts_per_token_train_avg", "expert_flops_per_token_train_avg", "final_experts_per_token",
               "final_sparsity", "final_max_vio", "final_routing_entropy")
# the final checkpoint is written before the final evaluation, so a lost result costs no training
RESULT_REMEDY = (f"delete it and rerun: the result is rebuilt from the run's final {CKPT_NAME} without "
                 "retraining (or the run is retrained if that is gone too)")


@dataclass
class Data:
    """Token streams of both splits, the fixed validation batches and the tokenizer's name and vocab."""

    train_N: Tensor
    val_N: Tensor
    val_batches: list[tuple[Tensor, Tensor]]
    vocab_size: int
    tokenizer: str

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of both token streams: a run resumed or read back on another corpus or tokenizer is refused."""
        h = hashlib.sha256()
        for t in (self.train_N, self.val_N):
            h.update(str(t.dtype).encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def load_data(p: Preset, corpus: Corpus, cache_dir: Path) -> Data:
    """Tokenize both splits with the preset's tokenizer (a BPE is trained on the training split and cached in
    ``cache_dir``), check each split holds a window, and draw the fixed validation batches."""
    tok = make_tokenizer(p.tokenizer, corpus, p.bpe_vocab, cache_dir)
    train_N, val_N = encode_docs(tok, corpus.train_docs), encode_docs(tok, corpus.val_docs)
    check_split_sizes(corpus, train_N, val_N, p.seq_len)
    return Data(train_N, val_N, val_batches(val_N, p.eval_batches, EVAL_BATCH, p.seq_len), tok.vocab_size, tok.name)


def make_optimizer(model: nn.Module, p: Preset) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (norm scales are 1-D)."""
    decay = [q for q in model.parameters() if q.dim() >= 2]
    no_decay = [q for q in model.parameters() if q.dim() < 2]
    groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=p.lr, betas=tuple(p.betas), eps=1e-8)


def _autocast(p: Preset, device: torch.device):
    if p.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _experts_per_token(model: nn.Module, p: Preset) -> list[float]:
    """Experts each token used in the last forward, per layer (dense FFN of k*F counts as k)."""
    layers = moe_layers(model)
    if not layers:
        return [float(p.top_k)] * p.n_layers
    return [float(layer.last_stats["experts_per_token"]) for _, layer in layers]


def _micro_batch_stats(model: nn.Module, p: Preset, device: torch.device) -> tuple[Tensor, Tensor]:
    """(mean over layers, sum over layers) of the experts each token used in the last forward, as float64
    device tensors: read on the host only when the step's statistics are flushed."""
    layers = moe_layers(model)
    if not layers:
        total = torch.tensor(float(p.top_k) * p.n_layers, dtype=torch.float64, device=device)
        return total / p.n_layers, total
    total = layers[0][1].last_stats["experts_per_token"].to(device, torch.float64)
    for _, layer in layers[1:]:  # in layer order, as a host-side sum would add them
        total = total + layer.last_stats["experts_per_token"].to(device, torch.float64)
    return total / len(layers), total


def _relu_state(model: nn.Module) -> Optional[tuple[float, float]]:
    """(mean sparsity of the last forward, lambda) of the ReLU routers, or None if there are none."""
    layers = [layer for _, layer in moe_layers(model) if isinstance(layer.router, ReLURouter)]
    if not layers:
        return None
    sparsity = sum(float(layer.last_stats["sparsity"]) for layer in layers) / len(layers)
    return sparsity, float(layers[0].router.l1_coeff)


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, p: Preset, device: torch.device, with_routing: bool = False) -> dict:
    """Mean validation cross-entropy over the fixed batches; with ``with_routing`` also per-layer loads,
    MaxVio (of the loads summed over the validation set), routing entropy and experts per token."""
    was_training = model.training
    model.eval()
    losses, loads, ent, ept = [], None, [], []
    for x, y in data.val_batches:
        x, y = x.to(device), y.to(device)
        with _autocast(p, device), routing_context(model):
            logits = model(x)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())
        if with_routing:
            layers = moe_layers(model)
            batch_loads = [layer.last_stats["tokens_per_expert"].double().cpu() for _, layer in layers]
            loads = batch_loads if loads is None else [a + b for a, b in zip(loads, batch_loads)]
            ent.append([float(layer.last_stats["routing_entropy"]) for _, layer in layers])
            ept.append(_experts_per_token(model, p))
    model.train(was_training)
    out = {"val_loss": sum(losses) / len(losses)}
    if with_routing:
        n = len(data.val_batches)
        ept_L = [sum(col) / n for col in zip(*ept)]
        out["experts_per_token"] = sum(ept_L) / len(ept_L)
        out["sparsity"] = 1.0 - out["experts_per_token"] / p.num_experts
        if loads:
            out["load_LE"] = [(ld / ld.sum().clamp_min(1)).tolist() for ld in loads]
            out["max_vio"] = sum(float(max_violation(ld)) for ld in loads) / len(loads)
            out["routing_entropy"] = sum(sum(col) / n for col in zip(*ent)) / len(loads)
        else:  # dense: no router, nothing measured
            out.update(load_LE=None, max_vio=None, routing_entropy=None, sparsity=None)
    return out


def library_digest() -> str:
    """Hash of the moe_routing sources outside ``ablate/`` (routers, losses, layer, ops): a finished run read
    back under a different digest was trained with other library code, which the CLI warns about."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        if "ablate" not in f.relative_to(root).parts:
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _fresh_state() -> dict:
    return {"train_losses": [], "history": [], "val_curve": [], "val_compute_curve": [], "train_time_s": 0.0,
            "tokens": 0,
            "ept_sum": 0.0, "flops_sum": 0.0, "micro_steps": 0}


def train_run(p: Preset, router: str, seed: int, data: Data, run_dir: Path, device: str = "cpu",
              progress: bool = True, stop_at: Optional[int] = None, digest: Optional[str] = None,
              parallel: Optional[Parallel] = None) -> Optional[dict]:
    """Train ``router`` with ``seed`` under preset ``p``, resuming from ``run_dir/ckpt.safetensors`` if present.

    Returns the run's result dict (also written to ``run_dir/result.json``); a finished run is read back, not
    retrained. ``stop_at`` (for tests) checkpoints and returns None after that many steps, like an interrupt.
    ``digest``: the `library_digest` of the code this process imported (taken now if None).
    ``parallel``: the process layout of a multi-process run (`parallel.init_parallel`; every rank calls this
    with the same arguments): FSDP2 + expert parallelism, rank 0 locks the folder and writes every file.
    Raises ValueError when ``run_dir`` holds a run with a different configuration, and its subclass
    DamagedFileError for a corrupted, truncated or foreign checkpoint or result file.
    """
    run_dir = Path(run_dir)
    lock = folder_lock(run_dir, "run folder") if parallel is None or parallel.is_main else contextlib.nullcontext()
    with lock:  # a second process on this run fails here instead of racing
        return _run_locked(p, router, seed, data, run_dir, device, progress, stop_at, digest or library_digest(),
                           parallel)


def _run_locked(p: Preset, router: str, seed: int, data: Data, run_dir: Path, device: str, progress: bool,
                stop_at: Optional[int], digest: str, parallel: Optional[Parallel] = None) -> Optional[dict]:
    fingerprint = {**p.fingerprint(), "router": router, "seed": seed, "tokenizer": data.tokenizer,
                   "vocab_size": data.vocab_size, "data_digest": data.digest}
    result_path = run_dir / RESULT_NAME
    if result_path.exists():
        result = read_checked_json(result_path, RESULT_KEYS, RESULT_REMEDY)
        _check_fingerprint(result.get("fingerprint"), fingerprint, result_path)
        if result.get("library_digest") != digest:
            print(f"moe-ablate: warning: {result_path} was trained with other moe_routing sources (digest "
                  f"{result.get('library_digest')} != {digest}); delete it to retrain", file=sys.stderr)
        return result
    threads = torch.get_num_threads()
    if p.threads and torch.device(device).type == "cpu":
        torch.set_num_threads(p.threads)
    try:
        if parallel is not None:
            from .distributed_train import train_parallel

            return train_parallel(p, router, seed, data, run_dir, torch.device(device), progress, stop_at,
                                  fingerprint, digest, parallel)
        return _train(p, router, seed, data, run_dir, torch.device(device), progress, stop_at, fingerprint, digest)
    finally:
        torch.set_num_threads(threads)


def _train(p: Preset, router: str, seed: int, data: Data, run_dir: Path, dev: torch.device, progress: bool,
           stop_at: Optional[int], fingerprint: dict, digest: str) -> Optional[dict]:
    result_path, ckpt_path = run_dir / RESULT_NAME, run_dir / CKPT_NAME
    if run_dir.exists():
        remove_stale_temporaries(run_dir)
    model = build_model(p, router, seed, data.vocab_size).to(dev)
    optimizer = make_optimizer(model, p)
    set_aux_loss_scale(model, 1.0 / p.grad_accum)  # main loss is divided by the micro-batch count too
    # router noise (jitter, ERC's proxy noise) draws from the global RNG: its own stream per seed, separate
    # from data and init; the checkpoint saves and restores it
    torch.manual_seed(_mix(seed, "noise") % (1 << 62))
    state, start = _fresh_state(), 0
    if ckpt_path.exists():
        saved = read_checkpoint(ckpt_path)  # verified before the fingerprint is trusted
        _check_fingerprint(saved.run_state.get("fingerprint"), fingerprint, ckpt_path)
        if saved.run_state.get("library_digest") != digest:
            print(f"moe-ablate: warning: resuming {ckpt_path} with other moe_routing sources (digest "
                  f"{saved.run_state.get('library_digest')} != {digest})", file=sys.stderr)
        restore_checkpoint(saved, model, optimizer)
        state = dict(saved.run_state)
        start = state.pop("step")
    role = ProcessRole(
        # the module's `get_batch` is looked up at every step (tests replace it to record or interrupt steps)
        batch=lambda step: get_batch(data.train_N, p.global_batch, p.seq_len, seed, step),
        micro=p.micro_batch, accum=p.grad_accum, world=1,
        clip_grads=lambda model, max_norm: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm),
        sum_over_processes=lambda sums: sums,
        save=functools.partial(save_checkpoint, ckpt_path),
        write_result=functools.partial(atomic_write_checked_json, result_path),
        shows_progress=progress, result_extra={})
    return train_loop(p, router, seed, data, dev, model, optimizer, state, start, stop_at, fingerprint, digest,
                      count_params(model, p.top_k), role)


@dataclass(frozen=True)
class ProcessRole:
    """What differs between a single-process run (`_train`) and one rank of a multi-process run
    (`distributed_train.train_parallel`); the rest of a training step is `train_loop`'s, shared by both."""

    batch: Callable[[int], tuple[Tensor, Tensor]]  # step -> this process's rows (x, y) of the global batch, [B, S]
    micro: int  # rows per micro-batch
    accum: int  # micro-batches per step on this process: each micro-batch's loss is divided by it
    world: int  # processes: a step's logged losses are sums over ``accum * world`` micro-batches
    clip_grads: Callable[[nn.Module, float], object]  # (model, max_norm): reduce gradients over processes, clip
    sum_over_processes: Callable[[Tensor], Tensor]  # the step's device-side sums, summed over all processes
    save: Callable[[nn.Module, torch.optim.Optimizer, int, dict], None]  # checkpoint (model, optim, step, state)
    write_result: Callable[[dict], None]  # the result file (a multi-process run: rank 0 writes, all wait)
    shows_progress: bool  # this process draws the progress bar
    result_extra: dict  # the process layout, recorded in the result


def train_loop(p: Preset, router: str, seed: int, data: Data, dev: torch.device, model: nn.Module,
               optimizer: torch.optim.Optimizer, state: dict, start: int, stop_at: Optional[int], fingerprint: dict,
               digest: str, params: tuple[int, int], role: ProcessRole) -> Optional[dict]:
    """Steps ``start`` to the end (or ``stop_at``) of a built, possibly resumed, run: micro-batches, logging,
    evaluation and checkpoints; then the final evaluation and the result (None if stopped early).
    ``params``: (active, total) parameter counts of the full model."""
    state["fingerprint"], state["library_digest"] = fingerprint, digest
    active, total = params
    end = p.steps if stop_at is None else min(stop_at, p.steps)
    divisor = role.accum * role.world  # micro-batches per step, over all processes
    model.train()
    # ReLU lambda controller and bias balancing after every optimizer step (statistics all-reduced over the
    # ranks of a multi-process run)
    attach(model, optimizer)

    from tqdm.auto import tqdm

    bar = tqdm(total=p.steps, initial=start, desc=f"{router} seed {seed}", disable=not role.shows_progress,
               leave=False, dynamic_ncols=True)
    # per-step sums stay on the device and are read in one transfer when logged or checkpointed
    pending: list[Tensor] = []

    def flush() -> list[list[float]]:
        rows = torch.stack(pending).tolist() if pending else []
        pending.clear()
        for loss_sum, _, ept_mean_sum, ept_layer_sum, _ in rows:
            state["train_losses"].append(loss_sum / divisor)
            state["ept_sum"] += ept_mean_sum
            state["flops_sum"] += ffn_flops_per_token(p.d_model, p.expert_hidden, ept_layer_sum)
        return rows

    for step in range(start, end):
        t0, c0 = time.perf_counter(), time.process_time()
        for group in optimizer.param_groups:
            group["lr"] = p.lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=dev)  # loss, aux, experts/token mean and layer sum
        x_rank, y_rank = role.batch(step)
        for micro in range(role.accum):
            rows = slice(micro * role.micro, (micro + 1) * role.micro)
            x, y = x_rank[rows].to(dev), y_rank[rows].to(dev)
            with _autocast(p, dev), routing_context(model):
                logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            (loss / role.accum).backward()
            ept_mean, ept_layers = _micro_batch_stats(model, p, dev)
            sums = sums + torch.stack([loss.detach().to(torch.float64), total_aux_loss(model).to(dev, torch.float64),
                                       ept_mean, ept_layers])
        state["micro_steps"] += divisor
        role.clip_grads(model, p.clip)
        optimizer.step()  # the attached hook runs the routers' controllers
        pending.append(torch.cat([role.sum_over_processes(sums), ept_mean.reshape(1)]))  # + last experts/token
        state["train_time_s"] += time.perf_counter() - t0
        # process CPU time: with one torch thread, the run's own work, little changed by other jobs on the machine
        state["train_cpu_s"] = state.get("train_cpu_s", 0.0) + time.process_time() - c0
        state["tokens"] += p.global_batch * p.seq_len
        done = step + 1
        if done % p.log_interval == 0 or done == p.steps:
            _, aux_sum, _, _, last_ept = flush()[-1]
            train_loss = state["train_losses"][-1]
            row = {"step": done, "loss": train_loss, "aux": aux_sum / divisor, "lr": p.lr_at(step),
                   "experts_per_token": last_ept}
            # per loss, summed over layers: this process's last micro-batch
            for losses in aux_losses(model).values():
                for name, value in losses.items():
                    row[f"aux/{name}"] = row.get(f"aux/{name}", 0.0) + float(value)
            relu = _relu_state(model)
            if relu is not None:
                row["relu_sparsity"], row["relu_lambda"] = relu
            state["history"].append(row)
            bar.set_postfix(loss=f"{train_loss:.3f}")
        if done % p.eval_interval == 0 or done == p.steps:
            state["val_curve"].append([done, evaluate(model, data, p, dev)["val_loss"]])
            flush()  # the evaluation synced anyway: the compute spent so far is up to date
            state.setdefault("val_compute_curve", []).append(state["flops_sum"] * role.micro * p.seq_len)
        bar.update(1)
        if done % p.ckpt_interval == 0 or done == end:
            flush()
            role.save(model, optimizer, done, state)
    bar.close()
    if end < p.steps:
        return None
    final = evaluate(model, data, p, dev, with_routing=True)
    n = max(1, state["micro_steps"])
    result = {"router": router, "seed": seed, "fingerprint": fingerprint, "library_digest": digest,
              "final_val_loss": final["val_loss"],
              "val_curve": state["val_curve"],
              # forward expert FLOPs spent before each evaluation (all tokens so far), for iso-compute comparisons
              "val_compute_curve": state.get("val_compute_curve", []),
              "train_losses": state["train_losses"], "history": state["history"],
              "tokens_per_s": state["tokens"] / max(state["train_time_s"], 1e-9),
              "train_time_s": state["train_time_s"], "train_cpu_s": state.get("train_cpu_s", 0.0),
              "active_params": active, "total_params": total,
              # not part of the fingerprint (a resume may use other threads), but CPU sums round differently
              # with another thread count: `--verify` reruns with this one
              "torch_threads": torch.get_num_threads(), **role.result_extra,
              "experts_per_token_train_avg": state["ept_sum"] / n,
              "expert_flops_per_token_train_avg": state["flops_sum"] / n,
              **{f"final_{k}": v for k, v in final.items() if k != "val_loss"}}
    role.write_result(result)
    return result


def _check_fingerprint(saved: object, current: dict, path: Path) -> None:
    if saved != current:
        saved = saved if isinstance(saved, dict) else {}
        diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        raise ValueError(f"{path} belongs to a run with different settings ({', '.join(diff)}); "
                         "use another --out folder or delete it")
