"""Routing analysis of a model without training it: `collect_routing` runs batches through a model under
`moe_routing.replay.record_routing` and keeps, per MoE layer, every token's experts (and router scores), with the
token ids and positions they came from. `RoutingCollection` computes from that:

- expert load per layer (``expert_counts``, ``expert_load``);
- co-activation matrices (``coactivation``): how many tokens route to both experts i and j;
- token-id and position specialisation (``specialization``): per expert the distribution P(v | e) over token ids
  (or positions) of the (token, expert) pairs it receives; per expert the KL divergence KL(P(v | e) || P(v)) from
  the corpus distribution (nats), and per layer the uncertainty coefficient U = I(E; V) / H(E) (Theil's U, the
  share of the entropy of the expert choice that the token id explains: 1 when the expert is a function of the
  token id, as in hash routing at k = 1, 0 when independent; Press et al., *Numerical Recipes*, 3rd ed., section
  14.7.4). The weighted per-expert scores add up to the mutual information: sum_e P(e) KL_e = I(E; V). Token-id
  specialisation is the "context-independent specialisation" OpenMoE reports (Xue et al. 2024, arXiv 2402.01739,
  section 5); the scores are this library's summary of it;
- cross-input routing divergence (`routing_divergence`): the quantity of Bandarkar et al. 2025, "Multilingual
  Routing in Mixture-of-Experts" (arXiv 2510.04694, section 4.3 and appendix A.4; no public code), which
  correlates with a language's performance in the middle layers. Per sequence i and layer l, q_i = the mean over
  its tokens of the router's post-softmax weights (a distribution over the E experts; the paper's Eq. 1); for
  parallel inputs (sequence i of one set translates sequence i of the other) the entropy-normalised
  Jensen-Shannon divergence

      D_H-JS(q^a, q^b) = JSD(q^a, q^b) / (log E - (H(q^a) + H(q^b)) / 2),
      JSD(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2      (natural log; the ratio is base-free),

  averaged over i (the paper's Div^(lang, l), Eq. 2). The denominator is the room the two distributions leave
  below the uniform entropy: since H((p + q) / 2) <= log E the ratio lies in [0, 1] (0 when the denominator is
  0: both uniform). Provenance of the normaliser: the paper's own text (Eq. 6-8) could not be read here; it is
  the one a public re-implementation states with that equation reference (github TracDucAnh/Nested-OTMoE,
  ``eval/rounter-steering/Qwen1.5-MoE-A2.7B/plot_routing_divergence.py``), and matches the summaries' wording
  ("entropy-normalised JS divergence"); the per-sequence q and the pairing were checked against a summary
  quoting Eq. 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ..replay.context import record_routing


@dataclass
class RoutingCollection:
    """Routing of L MoE layers over T tokens (see the module docstring).

    Attributes:
        layer_names: the MoE layers' module names (L).   num_experts: E of each layer.   top_k: K (nominal for
            variable-k routers).
        routing_map_TLE: bool [T, L, E] (E = the largest layer's) whether token t uses expert e in layer l.
        experts_TLK: int64 [T, L, K], each token's experts in id order, when every layer routes a fixed k
            (None otherwise).
        scores_TLE: float32 [T, L, E] router scores (None when collected with ``keep_scores=False``).
        token_ids_T: int64 [T].   positions_T: int64 [T] position of each token in its sequence.
        seq_lens: length of each collected sequence (sum = T).
    """

    layer_names: list[str]
    num_experts: list[int]
    top_k: int
    routing_map_TLE: Tensor
    experts_TLK: Optional[Tensor]
    scores_TLE: Optional[Tensor]
    token_ids_T: Tensor
    positions_T: Tensor
    seq_lens: list[int]

    @property
    def num_tokens(self) -> int:
        return self.routing_map_TLE.shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def expert_counts(self) -> Tensor:
        """int64 [L, E]: tokens routed to each expert of each layer."""
        return self.routing_map_TLE.sum(0, dtype=torch.int64)

    def expert_load(self) -> Tensor:
        """float64 [L, E]: each expert's share of the layer's (token, expert) assignments (rows sum to 1)."""
        c = self.expert_counts().double()
        return c / c.sum(1, keepdim=True).clamp_min(1)

    def coactivation(self, normalize: bool = False) -> Tensor:
        """float64 [L, E, E]: C[l, i, j] = tokens routed to both i and j in layer l (the diagonal: to i).

        ``normalize=True``: row i divided by C[l, i, i], i.e. P(j | i) = the share of expert i's tokens that
        also use expert j (rows of unused experts stay 0)."""
        m = self.routing_map_TLE.double()
        c = torch.einsum("tli,tlj->lij", m, m)
        if normalize:
            c = c / torch.diagonal(c, dim1=1, dim2=2).clamp_min(1)[:, :, None]
        return c

    def specialization(self, kind: str = "token", num_values: Optional[int] = None) -> "Specialization":
        """Token-id (``kind="token"``) or position (``kind="position"``) specialisation (module docstring).
        ``num_values``: V (default: the largest id or position + 1)."""
        if kind not in ("token", "position"):
            raise ValueError(f"kind must be 'token' or 'position', got {kind!r}")
        v_T = self.token_ids_T if kind == "token" else self.positions_T
        V = int(v_T.max()) + 1 if num_values is None else num_values
        if not isinstance(V, int) or isinstance(V, bool) or V < 1 or (v_T.numel() and int(v_T.max()) >= V):
            raise ValueError(f"num_values must be an int above every {kind} value (max {int(v_T.max())}), got {V!r}")
        L, E = self.num_layers, self.routing_map_TLE.shape[2]
        joint_LEV = torch.zeros(L, E, V, dtype=torch.float64)
        joint_LEV.index_add_(2, v_T, self.routing_map_TLE.double().permute(1, 2, 0))
        return Specialization.from_joint(joint_LEV)


@dataclass
class Specialization:
    """Specialisation of experts on a discrete token attribute v (token id or position).

    Attributes:
        joint_LEV: float64 [L, E, V] counts of (expert, value) pairs.
        dist_LEV: P(v | e), rows of unused experts 0.
        score_LE: KL(P(v | e) || P(v)) in nats (0 for unused experts).
        score_L: uncertainty coefficient I(E; V) / H(E) in [0, 1] (0 when H(E) = 0).
        mutual_info_L: I(E; V) in nats.
    """

    joint_LEV: Tensor
    dist_LEV: Tensor
    score_LE: Tensor
    score_L: Tensor
    mutual_info_L: Tensor

    @classmethod
    def from_joint(cls, joint_LEV: Tensor) -> "Specialization":
        p_LEV = joint_LEV / joint_LEV.sum((1, 2), keepdim=True).clamp_min(1e-300)
        p_e = p_LEV.sum(2)                      # [L, E]
        p_v = p_LEV.sum(1)                      # [L, V]
        dist = p_LEV / p_e[:, :, None].clamp_min(1e-300)
        ratio = dist / p_v[:, None, :].clamp_min(1e-300)
        kl_LE = torch.where(dist > 0, dist * ratio.clamp_min(1e-300).log(), torch.zeros_like(dist)).sum(2)
        mi_L = (p_e * kl_LE).sum(1)
        h_e = _entropy(p_e)
        score_L = torch.where(h_e > 0, mi_L / h_e.clamp_min(1e-300), torch.zeros_like(h_e))
        return cls(joint_LEV, dist, kl_LE, score_L.clamp(0, 1), mi_L)


def _entropy(p: Tensor, dim: int = -1) -> Tensor:
    return -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(dim)


def _ids_of(batch) -> Tensor:
    ids = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dim() not in (1, 2):
        raise TypeError(f"each batch must be an integer tensor of token ids [B, S] or [S] (or a tuple starting "
                        f"with one), got {getattr(ids, 'dtype', type(ids).__name__)} "
                        f"{tuple(getattr(ids, 'shape', ()))}")
    return ids if ids.dim() == 2 else ids[None]


def collect_routing(model: nn.Module, batches: Iterable, forward: Optional[Callable] = None,
                    keep_scores: bool = True) -> RoutingCollection:
    """Run ``batches`` through ``model`` (no grad) and collect every MoE layer's routing.

    Args:
        model: any module holding `MoELayer`s, or an HF model after `integrations.hf.swap_routers` (layers:
            `moe_routing.routing_layers`); put it in eval mode first for inference routing.
        batches: integer token ids [B, S] (or [S], or tuples whose first item is the ids).
        forward: ``forward(model, batch)`` running one batch (default ``model(ids_BS)``); e.g. to set a
            `routing_context` with token ids for hash routers.
        keep_scores: also keep router scores (needed by `routing_divergence`).

    The routing comes from `record_routing` (one record per batch), so it is exactly what replay would force.
    """
    if not isinstance(keep_scores, bool):
        raise TypeError(f"keep_scores must be a bool, got {keep_scores!r}")
    run = forward if forward is not None else (lambda m, b: m(_ids_of(b)))
    maps, exps, scores, ids, pos, lens = [], [], [], [], [], []
    record = None
    for batch in batches:
        ids_BS = _ids_of(batch)
        with record_routing(model, keep_scores=keep_scores) as record:
            with torch.no_grad():
                run(model, batch)
        if record.num_tokens != ids_BS.numel():
            raise ValueError(f"the MoE layers routed {record.num_tokens} tokens for a batch of {ids_BS.numel()} "
                             "token ids: one forward per batch, every token through every MoE layer")
        sel = record.selection.long()
        if record.experts_TLK is not None:
            exps.append(sel)
            sel = torch.zeros(*sel.shape[:2], max(record.num_experts), dtype=torch.bool).scatter_(2, sel, True)
        maps.append(sel.bool())
        if keep_scores:
            scores.append(record.scores_TLE.float())
        B, S = ids_BS.shape
        ids.append(ids_BS.reshape(-1).cpu().long())
        pos.append(torch.arange(S).repeat(B))
        lens += [S] * B
    if record is None:
        raise ValueError("batches is empty: nothing to collect")
    map_TLE = torch.cat(maps)
    experts = torch.cat(exps).sort(2).values if len(exps) == len(maps) else None
    return RoutingCollection(layer_names=list(record.layer_names), num_experts=list(record.num_experts),
                             top_k=record.top_k, routing_map_TLE=map_TLE, experts_TLK=experts,
                             scores_TLE=torch.cat(scores) if keep_scores else None, token_ids_T=torch.cat(ids),
                             positions_T=torch.cat(pos), seq_lens=lens)


def sequence_distributions(collection: RoutingCollection) -> Tensor:
    """float64 [N, L, E]: per sequence and layer, the router scores averaged over the sequence's tokens and
    normalised to sum to 1 (softmax scores already do; sigmoid / ReLU scores are rescaled)."""
    if collection.scores_TLE is None:
        raise ValueError("the collection has no router scores: collect_routing(..., keep_scores=True)")
    parts = collection.scores_TLE.double().split(collection.seq_lens)
    q = torch.stack([p.mean(0) for p in parts])
    return q / q.sum(2, keepdim=True).clamp_min(1e-300)


def normalized_js(p: Tensor, q: Tensor) -> Tensor:
    """Entropy-normalised Jensen-Shannon divergence over the last dimension (E), Bandarkar et al. 2025
    (module docstring): JSD(p, q) / (log E - (H(p) + H(q)) / 2), in [0, 1]; 0 where the denominator is 0."""
    h_avg = (_entropy(p) + _entropy(q)) / 2
    jsd = (_entropy((p + q) / 2) - h_avg).clamp_min(0)
    room = math.log(p.shape[-1]) - h_avg
    # 1e-12: rounding leaves a near-uniform pair a denominator of ~1e-16 over a JSD of the same size
    return torch.where(room > 1e-12, (jsd / room.clamp_min(1e-300)).clamp(0, 1), torch.zeros_like(room))


def routing_divergence(a: RoutingCollection, b: RoutingCollection, paired: bool = True) -> Tensor:
    """float64 [L]: entropy-normalised Jensen-Shannon divergence of the routing of inputs ``a`` and ``b`` per
    layer (Bandarkar et al. 2025, section 4.3, Eq. 2; `normalized_js`). 0 = routed alike; 1 only when the two
    distributions are disjoint and their mixture is uniform (e.g. two one-hot on E = 2).

    ``paired=True``: sequence i of ``a`` and of ``b`` are parallel (translations); the divergence of each pair,
    averaged. ``paired=False``: the divergence of the two sets' mean distributions."""
    qa, qb = sequence_distributions(a), sequence_distributions(b)
    if qa.shape[1:] != qb.shape[1:]:
        raise ValueError(f"a and b must come from the same model: [L, E] {tuple(qa.shape[1:])} vs "
                         f"{tuple(qb.shape[1:])}")
    if paired:
        if qa.shape[0] != qb.shape[0]:
            raise ValueError(f"paired=True needs as many sequences in a as in b (parallel inputs), got "
                             f"{qa.shape[0]} and {qb.shape[0]}; use paired=False for unpaired sets")
        return normalized_js(qa, qb).mean(0)
    return normalized_js(qa.mean(0), qb.mean(0))
