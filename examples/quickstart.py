"""Quickstart: a small model with MoE layers trains on a synthetic task, then prints a routing report.

Task: predict ``(3 * x_t + x_{t-1}) mod V`` from a token and its predecessor, a lookup a dense net of this
size struggles with and experts can split. Runs on CPU in about 15 s: ``.venv/bin/python examples/quickstart.py``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_routing as mr


class Block(nn.Module):
    def __init__(self, d: int, layer: mr.MoELayer) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.moe = layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.moe(self.norm(h))


class TinyMoEModel(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 64, num_experts: int = 8, top_k: int = 2) -> None:
        super().__init__()
        self.embed_cur = nn.Embedding(vocab, d)
        self.embed_prev = nn.Embedding(vocab + 1, d)  # index `vocab` = "no previous token"
        self.blocks = nn.ModuleList([
            # layer 0: softmax top-k with the switch aux loss (the default)
            Block(d, mr.MoELayer(d, 2 * d, num_experts, top_k)),
            # layer 1: sigmoid scores with aux-loss-free bias balancing (updated by mr.step)
            Block(d, mr.MoELayer(d, 2 * d, num_experts, top_k,
                                 router_kwargs={"score_func": "sigmoid", "bias_update_rate": 1e-3})),
        ])
        self.head = nn.Linear(d, vocab)
        self.vocab = vocab

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        prev_BS = F.pad(tokens_BS[:, :-1], (1, 0), value=self.vocab)
        h = self.embed_cur(tokens_BS) + self.embed_prev(prev_BS)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_batch(gen: torch.Generator, batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, vocab, (batch, seq), generator=gen)
    prev = F.pad(x[:, :-1], (1, 0), value=0)
    return x, (3 * x + prev) % vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = TinyMoEModel()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    start = time.time()
    for it in range(1, args.steps + 1):
        x, target = make_batch(gen, args.batch, args.seq, model.vocab)
        loss = F.cross_entropy(model(x).flatten(0, 1), target.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # aux losses reach the router gradients without being added here
        opt.step()
        mr.step(model)  # per-step controllers: the aux-free bias update of layer 1
        if it % 50 == 0 or it == 1:
            aux = mr.total_aux_loss(model).item()
            print(f"step {it:4d}  loss {loss.item():.4f}  aux {aux:.5f}  ({time.time() - start:.1f}s)")

    model.eval()
    with torch.no_grad():
        x, target = make_batch(gen, 64, args.seq, model.vocab)
        acc = (model(x).argmax(-1) == target).float().mean().item()
    print(f"\neval accuracy {acc:.3f}\n\nrouting report (last forward):")
    print(mr.format_routing_report(mr.routing_report(model)))


if __name__ == "__main__":
    main()
