"""moe_routing/ablate/config.py: the learning-rate schedule (warmup, cosine) and presets refusing bools, NaN and
empty values."""
import math
import re

import pytest

from moe_routing.ablate.config import Preset, get_preset


def test_lr_schedule_warmup_and_cosine():
    p = Preset(name="t", d_model=8, n_layers=1, n_heads=2, num_experts=2, top_k=1, expert_hidden=4, seq_len=4,
               global_batch=2, micro_batch=1, steps=100, lr=1.0, min_lr=0.1, warmup_frac=0.1)
    assert p.grad_accum == 2 and p.warmup_steps == 10
    assert p.lr_at(0) == pytest.approx(0.1) and p.lr_at(9) == pytest.approx(1.0)
    assert p.lr_at(10) == pytest.approx(1.0)
    assert p.lr_at(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert p.lr_at(100) == pytest.approx(0.1)


@pytest.mark.parametrize("change, message", [
    (dict(seeds=(True,)), "seeds must be a non-empty tuple of ints"),
    (dict(seeds=(1, 1)), "seeds must be distinct"),
    (dict(threads=True), "threads must be an int >= 0"),
    (dict(jobs=0), "jobs must be a positive int"),
    (dict(jobs=True), "jobs must be a positive int"),
    (dict(steps=True), "steps must be a positive int, got True"),
    (dict(lr=float("nan")), "lr must be a finite number"),
    (dict(lr=True), "lr must be a finite number"),
    (dict(routers=()), "routers must be a non-empty tuple"),
    (dict(routers=("topk", "")), "routers must be a non-empty tuple"),
    (dict(betas=(0.9,)), "betas must be two numbers in [0, 1)"),
    (dict(n_kv_heads=3), "n_kv_heads must be 0 (= n_heads) or a positive int dividing n_heads=2, got 3"),
    (dict(rope_base=float("inf")), "rope_base must be a finite number > 1"),
    (dict(tie_embeddings=1), "tie_embeddings must be a bool"),
    (dict(vocab_multiple=0), "vocab_multiple must be a positive int"),
])
def test_preset_refuses_bool_nan_and_empty_values(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        get_preset("smoke", **change)


def test_remoe_182m_is_the_papers_recipe():
    """thu-ml/ReMoE scripts/train_llama_182m_*.sh with Megatron's defaults (beta2 0.999, weight decay 0.01)."""
    p = get_preset("remoe-182m")
    assert (p.d_model, p.n_layers, p.n_heads, p.kv_heads, p.num_experts, p.top_k, p.expert_hidden) == \
        (768, 12, 12, 4, 8, 1, 3072)
    assert (p.seq_len, p.global_batch, p.steps, p.lr, p.min_lr, p.warmup_frac, p.clip, p.init_std) == \
        (1024, 512, 60_000, 5e-4, 5e-5, 0.01, 1.0, 0.01)
    assert p.betas == (0.9, 0.999) and p.weight_decay == 0.01 and p.rope_base == 1e6
    assert not p.tie_embeddings and p.vocab_multiple == 1024 and p.tokenizer == "gpt2" and p.needs_corpus
