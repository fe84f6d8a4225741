"""The one place that maps a router name (``--routers``) to how its FFN layers are built.

A builder takes the preset and returns ``(ffns, shared)``: one FFN module per layer and an optional module the
layers share (registered on the model).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..layer import MoELayer
from ..losses.balance import SwitchAuxLoss
from ..losses.dpsl import DPSLoss
from ..losses.erc import ERCLoss
from ..routers.bilevel import BilevelRouter
from ..routers.blockffn import BlockFFNRouter
from ..routers.compete import CompeteRouter
from ..routers.mor import MixtureOfRoutersRouter
from ..routers.recurrent import RecurrentRouterGroup
from ..routers.relu import ReLURouter
from ..routers.topk import TopKRouter
from .config import Preset
from .model import SwiGLU, TinyLM

Built = tuple[list[nn.Module], Optional[nn.Module]]


def _topk_layers(p: Preset, losses_fn: Callable[[], list], gate_sum_k: bool = False) -> Built:
    # k >= 2: Mixtral gates (softmax over the k chosen logits), the same gating as the recurrent router, so
    # topk vs rmoe differs only in how logits are computed. k = 1: Switch gates (softmax over all E, then
    # top-1): a softmax over one logit is constant 1 and would leave the router no gradient from the LM loss.
    # gate_sum_k: scale the gates so a token's gates sum to k at initialisation, as the dense FFN of hidden k*F
    # weighs its k F-sized blocks; Switch gates start at ~1/E (factor E), Mixtral gates sum to 1 (factor k).
    factor = (p.num_experts if p.top_k == 1 else p.top_k) if gate_sum_k else 1.0
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k,
                     router=TopKRouter(p.d_model, p.num_experts, p.top_k, softmax_before_topk=p.top_k == 1,
                                       init_std=p.init_std, scaling_factor=float(factor)),
                     losses=losses_fn(), layer_idx=i) for i in range(p.n_layers)], None


def build_dense(p: Preset) -> Built:
    """SwiGLU FFN of hidden ``k * F``: the same active parameters and FLOPs as a k-of-E MoE layer."""
    return [SwiGLU(p.d_model, p.top_k * p.expert_hidden) for _ in range(p.n_layers)], None


def build_topk(p: Preset) -> Built:
    return _topk_layers(p, lambda: [SwitchAuxLoss(1e-2)])


def build_topk_scaled(p: Preset) -> Built:
    """TopK with its gates scaled to sum to k at initialisation (`TopKRouter(scaling_factor=...)`: E for Switch
    gates at k = 1, k for Mixtral gates): the routed FFN starts at the dense FFN's output scale."""
    return _topk_layers(p, lambda: [SwitchAuxLoss(1e-2)], gate_sum_k=True)


def build_relu(p: Preset) -> Built:
    """ReMoE: ReLU gates, its adaptive L1 loss (the router's default), k is the nominal sparsity target. lambda
    keeps a floor at lambda_0 (not in the reference; the router's default has none): the recorded runs used it."""
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k,
                     router=ReLURouter(p.d_model, p.num_experts, p.top_k, init_std=p.init_std, min_l1_coeff=1e-8),
                     layer_idx=i)
            for i in range(p.n_layers)], None


def build_rmoe(p: Preset) -> Built:
    # P = 128 as in the paper, but at most D/2: at our tiny widths a P=128 GRU would outweigh the whole model.
    # Not the reference code's defaults (GRU ~ N(0, std), its pooled 1e-3 aux): the torch GRU init and the switch
    # aux loss 1e-2 of the topk arm, so topk vs rmoe differs only in how the logits are computed.
    group = RecurrentRouterGroup(p.d_model, p.num_experts, p.top_k, p.n_layers, proj_dim=min(128, p.d_model // 2),
                                 init_std=p.init_std, gru_init="torch", balance_loss="switch",
                                 softmax_before_topk=p.top_k == 1)  # k=1: as topk
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k, router=group.routers[i], layer_idx=i)
            for i in range(p.n_layers)], group


def build_topk_erc(p: Preset) -> Built:
    return _topk_layers(p, lambda: [SwitchAuxLoss(1e-2), ERCLoss()])


def build_topk_dpsl(p: Preset) -> Built:
    # DPSL shapes the routing distribution itself (balance included): it replaces the switch aux loss
    return _topk_layers(p, lambda: [DPSLoss()])


def build_blockffn(p: Preset) -> Built:
    """BlockFFN: ReLU + RMSNorm gates with its default losses (activation locality 2e-3, chunk sparsification with
    the adaptive coefficient, chunks of 64); k is nominal. tls / cls (8-token chunks) land in the layer stats."""
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k,
                     router=BlockFFNRouter(p.d_model, p.num_experts, p.top_k, init_std=p.init_std), layer_idx=i)
            for i in range(p.n_layers)], None


def build_mor(p: Preset) -> Built:
    """Mixture of Routers: 4 sub-routers weighted by a main router, switch aux loss 1e-2 (gates renormalised over
    the k chosen for k >= 2; Switch-style at k = 1)."""
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k,
                     router=MixtureOfRoutersRouter(p.d_model, p.num_experts, p.top_k, num_routers=4,
                                                   init_std=p.init_std),
                     losses=[SwitchAuxLoss(1e-2)], layer_idx=i) for i in range(p.n_layers)], None


def build_compete(p: Preset) -> Built:
    """CompeteSMoE: competition on 5% of the optimizer steps (the authors' ``rate_flip``; each layer draws its own
    steps, seeded by its index), switch aux 1e-2 + distillation 1e-2 (the router's defaults). k = 1: Switch
    gates on router steps, as topk."""
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k,
                     router=CompeteRouter(p.d_model, p.num_experts, p.top_k, compete_prob=0.05, init_std=p.init_std),
                     layer_idx=i) for i in range(p.n_layers)], None


def build_bilevel(p: Preset) -> Built:
    """Bi-level routing (SMILE): two groups of E/2 experts when they hold k (else one), one group per token,
    switch aux 1e-2 + group balance 1e-2 (the router's defaults). On one device the groups are logical: no home
    group, so no locality stats."""
    return [MoELayer(p.d_model, p.expert_hidden, p.num_experts, p.top_k,
                     router=BilevelRouter(p.d_model, p.num_experts, p.top_k, init_std=p.init_std), layer_idx=i)
            for i in range(p.n_layers)], None


ROUTER_BUILDERS: dict[str, Callable[[Preset], Built]] = {
    "dense": build_dense,
    "topk": build_topk,
    "topk_scaled": build_topk_scaled,
    "relu": build_relu,
    "rmoe": build_rmoe,
    "topk+erc": build_topk_erc,
    "topk+dpsl": build_topk_dpsl,
    "blockffn": build_blockffn,
    "mor": build_mor,
    "compete": build_compete,
    "bilevel": build_bilevel,
}


def check_router_names(names: list[str]) -> None:
    """ValueError naming the unknown router(s) and the valid names."""
    unknown = [n for n in names if n not in ROUTER_BUILDERS]
    if unknown:
        raise ValueError(f"unknown router(s) {unknown}; --routers takes a comma-separated subset of "
                         f"{list(ROUTER_BUILDERS)}")
    if not names:
        raise ValueError(f"--routers must name at least one of {list(ROUTER_BUILDERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--routers names a router twice: {names}")


def build_model(p: Preset, router: str, seed: int, vocab_size: int) -> TinyLM:
    """The preset's LM with ``router``'s FFNs, initialised from ``seed`` (ValueError for an unknown router).

    ``vocab_size`` is the tokenizer's; the model holds ``p.padded_vocab(vocab_size)`` rows (never emitted ids)."""
    check_router_names([router])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1_000_003 * seed + 7)  # router inits (their constructors draw from the global RNG)
        ffns, shared = ROUTER_BUILDERS[router](p)
    return TinyLM(p.padded_vocab(vocab_size), p.d_model, p.n_heads, p.seq_len, ffns, shared=shared,
                  tie_embeddings=p.tie_embeddings, init_std=p.init_std, seed=seed, n_kv_heads=p.kv_heads,
                  rope_base=p.rope_base)
