"""pytest options for the benchmarks: ``--moe-quick`` (same as MOE_BENCH_QUICK=1: small sizes) and a header
naming the machine, so a pasted pytest-benchmark table says where it was measured."""
from __future__ import annotations

import os
from pathlib import Path


def pytest_addoption(parser):
    parser.addoption("--moe-quick", action="store_true",
                     help="run bench_layer.py at T=1024 with 2 rounds (same as MOE_BENCH_QUICK=1)")


def pytest_configure(config):
    if config.getoption("--moe-quick"):
        os.environ["MOE_BENCH_QUICK"] = "1"


def pytest_report_header(config):
    import torch
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    size = "quick (T=1024)" if os.environ.get("MOE_BENCH_QUICK") else "full (T=8192)"
    return (f"moe_routing benchmarks: {nproc} CPUs ({cpu}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); bench_layer size {size}")
