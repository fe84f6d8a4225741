"""`moe_routing.replay.from_engine` on hand-built SGLang / vLLM style arrays, and `pack_records`.

The engine arrays are built as the engines build them (see the module docstring): int32 ``[seqlen - 1,
num_hidden_layers, K]`` with the dense layers' rows left at 0, flattened and base64-encoded for SGLang's
``meta_info["routed_experts"]``, a shaped numpy array for vLLM (narrowed to uint8/uint16 in newer releases).
"""
from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from moe_routing.replay import from_engine, pack_records

L_ALL, DENSE, E, K = 6, (0, 3), 16, 4   # layers 0 and 3 dense, as in models with leading / interleaved dense layers
MOE_IDS = [l for l in range(L_ALL) if l not in DENSE]


def engine_array(num_tokens: int, seed: int, dtype=np.int32, num_experts: int = E, k: int = K) -> np.ndarray:
    """What an engine returns for a sequence of ``num_tokens``: rows for all but the last token, every hidden
    layer, K distinct experts per MoE layer and zeros for dense layers."""
    rng = np.random.default_rng(seed)
    out = np.zeros((num_tokens - 1, L_ALL, k), dtype=dtype)
    for t in range(num_tokens - 1):
        for l in MOE_IDS:
            out[t, l] = rng.permutation(num_experts)[:k]
    return out


def naive_from_engine(arr: np.ndarray, num_tokens: int, moe_ids) -> torch.Tensor:
    out = torch.full((num_tokens, len(moe_ids), arr.shape[2]), -1, dtype=torch.int16)
    for t in range(arr.shape[0]):
        for j, l in enumerate(moe_ids):
            for k in range(arr.shape[2]):
                out[t, j, k] = int(arr[t, l, k])
    return out


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.uint8, np.int16])
@pytest.mark.parametrize("num_tokens", [1, 2, 7])
def test_vllm_shaped_array_selects_moe_layers_and_appends_last_row(dtype, num_tokens):
    arr = engine_array(num_tokens, seed=num_tokens, dtype=dtype)
    got = from_engine(arr, num_tokens=num_tokens, moe_layer_ids=MOE_IDS, num_experts=E)
    assert got.dtype == torch.int16 and got.shape == (num_tokens, len(MOE_IDS), K)
    assert torch.equal(got, naive_from_engine(arr, num_tokens, MOE_IDS))
    assert bool((got[-1] == -1).all())  # the last token never ran in the engine


@pytest.mark.parametrize("dtype", ["int32", "uint16", "uint8"])
def test_sglang_base64_and_raw_bytes(dtype):
    T = 9
    arr = engine_array(T, seed=3, dtype=np.dtype(dtype))
    want = naive_from_engine(arr, T, MOE_IDS)
    raw = arr.tobytes()
    b64 = base64.b64encode(raw).decode("utf-8")  # what SGLang's detokenizer puts in meta_info["routed_experts"]
    for payload in (raw, bytearray(raw), memoryview(raw), b64):
        got = from_engine(payload, num_tokens=T, moe_layer_ids=MOE_IDS, dtype_hint=dtype, num_layers=L_ALL,
                          top_k=K, num_experts=E)
        assert torch.equal(got, want)
    # the torch dtype spelling works too, and one of num_layers / top_k is enough for a flat array
    got = from_engine(raw, num_tokens=T, moe_layer_ids=MOE_IDS, dtype_hint=getattr(torch, dtype), top_k=K)
    assert torch.equal(got, want)


def test_flat_arrays_tensors_and_lists():
    T = 5
    arr = engine_array(T, seed=4)
    want = naive_from_engine(arr, T, MOE_IDS)
    for flat in (arr.reshape(-1), torch.from_numpy(arr.reshape(-1)), arr.reshape(-1).tolist()):
        assert torch.equal(from_engine(flat, num_tokens=T, moe_layer_ids=MOE_IDS, num_layers=L_ALL), want)
    assert torch.equal(from_engine(torch.from_numpy(arr), num_tokens=T, moe_layer_ids=MOE_IDS), want)
    narrow = torch.from_numpy(arr.astype(np.int64)).to(torch.uint16)  # vLLM's narrowed buffer as a tensor
    assert torch.equal(from_engine(narrow, num_tokens=T, moe_layer_ids=np.array(MOE_IDS)), want)
    assert torch.equal(from_engine(arr.tolist(), num_tokens=T, moe_layer_ids=MOE_IDS), want)


def test_full_length_record_and_all_moe_layers():
    """A record that includes the last token (num_tokens rows) gets no -1 row; moe_layer_ids=None keeps all."""
    T = 4
    arr = engine_array(T + 1, seed=5)[:, MOE_IDS]  # T rows, only MoE layers
    got = from_engine(arr, num_tokens=T)
    assert got.shape == (T, len(MOE_IDS), K) and bool((got >= 0).all())
    assert torch.equal(got, torch.from_numpy(arr.astype(np.int16)))


def test_layer_order_follows_moe_layer_ids():
    T = 4
    arr = engine_array(T, seed=6)
    ids = [5, 1, 2]
    assert torch.equal(from_engine(arr, num_tokens=T, moe_layer_ids=ids), naive_from_engine(arr, T, ids))


def test_forgotten_dense_layers_are_named():
    arr = engine_array(6, seed=7)
    with pytest.raises(ValueError, match=r"engine layer\(s\) \[0, 3\].*dense.*moe_layer_ids"):
        from_engine(arr, num_tokens=6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_layers=L_ALL - 2), r"6 layers .* num_layers=4.*dense ones included"),  # MoE-only count
    (dict(top_k=K + 1), r"top_k=4 .* top_k=5"),
    (dict(moe_layer_ids=[1, 2, 6]), r"layer 6 .* L_all=6"),
    (dict(moe_layer_ids=[1, 1, 2]), r"repeats a layer"),
    (dict(moe_layer_ids=[]), r"moe_layer_ids is empty"),
    (dict(moe_layer_ids=[1, True]), r"moe_layer_ids\[1\] must be an int"),
])
def test_shaped_layer_count_errors(kwargs, match):
    arr = engine_array(6, seed=8)
    kwargs.setdefault("moe_layer_ids", MOE_IDS)
    with pytest.raises((ValueError, TypeError), match=match):
        from_engine(arr, num_tokens=6, **kwargs)


def test_flat_layer_count_mismatch_names_the_counts():
    T = 6
    flat = engine_array(T, seed=9).reshape(-1)
    # the classic failure: the MoE layer count where the engine counts every hidden layer
    with pytest.raises(ValueError, match=r"120 ids but num_tokens=6, num_layers=4, top_k=4 need 80 or 96.*layer "
                                         r"count is the usual mismatch"):
        from_engine(flat, num_tokens=T, num_layers=len(MOE_IDS), top_k=K, moe_layer_ids=[0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"pass num_layers .*and/or top_k"):
        from_engine(flat, num_tokens=T)
    with pytest.raises(ValueError, match=r"fits both"):  # 24 ids: 2 rows x 12 or 3 rows x 8, with top_k=2
        from_engine(np.arange(24, dtype=np.int32) % 2, num_tokens=3, top_k=2)


@pytest.mark.parametrize("num_tokens", [4, 7, 9])
def test_wrong_length(num_tokens):
    arr = engine_array(6, seed=10)  # 5 rows: right for num_tokens 5 or 6 only
    with pytest.raises(ValueError, match=rf"5 token rows .*num_tokens={num_tokens}.*num_tokens - 1 rows"):
        from_engine(arr, num_tokens=num_tokens, moe_layer_ids=MOE_IDS)
    with pytest.raises(ValueError, match=r"ids but num_tokens="):
        from_engine(arr.reshape(-1), num_tokens=num_tokens, moe_layer_ids=MOE_IDS, num_layers=L_ALL, top_k=K)


def test_truncated_bytes_and_wrong_dtype_hint():
    T = 5
    raw = engine_array(T, seed=11).tobytes()
    with pytest.raises(ValueError, match=r"not a multiple of 4 .*truncated or the dtype_hint is wrong"):
        from_engine(raw[:-2], num_tokens=T, dtype_hint="int32", num_layers=L_ALL, top_k=K)
    with pytest.raises(ValueError, match=r"ids but num_tokens="):  # int32 bytes read as uint8: 4x too many ids
        from_engine(raw, num_tokens=T, dtype_hint="uint8", num_layers=L_ALL, top_k=K, moe_layer_ids=MOE_IDS)
    with pytest.raises(ValueError, match=r"pass dtype_hint"):
        from_engine(raw, num_tokens=T, num_layers=L_ALL, top_k=K)
    with pytest.raises(ValueError, match=r"not valid base64"):
        from_engine("not base64!", num_tokens=T, dtype_hint="int32", num_layers=L_ALL, top_k=K)
    with pytest.raises(ValueError, match=r"dtype_hint must .*integer"):
        from_engine(raw, num_tokens=T, dtype_hint="float32", num_layers=L_ALL, top_k=K)
    with pytest.raises(ValueError, match=r"dtype_hint=uint8 but routed_experts already has dtype int32"):
        from_engine(engine_array(T, seed=11), num_tokens=T, dtype_hint="uint8", moe_layer_ids=MOE_IDS)


def test_out_of_range_and_repeated_ids():
    T = 5
    arr = engine_array(T, seed=12)
    bad = arr.copy()
    bad[2, 4, 1] = E
    with pytest.raises(ValueError, match=rf"expert id {E} at token 2, engine layer 4, outside \[0, {E}\)"):
        from_engine(bad, num_tokens=T, moe_layer_ids=MOE_IDS, num_experts=E)
    # without num_experts only the int16 range is known
    assert from_engine(bad, num_tokens=T, moe_layer_ids=MOE_IDS)[2, MOE_IDS.index(4), 1] == E
    neg = arr.copy()
    neg[1, 1, 0] = -3
    with pytest.raises(ValueError, match=r"expert id -3 at token 1, engine layer 1"):
        from_engine(neg, num_tokens=T, moe_layer_ids=MOE_IDS)
    huge = arr.copy()
    huge[0, 2, 0] = 40000
    with pytest.raises(ValueError, match=r"outside \[0, 32768\)"):
        from_engine(huge, num_tokens=T, moe_layer_ids=MOE_IDS)
    dup = arr.copy()
    dup[3, 5, 1] = dup[3, 5, 0]
    with pytest.raises(ValueError, match=r"repeats an expert within token 3 at engine layer 5"):
        from_engine(dup, num_tokens=T, moe_layer_ids=MOE_IDS)


def test_bad_types():
    with pytest.raises(TypeError, match=r"integer expert ids, got dtype float"):
        from_engine(np.zeros((2, 1, 1)), num_tokens=3)
    with pytest.raises(TypeError, match=r"integer expert ids, got a tensor of dtype torch.float32"):
        from_engine(torch.zeros(2, 1, 1), num_tokens=3)
    with pytest.raises(ValueError, match=r"2-D array"):
        from_engine(np.zeros((2, 4), dtype=np.int32), num_tokens=3)
    with pytest.raises(TypeError, match=r"num_tokens must be an int"):
        from_engine(np.zeros((2, 1, 1), dtype=np.int32), num_tokens=True)
    with pytest.raises(ValueError, match=r"num_tokens must be an int >= 1"):
        from_engine(np.zeros((0, 1, 1), dtype=np.int32), num_tokens=0)


# ---- pack_records --------------------------------------------------------------------------------------------

def records(lengths, L=3, k=2, seed=0, dtype=torch.uint8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 8, (n, L, k), generator=g).to(dtype) for n in lengths]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int64])
def test_pack_packed_concatenates_in_order(dtype):
    recs = records([3, 1, 4], dtype=dtype)
    recs[0][-1] = -1 if dtype != torch.uint8 else recs[0][-1]  # -1 rows already present pass through
    got = pack_records(recs)
    want = [row for r in recs for row in r.to(torch.int16)]
    assert got.dtype == torch.int16 and got.shape == (8, 3, 2)
    assert all(torch.equal(got[i], want[i]) for i in range(8))
    padded = pack_records(recs, num_tokens=11)
    assert torch.equal(padded[:8], got) and bool((padded[8:] == -1).all())


@pytest.mark.parametrize("side", ["right", "left"])
def test_pack_padded_matches_layer_flattening(side):
    """Sample b's token i sits where a [B, S, D] input's token (b, i) lands after the layer's reshape(-1, D)."""
    lengths, S = [3, 5, 1], 5
    recs = records(lengths, seed=1)
    got = pack_records(recs, seq_len=S, padding_side=side)
    assert got.shape == (len(lengths) * S, 3, 2)
    x = torch.full((len(lengths), S), -1, dtype=torch.long)  # token id grid, -1 = padding
    for b, n in enumerate(lengths):
        start = 0 if side == "right" else S - n
        x[b, start:start + n] = torch.arange(n) + 100 * b
    flat = x.reshape(-1)
    for t in range(flat.numel()):
        v = int(flat[t])
        if v < 0:
            assert bool((got[t] == -1).all())
        else:
            assert torch.equal(got[t], recs[v // 100][v % 100].to(torch.int16))


def test_pack_errors():
    with pytest.raises(ValueError, match="empty"):
        pack_records([])
    with pytest.raises(ValueError, match=r"per_sample_TLK\[1\] has \[L, K\] = \[2, 2\] but .* \[3, 2\]"):
        pack_records(records([2]) + records([2], L=2))
    with pytest.raises(ValueError, match=r"per_sample_TLK\[0\] must be a \[T, L, K\] tensor"):
        pack_records([torch.zeros(3, 2, dtype=torch.long)])
    with pytest.raises(TypeError, match=r"integer expert ids"):
        pack_records([torch.zeros(3, 2, 2)])
    with pytest.raises(ValueError, match=r"per_sample_TLK\[1\] has 6 tokens, more than seq_len=5"):
        pack_records(records([2, 6]), seq_len=5)
    with pytest.raises(ValueError, match=r"padding_side must be one of"):
        pack_records(records([2]), seq_len=4, padding_side="middle")
    with pytest.raises(ValueError, match=r"num_tokens must be an int >= 5"):
        pack_records(records([2, 3]), num_tokens=4)
    with pytest.raises(ValueError, match=r"per_sample_TLK\[0\] has ids outside \[-1, 32768\)"):
        pack_records([torch.full((2, 1, 1), 40000)])
    with pytest.raises(ValueError, match=r"num_tokens applies to the packed layout"):
        pack_records(records([2]), seq_len=4, num_tokens=8)


def test_engine_record_replays_in_our_layers():
    """An "engine" (our layers with other router weights) reports its choice in the engine layout, dense layers
    included; from_engine's output forces exactly that choice in the trainer's layers."""
    from moe_routing import MoELayer, RoutingContext

    D, T = 8, 7
    torch.manual_seed(0)
    trainer = [MoELayer(D, 4, E, K, layer_idx=j) for j in range(len(MOE_IDS))]
    xs = [torch.randn(T, D) for _ in MOE_IDS]
    engine_out = np.zeros((T - 1, L_ALL, K), dtype=np.int32)  # dense layers stay 0, as in the engines
    for j, (layer, x) in enumerate(zip(trainer, xs)):
        w = layer.router.weight.detach() + torch.randn(E, D)
        engine_out[:, MOE_IDS[j]] = (x[:T - 1] @ w.t()).topk(K, dim=-1).indices.numpy()
    native = [(x[:T - 1] @ layer.router.weight.detach().t()).topk(K, dim=-1).indices.sort(-1).values
              for layer, x in zip(trainer, xs)]
    assert any(not torch.equal(n, torch.from_numpy(engine_out[:, l]).long().sort(-1).values)
               for n, l in zip(native, MOE_IDS))  # the trainer alone would route differently
    rec = from_engine(base64.b64encode(engine_out.tobytes()).decode(), num_tokens=T, moe_layer_ids=MOE_IDS,
                      dtype_hint="int32", num_layers=L_ALL, top_k=K, num_experts=E)
    for j, (layer, x) in enumerate(zip(trainer, xs)):
        seen = []
        handle = layer.router.register_forward_hook(lambda m, args, out: seen.append(out.experts_TK))
        with torch.no_grad():  # the reported rows only: the last token routes natively (-1 row)
            layer(x[:T - 1], RoutingContext(forced_experts={j: rec[:T - 1, j]}))
        handle.remove()
        assert torch.equal(seen[0], torch.from_numpy(engine_out[:, MOE_IDS[j]]).long())
