"""R2-T2: re-routing in test time toward the routing of correctly handled neighbours.

Li, Li & Zhou, "R2-T2: Re-Routing in Test-Time for Multimodal Mixture-of-Experts" (ICML 2025, arXiv 2502.20395;
code: github.com/tianyi-lab/R2-T2, ``evaluate.py``). A test input's routing-weight vector r (the router's softmax
scores) is moved toward the routing of *reference* samples the model handles correctly, found in a neighbourhood
of the input; nothing in the model is trained. The three strategies of the paper's Section 3:

- ``"ngd"`` (neighbourhood gradient descent): minimise the kernel-weighted loss of the k nearest reference samples
  evaluated *with the test input's routing* r, ``sum_i K_i l(f(x_i; r), y_i) / sum_i K_i``, over r. As the
  reference code: Adam with a cosine learning-rate decay (1e-2 -> 1e-5, 10 steps, k = 5).
- ``"kernel"`` (kernel regression): ``r_hat = sum_i K_i r_i / sum_i K_i`` over the neighbours' own routing, then
  ``r = (1 - a) r + a r_hat`` with ``a`` searched on [0, 1] for the lowest neighbourhood loss (or given).
- ``"mode"`` (mode finding, mean shift in routing space): neighbours are the reference routings nearest to the
  current r; ``r <- (1 - a) r + a r_bar`` with ``r_bar`` their kernel-weighted mean, repeated ``steps`` times.

Our setting (token-level MoE LMs, not MoAI's per-image routing), and where we deviate:
- The routing vector of an input is its routing weights at the chosen ``layers`` and ``positions`` ("last": the
  token whose prediction is the label, as C3PO (arXiv 2504.07964) found best; "all": every position, windows of
  equal length), float [L', P, E]. It is imposed by setting those logits to ``log r`` (a softmax router's scores are
  then exactly r; top-k and gates follow). Only routers whose scores are a softmax of their logits qualify.
- NGD optimises r through its logits (r = softmax(z)) so it stays on the simplex; the reference code instead
  updates the router modules themselves.
- The neighbourhood is found in an embedding of the input: by default the hidden state entering the first chosen
  layer at the re-routed positions (mean over them) -- the model's own features, where the paper uses an external
  text embedder (NV-Embed-v2). Pass ``embed`` to use another. Kernel: Gaussian on the Euclidean distance with the
  median neighbour distance as bandwidth (or ``bandwidth``), or uniform.
- Kernel regression's coefficient is found by a ternary search on the neighbourhood loss (the paper's "binary
  search" between r and r_hat); mode finding's step ``a`` defaults to 0.5 (not given in the code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_float, check_int
from .logits import check_layer_indices, edit_router_logits, layers_of, output_logits, without_aux_gradient

STRATEGIES = ("ngd", "kernel", "mode")
POSITIONS = ("last", "all")
KERNELS = ("gaussian", "uniform")

SampleLoss = Callable[[Tensor, Tensor], Tensor]


def last_token_loss(output_BSV: Tensor, targets_B: Tensor) -> Tensor:
    """Per-sample cross-entropy of the last position's prediction (float [B]): next-token classification."""
    return F.cross_entropy(output_BSV[:, -1].float(), targets_B, reduction="none")


def last_token_correct(output_BSV: Tensor, targets_B: Tensor) -> Tensor:
    """bool [B]: the last position's argmax is the target."""
    return output_BSV[:, -1].argmax(-1) == targets_B


@dataclass
class R2T2Reference:
    """Correctly handled reference samples and their routing (built by `build_reference`).

    Attributes: ``inputs`` int [N, S]; ``targets`` [N]; ``embeddings_NF`` float [N, F]; ``routing_NLPE`` float
    [N, L', P, E] routing weights at ``layers`` (MoE-layer indices) and ``positions``.
    """

    inputs: Tensor
    targets: Tensor
    embeddings_NF: Tensor
    routing_NLPE: Tensor
    layers: tuple[int, ...]
    positions: str


@dataclass
class R2T2Result:
    """``routing_BLPE``: the re-routed weights; ``initial_routing_BLPE``: the router's own; ``neighbors_BK``:
    reference indices used (the last step's for "mode"); ``output``: the model's output on the test inputs with
    the new routing; ``alpha_B``: kernel regression's interpolation coefficients (None otherwise)."""

    routing_BLPE: Tensor
    initial_routing_BLPE: Tensor
    neighbors_BK: Tensor
    output: Tensor
    alpha_B: Optional[Tensor] = None


def _check_softmax_routers(model: nn.Module, layers: Sequence[int]) -> int:
    """The common E of ``layers``; ValueError unless each router's scores are the softmax of its logits."""
    moe = layers_of(model)
    sizes = {moe[i].num_experts for i in layers}
    if len(sizes) != 1:
        raise ValueError(f"layers must have the same number of experts, got {sorted(sizes)}")
    for i in layers:
        router = moe[i].router
        z = torch.randn(3, router.num_experts, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        scores = getattr(router, "scores", None)
        if scores is None or not torch.allclose(scores(z).double(), z.softmax(-1), atol=1e-6):
            raise ValueError(f"MoE layer {i} ({type(router).__name__}) does not score experts with a softmax of its "
                             "logits; R2-T2 re-routes softmax routing weights only")
    return sizes.pop()


def _positions(positions: str) -> slice:
    return slice(-1, None) if positions == "last" else slice(None)


@torch.no_grad()
def _capture(model: nn.Module, inputs_BS: Tensor, layers: tuple[int, ...], positions: str) -> tuple[Tensor, Tensor]:
    """(routing_BLPE, embedding_BD): the routing weights at ``layers`` and the input of the first of them."""
    moe = layers_of(model)
    B, store = inputs_BS.shape[0], {}

    def keep(i: int):
        def fn(logits_TE: Tensor) -> Tensor:
            store[i] = logits_TE.detach()
            return logits_TE
        return fn

    handle = moe[layers[0]].register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach()))
    try:
        with edit_router_logits(model, {i: keep(i) for i in layers}):
            model(inputs_BS)
    finally:
        handle.remove()
    sel = _positions(positions)
    routing = torch.stack([store[i].softmax(-1).reshape(B, -1, store[i].shape[-1])[:, sel] for i in layers], 1)
    x = store["x"]
    return routing, x.reshape(B, -1, x.shape[-1])[:, sel].float().mean(1)


def _imposed(model: nn.Module, layers: tuple[int, ...], positions: str, routing_BLPE: Tensor, batch: int):
    """A block in which a batch of ``batch`` inputs routes with ``routing_BLPE`` (B = 1 broadcasts)."""
    def edit(j: int):
        def fn(logits_TE: Tensor) -> Tensor:
            E = logits_TE.shape[-1]
            l_BSE = logits_TE.reshape(batch, -1, E)
            log_r = routing_BLPE[:, j].clamp_min(torch.finfo(routing_BLPE.dtype).tiny).log().to(logits_TE.dtype)
            if positions == "last":
                new = torch.cat([l_BSE[:, :-1], log_r.expand(batch, 1, E)], 1)
            else:
                if log_r.shape[1] != l_BSE.shape[1]:
                    raise ValueError(f"positions='all' needs inputs of the reference's length {log_r.shape[1]}, got "
                                     f"{l_BSE.shape[1]}")
                new = log_r.expand(batch, -1, E)
            return new.reshape(logits_TE.shape)
        return fn

    return edit_router_logits(model, {i: edit(j) for j, i in enumerate(layers)})


@torch.no_grad()
def build_reference(model: nn.Module, inputs_NS: Tensor, targets_N: Tensor, layers: Sequence[int], *,
                    positions: str = "last", is_correct: Callable[[Tensor, Tensor], Tensor] = last_token_correct,
                    embed: Optional[Callable[[Tensor], Tensor]] = None, batch_size: int = 256) -> R2T2Reference:
    """The reference set: the samples of a labelled task that ``model`` gets right, with their routing weights at
    ``layers`` / ``positions`` and their embeddings (see the module docstring). ValueError when none is right."""
    inputs_NS, targets_N, layers, positions = _check_common(model, inputs_NS, targets_N, layers, positions)
    check_int("batch_size", batch_size, 1)
    keep, routing, emb = [], [], []
    for start in range(0, inputs_NS.shape[0], batch_size):
        x, y = inputs_NS[start:start + batch_size], targets_N[start:start + batch_size]
        r, e = _capture(model, x, layers, positions)
        keep.append(is_correct(output_logits(model(x)), y).bool())
        routing.append(r)
        emb.append(e if embed is None else embed(x).float())
    ok = torch.cat(keep)
    if not bool(ok.any()):
        raise ValueError("the model handles none of the reference samples correctly: no reference routing to use")
    return R2T2Reference(inputs_NS[ok], targets_N[ok], torch.cat(emb)[ok], torch.cat(routing)[ok], layers, positions)


def _check_common(model, inputs, targets, layers, positions):
    if not isinstance(inputs, Tensor) or inputs.dim() < 2:
        raise ValueError(f"inputs must be a tensor [N, S, ...] (a batch of sequences), got "
                         f"{getattr(inputs, 'shape', type(inputs).__name__)}")
    if targets is not None and (not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]):
        raise ValueError(f"targets must be a tensor with {inputs.shape[0]} rows (one per input), got "
                         f"{getattr(targets, 'shape', type(targets).__name__)}")
    if positions not in POSITIONS:
        raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    layers = check_layer_indices("layers", layers, len(layers_of(model)))
    _check_softmax_routers(model, layers)
    return inputs, targets, layers, positions


def kernel_weights(dist_K: Tensor, kernel: str = "gaussian", bandwidth: Optional[float] = None) -> Tensor:
    """Neighbour weights from distances: Gaussian ``exp(-d^2 / (2 h^2))`` (h = ``bandwidth``, else the median
    distance; all ones when that is 0) or uniform."""
    if kernel == "uniform":
        return torch.ones_like(dist_K)
    h = float(dist_K.median()) if bandwidth is None else bandwidth
    if h <= 0:
        return torch.ones_like(dist_K)
    return torch.exp(-dist_K.square() / (2 * h * h))


def neighborhood_loss(model: nn.Module, reference: R2T2Reference, neighbors_K: Tensor, weights_K: Tensor,
                      routing_1LPE: Tensor, sample_loss: SampleLoss = last_token_loss) -> Tensor:
    """``sum_i K_i l(f(x_i; r), y_i) / sum_i K_i``: the neighbours' loss when they route with ``routing_1LPE``.
    For its gradient in r, run forward and backward under `without_aux_gradient` (as `r2t2` does): the layers'
    balance losses would otherwise add their own gradient."""
    x = reference.inputs[neighbors_K]
    with _imposed(model, reference.layers, reference.positions, routing_1LPE, x.shape[0]):
        losses_K = sample_loss(output_logits(model(x)), reference.targets[neighbors_K])
    return (weights_K.to(losses_K.dtype) * losses_K).sum() / weights_K.sum()


def r2t2(model: nn.Module, inputs_BS: Tensor, reference: R2T2Reference, *, strategy: str = "ngd",
         num_neighbors: int = 5, kernel: str = "gaussian", bandwidth: Optional[float] = None, steps: int = 10,
         lr: float = 1e-2, final_lr: float = 1e-5, optimizer: str = "adam", alpha: Optional[float] = None,
         search_steps: int = 8, mode_step: float = 0.5, sample_loss: SampleLoss = last_token_loss,
         embed: Optional[Callable[[Tensor], Tensor]] = None) -> R2T2Result:
    """Re-route each test input of ``inputs_BS`` toward its correctly handled neighbours (module docstring).

    Args:
        reference: from `build_reference` (fixes the layers and positions re-routed).
        strategy: "ngd" | "kernel" | "mode".  num_neighbors: k of the kNN neighbourhood.
        kernel / bandwidth: neighbour weights (`kernel_weights`).
        steps: NGD steps / mean-shift iterations.  lr / final_lr / optimizer: NGD's cosine schedule and
            optimiser ("adam" as the reference code, or plain "sgd": ``z <- z - lr * grad``).
        alpha: kernel regression's coefficient (None: searched with ``search_steps`` ternary steps).
        mode_step: mean shift's interpolation step.  sample_loss: per-sample loss ``(output, targets) -> [B]``.
        embed: the embedding ``inputs -> [B, F]`` the reference was built with (None: the default of both).
    Run the model in eval mode; its parameters and their ``.grad`` are never changed.
    """
    if not isinstance(reference, R2T2Reference):
        raise TypeError(f"reference must be an R2T2Reference (build_reference), got {type(reference).__name__}")
    layers, positions = reference.layers, reference.positions
    _check_common(model, inputs_BS, None, layers, positions)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    k = min(check_int("num_neighbors", num_neighbors, 1), reference.inputs.shape[0])
    check_int("steps", steps, 0)
    check_int("search_steps", search_steps, 0)
    lr, final_lr = check_float("lr", lr, 0.0), check_float("final_lr", final_lr, 0.0)
    mode_step = check_float("mode_step", mode_step, 0.0, 1.0)
    if bandwidth is not None:
        bandwidth = check_float("bandwidth", bandwidth, 0.0, low_inclusive=False)
    if alpha is not None:
        alpha = check_float("alpha", alpha, 0.0, 1.0)

    routing0, emb = _capture(model, inputs_BS, layers, positions)
    if embed is not None:
        emb = embed(inputs_BS).float()
    ref_emb = reference.embeddings_NF.to(emb.device)
    new, neighbors, alphas = [], [], []
    for b in range(inputs_BS.shape[0]):
        r0 = routing0[b:b + 1]
        if strategy == "mode":
            r, idx = _mode_find(r0, reference.routing_NLPE, k, kernel, bandwidth, steps, mode_step)
        else:
            dist = torch.cdist(emb[b:b + 1], ref_emb)[0]
            d_K, idx = dist.topk(k, largest=False)
            w_K = kernel_weights(d_K, kernel, bandwidth)
            if strategy == "kernel":
                r, a = _kernel_regression(model, reference, idx, w_K, r0, alpha, search_steps, sample_loss)
                alphas.append(a)
            else:
                r = _ngd(model, reference, idx, w_K, r0, steps, lr, final_lr, optimizer, sample_loss)
        new.append(r)
        neighbors.append(idx)
    routing = torch.cat(new)
    with torch.no_grad(), _imposed(model, layers, positions, routing, inputs_BS.shape[0]):
        output = output_logits(model(inputs_BS))
    return R2T2Result(routing, routing0, torch.stack(neighbors), output,
                      torch.tensor(alphas, dtype=torch.float64) if alphas else None)


def _ngd(model, reference, idx, w_K, r0, steps, lr, final_lr, optimizer, sample_loss) -> Tensor:
    z = r0.clamp_min(torch.finfo(r0.dtype).tiny).log().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr) if optimizer == "adam" else torch.optim.SGD([z], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=final_lr)
    with without_aux_gradient(model):
        for _ in range(steps):
            loss = neighborhood_loss(model, reference, idx, w_K, z.softmax(-1), sample_loss)
            (z.grad,) = torch.autograd.grad(loss, [z])  # the model's own .grad stays untouched
            opt.step()
            sched.step()
    return z.detach().softmax(-1)


@torch.no_grad()
def _kernel_regression(model, reference, idx, w_K, r0, alpha, search_steps, sample_loss) -> tuple[Tensor, float]:
    w = w_K.to(reference.routing_NLPE.dtype)
    r_hat = (w[:, None, None, None] * reference.routing_NLPE[idx]).sum(0, keepdim=True) / w.sum()
    if alpha is None:
        def loss(a: float) -> float:
            return float(neighborhood_loss(model, reference, idx, w_K, (1 - a) * r0 + a * r_hat, sample_loss))

        lo, hi = 0.0, 1.0
        for _ in range(search_steps):
            m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
            if loss(m1) <= loss(m2):
                hi = m2
            else:
                lo = m1
        alpha = min((0.0, (lo + hi) / 2, 1.0), key=loss)
    return (1 - alpha) * r0 + alpha * r_hat, alpha


@torch.no_grad()
def _mode_find(r0, ref_routing, k, kernel, bandwidth, steps, step) -> tuple[Tensor, Tensor]:
    flat_N = ref_routing.reshape(ref_routing.shape[0], -1)
    r = r0
    idx = torch.zeros(k, dtype=torch.long)
    for _ in range(steps):
        dist = torch.cdist(r.reshape(1, -1), flat_N)[0]
        d_K, idx = dist.topk(k, largest=False)
        w = kernel_weights(d_K, kernel, bandwidth).to(ref_routing.dtype)
        r_bar = (w[:, None, None, None] * ref_routing[idx]).sum(0, keepdim=True) / w.sum()
        r = (1 - step) * r + step * r_bar
    return r, idx
