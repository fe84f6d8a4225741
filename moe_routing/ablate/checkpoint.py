"""Atomic files and safetensors checkpoints (model + flattened optimizer state + RNG + run state).

Every file is written to a temporary name in the same folder, flushed, fsynced and moved over the target with
``os.replace``: a kill -9 at any moment leaves either the old file or the new one, never a torn one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries a killed process left in ``folder`` (never the files they were meant to replace)."""
    for tmp in Path(folder).glob(".*.tmp*"):
        tmp.unlink(missing_ok=True)


def _dedup(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """safetensors refuses aliased tensors (a router shared by a layer and a router group): keep the first."""
    seen: dict[tuple, str] = {}
    kept, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        kept[name] = t.detach().cpu().contiguous().clone()
    return kept, aliases


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    run_state: dict) -> None:
    """Write ``model/<name>``, ``optim/<param index>/<key>``, ``rng/torch`` tensors; ``run_state`` (JSON, with
    ``step``) and the alias map go into the safetensors metadata."""
    model_state, aliases = _dedup(model.state_dict())
    tensors = {f"model/{k}": v for k, v in model_state.items()}
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for p, st in optimizer.state.items():
        for key, value in st.items():
            value = value if isinstance(value, Tensor) else torch.tensor(value)
            tensors[f"optim/{index[id(p)]}/{key}"] = value.detach().cpu().contiguous().clone()
    tensors["rng/torch"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    meta = {"run_state": json.dumps({**run_state, "step": step}), "aliases": json.dumps(aliases),
            "format": "moe-ablate-1"}
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and torch RNG from ``path``; returns the saved ``run_state`` dict."""
    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "moe-ablate-1":
            raise ValueError(f"{path} is not a moe-ablate checkpoint (metadata format={meta.get('format')!r})")
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    aliases = json.loads(meta["aliases"])
    state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    for name, target in aliases.items():
        state[name] = state[target]
    model.load_state_dict(state, strict=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    opt_state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, i, key = k.split("/", 2)
            opt_state.setdefault(int(i), {})[key] = v
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: (v.to(params[i].device) if v.dim() else v) for k, v in st.items()}
                   for i, st in opt_state.items()}
    optimizer.load_state_dict(sd)
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], next(model.parameters()).device)
    return json.loads(meta["run_state"])


def read_run_state(path: Path) -> Optional[dict]:
    """The run_state of a checkpoint without loading tensors (None if there is no checkpoint)."""
    if not Path(path).exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["run_state"])
