"""Online test-time rerouting: additive router-logit vectors optimised on the context during generation.

Su, Yang, Shen, Yin, Liu & Geiping, "Rewiring Experts on the Fly: Continuous Rerouting for Better Online Adaptation
in Mixture-of-Expert models" (arXiv 2510.14853). Each selected MoE layer gets a vector delta [E] added to its
router logits (zero at the start). At prefill, and again every ``interval`` generated tokens, the vectors are
optimised by self-supervision -- the next-token cross-entropy of the model on the context generated so far -- with
the model frozen; generation then proceeds with the adapted routing until the next adaptation.

Where we follow our own reading (no reference code was found in our index): Adam on the vectors (``lr``, ``steps``
per adaptation, carried over between adaptations, not reset); the paper updates only "high-confidence" layers:
``layers="confidence"`` picks the ``num_layers`` layers whose routing on the prefill context is most confident
(highest mean top-k score mass), or pass explicit MoE-layer indices. The loss is the mean next-token CE over the
context (the last ``max_context`` tokens), balance losses excluded.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_float, check_int
from .logits import (add_to_router_logits, check_layer_indices, edit_router_logits, layers_of, output_logits,
                     without_aux_gradient)


def next_token_loss(model: nn.Module, ids_BS: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``model(ids)[:, :-1]`` against ``ids[:, 1:]`` (float32 or higher)."""
    logits = output_logits(model(ids_BS))[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids_BS[:, 1:].reshape(-1))


class OnlineRerouter:
    """Additive router-logit vectors for chosen MoE layers of ``model``, adapted on the context by `adapt`.

    Args:
        model: a causal LM ``ids [B, S] -> logits [B, S, V]`` made of `MoELayer`s (e.g. the ablation `TinyLM`),
            or an HF causal LM after `swap_routers` (its output's ``logits`` are read).
        layers: MoE-layer indices, or "confidence" (chosen at the first `adapt` from the routing confidence).
        num_layers: how many layers "confidence" picks (default: half of them, at least one).
        steps / lr: Adam steps per adaptation and their learning rate.
        interval: generated tokens between adaptations in `generate` (0: prefill only).
        max_context: adapt on at most the last ``max_context`` tokens (None: the model's window if it has
            ``max_seq_len``, else all).
    Attributes: ``deltas`` ({layer: float32 [E]}), ``layers`` (None until chosen), ``history`` (per adaptation:
    the loss before and after).
    """

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[int]] = "confidence", *,
                 num_layers: Optional[int] = None, steps: int = 5, lr: float = 0.1, interval: int = 16,
                 max_context: Optional[int] = None) -> None:
        self.model = model
        moe = layers_of(model)
        self._by_confidence = isinstance(layers, str)
        if isinstance(layers, str):
            if layers != "confidence":
                raise ValueError(f"layers must be 'confidence' or a sequence of MoE-layer indices, got {layers!r}")
            self.layers: Optional[tuple[int, ...]] = None
        else:
            self.layers = check_layer_indices("layers", layers, len(moe))
        self.num_layers = (max(1, (len(moe) + 1) // 2) if num_layers is None
                           else check_int("num_layers", num_layers, 1, len(moe)))
        self.steps = check_int("steps", steps, 0)
        self.lr = check_float("lr", lr, 0.0)
        self.interval = check_int("interval", interval, 0)
        self.max_context = None if max_context is None else check_int("max_context", max_context, 2)
        self.deltas: dict[int, Tensor] = {}
        self._opt: Optional[torch.optim.Optimizer] = None
        self.history: list[tuple[float, float]] = []
        if self.layers is not None:
            self._init_deltas()

    def _init_deltas(self) -> None:
        moe = layers_of(self.model)
        device = next(moe[0].parameters()).device  # an MoELayer's experts, a swapped HF gate's router
        self.deltas = {i: torch.zeros(moe[i].num_experts, device=device, requires_grad=True) for i in self.layers}
        self._opt = torch.optim.Adam(list(self.deltas.values()), lr=self.lr)

    def reset(self) -> None:
        """Back to zero vectors (and a fresh optimiser); "confidence" layers are chosen again at the next adapt."""
        if self._by_confidence:
            self.layers, self.deltas, self._opt = None, {}, None
        elif self.layers is not None:
            self._init_deltas()
        self.history = []

    @torch.no_grad()
    def confident_layers(self, ids_BS: Tensor) -> tuple[int, ...]:
        """The ``num_layers`` MoE layers with the highest mean top-k softmax mass on ``ids_BS``."""
        moe = layers_of(self.model)
        mass: dict[int, float] = {}

        def keep(i: int):
            def fn(logits_TE: Tensor) -> Tensor:
                mass[i] = float(logits_TE.softmax(-1).topk(moe[i].top_k, -1).values.sum(-1).mean())
                return logits_TE
            return fn

        with edit_router_logits(self.model, {i: keep(i) for i in range(len(moe))}):
            self.model(ids_BS)
        ranked = sorted(range(len(moe)), key=lambda i: -mass[i])
        return tuple(sorted(ranked[:self.num_layers]))

    def applied(self):
        """A block in which the model routes with the current vectors added to the chosen layers' logits."""
        return add_to_router_logits(self.model, {i: d.detach() for i, d in self.deltas.items()})

    def _window(self, ids_BS: Tensor) -> Tensor:
        limit = self.max_context if self.max_context is not None else getattr(self.model, "max_seq_len", None)
        return ids_BS if limit is None else ids_BS[:, -limit:]

    def adapt(self, ids_BS: Tensor) -> tuple[float, float]:
        """Optimise the vectors on the context ``ids_BS`` (int [B, S], S >= 2); returns the next-token loss on it
        before and after (no-grad evaluations)."""
        if not isinstance(ids_BS, Tensor) or ids_BS.dim() != 2 or ids_BS.shape[1] < 2:
            raise ValueError(f"ids must be an integer tensor [B, S >= 2], got "
                             f"{getattr(ids_BS, 'shape', type(ids_BS).__name__)}")
        ctx = self._window(ids_BS)
        if self.layers is None:
            self.layers = self.confident_layers(ctx)
            self._init_deltas()
        with torch.no_grad(), self.applied():
            before = float(next_token_loss(self.model, ctx))
        params = list(self.deltas.values())
        with without_aux_gradient(self.model):
            for _ in range(self.steps):
                with add_to_router_logits(self.model, self.deltas):
                    loss = next_token_loss(self.model, ctx)
                grads = torch.autograd.grad(loss, params)  # only the vectors: the model's .grad stays untouched
                for p, g in zip(params, grads):
                    p.grad = g
                self._opt.step()
        with torch.no_grad(), self.applied():
            after = float(next_token_loss(self.model, ctx))
        self.history.append((before, after))
        return before, after


@torch.no_grad()
def generate(model: nn.Module, prompt_BS: Tensor, max_new_tokens: int, *, rerouter: Optional[OnlineRerouter] = None,
             greedy: bool = True, temperature: float = 1.0, seed: int = 0) -> Tensor:
    """Autoregressive generation for a causal LM ``ids [B, S] -> logits [B, S, V]`` (no KV cache: each step runs
    the last ``model.max_seq_len`` tokens). With ``rerouter``: it adapts on the prompt (prefill) and then every
    ``rerouter.interval`` new tokens, and every step routes with its vectors. Sampling (``greedy=False``) draws
    from ``softmax(logits / temperature)`` with a generator seeded by ``seed``. Returns int [B, S + new]."""
    if not isinstance(prompt_BS, Tensor) or prompt_BS.dim() != 2 or prompt_BS.shape[1] < 1:
        raise ValueError(f"prompt must be an integer tensor [B, S >= 1], got "
                         f"{getattr(prompt_BS, 'shape', type(prompt_BS).__name__)}")
    check_int("max_new_tokens", max_new_tokens, 0)
    temperature = check_float("temperature", temperature, 0.0, low_inclusive=False)
    gen = torch.Generator(device=prompt_BS.device).manual_seed(check_int("seed", seed, 0))
    window = getattr(model, "max_seq_len", None)
    ids = prompt_BS
    for t in range(max_new_tokens):
        due = t == 0 or (rerouter is not None and rerouter.interval and t % rerouter.interval == 0)
        if rerouter is not None and ids.shape[1] >= 2 and due:
            with torch.enable_grad():
                rerouter.adapt(ids)
        ctx = ids if window is None else ids[:, -window:]
        with (rerouter.applied() if rerouter is not None else _nothing()):
            logits_BV = output_logits(model(ctx))[:, -1].float()
        if greedy:
            nxt = logits_BV.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial((logits_BV / temperature).softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.to(ids.dtype)], 1)
    return ids


@contextmanager
def _nothing() -> Iterator[None]:
    yield
