"""moe_routing/losses/balance.py: Switch, sequence (DeepSeek-V3) and global-batch aux losses and z-loss against
independent per-token computations: alone and together, with padding, over two gloo ranks, as logged per layer,
and the routers' default losses; against megatron-core's own router for the Switch, sequence, global-batch
(over gradient accumulation) aux losses and the z-loss (skipped without megatron-core). Gradient injection and
accumulation: test_losses_attach.py.

The expected values here are computed with explicit Python loops over tokens, sequences and experts in float64;
they share no code with `moe_routing.losses`.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moe_routing as mr
from moe_routing import (GlobalBatchAuxLoss, MoELayer, RoutingContext, SequenceAuxLoss, SwitchAuxLoss, ZLoss,
                         aux_losses)

from helpers import LOSS_SIZES, loss_layer as make_layer, run_on_gloo_ranks

D, F, E = LOSS_SIZES


# ---- independent reference: per-token loops in float64 -------------------------------------------------------------
def ref_logits(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    W = layer.router.weight.detach().double()
    return x_TD.detach().double() @ W.t()


def ref_choices(scores_TE: torch.Tensor, k: int) -> list[list[int]]:
    """Experts of each token: the k largest scores, by sorting a Python list."""
    out = []
    for row in scores_TE.tolist():
        order = sorted(range(len(row)), key=lambda e: -row[e])
        out.append(order[:k])
    return out


def ref_probs(logits_TE: torch.Tensor, score_func: str) -> list[list[float]]:
    """Per-token probabilities: softmax, or sigmoid normalised to sum to one per token."""
    rows = []
    for row in logits_TE.tolist():
        if score_func == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
        else:
            ex = [1.0 / (1.0 + math.exp(-v)) for v in row]
        s = sum(ex)
        rows.append([v / s for v in ex])
    return rows


def ref_switch_aux(probs: list[list[float]], choices: list[list[int]], k: int, num_experts: int) -> float:
    """E * sum_i f_i * P_i with f_i = count_i / (T*k), P_i = mean_t p_ti, from one-hot rows."""
    T = len(probs)
    if T == 0:
        return 0.0
    f = [0.0] * num_experts
    P = [0.0] * num_experts
    for t in range(T):
        onehot = [0.0] * num_experts
        for e in choices[t]:
            onehot[e] += 1.0
        for i in range(num_experts):
            f[i] += onehot[i] / (T * k)
            P[i] += probs[t][i] / T
    return num_experts * sum(f[i] * P[i] for i in range(num_experts))


def ref_sequence_aux(probs, choices, k, num_experts, seq_of_token) -> float:
    """Switch aux per sequence (on per-token-normalised scores), averaged over non-empty sequences."""
    seqs: dict[int, list[int]] = {}
    for t, s in enumerate(seq_of_token):
        seqs.setdefault(s, []).append(t)
    per_seq = [ref_switch_aux([probs[t] for t in toks], [choices[t] for t in toks], k, num_experts)
               for _, toks in sorted(seqs.items())]
    return sum(per_seq) / len(per_seq)


def ref_z_loss(logits_TE: torch.Tensor) -> float:
    vals = []
    for row in logits_TE.tolist():
        m = max(row)
        lse = m + math.log(sum(math.exp(v - m) for v in row))
        vals.append(lse * lse)
    return sum(vals) / len(vals)


def scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64)


def close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual.detach().double(), scalar(expected), rtol=rtol, atol=atol)


# ---- Switch aux ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_aux_matches_per_token_loop(top_k):
    layer = make_layer([SwitchAuxLoss(0.37)], top_k=top_k, return_aux_loss=True)
    torch.manual_seed(1)
    x = torch.randn(4, 7, D, dtype=torch.float64)
    y, aux = layer(x)
    assert y.shape == x.shape
    logits = ref_logits(layer, x.reshape(-1, D))
    probs = ref_probs(logits, "softmax")
    choices = ref_choices(logits, top_k)
    expected = 0.37 * ref_switch_aux(probs, choices, top_k, E)
    close(aux, expected)
    close(aux_losses(layer)[""]["switch_aux"], expected)


def test_switch_aux_sigmoid_scores_are_normalised_per_token():
    layer = make_layer([SwitchAuxLoss(1.0)], router_kwargs={"score_func": "sigmoid"}, return_aux_loss=True)
    torch.manual_seed(2)
    x = torch.randn(20, D, dtype=torch.float64)
    _, aux = layer(x)
    logits = ref_logits(layer, x)
    expected = ref_switch_aux(ref_probs(logits, "sigmoid"), ref_choices(logits, 2), 2, E)
    close(aux, expected)


@pytest.mark.parametrize("top_k", [1, 2])
def test_switch_aux_equals_coeff_at_perfect_balance(top_k):
    # Router = scaled identity; token t is 3*e_i + 1*e_{i+1} (i = t mod E): it picks expert i (and i+1 for k=2),
    # so every expert receives exactly T*k/E pairs. With f_i = 1/E the loss is E * sum_i P_i / E = 1.
    layer = MoELayer(E, F, E, top_k, losses=[SwitchAuxLoss(0.25)], return_aux_loss=True).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(E, dtype=torch.float64) * 2.0)
    T = 5 * E
    x = torch.zeros(T, E, dtype=torch.float64)
    for t in range(T):
        x[t, t % E] = 3.0
        x[t, (t + 1) % E] = 1.0
    _, aux = layer(x)
    counts = torch.bincount(torch.tensor(ref_choices(ref_logits(layer, x), top_k)).reshape(-1), minlength=E)
    assert counts.tolist() == [T * top_k // E] * E
    close(aux, 0.25)
    # skewed routing (all tokens prefer expert 0) is penalised: well above coeff
    x_skew = x.clone()
    x_skew[:, 0] += 10.0
    _, aux_skew = layer(x_skew)
    assert aux_skew.item() > 0.25 * 1.5


def test_switch_aux_layer_without_losses_returns_zero():
    layer = make_layer([], return_aux_loss=True)
    y, aux = layer(torch.randn(5, D, dtype=torch.float64))
    assert aux.item() == 0.0 and not aux.requires_grad
    assert aux_losses(layer) == {"": {}}


# ---- sequence aux (DeepSeek-V3) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_aux_bsd_input(score_func):
    layer = make_layer([SequenceAuxLoss(0.5)], router_kwargs={"score_func": score_func}, return_aux_loss=True)
    torch.manual_seed(3)
    B, S = 3, 5
    x = torch.randn(B, S, D, dtype=torch.float64)
    _, aux = layer(x)
    logits = ref_logits(layer, x.reshape(-1, D))
    probs = ref_probs(logits, score_func)
    choices = ref_choices(logits if score_func == "softmax" else logits, 2)  # sigmoid is monotone: same order
    seq = [t // S for t in range(B * S)]
    expected = 0.5 * ref_sequence_aux(probs, choices, 2, E, seq)
    close(aux, expected)
    # the per-sequence loss differs from the batch-level one (it is not a rename of switch aux)
    batch_level = 0.5 * ref_switch_aux(probs, choices, 2, E)
    assert abs(expected - batch_level) > 1e-4


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_sequence_aux_packed_input_with_seq_lens(score_func):
    layer = make_layer([SequenceAuxLoss(1.0)], router_kwargs={"score_func": score_func}, return_aux_loss=True)
    torch.manual_seed(4)
    lens = [3, 6, 1, 4]
    x = torch.randn(sum(lens), D, dtype=torch.float64)
    _, aux = layer(x, RoutingContext(seq_lens=torch.tensor(lens)))
    logits = ref_logits(layer, x)
    seq = [s for s, n in enumerate(lens) for _ in range(n)]
    expected = ref_sequence_aux(ref_probs(logits, score_func), ref_choices(logits, 2), 2, E, seq)
    close(aux, expected)
    # without seq_lens a [T, D] input is one sequence: the batch-level value
    _, aux_one = layer(x)
    close(aux_one, ref_switch_aux(ref_probs(logits, score_func), ref_choices(logits, 2), 2, E))
    assert abs(aux.item() - aux_one.item()) > 1e-4


def test_sequence_aux_bsd_equals_packed_equal_lengths():
    layer = make_layer([SequenceAuxLoss(1.0)], return_aux_loss=True)
    torch.manual_seed(5)
    x = torch.randn(4, 6, D, dtype=torch.float64)
    _, aux_bsd = layer(x)
    _, aux_packed = layer(x.reshape(-1, D), RoutingContext(seq_lens=[6, 6, 6, 6]))
    torch.testing.assert_close(aux_bsd, aux_packed, rtol=1e-12, atol=1e-14)


# ---- z-loss --------------------------------------------------------------------------------------------------------
def test_z_loss_matches_logsumexp_squared():
    layer = make_layer([ZLoss(1e-2)], return_aux_loss=True)
    torch.manual_seed(6)
    x = 3 * torch.randn(2, 9, D, dtype=torch.float64)
    _, aux = layer(x)
    expected = 1e-2 * ref_z_loss(ref_logits(layer, x.reshape(-1, D)))
    close(aux, expected)
    assert expected > 1e-3  # the check is not vacuous


def test_several_losses_sum_and_are_logged_separately():
    losses = [SwitchAuxLoss(0.1), ZLoss(0.01), SequenceAuxLoss(0.2)]
    layer = make_layer(losses, return_aux_loss=True)
    torch.manual_seed(7)
    x = torch.randn(2, 8, D, dtype=torch.float64)
    _, aux = layer(x)
    logits = ref_logits(layer, x.reshape(-1, D))
    probs, choices = ref_probs(logits, "softmax"), ref_choices(logits, 2)
    expected = {"switch_aux": 0.1 * ref_switch_aux(probs, choices, 2, E),
                "z_loss": 0.01 * ref_z_loss(logits),
                "seq_aux": 0.2 * ref_sequence_aux(probs, choices, 2, E, [t // 8 for t in range(16)])}
    logged = aux_losses(layer)[""]
    assert set(logged) == set(expected)
    for name, value in expected.items():
        close(logged[name], value)
        assert not logged[name].requires_grad
    close(aux, sum(expected.values()))
    close(mr.total_aux_loss(layer), sum(expected.values()))


# ---- padding -------------------------------------------------------------------------------------------------------
def test_padding_mask_excludes_tokens_from_every_loss():
    losses = [SwitchAuxLoss(1.0), ZLoss(1.0), SequenceAuxLoss(1.0)]
    layer = make_layer(losses, return_aux_loss=True)
    torch.manual_seed(8)
    B, S = 3, 6
    x = torch.randn(B, S, D, dtype=torch.float64)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[0, 4:] = True
    pad[1, 1:] = True
    pad[2, 0] = True
    # padded positions hold huge values: if they leaked into any loss, it would show
    x = x.masked_fill(pad[..., None], 50.0)
    _, aux = layer(x, RoutingContext(padding_mask=pad))
    logged = dict(aux_losses(layer)[""])

    valid = (~pad).reshape(-1)
    xv = x.reshape(-1, D)[valid]
    logits = ref_logits(layer, xv)
    probs, choices = ref_probs(logits, "softmax"), ref_choices(logits, 2)
    seq = [t // S for t in range(B * S) if valid[t]]
    expected = {"switch_aux": ref_switch_aux(probs, choices, 2, E), "z_loss": ref_z_loss(logits),
                "seq_aux": ref_sequence_aux(probs, choices, 2, E, seq)}
    for name, value in expected.items():
        close(logged[name], value)
    close(aux, sum(expected.values()))
    # the same as running the valid tokens alone, packed with their sequence lengths
    _, aux_packed = layer(xv, RoutingContext(seq_lens=(~pad).sum(1)))
    torch.testing.assert_close(aux, aux_packed, rtol=1e-12, atol=1e-14)


def test_padding_drops_a_fully_padded_sequence_from_sequence_aux():
    layer = make_layer([SequenceAuxLoss(1.0)], return_aux_loss=True)
    torch.manual_seed(9)
    x = torch.randn(3, 4, D, dtype=torch.float64)
    pad = torch.zeros(3, 4, dtype=torch.bool)
    pad[1] = True  # an all-padding sequence neither counts nor dilutes the average
    _, aux = layer(x, RoutingContext(padding_mask=pad))
    _, aux_two = layer(x[[0, 2]])
    torch.testing.assert_close(aux, aux_two, rtol=1e-12, atol=1e-14)


# ---- global-batch aux ----------------------------------------------------------------------------------------------
def test_global_batch_aux_equals_switch_aux_without_distributed():
    assert not (torch.distributed.is_available() and torch.distributed.is_initialized())
    torch.manual_seed(10)
    x = torch.randn(30, D, dtype=torch.float64)
    g = make_layer([GlobalBatchAuxLoss(0.3)], return_aux_loss=True)
    s = make_layer([SwitchAuxLoss(0.3)], return_aux_loss=True)
    _, aux_g = g(x)
    _, aux_s = s(x)
    torch.testing.assert_close(aux_g, aux_s, rtol=0, atol=0)
    logits = ref_logits(g, x)
    close(aux_g, 0.3 * ref_switch_aux(ref_probs(logits, "softmax"), ref_choices(logits, 2), 2, E))
    # gradients are identical too
    gg = torch.autograd.grad(aux_g, g.router.weight)[0]
    gs = torch.autograd.grad(aux_s, s.router.weight)[0]
    torch.testing.assert_close(gg, gs, rtol=0, atol=0)


def _global_aux_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = make_layer([GlobalBatchAuxLoss(1.0)], return_aux_loss=True, seed=0)
        # each rank can rebuild every rank's micro-batch: rank r's data is seeded with 100 + r
        xs = []
        for r in range(world):
            torch.manual_seed(100 + r)
            n = 8 + 5 * r  # ranks hold different token counts
            x = torch.randn(n, D, dtype=torch.float64)
            if r == 1:
                x[:, :] += layer.router.weight[0].detach()  # rank 1 prefers expert 0: global counts differ
            xs.append(x)
        _, aux = layer(xs[rank])
        # expected: counts and T summed over ranks, P from this rank's tokens only
        counts = [0.0] * E
        total_T = 0
        for x in xs:
            for row in ref_choices(ref_logits(layer, x), 2):
                for e in row:
                    counts[e] += 1
            total_T += x.shape[0]
        probs = ref_probs(ref_logits(layer, xs[rank]), "softmax")
        P = [sum(p[i] for p in probs) / len(probs) for i in range(E)]
        expected = E * sum(counts[i] / (total_T * 2) * P[i] for i in range(E))
        local = ref_switch_aux(probs, ref_choices(ref_logits(layer, xs[rank]), 2), 2, E)
        torch.testing.assert_close(aux.detach(), scalar(expected), rtol=1e-10, atol=1e-12)
        assert abs(expected - local) > 1e-3, (expected, local)  # differs from the local-only value
        aux.backward()  # gradients stay local (no collective in backward)
        assert layer.router.weight.grad.abs().sum() > 0
        _check_accumulation_over_ranks(rank, world)  # in the same processes: one spawn for both checks
    finally:
        dist.destroy_process_group()


def test_global_batch_aux_sums_counts_over_two_gloo_ranks():
    run_on_gloo_ranks(_global_aux_worker)


def ref_global_aux(layer, xs_seen, x_now, k=2) -> float:
    """Global-batch aux for ``x_now``: f from the choices over every token of ``xs_seen`` (all micro-batches of all
    ranks so far), P the mean over ``x_now``."""
    counts, total_T = [0.0] * E, 0
    for x in xs_seen:
        for row in ref_choices(ref_logits(layer, x), k):
            for e in row:
                counts[e] += 1
        total_T += x.shape[0]
    probs = ref_probs(ref_logits(layer, x_now), "softmax")
    P = [sum(p[i] for p in probs) / len(probs) for i in range(E)]
    return E * sum(counts[i] / (total_T * k) * P[i] for i in range(E))


def micro_batches(layer, n, sizes=(9, 5, 12), seed=40):
    """``n`` float64 micro-batches of varied sizes, each preferring a different expert (the counts drift)."""
    torch.manual_seed(seed)
    xs = []
    for m in range(n):
        x = torch.randn(sizes[m % len(sizes)], D, dtype=torch.float64)
        xs.append(x + layer.router.weight[m % E].detach())
    return xs


def test_global_aux_accumulates_micro_batches_until_the_step():
    layer = make_layer([GlobalBatchAuxLoss(1.0)], return_aux_loss=True)
    single = make_layer([GlobalBatchAuxLoss(1.0, accumulate=False)], return_aux_loss=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)  # lr 0: the step only runs the controllers
    handle = mr.attach(layer, opt)
    xs = micro_batches(layer, 5)
    steps = [xs[:3], xs[3:]]  # 3 micro-batches, step, 2 micro-batches
    for batch in steps:
        for m, x in enumerate(batch):
            _, aux = layer(x)
            close(aux, ref_global_aux(layer, batch[:m + 1], x))
            assert int(layer.last_stats["global_aux_micro_batches"]) == m + 1
            _, aux_single = single(x)
            close(aux_single, ref_global_aux(layer, [x], x))
            if m:
                assert abs(aux.item() - aux_single.item()) > 1e-3
            aux.backward()
        opt.step()  # the attached step restarts the counts
        assert int(layer.loss_state_0.abs().sum()) == 0
    handle.remove()


def test_global_aux_eval_and_no_grad_forwards_add_nothing():
    layer = make_layer([GlobalBatchAuxLoss(1.0)], return_aux_loss=True)
    xs = micro_batches(layer, 3)
    layer(xs[0])
    before = layer.loss_state_0.clone()
    with torch.no_grad():
        _, aux = layer(xs[1])
    close(aux, ref_global_aux(layer, [xs[1]], xs[1]))  # this micro-batch's own counts
    layer.eval()
    _, aux = layer(xs[2])
    close(aux, ref_global_aux(layer, [xs[2]], xs[2]))
    torch.testing.assert_close(layer.loss_state_0, before, rtol=0, atol=0)


def test_global_aux_checkpoint_recompute_counts_once():
    from torch.utils.checkpoint import checkpoint

    layer = make_layer([GlobalBatchAuxLoss(1.0)], return_aux_loss=True)
    plain = make_layer([GlobalBatchAuxLoss(1.0)], return_aux_loss=True)
    for x in micro_batches(layer, 2):
        y, aux = checkpoint(layer, x, use_reentrant=False)
        (y.sum() + aux).backward()
        y, aux = plain(x)
        (y.sum() + aux).backward()
    torch.testing.assert_close(layer.loss_state_0, plain.loss_state_0, rtol=0, atol=0)
    assert int(layer.loss_state_0[-1]) == 2
    torch.testing.assert_close(layer.router.weight.grad, plain.router.weight.grad, rtol=1e-10, atol=1e-12)


def test_global_aux_state_is_per_layer_with_a_shared_loss():
    loss = GlobalBatchAuxLoss(1.0)
    model = nn.Sequential(make_layer([loss]), make_layer([loss], seed=1))
    xs = micro_batches(model[0], 2)
    for x in xs:
        model(x)
    assert int(model[0].loss_state_0[-1]) == int(model[1].loss_state_0[-1]) == 2
    assert not torch.equal(model[0].loss_state_0, model[1].loss_state_0)  # each layer counts its own choices
    assert not hasattr(loss, "state") and "loss_state_0" not in model.state_dict().__repr__()
    mr.step(model)
    assert int(model[0].loss_state_0.abs().sum()) == int(model[1].loss_state_0.abs().sum()) == 0
    # a losses list edited after construction gets fresh state on the next forward
    model[0].losses = [GlobalBatchAuxLoss(1.0), GlobalBatchAuxLoss(1.0, count="chosen")]
    model(xs[0])
    assert int(model[0].loss_state_1[-1]) == 1
    model[0].losses = [SwitchAuxLoss(1.0)]
    model(xs[0])
    assert not hasattr(model[0], "loss_state_0") or model[0].loss_state_0 is None


def test_global_aux_accumulate_needs_the_layer_state():
    layer = make_layer([SwitchAuxLoss(1.0)])
    d = layer.router(torch.randn(4, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="LossInputs.state"):
        GlobalBatchAuxLoss(1.0)(mr.LossInputs(decision=d, top_k=2))
    with pytest.raises(TypeError, match="accumulate"):
        GlobalBatchAuxLoss(1.0, accumulate=1)


def _check_accumulation_over_ranks(rank: int, world: int) -> None:
    """Micro-batch m of rank r sees the counts of micro-batches 1..m of every rank; a step restarts them."""
    layer = make_layer([GlobalBatchAuxLoss(1.0)], return_aux_loss=True, seed=0)
    # every rank rebuilds every rank's micro-batches (3 per rank, uneven sizes): mb m of rank r = xs[r][m]
    xs = [micro_batches(layer, 3, sizes=(6 + 3 * r, 4, 7 + r), seed=50 + r) for r in range(world)]
    for m in range(3):
        if m == 2:
            mr.step(layer)  # the optimizer step after 2 micro-batches: counts restart
        _, aux = layer(xs[rank][m])
        first = 0 if m < 2 else 2
        seen = [xs[r][j] for r in range(world) for j in range(first, m + 1)]
        torch.testing.assert_close(aux.detach(), scalar(ref_global_aux(layer, seen, xs[rank][m])),
                                   rtol=1e-10, atol=1e-12)
        aux.backward()


# ---- against megatron-core itself -----------------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True])
def test_global_aux_matches_megatron_over_gradient_accumulation(padded):
    """Megatron-Core 0.16's own ``TopKRouter`` with ``moe_router_load_balancing_type='global_aux_loss'`` (world
    size 1): three micro-batches, the reset Megatron's ``finalize_model_grads`` runs before the optimizer step, two
    more; the logged loss and the router-weight gradient of every micro-batch agree. Micro-batches hold equal
    numbers of non-padding tokens (where Megatron's mean-count-over-current-tokens f is a fraction). Tolerances:
    Megatron's aux-loss softmax and its logged value are float32."""
    from helpers import megatron_aux_value, megatron_cpu, megatron_router

    S, B = 5, 2
    with megatron_cpu() as pg:
        ours = make_layer([GlobalBatchAuxLoss(0.3)], return_aux_loss=True)
        ref = megatron_router(pg, ours.router.weight, 2, moe_router_load_balancing_type="global_aux_loss",
                              moe_aux_loss_coeff=0.3)
        torch.manual_seed(60)
        pad_SB = torch.zeros(S, B, dtype=torch.bool)
        if padded:
            pad_SB[3:, 0] = True  # 3 padding tokens in every micro-batch
        for step, n in enumerate((3, 2)):
            for m in range(n):
                x_SBD = torch.randn(S, B, D, dtype=torch.float64) + ours.router.weight[(m + step) % E].detach()
                probs, _ = ref(x_SBD, padding_mask=pad_SB if padded else None)
                ref.weight.grad = None
                (probs * 0).sum().backward()  # the aux loss's gradient alone
                ctx = RoutingContext(padding_mask=pad_SB.t()) if padded else None
                _, aux = ours(x_SBD.transpose(0, 1), ctx)
                grad = torch.autograd.grad(aux, ours.router.weight)[0]
                # Megatron takes the aux-loss softmax and logs in float32
                close(aux, 0.3 * megatron_aux_value("global_load_balancing_loss"), rtol=2e-6, atol=1e-7)
                torch.testing.assert_close(grad, ref.weight.grad, rtol=2e-6, atol=1e-7)
            mr.step(ours)
            ref.reset_global_aux_loss_tracker()


# Megatron-Core router settings (TransformerConfig fields) and the router_kwargs of ours that match them
MEGATRON_ROUTERS = {
    "softmax": ({}, {}),
    "sigmoid_bias_groups": ({"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                             "moe_router_num_groups": 3, "moe_router_group_topk": 2},
                            {"score_func": "sigmoid", "bias_update_rate": 1e-3, "num_groups": 3, "topk_groups": 2,
                             "group_score": "topk_sum"}),
}
# our loss, Megatron's config for it, the name Megatron logs it under
MEGATRON_LOSSES = {
    "aux_loss": (SwitchAuxLoss, {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.3},
                 "load_balancing_loss"),
    "seq_aux_loss": (SequenceAuxLoss, {"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.3},
                     "seq_load_balancing_loss"),
    "z_loss": (ZLoss, {"moe_router_load_balancing_type": "none", "moe_z_loss_coeff": 0.3}, "z_loss"),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("router", sorted(MEGATRON_ROUTERS))
@pytest.mark.parametrize("kind", sorted(MEGATRON_LOSSES))
def test_losses_match_megatron(kind, router, padded):
    """Megatron-Core 0.16's own ``TopKRouter`` (world size 1) with ``aux_loss`` / ``seq_aux_loss`` / z-loss:
    the logged value and the router-weight gradient equal ours (SwitchAuxLoss / SequenceAuxLoss / ZLoss) in the
    default softmax router and in a sigmoid router with an expert bias and group-limited routing, where both
    count the top-k of the unbiased scores. Padding: the same positions in every sequence (Megatron's sequence
    aux divides every sequence by the mean non-padding length, ours by each sequence's own). Tolerances:
    Megatron's aux-loss softmax and logged values are float32."""
    from helpers import megatron_aux_value, megatron_cpu, megatron_router

    S, B = 7, 3
    mc_config, router_kwargs = MEGATRON_ROUTERS[router]
    loss_cls, loss_config, logged = MEGATRON_LOSSES[kind]
    with megatron_cpu() as pg:
        ours = make_layer([loss_cls(0.3)], return_aux_loss=True, router_kwargs=router_kwargs)
        ref = megatron_router(pg, ours.router.weight, 2, **mc_config, **loss_config)
        if ours.router.expert_bias is not None:
            bias = torch.tensor([0.25, -0.5, 0.125, 0.375, -0.25, 0.0])  # exact in float32 and float64
            ours.router.expert_bias.copy_(bias)
            ref.expert_bias.copy_(bias)
            # routing still adds the bias; this only skips the bias-update counting, which in megatron-core
            # 0.16 fails with a padding mask (`_apply_expert_bias` ANDs the [T, E] map with the [T] mask)
            ref.enable_expert_bias = False
        torch.manual_seed(61)
        x_SBD = torch.randn(S, B, D, dtype=torch.float64)
        pad_SB = torch.zeros(S, B, dtype=torch.bool)
        if padded:
            pad_SB[5:] = True
        probs, routing_map = ref(x_SBD, padding_mask=pad_SB if padded else None)
        (probs * 0).sum().backward()  # the loss's gradient alone
        ctx = RoutingContext(padding_mask=pad_SB.t()) if padded else None
        _, aux = ours(x_SBD.transpose(0, 1), ctx)
        grad = torch.autograd.grad(aux, ours.router.weight)[0]
        experts = ours.router(x_SBD.transpose(0, 1).reshape(-1, D)).experts_TK
        want_map = routing_map.view(S, B, E).transpose(0, 1).reshape(-1, E)
        assert torch.equal(torch.zeros_like(want_map).scatter_(1, experts, True), want_map)  # same routing
        close(aux, 0.3 * megatron_aux_value(logged), rtol=2e-6, atol=1e-7)
        assert ref.weight.grad.abs().max() > 0
        torch.testing.assert_close(grad, ref.weight.grad, rtol=2e-6, atol=1e-7)


# ---- values logged per layer, defaults, coefficients ---------------------------------------------------------------
def test_aux_losses_per_layer_detached_and_return_mode():
    model = nn.ModuleDict({"a": make_layer([SwitchAuxLoss(0.1)]), "b": make_layer([ZLoss(0.2)], seed=3)})
    torch.manual_seed(15)
    x = torch.randn(7, D, dtype=torch.float64)
    ya = model["a"](x)
    model["b"](ya)
    vals = aux_losses(model)
    assert set(vals) == {"a", "b"}
    assert set(vals["a"]) == {"switch_aux"} and set(vals["b"]) == {"z_loss"}
    assert not vals["a"]["switch_aux"].requires_grad and not vals["b"]["z_loss"].requires_grad
    la = ref_logits(model["a"], x)
    close(vals["a"]["switch_aux"], 0.1 * ref_switch_aux(ref_probs(la, "softmax"), ref_choices(la, 2), 2, E))
    close(vals["b"]["z_loss"], 0.2 * ref_z_loss(ref_logits(model["b"], ya)))
    # return mode: (y, aux) with aux differentiable and y equal to the injecting mode's output
    model["a"].return_aux_loss = True
    y, aux = model["a"](x)
    assert isinstance(aux, torch.Tensor) and aux.dim() == 0 and aux.requires_grad
    torch.testing.assert_close(y, ya.detach(), rtol=0, atol=0)
    torch.testing.assert_close(aux.detach(), vals["a"]["switch_aux"], rtol=0, atol=0)
    # in return mode nothing is injected: y's backward gives the router only the main-path gradient
    (y * 0).sum().backward()
    assert model["a"].router.weight.grad.abs().max() == 0


def test_default_losses_per_router():
    soft = MoELayer(D, F, E, 2)
    sig = MoELayer(D, F, E, 2, router_kwargs={"score_func": "sigmoid"})
    assert [type(l) for l in soft.losses] == [SwitchAuxLoss] and soft.losses[0].coeff == 1e-2
    assert [type(l) for l in sig.losses] == [SequenceAuxLoss] and sig.losses[0].coeff == 1e-4


def test_loss_coeff_must_be_non_negative():
    for cls in (SwitchAuxLoss, SequenceAuxLoss, ZLoss, GlobalBatchAuxLoss):
        with pytest.raises(ValueError, match="coeff"):
            cls(-1.0)


def test_switch_aux_of_an_empty_batch_is_zero_not_nan():
    """An expert-parallel rank with no tokens still runs its layers: its switch aux is 0 (not 0/0 = NaN)."""
    from moe_routing.losses.balance import switch_aux_loss

    layer = mr.MoELayer(8, 4, 4, 2)
    decision = layer.router(torch.zeros(0, 8), None, 0, "torch")
    assert switch_aux_loss(decision, 2).item() == 0.0
