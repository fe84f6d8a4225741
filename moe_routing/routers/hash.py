"""Hash router (Roller et al. 2021, "Hash Layers For Large Sparse Models"): token id -> experts by a fixed hash.

Three assignments: the paper's *balanced assignment* (`frequency_balanced_expert_map`: a table built from token
counts of the training data, the most frequent ids greedily to the emptiest expert, so experts see about equal
numbers of *tokens*), a seeded random table balancing the number of *ids* per expert (`id_balanced_expert_map`,
this library's own), and a table-free seeded hash (`hash_experts`). The paper routes each token to one expert;
``top_k`` > 1 (K whole experts, gate 1/K each) is this library's extension, not the paper's MultiHash layer,
which splits one FFN into segments chosen by several hashes and changes what the experts compute: that is
`moe_routing.multihash.MultiHashFFN`. The authors' public code (facebookresearch/ParlAI,
``projects/params_vs_compute/hash_ladder/hash_ladder.py``, ``HashLayerFFN``) has only a random table
(``random.randrange`` per id); the balanced and MultiHash forms follow the paper's section 3.
"""
from __future__ import annotations

import heapq
import math
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

from ..decision import RoutingContext, RoutingDecision
from ..settings import debug_checks
from ..validation import check_int
from .base import Router, forced_selection, param_factory

_MASK32 = 0xFFFFFFFF
_MIX = 0x45D9F3B      # < 2**27, so a 32-bit value times it stays inside int64
_GOLDEN = 0x9E3779B9
_SALT_STEP = 0x632BE5AB


def count_tokens(token_ids: Union[Tensor, Iterable[Tensor]], vocab_size: int) -> Tensor:
    """int64 [vocab_size] occurrences of each id in ``token_ids`` (a tensor, or an iterable of tensors: a token
    stream such as the training batches); ValueError for ids outside [0, vocab_size)."""
    check_int("vocab_size", vocab_size, 1)
    chunks = [token_ids] if isinstance(token_ids, Tensor) else token_ids
    counts_V = torch.zeros(vocab_size, dtype=torch.int64)
    for chunk in chunks:
        if (not isinstance(chunk, Tensor) or chunk.is_floating_point() or chunk.is_complex()
                or chunk.dtype == torch.bool):
            got = chunk.dtype if isinstance(chunk, Tensor) else type(chunk).__name__
            raise TypeError(f"token_ids must be integer tensors, got {got}")
        ids = chunk.reshape(-1).long().cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"token_ids must lie in [0, {vocab_size}) (vocab_size), got values in "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        counts_V += torch.bincount(ids, minlength=vocab_size)
    return counts_V


def frequency_balanced_expert_map(token_counts_V: Tensor, num_experts: int, top_k: int = 1) -> Tensor:
    """The paper's balanced assignment: int64 [V, top_k] from token counts ``token_counts_V`` [V] (>= 0).

    Ids in decreasing count (ties: lower id first) each go to the ``top_k`` experts with the least count assigned
    so far (ties: lower expert id), whose loads then grow by the id's count: the greedy "most frequent tokens to
    the emptiest buckets" of Roller et al. 2021, sec. 3. For top_k = 1 the expert loads end within the largest
    single count of each other (the greedy bound); ids that never occur fill the emptiest experts last.
    Deterministic; no randomness.
    """
    if not isinstance(token_counts_V, Tensor) or token_counts_V.dim() != 1 or token_counts_V.numel() == 0:
        raise ValueError("token_counts must be a non-empty 1-D tensor [vocab_size] of counts")
    E, K = check_int("num_experts", num_experts, 1), check_int("top_k", top_k, 1, num_experts)
    counts = token_counts_V.detach().cpu().double()
    if not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("token_counts must be finite and >= 0")
    order = torch.sort(-counts, stable=True).indices.tolist()
    values = counts.tolist()
    heap = [(0.0, e) for e in range(E)]  # (load, expert): the emptiest expert, then the lower id, pops first
    table = [None] * len(values)
    for v in order:
        chosen = [heapq.heappop(heap) for _ in range(K)]
        table[v] = [e for _, e in chosen]
        for load, e in chosen:
            heapq.heappush(heap, (load + values[v], e))
    return torch.tensor(table, dtype=torch.int64)


def id_balanced_expert_map(vocab_size: int, num_experts: int, top_k: int, seed: int = 0) -> Tensor:
    """A fixed random map token id -> ``top_k`` distinct experts, int64 [vocab_size, top_k], balancing the number
    of *ids* per expert (not their frequency in data: `frequency_balanced_expert_map` is the paper's).

    Token ids are shuffled and dealt in blocks of E; within a block row r gets experts
    ``sigma((rho(r) + tau_j) mod E)`` for j < K, with random permutations ``sigma`` (expert labels) and ``rho``
    (rows) and K distinct random shifts ``tau``, all drawn afresh per block. Every column of a full block is a
    permutation of the experts, so each expert serves exactly K ids per full block: over the whole vocabulary
    the per-expert counts differ by at most K (by at most 1 for K = 1), and a token's K experts are distinct.
    Deterministic given ``seed`` (a CPU generator).
    """
    E, K = num_experts, top_k
    g = torch.Generator().manual_seed(seed)
    num_blocks = -(-vocab_size // E)
    sigma = torch.rand(num_blocks, E, generator=g).argsort(1)
    rho = torch.rand(num_blocks, E, generator=g).argsort(1)
    tau = torch.rand(num_blocks, E, generator=g).argsort(1)[:, :K]
    pos = (rho[:, :, None] + tau[:, None, :]) % E                       # [blocks, E rows, K]
    rows = sigma.gather(1, pos.reshape(num_blocks, E * K)).reshape(num_blocks * E, K)[:vocab_size]
    expert_map = torch.empty_like(rows)
    expert_map[torch.randperm(vocab_size, generator=g)] = rows
    return expert_map


def _mix32(x: Tensor) -> Tensor:
    """32-bit multiply-xorshift integer hash of int64 values in [0, 2**32)."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def hash_experts(token_ids_T: Tensor, num_experts: int, top_k: int, seed: int = 0) -> Tensor:
    """``top_k`` distinct experts per token id from a seeded integer hash, int64 [T, K] (no table needed).

    Choice j hashes ``(id mod 2**32) xor salt_j`` (``salt_j = ((seed+1) * 0x9E3779B9 + j * 0x632BE5AB) mod 2**32``)
    with `_mix32` to h, takes ``r = floor(h * (E - j) / 2**32)`` and picks the r-th (0-based, increasing id) expert
    not already chosen for the token. Uniform over experts for well-spread ids; balance is statistical, not exact.
    """
    E, T = num_experts, token_ids_T.shape[0]
    v = token_ids_T.long() & _MASK32
    taken_TE = torch.zeros(T, E, dtype=torch.bool, device=v.device)
    rows = torch.arange(T, device=v.device)
    out = []
    for j in range(top_k):
        salt = ((seed + 1) * _GOLDEN + j * _SALT_STEP) & _MASK32
        r_T = (_mix32(v ^ salt) * (E - j)) >> 32
        free_TE = ~taken_TE
        rank_TE = free_TE.long().cumsum(1) - 1
        e_T = (free_TE & (rank_TE == r_T[:, None])).long().argmax(1)
        taken_TE[rows, e_T] = True
        out.append(e_T)
    return torch.stack(out, 1) if out else v.new_zeros(T, 0)


class HashRouter(Router):
    """Route each token by its id through a fixed hash: no trainable parameters, no balance loss needed.

    Needs token ids per call: ``with moe_routing.routing_context(model, token_ids=ids): model(x)`` (ids int
    [T] or [B, S] matching the layer input), or ``layer(x, RoutingContext(token_ids=ids))``.
    The id range is checked on CPU, and on accelerators only with ``MOE_ROUTING_DEBUG=1`` (reading it would
    sync the host in every forward of every hash layer); there an id outside the table fails in the lookup.

    Args:
        hidden_size: D (unused by the routing, checked against the input).  num_experts: E.
        top_k: K distinct whole experts per token, each with gate weight 1/K (the paper: K = 1).
        token_counts: int/float [V] counts of each id in the training data (`count_tokens` builds them from a
            token stream): the paper's balanced assignment, `frequency_balanced_expert_map` (V = its length).
        vocab_size: without counts, a seeded random table balancing the number of ids per expert
            (`id_balanced_expert_map`); with counts it must equal their length. Tables are an int64 buffer
            ``expert_map`` [V, K] (saved in the state dict); ids must lie in [0, V).
            Neither: the table-free `hash_experts` (ids >= 0).
        seed: seed of the random table / hash salt (0; the frequency table has no randomness).
    ``assignment`` says which: "frequency", "ids" or "hash". The decision's ``logits_TE`` are zeros and
    ``scores_TE`` the assignment (1/K at the chosen experts), so balance metrics and losses read the actual
    assignment. Default losses: none.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int = 1, *, vocab_size: Optional[int] = None,
                 token_counts: Optional[Tensor] = None, seed: int = 0, device=None, dtype=None) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.vocab_size = None if vocab_size is None else check_int("vocab_size", vocab_size, 1)
        self.seed = check_int("seed", seed, 0)
        if token_counts is not None:
            if not isinstance(token_counts, Tensor) or token_counts.dim() != 1:
                raise ValueError("token_counts must be a 1-D tensor [vocab_size] of counts")
            if self.vocab_size is not None and token_counts.numel() != self.vocab_size:
                raise ValueError(f"token_counts has {token_counts.numel()} entries but vocab_size={self.vocab_size}")
            self.vocab_size = token_counts.numel()
        # an empty float buffer that follows module casts (float64 yes, bf16/fp16 no: see Router._apply), so the
        # gate weights take the dtype a parametrised router would compute in
        self.register_buffer("_gate_dtype", torch.zeros(0, **param_factory(device, dtype)), persistent=False)
        if token_counts is not None:
            self.assignment = "frequency"
            self.register_buffer("expert_map",
                                 frequency_balanced_expert_map(token_counts, num_experts, top_k).to(device))
        elif vocab_size is not None:
            self.assignment = "ids"
            self.register_buffer("expert_map", id_balanced_expert_map(vocab_size, num_experts, top_k, seed).to(device))
        else:
            self.assignment = "hash"
            self.expert_map = None

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"vocab_size={self.vocab_size}, assignment={self.assignment!r}, seed={self.seed}")

    def route(self, x_TD: Tensor, ctx: Optional[RoutingContext], layer_key: object,
              backend: str = "torch") -> RoutingDecision:
        T, E, K = x_TD.shape[0], self.num_experts, self.top_k
        forced_TK, native_T = forced_selection(ctx, layer_key, T, K, E, x_TD.device)
        if forced_TK is None or native_T is not None:  # a fully replayed call needs no token ids
            experts_TK = self._hashed(T, ctx, x_TD.device)
            if forced_TK is not None:
                experts_TK = torch.where(native_T[:, None], experts_TK, forced_TK)
        else:
            experts_TK = forced_TK
        dtype = self._gate_dtype.dtype
        weights_TK = torch.full((T, K), 1.0 / K, dtype=dtype, device=x_TD.device)
        logits_TE = torch.zeros(T, E, dtype=dtype, device=x_TD.device)
        scores_TE = torch.zeros_like(logits_TE).scatter_(1, experts_TK, 1.0 / K)
        return RoutingDecision.from_topk(experts_TK, weights_TK, logits_TE, scores_TE)

    def _hashed(self, T: int, ctx: Optional[RoutingContext], device: torch.device) -> Tensor:
        """int64 [T, K] experts of the token ids in ``ctx`` (checked)."""
        ids_T = None if ctx is None else ctx.token_ids_T(T)
        if ids_T is None:
            raise ValueError("HashRouter needs token ids: run the model inside "
                             "`with moe_routing.routing_context(model, token_ids=ids):` (ids int [T] or [B, S]), "
                             "or pass RoutingContext(token_ids=ids) to the layer")
        ids_T = ids_T.to(device).long()
        if not torch.compiler.is_compiling() and T and (ids_T.device.type == "cpu" or debug_checks()):
            high = self.vocab_size if self.vocab_size is not None else math.inf
            lo, hi = int(ids_T.min()), int(ids_T.max())
            if lo < 0 or hi >= high:
                raise ValueError(f"token_ids must lie in [0, {high}) (vocab_size), got values in [{lo}, {hi}]")
        return self.expert_map[ids_T] if self.expert_map is not None else hash_experts(ids_T, self.num_experts,
                                                                                      self.top_k, self.seed)
