"""Train a sweep's (router, seed) runs in several worker processes on one machine (``moe-ablate --jobs N``).

Runs are independent and seeded, so where a run trains does not change its numbers: ``--jobs 2`` writes the
same result files as ``--jobs 1``, in about half the time on a 2-core CPU with one torch thread per run (tiny
models are bound by per-op overhead, which a second thread in the same process does not parallelise). Each run
still takes its own folder lock and checkpoints, so an interrupted sweep resumes with any ``--jobs``.

Workers are spawned, not forked: forking a process that has already started torch's thread pools can hang.
Each task carries the token streams (tens of MB for the default corpus, pickled in well under a second:
small next to a run's minutes).
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import Preset
from .train import Data, train_run

def _train_in_worker(preset: Preset, router: str, seed: int, data: Data, run_dir: Path, device: str,
                     digest: str) -> dict:
    return train_run(preset, router, seed, data, run_dir, device=device, progress=False, digest=digest)


def train_runs_in_workers(preset: Preset, pairs: Sequence[tuple[str, int]], data: Data, out: Path, device: str,
                          digest: str, jobs: int, on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train every ``(router, seed)`` of ``pairs`` (run folder ``out/router/seed<seed>``) in ``jobs`` spawned
    processes; returns the results in the order of ``pairs``. ``on_result`` sees each result as it finishes.
    The first failing run cancels the runs not yet started and its error is raised here (finished runs keep
    their result files, started ones their checkpoints)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_train_in_worker, preset, r, s, data, out / r / f"seed{s}", device, digest): (r, s)
                   for r, s in pairs}
        pending, results = set(futures), {}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()
                results[futures[fut]] = fut.result()
                if on_result is not None:
                    on_result(results[futures[fut]])
    return [results[pair] for pair in pairs]
