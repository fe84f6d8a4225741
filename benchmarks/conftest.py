"""pytest options for the benchmarks: ``--moe-quick`` (same as MOE_BENCH_QUICK=1: small sizes) and a header
naming the machine, so a pasted pytest-benchmark table says where it was measured."""
from __future__ import annotations

import os


def pytest_addoption(parser):
    parser.addoption("--moe-quick", action="store_true",
                     help="run bench_layer.py at T=1024 with 2 rounds (same as MOE_BENCH_QUICK=1)")


def pytest_configure(config):
    if config.getoption("--moe-quick"):
        os.environ["MOE_BENCH_QUICK"] = "1"


def pytest_report_header(config):
    import torch
    from _machine import cpu_count, cpu_model

    cpu, nproc = cpu_model(), cpu_count()
    size = "quick (T=1024)" if os.environ.get("MOE_BENCH_QUICK") else "full (T=8192)"
    return (f"moe_routing benchmarks: {nproc} CPUs ({cpu}), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); bench_layer size {size}")
