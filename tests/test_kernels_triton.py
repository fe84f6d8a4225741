"""kernels/ (installed as moe_routing._kernels): the Triton backend under TRITON_INTERPRET=1 on CPU against the
torch reference backend, for the ops and the whole layer, and the hints (top_k, max_pairs) its kernels get."""
import os

import pytest
import torch

pytest.importorskip("triton")

import moe_routing as mr  # noqa: E402
from moe_routing.ops import combine, permute  # noqa: E402
from moe_routing.ops.backend import resolve_backend  # noqa: E402

from helpers import D, K, backend_results, gen, moe  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _pairs(T, E, K, gen, variable=False):
    """Routed pairs in token order: fixed K distinct experts per token, or 0..K experts when ``variable``."""
    token, expert = [], []
    for t in range(T):
        k = int(torch.randint(0, K + 1, (1,), generator=gen)) if variable else K
        for e in torch.randperm(E, generator=gen)[:k].tolist():
            token.append(t)
            expert.append(e)
    token_N = torch.tensor(token, dtype=torch.long)
    expert_N = torch.tensor(expert, dtype=torch.long)
    pair_of_row_N, _, _ = mr.ops.sort_by_expert(expert_N, E)
    return token_N, expert_N, pair_of_row_N, mr.ops.invert_permutation(pair_of_row_N)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("D", [1, 33, 1030])
def test_permute_exact(index_dtype, D):
    gen = torch.Generator().manual_seed(D)
    x = torch.randn(11, D, generator=gen)
    src_token = torch.randint(0, 11, (29,), generator=gen).to(index_dtype)
    assert torch.equal(permute(x, src_token, "triton"), permute(x, src_token, "torch"))


@pytest.mark.parametrize("T,E,K,variable", [(1, 4, 2, False), (17, 8, 3, False), (23, 256, 4, False),
                                             (19, 6, 3, True)])
@pytest.mark.parametrize("D", [7, 1030])
def test_combine_and_backward_fp32(T, E, K, variable, D):
    gen = torch.Generator().manual_seed(T * D)
    token_N, _, _, row_of_pair_N = _pairs(T, E, K, gen, variable)
    N = token_N.numel()
    top_k = None if variable else K
    h = torch.randn(N, D, generator=gen, requires_grad=True)
    w = torch.rand(N, generator=gen, requires_grad=True)
    dy = torch.randn(T, D, generator=gen)
    outs = {}
    for backend in ("torch", "triton"):
        y = combine(h, w, row_of_pair_N, token_N, T, top_k, backend)
        outs[backend] = (y, *torch.autograd.grad(y, (h, w), dy))
    atol = 1e-6 * max(1.0, K * D ** 0.5)
    for ref, got in zip(outs["torch"], outs["triton"]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=atol)


def test_combine_bf16_within_bf16_tolerance():
    gen = torch.Generator().manual_seed(1)
    T, E, K, D = 13, 8, 2, 64
    token_N, _, _, row_of_pair_N = _pairs(T, E, K, gen)
    h32 = torch.randn(T * K, D, generator=gen)
    w = torch.rand(T * K, generator=gen)
    ref = combine(h32.bfloat16().float(), w, row_of_pair_N, token_N, T, K, "torch")
    got = combine(h32.bfloat16(), w, row_of_pair_N, token_N, T, K, "triton")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1e-2)


def test_gradcheck_float64_through_triton_ops():
    gen = torch.Generator().manual_seed(2)
    token_N, _, _, row_of_pair_N = _pairs(4, 3, 2, gen)
    h = torch.randn(8, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: combine(a, b, row_of_pair_N, token_N, 4, 2, "triton"), (h, w))
    assert torch.autograd.gradcheck(lambda a, b: combine(a, b, row_of_pair_N, token_N, 4, None, "triton"), (h, w))
    src_token = torch.tensor([0, 3, 3, 1, 0, 2, 3])
    assert torch.autograd.gradcheck(lambda a: permute(a, src_token, "triton"), (x,))


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_layer_triton_matches_torch(capacity_factor):
    torch.manual_seed(0)
    layer = mr.MoELayer(33, 24, 6, 2, capacity_factor=capacity_factor)
    x = torch.randn(2, 9, 33, requires_grad=True)
    for ref, got in zip(*backend_results(layer, x, ("torch", "triton"))):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_out_of_range_index_raises_before_launch():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="src_token_N"):
        permute(x, torch.tensor([0, 4]), "triton")
    h, w = torch.randn(2, 8), torch.rand(2)
    with pytest.raises(ValueError, match="row_of_pair_N"):
        combine(h, w, torch.tensor([0, 2]), torch.tensor([0, 1]), 2, 1, "triton")


def test_backend_resolution_and_errors(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"  # auto picks Triton only for CUDA tensors
    assert resolve_backend("triton", cpu) == "triton"  # interpreter on
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors or TRITON_INTERPRET=1"):
        resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="cuda backend is unavailable"):
        resolve_backend("cuda", cpu)
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "torch")
    assert resolve_backend("triton", cpu) == "torch"
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("auto", cpu)
    layer = mr.MoELayer(8, 8, 2, 1, backend="cuda")
    monkeypatch.delenv("MOE_ROUTING_BACKEND")
    with pytest.raises(ValueError, match="cuda backend"):
        layer(torch.randn(3, 8))


def test_gpu_check_smoke(tmp_path):
    """The GPU script's code paths (checks, timing, JSON) run end to end on tiny sizes under the interpreter."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert {r["op"] for r in report["ops"]} == {"permute", "combine", "combine_bwd", "sort_by_expert",
                                                "topk_softmax"}
    assert report["layer"]["E"] == 8 and report["copy_GBps"] > 0
    assert report["cuda"]["available"] is False and report["cuda"]["reason"]  # no GPU: skipped, with the reason


@pytest.mark.parametrize("N,E", [(0, 4), (1, 4), (300, 8), (1000, 256), (77, 3)])
def test_sort_by_expert_kernel_matches_torch(N, E):
    expert_N = torch.randint(0, E, (N,), generator=torch.Generator().manual_seed(N))
    got = mr.ops.sort_by_expert(expert_N, E, "triton")
    ref = mr.ops.sort_by_expert(expert_N, E, "torch")
    for g, r in zip(got, ref):
        assert torch.equal(g, r)  # stable order, counts and offsets all exact
    with pytest.raises(ValueError, match="expert_N"):
        mr.ops.sort_by_expert(torch.tensor([0, E]), E, "triton")


@pytest.mark.parametrize("softmax_first,normalize", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("T,E,K", [(1, 4, 1), (37, 12, 3), (9, 256, 8), (5, 6, 6)])
def test_fused_topk_softmax(softmax_first, normalize, T, E, K):
    from moe_routing._kernels.topk_softmax import topk_softmax

    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(E))
    weights, experts = topk_softmax(logits, K, softmax_first, normalize)
    if softmax_first:
        ref_w, ref_i = logits.softmax(-1).topk(K)
        if normalize:
            ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    else:
        ref_w, ref_i = logits.topk(K)
        ref_w = ref_w.softmax(-1)
    assert torch.equal(experts, ref_i)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)


def test_combine_autotune_key_excludes_max_pairs():
    """max_pairs varies per batch (variable-k routing): it must neither be an autotune key (re-tunes per value)
    nor specialised (a recompile for 1 / multiples of 16). Checked on the GPU-mode objects, in a subprocess
    without the interpreter (no GPU needed: nothing compiles at import)."""
    import subprocess
    import sys

    code = ("from moe_routing._kernels import combine as c; k = c._combine_kernel; "
            "print(sorted(k.keys), [p.do_not_specialize for p in k.fn.params if p.name == 'max_pairs'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("\n")[0] == "['D', 'HAS_W'] [True]"


def test_triton_backward_gets_top_k_and_max_pairs(monkeypatch):
    pytest.importorskip("triton")
    from moe_routing._kernels import combine as kernel

    calls = []
    real = kernel.combine
    monkeypatch.setattr(kernel, "combine", lambda *a, **kw: calls.append((a[3].clone(), kw.get("max_pairs")))
                        or real(*a, **kw))
    T, k = 5, 3
    src_token = torch.arange(T).repeat_interleave(k)[torch.randperm(T * k, generator=gen(7))]
    x = torch.randn(T, 6, generator=gen(8), dtype=torch.float64, requires_grad=True)
    g = torch.randn(T * k, 6, generator=gen(9), dtype=torch.float64)
    (permute(x, src_token, "triton", top_k=k) * g).sum().backward()
    offsets, max_pairs = calls[-1]
    assert max_pairs == k and offsets.tolist() == [t * k for t in range(T + 1)]
    ref = torch.zeros(T, 6, dtype=torch.float64)
    for n in range(T * k):
        ref[int(src_token[n])] += g[n]
    torch.testing.assert_close(x.grad, ref, rtol=1e-12, atol=1e-12)
    # variable k with a bound: offsets from the sorted rows, the bound passed through
    calls.clear()
    rows_v = torch.tensor([4, 0, 4, 2, 4])
    xv = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: permute(v, rows_v, "triton", max_pairs=3), (xv,))
    assert all(mp == 3 for _, mp in calls) and calls[-1][0].tolist() == [0, 1, 1, 2, 2, 5]
    # the layer passes k (dropless) and the bound k (capacity mode) to every kernel combine
    for cf in (None, 0.5):
        calls.clear()
        layer = moe(capacity_factor=cf, backend="triton", losses=[])
        layer(torch.randn(6, D, generator=gen(10), requires_grad=True)).sum().backward()
        assert len(calls) == 2 and all(mp == K for _, mp in calls)
