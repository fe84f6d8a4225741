"""What a router decides, and the per-call context a router may read.

Shape letters used across the package:
    T  tokens (flattened batch x sequence)     E  experts
    D  hidden size                             F  expert hidden (FFN) size
    K  experts per token (fixed-k routers)     N  routed (token, expert) pairs
    S  sequences                               L  MoE layers

`RoutingDecision` is the only thing dispatch consumes. Routed pairs are flat tensors sorted by token (for a
fixed-k router pair ``t * K + j`` is token t's j-th choice), so variable-k routers (ReLU, expert-choice) use
the same layout with a data-dependent N.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor


@dataclass
class RoutingDecision:
    """A router's output.

    Attributes:
        token_N: int64 [N], token index of each routed pair, non-decreasing.
        expert_N: int64 [N], expert of each pair, in [0, E).
        weight_N: [N] gate weight of each pair (router dtype, at least float32).
        logits_TE: [T, E] raw router logits (at least float32), for z-loss and metrics.
        scores_TE: [T, E] routing probabilities / scores (at least float32), for balance losses and metrics.
        num_experts: E.
        top_k: K for fixed-k routers (then N == T*K), else None.
        scores_normalized: whether each row of ``scores_TE`` sums to 1 (softmax, hash); losses and metrics that
            need a distribution normalise the scores otherwise (sigmoid, ReLU), see ``probs_TE``.
        extra: router-specific detached statistics (e.g. the ReLU router's sparsity), copied into layer stats.
        balance_experts_TK: int64 [T, K], the top-k of the scores without selection bias or group limit, when
            that differs from the choice (aux-free bias, group-limited routing); balance losses count these by
            default (DeepSeek-V3 eq. 18, Megatron-Core). None: count the chosen experts.
        target_TE: [T, E] detached distribution the router is trained to imitate (CompeteSMoE's competition
            outcome, read by `CompeteDistillLoss`), or None.
    """

    token_N: Tensor
    expert_N: Tensor
    weight_N: Tensor
    logits_TE: Tensor
    scores_TE: Tensor
    num_experts: int
    top_k: Optional[int] = None
    scores_normalized: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    balance_experts_TK: Optional[Tensor] = None
    target_TE: Optional[Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.logits_TE.shape[0]

    @property
    def probs_TE(self) -> Tensor:
        """Per-token routing distribution [T, E]: ``scores_TE`` as they are when normalised, else divided by
        their row sums (an all-zero row stays zero)."""
        s = self.scores_TE
        if self.scores_normalized:
            return s
        return s / s.sum(-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)

    def balance_pairs(self, chosen: bool = False) -> tuple[Tensor, Tensor]:
        """``(token_N, expert_N)`` a balance loss counts: ``balance_experts_TK`` when set (unless ``chosen``),
        else the routed pairs."""
        if chosen or self.balance_experts_TK is None:
            return self.token_N, self.expert_N
        T, K = self.balance_experts_TK.shape
        # a fixed-k decision with the same K already holds the token of each pair t*K + j
        token_N = (self.token_N if self.top_k == K
                   else torch.arange(T, device=self.balance_experts_TK.device).repeat_interleave(K))
        return token_N, self.balance_experts_TK.reshape(-1)

    @property
    def experts_TK(self) -> Optional[Tensor]:
        """[T, K] view of the chosen experts for fixed-k routers, else None."""
        if self.top_k is None:
            return None
        return self.expert_N.view(-1, self.top_k)

    @property
    def weights_TK(self) -> Optional[Tensor]:
        """[T, K] view of the gate weights for fixed-k routers, else None."""
        if self.top_k is None:
            return None
        return self.weight_N.view(-1, self.top_k)

    @staticmethod
    def from_topk(experts_TK: Tensor, weights_TK: Tensor, logits_TE: Tensor, scores_TE: Tensor, *,
                  scores_normalized: bool = True, extra: Optional[dict] = None) -> "RoutingDecision":
        """Build a fixed-k decision from ``[T, K]`` expert ids and weights."""
        T, K = experts_TK.shape
        token_N = torch.arange(T, device=experts_TK.device).repeat_interleave(K)
        return RoutingDecision(token_N=token_N, expert_N=experts_TK.reshape(-1).long(),
                               weight_N=weights_TK.reshape(-1), logits_TE=logits_TE, scores_TE=scores_TE,
                               num_experts=logits_TE.shape[-1], top_k=K, scores_normalized=scores_normalized,
                               extra=dict(extra or {}))


class RoutingContext:
    """Per-call information a router or loss may need beyond ``x``.

    Args:
        token_ids: int64 [T] or [B, S] token ids (hash routing).
        padding_mask: bool [T] or [B, S], True marks padding: excluded from losses, metrics and capacity.
        seq_lens: int [S] lengths of the sequences packed in a [T, D] input (sequence aux loss); must sum to T.
        forced_experts: {layer_key: int [T, K]} experts to use instead of the router's choice (routing replay).
        logit_offsets: {layer_key: float [E]} added to a gated router's logits before scores and selection
            (routing interventions, `moe_routing.intervene`).
        expert_responses: {layer_key: [T, E]} every expert's response to every token, filled by `MoELayer` for a
            router whose `Router.wants_expert_responses` says so (CompeteSMoE's competition steps).

    ``layer_state`` holds per-layer state keyed by layer (the recurrent router stores each layer's hidden state
    there), so a checkpointed layer recomputed after later layers ran still reads its predecessor's state.
    """

    def __init__(self, token_ids: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None,
                 seq_lens: Optional[Tensor] = None, forced_experts: Optional[dict] = None,
                 logit_offsets: Optional[dict] = None) -> None:
        if padding_mask is not None and padding_mask.dtype != torch.bool:
            raise TypeError(f"padding_mask must be a bool tensor (True = padding), got dtype {padding_mask.dtype}")
        if token_ids is not None and token_ids.is_floating_point():
            raise TypeError(f"token_ids must be an integer tensor, got dtype {token_ids.dtype}")
        self.token_ids = token_ids
        self.padding_mask = padding_mask
        self.seq_lens = None if seq_lens is None else torch.as_tensor(seq_lens, dtype=torch.long)
        self.forced_experts: dict = dict(forced_experts or {})
        self.logit_offsets: dict = dict(logit_offsets or {})
        self.expert_responses: dict = {}
        # {layer_key: logits_TE -> logits_TE}, applied after the offsets (test-time rerouting, `moe_routing.rerouting`)
        self.logit_edits: dict = {}
        self.layer_state: dict = {}

    def to(self, device: Union[torch.device, str]) -> "RoutingContext":
        """This context with ``token_ids``, ``padding_mask`` and ``seq_lens`` on ``device``.

        Returns ``self`` when they are already there; otherwise a shallow copy that shares ``forced_experts``
        and ``layer_state`` (so per-layer state written through the copy is seen by the caller's context).
        The layer calls this with its input's device, so a mask built on the CPU works for a CUDA model.
        """
        device = torch.device(device)
        names = ("token_ids", "padding_mask", "seq_lens")
        moved = {n: getattr(self, n).to(device) for n in names
                 if getattr(self, n) is not None and getattr(self, n).device != device}
        if not moved:
            return self
        out = copy.copy(self)
        for name, value in moved.items():
            setattr(out, name, value)
        return out

    def padding_T(self, num_tokens: int, device: Optional[torch.device] = None) -> Optional[Tensor]:
        """Flattened padding mask bool [T] (on ``device`` when given), checked against the layer's token count."""
        if self.padding_mask is None:
            return None
        mask = self.padding_mask.reshape(-1)
        if mask.numel() != num_tokens:
            raise ValueError(f"padding_mask has {mask.numel()} elements but the layer input has {num_tokens} tokens")
        return mask if device is None else mask.to(device)

    def token_ids_T(self, num_tokens: int, device: Optional[torch.device] = None) -> Optional[Tensor]:
        """Flattened token ids int [T] (on ``device`` when given), checked against the layer's token count."""
        if self.token_ids is None:
            return None
        ids = self.token_ids.reshape(-1)
        if ids.numel() != num_tokens:
            raise ValueError(f"token_ids has {ids.numel()} elements but the layer input has {num_tokens} tokens")
        return ids if device is None else ids.to(device)
