"""A trained ``moe-ablate`` run for inference: `load_run(run_dir)` rebuilds the run's `TinyLM` from its checkpoint.

A run folder (``<out>/<router>/seed<k>``, written by ``python -m moe_routing.ablate``) holds ``ckpt.safetensors``
(`checkpoint.save_checkpoint`: ``model/<name>`` tensors, an alias map for tied weights, and the run state whose
``fingerprint`` records every setting of the preset, the router, the seed and the tokenizer's vocabulary). The
checkpoint is verified against its sha256 before anything is trusted; the model is rebuilt from the fingerprint
(`verify.preset_from_fingerprint`) and loaded strictly, so a run of another library version whose model no longer
matches is refused rather than half loaded. `train_quick_run` makes such a folder in seconds (the examples use it
when no run is given).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .checkpoint import read_checked_json, read_checkpoint
from .config import Preset
from .registry import build_model
from .train import CKPT_NAME, RESULT_KEYS, RESULT_NAME, RESULT_REMEDY
from .verify import preset_from_fingerprint


@dataclass
class LoadedRun:
    """A trained run: ``model`` (eval mode), its ``preset``, ``router``, ``seed``, the optimizer ``step`` of the
    checkpoint, the tokenizer as recorded (``tokenizer``: "byte", "bpe<V>" or a file name), ``vocab_size`` and
    the run's ``result`` (its verified ``result.json``: final validation loss, curves, routing statistics; None
    for a run still training)."""

    model: nn.Module
    preset: Preset
    router: str
    seed: int
    step: int
    tokenizer: str
    vocab_size: int
    run_dir: Path
    result: Optional[dict] = None

    def describe(self) -> str:
        p = self.preset
        return (f"{self.run_dir}: router {self.router}, seed {self.seed}, step {self.step}/{p.steps}; D={p.d_model} "
                f"L={p.n_layers} E={p.num_experts} k={p.top_k} F={p.expert_hidden} seq={p.seq_len} "
                f"tokenizer {self.tokenizer}")


def load_run(run_dir: Union[str, Path], device: Union[str, torch.device] = "cpu") -> LoadedRun:
    """The model of the ``moe-ablate`` run in ``run_dir`` (e.g. ``runs/ablate-quick/topk/seed0``), weights from
    its checkpoint, in eval mode on ``device``. ValueError (DamagedFileError for a damaged checkpoint) naming
    the folder when it is not a run or its checkpoint does not fit the model its settings build."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CKPT_NAME
    if not ckpt_path.is_file():
        raise ValueError(f"run_dir {str(run_dir)!r} has no {CKPT_NAME}: give the folder of one run written by "
                         "python -m moe_routing.ablate (<out>/<router>/seed<k>, e.g. runs/ablate-quick/topk/seed0)")
    ckpt = read_checkpoint(ckpt_path)
    fp = ckpt.run_state.get("fingerprint")
    if not isinstance(fp, dict):
        raise ValueError(f"{ckpt_path}: its run state has no fingerprint (written by another version of "
                         "moe-ablate); it cannot be rebuilt")
    preset, router, seed = preset_from_fingerprint(fp, name=run_dir.parent.parent.name or "run")
    model = build_model(preset, router, seed, fp["vocab_size"])
    state = {k[len("model/"):]: v for k, v in ckpt.tensors.items() if k.startswith("model/")}
    for name, target in ckpt.aliases.items():
        state[name] = state[target]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{ckpt_path}: its weights do not fit the model its settings build ({e})") from None
    result_path = run_dir / RESULT_NAME
    result = read_checked_json(result_path, RESULT_KEYS, RESULT_REMEDY) if result_path.is_file() else None
    return LoadedRun(model.to(device).eval(), preset, router, seed, int(ckpt.run_state["step"]), fp["tokenizer"],
                     int(fp["vocab_size"]), run_dir, result)


def train_quick_run(out: Union[str, Path], preset: str = "quick", router: str = "topk", steps: Optional[int] = None,
                    seed: int = 0) -> Path:
    """Train one run with the ``moe-ablate`` command line (``--preset preset --routers router --seeds seed
    [--steps steps] --out out``, no plots) and return its folder ``out/router/seed<seed>`` for `load_run`."""
    from .cli import main

    argv = ["--preset", preset, "--routers", router, "--seeds", str(seed), "--out", str(out), "--no-plots",
            "--no-progress"]
    if steps is not None:
        argv += ["--steps", str(steps)]
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"moe-ablate {' '.join(argv)} exited with {code}")
    return Path(out) / router / f"seed{seed}"
