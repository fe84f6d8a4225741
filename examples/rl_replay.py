"""Routing replay for RL on a small MoE LM: the rollout/trainer routing mismatch, R3 and R2, measured on CPU.

A TinyLM (`moe_routing.ablate.model`) with top-k MoE FFNs is pre-trained briefly on a noisy synthetic language so
that its routing is not random. Then an RL loop:

- the **inference engine** is a bf16 copy of the policy; it samples responses one sequence at a time (batch size 1,
  no padding: continuous batching) and reports, per sequence, the token log-probs and the routed experts in
  SGLang's layout (``[T-1, L, K]`` int32, the last token missing), converted by `mr.replay.from_engine`;
- the **training engine** is the float32 policy on a right-padded batch of all sequences (another batch
  composition); the per-sample records are laid out for it by `mr.replay.pack_records`.

For every rollout batch it prints, without replay and with R3 (`mr.replay_routing` of the rollout's routing):
routing mismatch per layer and tokens differing in >= 1 layer (`routing_mismatch`), the k3 KL of the response
tokens' log-probs (`logprob_mismatch`), and the gradient norm of the policy-gradient surrogate
``-mean(A * exp(logp_train - logp_rollout))``. The update uses the R3 gradient. Then R2: one batch split into
mini-batches, the old policy's routing recorded by `mr.record_routing` in the (no-grad) old-log-prob pass, and
every later mini-batch update (after >= 1 optimizer step) measured without replay and with the R2 replay.

Seeded and deterministic (one thread). About 40 s of CPU time (single-threaded):
``python examples/rl_replay.py`` (``--smoke`` for a few-second run; ``--out`` writes a markdown table).
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import moe_routing as mr
from moe_routing.ablate.model import TinyLM
from moe_routing.replay import from_engine, logprob_mismatch, pack_records, routing_mismatch


@dataclass
class Config:
    vocab: int = 48
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    expert_hidden: int = 64
    max_seq_len: int = 24
    pretrain_steps: int = 250
    pretrain_batch: int = 16
    rl_batches: int = 4
    rollouts_per_batch: int = 16
    prompt_len: tuple[int, int] = (4, 8)   # drawn uniformly in [lo, hi]
    response_len: int = 16
    r2_minibatches: int = 4
    r2_epochs: int = 2
    rl_lr: float = 3e-4
    seed: int = 0


SMOKE = dict(pretrain_steps=5, rl_batches=2, rollouts_per_batch=4, prompt_len=(3, 5), response_len=4,
             r2_minibatches=2, r2_epochs=2, n_layers=2, d_model=32, expert_hidden=32)


# ---- model and synthetic language -----------------------------------------------------------------------------

def build_policy(c: Config) -> TinyLM:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(c.seed)
        ffns = [mr.MoELayer(c.d_model, c.expert_hidden, c.num_experts, c.top_k, layer_idx=i,
                              expert_impl="loop")  # torch._grouped_mm is slow on CPU
                for i in range(c.n_layers)]
    return TinyLM(c.vocab, c.d_model, c.n_heads, c.max_seq_len, ffns, seed=c.seed)


def language_batch(g: torch.Generator, batch: int, seq: int, vocab: int) -> torch.Tensor:
    """Noisy bigram language: ``x_t = (3 * x_{t-1} + 1) mod V`` with prob. 0.75, else uniform (the best LM loss
    is about 1.5 nats; an untrained model has ln V)."""
    x = torch.randint(0, vocab, (batch, seq), generator=g)
    keep = torch.rand(batch, seq, generator=g) < 0.75
    for t in range(1, seq):
        rule = (3 * x[:, t - 1] + 1) % vocab
        x[:, t] = torch.where(keep[:, t], rule, x[:, t])
    return x


def pretrain(model: TinyLM, c: Config, g: torch.Generator) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = torch.zeros(())
    for _ in range(c.pretrain_steps):
        x = language_batch(g, c.pretrain_batch, c.max_seq_len + 1, c.vocab)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return loss.item()


def reward(response: torch.Tensor, vocab: int) -> float:
    """The RL task: use tokens from the lower half of the vocabulary."""
    return (response < vocab // 2).float().mean().item()


# ---- the inference engine (bf16, one sequence at a time) -------------------------------------------------------

@torch.no_grad()
def rollout(engine: TinyLM, c: Config, g: torch.Generator) -> list[dict]:
    """Sample responses (prompts of equal length generated together), then the engine's per-sequence prefill at
    batch 1 gives what SGLang / vLLM return: token log-probs and the routed experts of all but the last token."""
    lengths = torch.randint(c.prompt_len[0], c.prompt_len[1] + 1, (c.rollouts_per_batch,), generator=g).tolist()
    sequences = []
    for n_prompt in sorted(set(lengths)):
        ids = language_batch(g, lengths.count(n_prompt), n_prompt, c.vocab)
        for _ in range(c.response_len):
            probs = engine(ids)[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
        sequences += [(n_prompt, row) for row in ids]
    samples = []
    for n_prompt, ids in sequences:
        with mr.record_routing(engine) as rec:
            logp = engine(ids[None])[0, :-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
        T = ids.shape[0]
        engine_rows = rec.experts_TLK[:-1].to(torch.int32).flatten()  # SGLang: flat int32, last token missing
        samples.append({"ids": ids, "n_prompt": n_prompt, "logp": logp,
                        "experts_TLK": from_engine(engine_rows, num_tokens=T, num_layers=c.n_layers, top_k=c.top_k,
                                                   num_experts=c.num_experts),
                        "reward": reward(ids[n_prompt:], c.vocab)})
    return samples


# ---- the training engine (float32, right-padded batch) ---------------------------------------------------------

def training_batch(samples: list[dict]) -> dict:
    """Right-padded ids [B, S], the response mask for log-prob positions [B, S-1], rollout log-probs, advantages,
    the rollout routing [B*S, L, K] (padding -1) and the real-token mask [B*S]."""
    S = max(s["ids"].shape[0] for s in samples)
    B = len(samples)
    ids = torch.zeros(B, S, dtype=torch.long)
    resp = torch.zeros(B, S - 1, dtype=torch.bool)
    logp_rollout = torch.zeros(B, S - 1)
    real = torch.zeros(B, S, dtype=torch.bool)
    for b, s in enumerate(samples):
        T = s["ids"].shape[0]
        ids[b, :T] = s["ids"]
        resp[b, s["n_prompt"] - 1:T - 1] = True  # position t predicts token t+1
        logp_rollout[b, :T - 1] = s["logp"]
        real[b, :T] = True
    r = torch.tensor([s["reward"] for s in samples])
    adv = (r - r.mean()) / (r.std(unbiased=False) + 1e-6)
    return {"ids": ids, "resp": resp, "logp_rollout": logp_rollout, "adv": adv, "real": real.flatten(),
            "experts_TLK": pack_records([s["experts_TLK"] for s in samples], seq_len=S)}


def token_logp(model: TinyLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None])[..., 0]


def measure(model: TinyLM, batch: dict, ref_logp: torch.Tensor, ref_TLK: torch.Tensor, replay: bool) -> tuple:
    """Train-engine forward (native or replaying ``ref_TLK``) + surrogate backward; the mismatch against the
    reference routing / log-probs and the gradient norm. Leaves the gradient in ``model``."""
    model.zero_grad(set_to_none=True)
    with mr.record_routing(model) as rec:
        if replay:
            with mr.replay_routing(model, ref_TLK):
                logp = token_logp(model, batch["ids"])
        else:
            logp = token_logp(model, batch["ids"])
    mask = batch["resp"]
    ratio = torch.exp(logp - ref_logp.detach())
    loss = -(batch["adv"][:, None] * ratio * mask).sum() / mask.sum()
    loss.backward()
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                      if p.grad is not None])).item()
    rm = routing_mismatch(ref_TLK, rec.experts_TLK, batch["real"])
    lm = logprob_mismatch(logp.detach()[mask], ref_logp[mask])
    return {"per_layer": rm.per_layer_L.tolist(), "any_layer": rm.any_layer.item(), "k3": lm.k3_kl.item(),
            "grad_norm": grad_norm}


def fmt(row: dict) -> str:
    layers = " ".join(f"{100 * v:5.2f}" for v in row["per_layer"])
    return (f"mismatch/layer % [{layers}]  any-layer {100 * row['any_layer']:6.2f}%  k3 {row['k3']:.3e}  "
            f"|grad| {row['grad_norm']:.4f}")


def run(c: Config, log=print) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend (and one thread is bitwise reproducible)
    try:
        return _run(c, log)
    finally:
        torch.set_num_threads(threads)


def _run(c: Config, log) -> dict:
    torch.manual_seed(c.seed)
    g = torch.Generator().manual_seed(c.seed + 1)
    start, cpu_start = time.time(), time.process_time()
    policy = build_policy(c)
    loss = pretrain(policy, c, g)
    log(f"pre-training: {c.pretrain_steps} steps, final LM loss {loss:.3f} ({time.time() - start:.1f}s)")
    mr.set_aux_loss_scale(policy, 0.0)  # the balance loss was for pre-training; the gradients below are the PG's
    opt = torch.optim.AdamW(policy.parameters(), lr=c.rl_lr)
    engine = copy.deepcopy(policy).to(torch.bfloat16).eval().requires_grad_(False)
    results = {"r3": [], "r2": []}

    log("\nR3 (replay the rollout's routing in the trainer): bf16 engine, batch 1  vs  fp32 trainer, padded batch")
    for i in range(c.rl_batches):
        engine.load_state_dict(policy.state_dict())  # weight sync (cast to bf16)
        batch = training_batch(rollout(engine, c, g))
        native = measure(policy, batch, batch["logp_rollout"], batch["experts_TLK"], replay=False)
        r3 = measure(policy, batch, batch["logp_rollout"], batch["experts_TLK"], replay=True)
        opt.step()  # with the R3 gradient
        results["r3"].append({"native": native, "replay": r3})
        log(f"batch {i}  no replay  {fmt(native)}\n         R3         {fmt(r3)}")

    log("\nR2 (record the old policy's routing in the old-log-prob pass, replay it after optimizer steps)")
    engine.load_state_dict(policy.state_dict())
    samples = rollout(engine, c, g)
    per_mb = len(samples) // c.r2_minibatches
    minibatches = [training_batch(samples[j * per_mb:(j + 1) * per_mb]) for j in range(c.r2_minibatches)]
    for mb in minibatches:
        with torch.no_grad(), mr.record_routing(policy) as rec:
            mb["logp_old"] = token_logp(policy, mb["ids"])
        mb["old_TLK"] = rec.experts_TLK
    update = 0
    for epoch in range(c.r2_epochs):
        for j, mb in enumerate(minibatches):
            if update == 0:  # on-policy: nothing has changed yet
                measure(policy, mb, mb["logp_old"], mb["old_TLK"], replay=False)
            else:
                native = measure(policy, mb, mb["logp_old"], mb["old_TLK"], replay=False)
                r2 = measure(policy, mb, mb["logp_old"], mb["old_TLK"], replay=True)
                results["r2"].append({"native": native, "replay": r2, "epoch": epoch, "minibatch": j})
                log(f"epoch {epoch} mb {j}  no replay  {fmt(native)}\n              R2         {fmt(r2)}")
            opt.step()
            update += 1
    results["seconds"], results["cpu_seconds"] = time.time() - start, time.process_time() - cpu_start
    log(f"\ntotal {results['seconds']:.1f}s wall, {results['cpu_seconds']:.1f}s CPU")
    return results


def mean_row(rows: list[dict], key: str) -> dict:
    rs = [r[key] for r in rows]
    return {"per_layer": [sum(v) / len(rs) for v in zip(*(r["per_layer"] for r in rs))],
            **{k: sum(r[k] for r in rs) / len(rs) for k in ("any_layer", "k3", "grad_norm")}}


def markdown(results: dict, c: Config) -> str:
    lines = ["| setting | routing mismatch per layer (%) | tokens differing in >= 1 layer | k3 KL | PG grad norm |",
             "|---|---|---|---|---|"]
    for phase, label in (("r3", "R3"), ("r2", "R2")):
        if not results[phase]:
            continue
        for key, name in (("native", f"{phase.upper()} phase, no replay"), ("replay", label)):
            m = mean_row(results[phase], key)
            layers = " / ".join(f"{100 * v:.2f}" for v in m["per_layer"])
            lines.append(f"| {name} | {layers} | {100 * m['any_layer']:.2f}% | {m['k3']:.2e} | "
                         f"{m['grad_norm']:.4f} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny configuration that runs in a few seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as markdown here")
    args = parser.parse_args(argv)
    c = Config(seed=args.seed, **(SMOKE if args.smoke else {}))
    results = run(c)
    table = markdown(results, c)
    print("\nmeans over batches / updates:\n" + table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            f"# `examples/rl_replay.py` results (CPU, seed {c.seed})\n\n"
            f"{c.n_layers} MoE layers, E={c.num_experts}, k={c.top_k}, d={c.d_model}; {c.pretrain_steps} "
            f"pre-training steps; R3: {c.rl_batches} rollout batches of {c.rollouts_per_batch} sequences "
            f"(prompt {c.prompt_len[0]}-{c.prompt_len[1]} + {c.response_len} response tokens), bf16 engine at "
            f"batch 1 vs fp32 trainer on the right-padded batch; R2: {c.r2_minibatches} mini-batches x "
            f"{c.r2_epochs} epochs, updates after the first. Means over batches / updates, over response tokens "
            f"(routing: all real tokens). Mismatch and k3 KL are against the rollout engine (R3 phase) or the old "
            f"policy's pass (R2 phase); the grad norm is of -mean(A * ratio). One thread, "
            f"{results['cpu_seconds']:.0f} s CPU ({results['seconds']:.0f} s wall on the machine it ran on)."
            f"\n\n{table}\n")
    return results


if __name__ == "__main__":
    main()
