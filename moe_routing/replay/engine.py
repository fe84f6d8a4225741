"""Inference-engine routing records to the replay layout ``experts_TLK``, and packing them into micro-batches.

What the engines return (read from their source, not from their docs):

- SGLang (`python/sglang/srt/layers/moe/routed_experts_capturer.py`, moved to
  `python/sglang/srt/state_capturer/routed_experts.py` in newer releases; sgl-project/sglang): each MoE layer's
  ``topk_ids`` are captured into an int32 buffer ``[tokens, num_hidden_layers, num_experts_per_tok]`` indexed by
  the model's layer id, so **dense layers have rows too** (left at 0: never written). ``get_routed_experts``
  returns the rows of ``req_to_token[: seqlen - 1]``: prompt plus generated tokens **except the last** (it was
  sampled, never run through the model). The detokenizer (``_extract_routed_experts`` in
  `managers/detokenizer_manager.py`) sends ``meta_info["routed_experts"]`` as the base64 of the raw int32 bytes:
  a flat array once decoded (both releases read use int32; no narrow dtype there). Fused shared experts occupy
  extra columns of the device buffer only; the host copy keeps the first ``num_experts_per_tok``. The capture
  runs after ``topk_ids_logical_to_physical`` (`layers/moe/topk.py`): with expert-location dispatch (EPLB,
  redundant experts) the ids are *physical* slots, to be mapped to logical experts before replay
  (``num_experts`` catches slots >= E, not a remapping).
- vLLM (`vllm/model_executor/layers/fused_moe/routed_experts_capturer.py` and `vllm/v1/core/sched/scheduler.py`
  ``_get_routed_experts``, vllm-project/vllm): the same int32 ``[tokens, num_hidden_layers, num_experts_per_tok]``
  buffer (adapted from SGLang's), read for ``request.num_tokens - 1`` slots and returned as a numpy array
  ``[seqlen - 1, L_all, K]`` (``CompletionOutput.routed_experts``). Newer releases keep the host copy narrow
  (``np.uint8`` when E <= 256, else ``np.uint16``) and split the rows into the request's
  ``prompt_routed_experts`` and the completion's ``routed_experts``: concatenate the two along the first axis
  before calling `from_engine`.

`from_engine` turns any of these into the int16 ``[T, L, K]`` tensor `replay_routing` takes (L = our MoE
layers), with -1 rows where the engine reported nothing.
"""
from __future__ import annotations

import base64
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..validation import check_int

#: ids are stored as int16, so -1 can mark unreported rows; no engine serves models with more experts
_MAX_EXPERTS = int(torch.iinfo(torch.int16).max) + 1

_NP_DTYPES = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
              torch.int64: np.int64, torch.uint16: np.uint16, torch.uint32: np.uint32}

ArrayLike = Union[Tensor, np.ndarray, Sequence, bytes, bytearray, memoryview, str]


def _np_dtype(dtype_hint) -> np.dtype:
    """``dtype_hint`` (a numpy dtype or name, or a torch integer dtype) as an integer numpy dtype."""
    if isinstance(dtype_hint, torch.dtype):
        if dtype_hint not in _NP_DTYPES:
            raise ValueError(f"dtype_hint must be an integer dtype (uint8, uint16, int16, int32, ...), got "
                             f"{dtype_hint}")
        return np.dtype(_NP_DTYPES[dtype_hint])
    try:
        dt = np.dtype(dtype_hint)
    except TypeError as exc:
        raise ValueError(f"dtype_hint must name an integer dtype such as 'int32', 'uint16' or 'uint8', got "
                         f"{dtype_hint!r}") from exc
    if dt.kind not in "iu":
        raise ValueError(f"dtype_hint must be an integer dtype (uint8, uint16, int16, int32, ...), got {dt}")
    return dt


def _as_int64_array(routed_experts: ArrayLike, dtype_hint) -> np.ndarray:
    """The engine's ids as an int64 numpy array (flat or shaped, as given)."""
    if isinstance(routed_experts, str):
        try:
            routed_experts = base64.b64decode(routed_experts.encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError) as exc:
            raise ValueError("routed_experts is a str but not valid base64 (SGLang's meta_info['routed_experts']"
                             " is the base64 of the raw id bytes)") from exc
    if isinstance(routed_experts, (bytes, bytearray, memoryview)):
        if dtype_hint is None:
            raise ValueError("routed_experts is raw bytes: pass dtype_hint, the engine's id dtype ('int32' for "
                             "SGLang's meta_info['routed_experts'] and vLLM's capture buffer; 'uint8'/'uint16' "
                             "for narrowed buffers)")
        dt = _np_dtype(dtype_hint)
        raw = bytes(routed_experts)
        if len(raw) % dt.itemsize:
            raise ValueError(f"routed_experts has {len(raw)} bytes, not a multiple of {dt.itemsize} (the size of "
                             f"dtype_hint={dt}); the bytes are truncated or the dtype_hint is wrong")
        return np.frombuffer(raw, dtype=dt).astype(np.int64)
    if isinstance(routed_experts, Tensor):
        t = routed_experts.detach()
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"routed_experts must hold integer expert ids, got a tensor of dtype {t.dtype}")
        arr = t.cpu().to(torch.int64).numpy()
        src = str(t.dtype).replace("torch.", "")
    else:
        is_array = isinstance(routed_experts, np.ndarray)
        arr = np.asarray(routed_experts)
        if arr.dtype == object:
            raise ValueError("routed_experts is a ragged nested sequence; every token row must have the same "
                             "[L_all, K] shape")
        if arr.dtype.kind not in "iu":
            if arr.size == 0:  # np.asarray([]) is float64: an empty record has no ids to misread
                arr = arr.astype(np.int64)
            else:
                raise TypeError(f"routed_experts must hold integer expert ids, got dtype {arr.dtype}")
        src = str(arr.dtype) if is_array else None  # a nested list has no dtype of its own
        arr = arr.astype(np.int64)
    if dtype_hint is not None and src is not None and np.dtype(src) != _np_dtype(dtype_hint):
        raise ValueError(f"dtype_hint={_np_dtype(dtype_hint)} but routed_experts already has dtype {src}; "
                         "dtype_hint only says how to read raw bytes")
    return arr


def _token_rows(arr: np.ndarray, num_tokens: int, num_layers: Optional[int], top_k: Optional[int]) -> np.ndarray:
    """The engine array as ``[rows, L_all, K]``, rows being ``num_tokens - 1`` (the engines never run the last
    token) or ``num_tokens``; a flat array is reshaped with ``num_layers`` and/or ``top_k``."""
    if arr.ndim == 3:
        rows, L_all, K = arr.shape
        if rows not in (num_tokens - 1, num_tokens):
            raise ValueError(f"routed_experts has {rows} token rows (shape {tuple(arr.shape)}) but num_tokens="
                             f"{num_tokens}; the engines report num_tokens - 1 rows (every token but the last)")
        if num_layers is not None and L_all != num_layers:
            raise ValueError(f"routed_experts has {L_all} layers (shape {tuple(arr.shape)}) but num_layers="
                             f"{num_layers}; the engine counts every hidden layer, dense ones included")
        if top_k is not None and K != top_k:
            raise ValueError(f"routed_experts has top_k={K} (shape {tuple(arr.shape)}) but top_k={top_k}")
        return arr
    if arr.ndim != 1:
        raise ValueError(f"routed_experts must be flat or shaped [rows, L_all, K], got shape {tuple(arr.shape)}; "
                         "a 2-D array leaves the layer and top-k axes ambiguous")
    if num_layers is None and top_k is None:
        raise ValueError("routed_experts is flat: pass num_layers (the engine's layer count, dense layers "
                         "included: the config's num_hidden_layers) and/or top_k so it can be reshaped")
    n, known = arr.size, (num_layers or 1) * (top_k or 1)
    both = num_layers is not None and top_k is not None
    candidates = [r for r in (num_tokens - 1, num_tokens) if r > 0 or both]
    fits = [r for r in candidates if (n == r * known if both else n % (r * known) == 0)]
    if not fits:
        want = (" or ".join(str(r * known) for r in candidates) if both
                else f"a multiple of {candidates[0] * known}")
        raise ValueError(f"routed_experts has {n} ids but num_tokens={num_tokens}, num_layers={num_layers}, "
                         f"top_k={top_k} need {want}: num_tokens - 1 rows of L_all * K ids; the layer count is "
                         "the usual mismatch (the engine counts dense layers too), else check num_tokens and "
                         "dtype_hint")
    if len(fits) > 1:
        raise ValueError(f"routed_experts has {n} ids, which fits both {fits[0]} and {fits[1]} token rows; pass "
                         "both num_layers and top_k")
    rows = fits[0]
    L_all = num_layers if num_layers is not None else n // (rows * known)
    K = top_k if top_k is not None else n // (rows * known)
    return arr.reshape(rows, L_all, K)


def from_engine(routed_experts: ArrayLike, *, num_tokens: int, moe_layer_ids: Optional[Sequence[int]] = None,
                dtype_hint=None, num_layers: Optional[int] = None, top_k: Optional[int] = None,
                num_experts: Optional[int] = None) -> Tensor:
    """An engine's per-token routing as int16 ``experts_TLK`` [T, L, K] for `replay_routing`.

    Args:
        routed_experts: what the engine returned for one sequence, logical layout ``[num_tokens - 1, L_all, K]``
            (L_all counts every hidden layer, dense ones too): a shaped or flat numpy array / torch tensor /
            nested list of integers (int32, uint16, uint8, ...), raw bytes (with ``dtype_hint``), or SGLang's
            base64 string ``meta_info["routed_experts"]`` (with ``dtype_hint="int32"``). ``num_tokens`` rows
            (a record that includes the last token) are accepted too.
        num_tokens: T, the tokens the trainer will run (prompt + generated).
        moe_layer_ids: the engine layer index of each of our MoE layers, in our layer order (e.g.
            ``range(1, 48)`` when layer 0 is dense); None: every engine layer is an MoE layer.
        dtype_hint: the id dtype of raw bytes / base64 input (numpy name or torch dtype); for arrays it must
            match their dtype if given.
        num_layers: L_all, checked against the array (and needed, or ``top_k``, to reshape a flat one).
        top_k: K, checked likewise.
        num_experts: E; ids must be in [0, E) (else only >= 0 and < 32768 are checked).

    Returns:
        int16 [T, L, K] on the CPU; rows the engine did not report (the last token) are -1, which
        `replay_routing` routes natively.

    Raises:
        ValueError naming the mismatch: token rows vs ``num_tokens``, layer count vs ``num_layers`` or
        ``moe_layer_ids`` (an engine layer whose every row repeats one expert is reported as a likely dense
        layer), ids out of range, experts repeated within a token, bytes not a multiple of the dtype size.
    """
    check_int("num_tokens", num_tokens, 1)
    if num_layers is not None:
        check_int("num_layers", num_layers, 1)
    if top_k is not None:
        check_int("top_k", top_k, 1)
    if num_experts is not None:
        check_int("num_experts", num_experts, 1, _MAX_EXPERTS)
    arr = _token_rows(_as_int64_array(routed_experts, dtype_hint), num_tokens, num_layers, top_k)
    rows, L_all, K = arr.shape

    if moe_layer_ids is None:
        ids = list(range(L_all))
    else:
        ids = [check_int(f"moe_layer_ids[{i}]", int(v) if isinstance(v, np.integer) else v, 0)
               for i, v in enumerate(moe_layer_ids)]
        if not ids:
            raise ValueError("moe_layer_ids is empty; pass the engine layer index of each MoE layer")
        if len(set(ids)) != len(ids):
            raise ValueError(f"moe_layer_ids repeats a layer: {ids}")
        if max(ids) >= L_all:
            raise ValueError(f"moe_layer_ids has layer {max(ids)} but the engine array has L_all={L_all} layers "
                             f"(shape {tuple(arr.shape)})")
    sel = arr[:, ids, :]

    if sel.size:
        high = num_experts if num_experts is not None else _MAX_EXPERTS
        bad = (sel < 0) | (sel >= high)
        if bad.any():
            t, l, k = (int(i[0]) for i in np.nonzero(bad))
            raise ValueError(f"routed_experts has expert id {int(sel[t, l, k])} at token {t}, engine layer {ids[l]}, "
                             f"outside [0, {high}){' (num_experts)' if num_experts is not None else ''}")
        if K > 1:
            s = np.sort(sel, axis=-1)
            dup_TL = (s[..., 1:] == s[..., :-1]).any(-1)
            if dup_TL.any():
                t, l = (int(i[0]) for i in np.nonzero(dup_TL))
                dense = [ids[j] for j in range(len(ids)) if dup_TL[:, j].all()]
                hint = (f"; engine layer(s) {dense} repeat an expert in every row: dense layers (left at 0 by the "
                        "engine), so pass moe_layer_ids" if dense else "")
                raise ValueError(f"routed_experts repeats an expert within token {t} at engine layer {ids[l]} "
                                 f"({sel[t, l].tolist()}){hint}")
    out = torch.full((num_tokens, len(ids), K), -1, dtype=torch.int16)
    out[:rows] = torch.from_numpy(np.ascontiguousarray(sel)).to(torch.int16)
    return out


PADDING_SIDES = ("right", "left")


def pack_records(per_sample_TLK: Sequence[Tensor], *, seq_len: Optional[int] = None, padding_side: str = "right",
                 num_tokens: Optional[int] = None) -> Tensor:
    """Per-sample records ``[T_i, L, K]`` as one micro-batch record, in the token order of the model input.

    Two layouts, chosen by ``seq_len``:

    - packed (``seq_len=None``): the samples concatenated, ``[sum T_i, L, K]``, the order of a packed ``[T, D]``
      input (``RoutingContext(seq_lens=...)``). ``num_tokens`` pads the end with -1 rows to a fixed token count
      (a micro-batch padded to a multiple of some size); it must be at least ``sum T_i``.
    - padded (``seq_len=S``): a ``[B, S, D]`` batch flattened as the layer flattens it (sample-major), giving
      ``[B * S, L, K]``; sample b's rows sit at ``b * S + [0, T_b)`` (``padding_side="right"``) or at the end of
      its span (``"left"``), the rest -1. Every ``T_b`` must be <= S.

    -1 rows route natively under `replay_routing`, so padding needs no separate mask. Inputs may be any integer
    dtype (uint8 records included) and may already hold -1 rows. Returns int16 on the first record's device.
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    records = list(per_sample_TLK)
    if not records:
        raise ValueError("per_sample_TLK is empty; pass one [T_i, L, K] record per sample")
    L = K = None
    for i, r in enumerate(records):
        if not isinstance(r, Tensor) or r.dim() != 3:
            got = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(f"per_sample_TLK[{i}] must be a [T, L, K] tensor, got {got}")
        if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            raise TypeError(f"per_sample_TLK[{i}] must hold integer expert ids, got dtype {r.dtype}")
        if L is None:
            L, K = r.shape[1], r.shape[2]
        elif (r.shape[1], r.shape[2]) != (L, K):
            raise ValueError(f"per_sample_TLK[{i}] has [L, K] = {list(r.shape[1:])} but per_sample_TLK[0] has "
                             f"{[L, K]}; every sample must come from the same model")
        # compared as int64: a uint8 tensor would wrap the bound (32768 -> 0) and reject everything
        if r.numel() and bool(((r.long() < -1) | (r.long() >= _MAX_EXPERTS)).any()):
            raise ValueError(f"per_sample_TLK[{i}] has ids outside [-1, {_MAX_EXPERTS}) (-1 marks unreported rows)")
    lengths = [r.shape[0] for r in records]
    device = records[0].device
    if seq_len is None:
        total = sum(lengths)
        if num_tokens is not None:
            check_int("num_tokens", num_tokens, total)
            total = num_tokens
        out = torch.full((total, L, K), -1, dtype=torch.int16, device=device)
        out[:sum(lengths)] = torch.cat([r.to(device=device, dtype=torch.int16) for r in records])
        return out
    if num_tokens is not None:
        raise ValueError("num_tokens applies to the packed layout; with seq_len the micro-batch has "
                         "len(per_sample_TLK) * seq_len tokens")
    check_int("seq_len", seq_len, 1)
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"per_sample_TLK[{i}] has {n} tokens, more than seq_len={seq_len}")
    out = torch.full((len(records), seq_len, L, K), -1, dtype=torch.int16, device=device)
    for b, r in enumerate(records):
        start = 0 if padding_side == "right" else seq_len - r.shape[0]
        out[b, start:start + r.shape[0]] = r.to(device=device, dtype=torch.int16)
    return out.reshape(len(records) * seq_len, L, K)
