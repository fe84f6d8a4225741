"""Atomic files and safetensors checkpoints (model + flattened optimizer state + RNG + run state).

Every file is written to a temporary name in the same folder, flushed, fsynced and moved over the target with
``os.replace``: a kill -9 at any moment leaves either the old file or the new one, never a torn one. Atomic
writes do not protect against what happens to a file afterwards (a bad disk, a failed copy, a hand edit), so
checkpoints carry a sha256 of their run state and tensors and result files one of their JSON, verified on read:
a damaged file is refused with an error that names it and says how to recover, never resumed from.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

FORMAT = "moe-ablate-1"
CHECKSUM_KEY = "sha256"  # in a checkpoint's safetensors metadata
JSON_CHECKSUM_KEY = "content_sha256"  # in a result file, over the rest of its JSON
RETRAIN_HINT = "delete it and rerun to retrain this run from step 0 (the other runs are not affected)"


class DamagedFileError(ValueError):
    """A checkpoint or result file that is torn, corrupted or not moe-ablate's; the message names the file and
    how to recover."""


def _damaged(path: Path, why: str, remedy: str = RETRAIN_HINT) -> DamagedFileError:
    return DamagedFileError(f"{path}: {why}; {remedy}")


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
    """Delete temporaries a killed process left in ``folder`` (never the files they were meant to replace).

    Only while holding the folder's `lock.folder_lock`: a live writer's temporaries look the same."""
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


def checkpoint_sha256(run_state_json: str, aliases_json: str, tensors: dict[str, Tensor]) -> str:
    """sha256 over the run state and alias map (as stored) and every tensor in name order: its name, dtype,
    shape and raw bytes. The run state is covered too: its losses and curves end up in the results."""
    h = hashlib.sha256()
    for text in (run_state_json, aliases_json):
        h.update(text.encode("utf-8") + b"\0")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # any dtype (bf16 too) as bytes, without a copy
    return h.hexdigest()


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
                    run_state: dict) -> None:
    """Write ``model/<name>``, ``optim/<param index>/<key>``, ``rng/torch`` tensors; ``run_state`` (JSON, with
    ``step``), the alias map and a sha256 of all of it (`checkpoint_sha256`) go into the safetensors metadata."""
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
    write_checkpoint(path, tensors, aliases, step, run_state)


def write_checkpoint(path: Path, tensors: dict[str, Tensor], aliases: dict[str, str], step: int,
                     run_state: dict) -> None:
    """Write ``tensors`` (named as `save_checkpoint` names them) with the run state, alias map and checksum."""
    meta = {"run_state": json.dumps({**run_state, "step": step}), "aliases": json.dumps(aliases), "format": FORMAT}
    meta[CHECKSUM_KEY] = checkpoint_sha256(meta["run_state"], meta["aliases"], tensors)
    atomic_write_bytes(path, st_save(tensors, metadata=meta))


@dataclass
class Checkpoint:
    """A verified checkpoint in memory: the run state (with ``step``), the alias map and every tensor."""

    path: Path
    run_state: dict
    aliases: dict[str, str]
    tensors: dict[str, Tensor]


def read_checkpoint(path: Path) -> Checkpoint:
    """Read ``path`` and verify it against the sha256 stored at save time; DamagedFileError (naming the file and
    how to recover) for a torn, corrupted or foreign file. A checkpoint without a checksum (written before
    checksums were added) is read with a warning that it cannot be verified."""
    path = Path(path)
    if path.is_dir():  # safetensors would report "No such device (os error 19)"
        raise _damaged(path, "is a folder, not a checkpoint file", "remove it and rerun to retrain this run")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise _damaged(path, f"is not a moe-ablate checkpoint (metadata format={meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:  # a torn or foreign header, an unreadable file
        raise _damaged(path, f"is not a readable safetensors checkpoint ({e})") from None
    expected = meta.get(CHECKSUM_KEY)
    if expected is None:
        print(f"moe-ablate: warning: {path} has no checksum (written before checksums were added), so it "
              "cannot be verified; reading it anyway (its next save adds one)", file=sys.stderr)
    elif checkpoint_sha256(meta.get("run_state", ""), meta.get("aliases", ""), tensors) != expected:
        raise _damaged(path, "its content does not match the sha256 stored when it was written (the file was "
                             "corrupted on disk or in a copy)")
    try:
        run_state, aliases = json.loads(meta["run_state"]), json.loads(meta["aliases"])
    except (KeyError, ValueError) as e:
        raise _damaged(path, f"its metadata is incomplete or not JSON ({e!r})") from None
    if not isinstance(run_state, dict) or not isinstance(run_state.get("step"), int):
        raise _damaged(path, "its run state has no step")
    return Checkpoint(path, run_state, aliases, tensors)


def restore_checkpoint(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model weights, optimizer state and the torch (and CUDA) RNG state from ``ckpt``."""
    try:
        _restore(ckpt.tensors, ckpt.aliases, model, optimizer)
    except (IndexError, KeyError, RuntimeError, ValueError) as e:  # only for an unverified (checksum-less) file
        raise _damaged(ckpt.path, f"its tensors do not fit this run's model and optimizer ({e})") from None


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`read_checkpoint` then `restore_checkpoint`; returns the saved ``run_state`` dict."""
    ckpt = read_checkpoint(path)
    restore_checkpoint(ckpt, model, optimizer)
    return ckpt.run_state


def _restore(tensors: dict[str, Tensor], aliases: dict[str, str], model: nn.Module,
             optimizer: torch.optim.Optimizer) -> None:
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


def _json_sha256(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def atomic_write_checked_json(path: Path, obj: dict) -> None:
    """``obj`` plus the sha256 of its canonical JSON under ``JSON_CHECKSUM_KEY``, written atomically."""
    atomic_write_json(path, {**obj, JSON_CHECKSUM_KEY: _json_sha256(obj)})


def read_checked_json(path: Path, required: Sequence[str], remedy: str) -> dict:
    """Read a file written by `atomic_write_checked_json` (checksum key removed); DamagedFileError naming
    ``path`` and ``remedy`` if it is not UTF-8 JSON, not an object with the ``required`` keys, or does not match
    its checksum. A file without a checksum (written before checksums were added) is accepted with a warning."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # unreadable, binary, torn or not JSON
        raise _damaged(path, f"is not readable JSON ({e})", remedy) from None
    if not isinstance(obj, dict):
        raise _damaged(path, f"is not a moe-ablate result file (a JSON {type(obj).__name__}, not an object)", remedy)
    missing = [k for k in required if k not in obj]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise _damaged(path, f"is not a moe-ablate result file (no {shown})", remedy)
    expected = obj.pop(JSON_CHECKSUM_KEY, None)
    if expected is None:
        print(f"moe-ablate: warning: {path} has no checksum (written before checksums were added); reading it "
              "unverified", file=sys.stderr)
    elif expected != _json_sha256(obj):
        raise _damaged(path, "its content does not match the sha256 stored when it was written (edited or "
                             "corrupted)", remedy)
    return obj
