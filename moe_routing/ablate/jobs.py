"""Train a sweep's runs one after another or in several worker processes (``moe-ablate --jobs N``).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .config import Preset
from .train import Data, train_run


@dataclass(frozen=True)
class RunTask:
    """One run of a sweep: ``router`` with ``seed`` under ``preset``, in ``run_dir``."""

    preset: Preset
    router: str
    seed: int
    run_dir: Path


def _train(task: RunTask, data: Data, device: str, digest: str, progress: bool = False) -> dict:
    return train_run(task.preset, task.router, task.seed, data, task.run_dir, device=device, progress=progress,
                     digest=digest)


def train_runs(tasks: Sequence[RunTask], data: Data, device: str, digest: str, jobs: int = 1,
               progress: bool = True, on_result: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Train every task, ``jobs`` at a time (1: in this process, with progress bars; more: in spawned worker
    processes, without); returns the results in the order of ``tasks``, and ``on_result`` sees each one as it
    finishes. The first failing run cancels the runs not yet started and its error is raised here (finished
    runs keep their result files, started ones their checkpoints)."""
    if jobs <= 1 or len(tasks) <= 1:
        results = []
        for t in tasks:
            results.append(_train(t, data, device, digest, progress))
            if on_result is not None:
                on_result(results[-1])
        return results
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_train, t, data, device, digest): i for i, t in enumerate(tasks)}
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
    return [results[i] for i in range(len(tasks))]
