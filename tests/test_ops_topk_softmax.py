"""moe_routing/ops/topk_softmax.py: the fused top-k + softmax op against a per-token float64 reference (ties,
NaN / inf rows, bf16), its gradients, opcheck, argument checks, and the torch backend's selection against a
stable sort. The Triton backend runs under TRITON_INTERPRET=1 (set in tests/conftest.py)."""
from __future__ import annotations

import math
import os

import pytest
import torch

from moe_routing.ops.topk_softmax import topk_softmax

HAVE_TRITON = os.environ.get("TRITON_INTERPRET") == "1" and __import__("importlib").util.find_spec("triton")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAVE_TRITON, reason="needs triton "
                                                                     "and TRITON_INTERPRET=1"))]
MODES = [(False, False), (True, False), (True, True)]  # (softmax_before_topk, normalize)


def naive_topk_softmax(logits_TE: torch.Tensor, k: int, softmax_first: bool, normalize: bool):
    """One token at a time in float64: ids by (NaN first, value descending, id ascending), then the weights."""
    ids, weights = [], []
    for row in logits_TE.double().tolist():
        E = len(row)
        order = sorted(range(E), key=lambda e: (0, 0.0, e) if math.isnan(row[e]) else (1, -row[e], e))
        chosen = order[:k]
        pool = range(E) if softmax_first and not normalize else chosen
        if any(math.isnan(row[e]) for e in pool):
            w = [math.nan] * k
        else:
            top = max(row[e] for e in pool)
            den = sum(math.exp(row[e] - top) if row[e] != top else 1.0 for e in pool) if top != -math.inf \
                else math.nan
            w = [(math.exp(row[e] - top) if row[e] != top else 1.0) / den for e in chosen]
            if top == math.inf:  # inf - inf: torch's softmax gives NaN
                w = [math.nan] * k
        ids.append(chosen)
        weights.append(w)
    return torch.tensor(weights, dtype=torch.float64).view(-1, k), torch.tensor(ids, dtype=torch.long).view(-1, k)


def _check(logits, k, backend, softmax_first, normalize, rtol):
    w, i = topk_softmax(logits, k, backend, softmax_before_topk=softmax_first, normalize=normalize)
    ref_w, ref_i = naive_topk_softmax(logits, k, softmax_first, normalize)
    assert i.dtype == torch.int64 and i.shape == (logits.shape[0], k)
    assert w.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(w.double(), ref_w, rtol=rtol, atol=rtol * 0.1, equal_nan=True)
    return w, i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax_first,normalize", MODES)
@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (37, 12, 3), (9, 256, 8), (5, 6, 6), (0, 5, 2), (3, 1000, 2)])
def test_matches_naive_reference(backend, softmax_first, normalize, T, E, K):
    gen = torch.Generator().manual_seed(T * 1000 + E + K)
    logits = torch.randn(T, E, generator=gen) * 3
    _check(logits, K, backend, softmax_first, normalize, rtol=2e-6)
    _check(logits.double(), K, backend, softmax_first, normalize, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax_first,normalize", MODES)
def test_ties_go_to_the_lowest_id(backend, softmax_first, normalize):
    """Integer logits (many exact ties) and bf16 logits: ids are those of a stable descending sort. torch.topk
    picks the same *values* but on CPU not always the same ids (e.g. torch.zeros(8).topk(3) gives 6, 5, 4)."""
    gen = torch.Generator().manual_seed(7)
    ints = torch.randint(0, 3, (23, 13), generator=gen).float()
    ints[0] = 0.0  # a row that is one big tie
    w, i = _check(ints, 4, backend, softmax_first, normalize, rtol=2e-6)
    assert i[0].tolist() == [0, 1, 2, 3]
    assert torch.equal(ints.gather(1, i), ints.topk(4).values)  # same values as torch.topk
    bf16 = (torch.randn(17, 9, generator=gen) * 0.5).bfloat16()
    _check(bf16, 3, backend, softmax_first, normalize, rtol=2e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax_first,normalize", MODES)
def test_nan_and_inf_rows_give_distinct_in_range_ids(backend, softmax_first, normalize):
    nan, inf = math.nan, math.inf
    logits = torch.tensor([[1.0, nan, 2.0, nan, inf, 2.0, 0.5],
                           [nan] * 7,
                           [-inf] * 7,
                           [0.0, -inf, 1.0, -inf, -inf, -inf, -inf],
                           [inf, 1.0, inf, 0.0, -1.0, 3.0, 2.0],
                           [0.3, -0.2, 0.9, 0.1, 0.0, -1.0, 0.5]])
    for k in (1, 3, 7):
        w, i = _check(logits, k, backend, softmax_first, normalize, rtol=2e-6)
        assert int(i.min()) >= 0 and int(i.max()) < 7
        assert all(len(set(row)) == k for row in i.tolist())  # distinct, even in NaN / -inf rows
        assert torch.isfinite(w[-1]).all() and torch.isnan(w[:3]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax_first,normalize", MODES)
def test_gradcheck_float64(backend, softmax_first, normalize):
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 7, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    fn = lambda x: topk_softmax(x, 3, backend, softmax_before_topk=softmax_first, normalize=normalize)[0]  # noqa
    assert torch.autograd.gradcheck(fn, (logits,))
    # which logits get gradient: only the chosen ones unless the weights come from the full softmax
    _, idx = topk_softmax(logits.detach(), 3, backend, softmax_before_topk=softmax_first, normalize=normalize)
    (grad,) = torch.autograd.grad(fn(logits), logits, torch.randn(5, 3, dtype=torch.float64, generator=gen))
    chosen = torch.zeros_like(grad, dtype=torch.bool).scatter_(1, idx, True)
    if softmax_first and not normalize:
        assert (grad[~chosen] != 0).all()
    else:
        assert (grad[~chosen] == 0).all() and (grad[chosen] != 0).any()


def test_gradient_matches_per_token_autograd():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 9, dtype=torch.float64, generator=gen).requires_grad_()
    g = torch.randn(6, 2, dtype=torch.float64, generator=gen)
    (got,) = torch.autograd.grad(topk_softmax(logits, 2, "torch")[0], logits, g)
    ref = torch.zeros_like(logits)
    for t in range(6):
        row = logits.detach()[t].clone().requires_grad_()
        ids = sorted(range(9), key=lambda e: -row[e].item())[:2]
        w = torch.stack([row[e] for e in ids]).softmax(0)
        (ref[t],) = torch.autograd.grad(w, row, g[t])
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)


def test_opcheck_and_fake():
    from moe_routing.ops.topk_softmax import _topk_softmax

    logits = torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(_topk_softmax, (logits, 2, False, False, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_arguments_raise_before_compute():
    x = torch.randn(3, 5)
    with pytest.raises(TypeError, match="logits_TE must be a torch.Tensor"):
        topk_softmax([[1.0]], 1)
    with pytest.raises(TypeError, match="logits_TE must be a floating tensor"):
        topk_softmax(torch.ones(3, 5, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=r"logits_TE must be 2-D \[T, E\]"):
        topk_softmax(torch.randn(5), 1)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_softmax(x, 2.0)
    with pytest.raises(TypeError, match="k must be an int"):
        topk_softmax(x, True)
    for k in (0, 6):
        with pytest.raises(ValueError, match=r"k must be in \[1, E=5\]"):
            topk_softmax(x, k)
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_softmax(x, 2, "bogus")
    with pytest.raises(ValueError, match="logits_TE must be a CUDA tensor for the cuda backend"):
        topk_softmax(x, 2, "cuda")
    with pytest.raises(TypeError, match="softmax_before_topk must be a bool"):
        topk_softmax(x, 2, softmax_before_topk=1)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        topk_softmax(x, 2, normalize=None)


def test_torch_backend_selection_equals_stable_sort_on_tie_heavy_rows():
    """The torch backend takes torch.topk's values and redoes only rows whose ids could differ from a stable
    descending sort (ties at the cut, ties inside, NaN): fuzz it with many ties, NaN, -inf and -0.0."""
    from moe_routing.ops.topk_softmax import _select

    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        T, E = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 200, (1,), generator=g))
        k = int(torch.randint(1, E + 1, (1,), generator=g))
        x = torch.randint(-2, 3, (T, E), generator=g).float()
        for value in (math.nan, -math.inf, -0.0):
            x[torch.rand(T, E, generator=g) < 0.05] = value
        ref = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(_select(x, k), ref), seed
