"""Frozen experiment presets: one model size, data budget and optimiser schedule shared by every router.

No per-router tuning: a preset is the whole recipe; the CLI may only override sizes that apply to all routers.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

# settings that name a run or only change how fast it goes, never its numbers: left out of the fingerprint
NOT_IN_FINGERPRINT = ("name", "routers", "seeds", "log_interval", "ckpt_interval", "threads", "jobs")
DEFAULT_ROUTERS = ("dense", "topk", "relu", "rmoe", "topk+erc", "topk+dpsl")
# sequences per validation batch: fixed, so --micro-batch (a memory knob) never changes what is evaluated
EVAL_BATCH = 16


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a count


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Preset:
    """Model, data and optimiser settings for one ablation (identical for every router in it).

    Model: ``d_model`` D, ``n_layers`` L, ``n_heads``, ``num_experts`` E, ``top_k`` k, ``expert_hidden`` F (the
    dense baseline's FFN hidden is ``k * F``: equal active parameters). Batches: ``global_batch`` sequences of
    ``seq_len`` tokens per optimiser step, split into micro-batches of ``micro_batch`` (gradient accumulation).
    Schedule: linear warm-up over ``warmup_frac * steps`` to ``lr``, cosine decay to ``min_lr``.
    Attention: ``n_kv_heads`` K/V heads (0: ``n_heads``, multi-head; fewer: grouped-query), RoPE base
    ``rope_base``. Vocabulary: the tokenizer's, padded up to a multiple of ``vocab_multiple`` (Megatron's
    ``--make-vocab-size-divisible-by``). ``needs_corpus``: the preset refuses the small default corpus unless
    data is given (or explicitly allowed).
    """

    name: str
    d_model: int
    n_layers: int
    n_heads: int
    num_experts: int
    top_k: int
    expert_hidden: int
    seq_len: int
    global_batch: int
    micro_batch: int
    steps: int
    lr: float
    min_lr: float
    warmup_frac: float = 0.01
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    clip: float = 1.0
    init_std: float = 0.02
    tie_embeddings: bool = True
    n_kv_heads: int = 0
    rope_base: float = 10000.0
    vocab_multiple: int = 1
    needs_corpus: bool = False
    eval_interval: int = 50
    eval_batches: int = 8
    log_interval: int = 10
    ckpt_interval: int = 100
    precision: str = "float32"   # "float32" | "bf16" (autocast; master weights stay float32)
    tokenizer: str = "byte"      # "byte" | "bpe" | "gpt2" (GPT-2's tokenizer.json, given by path) | a path
    bpe_vocab: int = 2048
    threads: int = 0             # CPU intra-op threads (0 = torch's default); tiny models run best on 1
    jobs: int = 1                # runs trained at once in worker processes (one per CPU core suits tiny models)
    seeds: tuple = (0, 1, 2)
    routers: tuple = DEFAULT_ROUTERS

    def __post_init__(self) -> None:
        for field in ("d_model", "n_layers", "n_heads", "num_experts", "top_k", "expert_hidden", "seq_len",
                      "global_batch", "micro_batch", "steps", "eval_interval", "eval_batches", "log_interval",
                      "ckpt_interval", "bpe_vocab", "vocab_multiple"):
            value = getattr(self, field)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        for field in ("lr", "min_lr", "warmup_frac", "weight_decay", "clip", "init_std"):
            value = getattr(self, field)
            if not _is_real(value):
                raise ValueError(f"{field} must be a finite number, got {value!r}")
        if not _is_int(self.n_kv_heads) or self.n_kv_heads < 0 or (self.n_kv_heads and self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_kv_heads must be 0 (= n_heads) or a positive int dividing n_heads={self.n_heads}, "
                             f"got {self.n_kv_heads!r}")
        if not _is_real(self.rope_base) or self.rope_base <= 1:
            raise ValueError(f"rope_base must be a finite number > 1, got {self.rope_base!r}")
        for field in ("tie_embeddings", "needs_corpus"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.weight_decay < 0 or self.clip <= 0 or self.init_std <= 0:
            raise ValueError(f"need weight_decay >= 0, clip > 0 and init_std > 0, got {self.weight_decay}, "
                             f"{self.clip}, {self.init_std}")
        if len(self.betas) != 2 or not all(_is_real(b) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got top_k={self.top_k}")
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size "
                             "(RoPE rotates pairs)")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch={self.global_batch} must be a multiple of micro_batch="
                             f"{self.micro_batch}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        if self.precision not in ("float32", "bf16"):
            raise ValueError(f"precision must be 'float32' or 'bf16', got {self.precision!r}")
        if not _is_int(self.jobs) or self.jobs < 1:
            raise ValueError(f"jobs must be a positive int, got {self.jobs!r}")
        if not _is_int(self.threads) or self.threads < 0:
            raise ValueError(f"threads must be an int >= 0 (0 = torch's default), got {self.threads!r}")
        if not self.seeds or not all(_is_int(s) and s >= 0 for s in self.seeds):
            raise ValueError(f"seeds must be a non-empty tuple of ints >= 0, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds!r}")
        if not self.routers or not all(isinstance(r, str) and r.strip() for r in self.routers):
            raise ValueError(f"routers must be a non-empty tuple of router names, got {self.routers!r}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def padded_vocab(self, vocab_size: int) -> int:
        """The model's vocabulary rows: ``vocab_size`` rounded up to a multiple of ``vocab_multiple``."""
        return -(-vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def grad_accum(self) -> int:
        return self.global_batch // self.micro_batch

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.steps))

    def lr_at(self, step: int) -> float:
        """Learning rate for optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
        w = self.warmup_steps
        if step < w:
            return self.lr * (step + 1) / w
        progress = min(1.0, (step - w) / max(1, self.steps - w))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def replace(self, **changes) -> "Preset":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def fingerprint(self) -> dict:
        """Everything that changes a run's numbers (routers and seeds excluded: they name the run)."""
        d = dataclasses.asdict(self)
        for k in NOT_IN_FINGERPRINT:
            d.pop(k)
        d["betas"] = list(d["betas"])
        return d


PRESETS: dict[str, Preset] = {
    # seconds: what the tests and a CI smoke run use
    "smoke": Preset(name="smoke", d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=1, expert_hidden=32,
                    seq_len=32, global_batch=4, micro_batch=4, steps=20, lr=3e-3, min_lr=3e-4, warmup_frac=0.1,
                    eval_interval=10, eval_batches=2, log_interval=5, ckpt_interval=10, threads=1),
    # 1,000 steps, two runs at a time (the wall time of one process doing 500). At 500 steps TopK's seed std was
    # 0.093 (5 seeds): Mixtral-gated top-2 sits on a loss plateau near 3.2 nats for 75-150 steps, the seeds
    # leave it at different times and the late ones end worse (more unevenly loaded); by 1,000 steps that
    # start is a small part of training and the std is 0.023 (docs/ablations.md). One thread per run: at
    # this size two threads on two shared cores mostly wait on each other.
    "quick": Preset(name="quick", d_model=64, n_layers=2, n_heads=4, num_experts=8, top_k=2, expert_hidden=128,
                    seq_len=64, global_batch=16, micro_batch=16, steps=1000, lr=3e-3, min_lr=3e-4,
                    warmup_frac=0.05, init_std=0.02, eval_interval=50, eval_batches=8, log_interval=10,
                    ckpt_interval=200, threads=1, jobs=2),
    # 46 min 23 s measured on the same CPU (6 routers x 3 seeds): 4x the tokens per run of quick on a
    # 4-layer model, long enough that TopK's slow start and ReMoE's dense warm-up are a small part of training
    "cpu-full": Preset(name="cpu-full", d_model=96, n_layers=4, n_heads=4, num_experts=8, top_k=2,
                       expert_hidden=192, seq_len=128, global_batch=16, micro_batch=16, steps=1000, lr=2e-3,
                       min_lr=2e-4, warmup_frac=0.02, eval_interval=100, eval_batches=16, log_interval=10,
                       ckpt_interval=200, threads=1),
    # the papers' regime on a CPU: k=1 and E=8 (ReMoE's headline setting), 4,000 steps so ReMoE's dense start
    # (lambda rising x1.2 per step from 1e-8, ~80 steps) is ~2% of training as in the paper (0.15%), 5 seeds.
    # The model is shrunk instead of the step count; at this size a step is bound by per-op overhead (~50 ms
    # quiet), so the budget (45 min on 2 cores) is met by two runs at a time (jobs=2) and the four routers whose
    # papers claim a pretraining loss: ERC (its claim is downstream accuracy at 15B tokens) and DPSL (its
    # setting is upcycled models, docs/conversion.md) stay in `quick`; add them here with --routers
    "cpu-paper": Preset(name="cpu-paper", d_model=48, n_layers=2, n_heads=4, num_experts=8, top_k=1,
                        expert_hidden=96, seq_len=64, global_batch=16, micro_batch=16, steps=4000, lr=3e-3,
                        min_lr=3e-4, warmup_frac=0.02, eval_interval=200, eval_batches=8, log_interval=20,
                        ckpt_interval=500, threads=1, jobs=2, seeds=(0, 1, 2, 3, 4),
                        routers=("dense", "topk", "relu", "rmoe")),
    # ReMoE's 182M LLaMA setting (arXiv 2412.14711; thu-ml/ReMoE scripts/train_llama_182m_{remoe,moe}.sh with
    # Megatron's defaults for what they leave out: Adam beta2 0.999, weight decay 0.01). GPT-2 BPE (50,257 ids)
    # padded to 51,200, untied embeddings, 4 K/V groups, RoPE base 1e6, init std 0.01: 182.4M active parameters
    # at k=1. A GPU run on a real corpus (the paper: The Pile, 30B tokens); refused on the default Shakespeare.
    "remoe-182m": Preset(name="remoe-182m", d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, num_experts=8,
                         top_k=1, expert_hidden=3072, seq_len=1024, global_batch=512, micro_batch=16, steps=60_000,
                         lr=5e-4, min_lr=5e-5, warmup_frac=0.01, weight_decay=0.01, betas=(0.9, 0.999),
                         init_std=0.01, tie_embeddings=False, rope_base=1e6, vocab_multiple=1024,
                         needs_corpus=True, eval_interval=1000, eval_batches=32, log_interval=50,
                         ckpt_interval=1000, precision="bf16", tokenizer="gpt2"),
}


def get_preset(name: str, **overrides: Optional[object]) -> Preset:
    """The preset ``name`` with ``overrides`` (None values ignored); unknown names raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name].replace(**overrides)
