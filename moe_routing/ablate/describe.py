"""``moe-ablate --describe``: the resolved preset and each router's parameter counts, without data or training."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import Preset
from .data import GPT2_VOCAB, check_tokenizer_spec, _load_tokenizer
from .model import count_params
from .registry import build_model


def tokenizer_vocab(spec: str, preset: Preset) -> tuple[int, str]:
    """(vocabulary size, how it was found) for a tokenizer spec, without reading or tokenizing any corpus."""
    if spec == "byte":
        return 256, "bytes"
    if spec == "bpe":
        return preset.bpe_vocab, f"BPE trained on the corpus, target size {preset.bpe_vocab} (may end smaller)"
    if spec == "gpt2":
        return GPT2_VOCAB, "GPT-2 BPE (pass its tokenizer.json with --tokenizer PATH to train)"
    check_tokenizer_spec(spec)
    return _load_tokenizer(Path(spec), "give --tokenizer a tokenizers JSON file").get_vocab_size(), spec


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def describe(preset: Preset) -> list[str]:
    """Lines: every resolved setting, then per router ``parameters: total ..., active ...`` (models are built on
    the meta device: nothing is allocated or initialised)."""
    vocab, source = tokenizer_vocab(preset.tokenizer, preset)
    padded = preset.padded_vocab(vocab)
    lines = [f"preset {preset.name}"]
    lines += [f"  {f.name}: {getattr(preset, f.name)!r}" for f in dataclasses.fields(preset) if f.name != "name"]
    lines.append(f"  vocabulary: {vocab} ({source}), padded to {padded}")
    lines.append(f"  tokens per step: {preset.global_batch * preset.seq_len}, total "
                 f"{preset.global_batch * preset.seq_len * preset.steps / 1e9:.3g}B")
    for router in preset.routers:
        with torch.device("meta"):
            model = build_model(preset, router, 0, padded)
        active, total = count_params(model, preset.top_k)
        lines.append(f"{router}: parameters: total {_millions(total)}, active {_millions(active)} "
                     f"({total} / {active})")
    return lines
