"""What every benchmark records about the machine it ran on (shared by the bench scripts and conftest)."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Optional


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else whatever `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def library_commit() -> Optional[str]:
    """The commit moe_routing was measured at, "+dirty" when its files differ from it (None outside git)."""
    import moe_routing

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True,
                              cwd=Path(moe_routing.__file__).parent).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return (head + ("+dirty" if git("status", "--porcelain", "--", ".") else "")) or None
    except OSError:
        return None


# glibc serves buffers above its mmap threshold (at most 32 MB) with fresh mappings and unmaps them on free, so a
# large temporary page-faults on every call; these settings (or a preloaded jemalloc/tcmalloc) change CPU timings
# by tens of percent where weight gradients are hundreds of MB, so a result records which were in force
ALLOCATOR_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")


def allocator_env() -> dict[str, str]:
    """The allocator settings of this process's environment (empty: glibc's defaults)."""
    return {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ}
