"""Build the CUDA C++ dispatch kernels (``csrc/*.cu``) into ``libmoe_ops.so`` with nvcc.

    python -m moe_routing.build_cuda [--arch sm_90] [--out DIR] [--force]

Without ``--arch`` the arch comes from the current CUDA device (needs torch with CUDA and a GPU); with it the
build needs only nvcc. The library lands in ``DIR`` or the cache (``$MOE_ROUTING_CACHE``, else
``~/.cache/moe_routing/cuda``) under ``<hash of sources + arch + flags>/libmoe_ops.so``; the path is printed.
``pip install`` never runs this: the op layer builds lazily on first use of ``backend="cuda"`` on a CUDA machine
(see ``moe_routing.ops.cuda_lib``). Imports nothing heavier than the standard library at module level.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

LIB_NAME = "libmoe_ops.so"
SOURCES = ("permute.cu", "combine.cu", "counts.cu", "topk_softmax.cu")
HEADERS = ("moe_ops.h", "acc_types.cuh")
NVCC_FLAGS = ("-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17")
SYMBOLS = ("moe_permute_fwd", "moe_combine_fwd", "moe_combine_bwd", "moe_expert_counts_workspace",
           "moe_expert_counts", "moe_topk_softmax_fwd")


class BuildError(RuntimeError):
    """nvcc missing or the compile failed; ``log_path`` (when set) holds nvcc's output."""

    def __init__(self, message: str, log_path: Optional[Path] = None):
        super().__init__(message)
        self.log_path = log_path


def csrc_dir() -> Path:
    """``$MOE_ROUTING_CSRC``, else ``csrc/`` next to the package (a source checkout or editable install)."""
    env = os.environ.get("MOE_ROUTING_CSRC")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "csrc"


def find_nvcc() -> Optional[str]:
    """nvcc on PATH, else under ``$CUDA_HOME``/``$CUDA_PATH``, else /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def normalize_arch(arch: str) -> str:
    """'sm_90', '90', '9.0' or 'sm_90a' -> 'sm_90' / 'sm_90a'."""
    a = arch.strip().lower()
    if a.startswith("sm_"):
        a = a[3:]
    a = a.replace(".", "")
    if not re.fullmatch(r"\d{2,3}[af]?", a):
        raise ValueError(f"arch must look like sm_90 (or 90, 9.0), got {arch!r}")
    return f"sm_{a}"


def device_arch() -> str:
    """``sm_XY`` of the current CUDA device (imports torch)."""
    import torch

    if not torch.cuda.is_available():
        raise BuildError("no CUDA device to take the arch from: pass --arch (e.g. --arch sm_90)")
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def cache_root() -> Path:
    env = os.environ.get("MOE_ROUTING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "moe_routing" / "cuda"


def source_hash(arch: str, src: Optional[Path] = None) -> str:
    src = src or csrc_dir()
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((src / name).read_bytes())
    h.update(arch.encode())
    h.update(" ".join(NVCC_FLAGS).encode())
    return h.hexdigest()[:16]


def library_path(arch: str, out_dir: Optional[Path] = None) -> Path:
    """Where ``build`` puts the library for ``arch``."""
    arch = normalize_arch(arch)
    if out_dir is not None:
        return Path(out_dir) / LIB_NAME
    return cache_root() / source_hash(arch) / LIB_NAME


def build(arch: Optional[str] = None, out_dir: Optional[Path] = None, force: bool = False,
          nvcc: Optional[str] = None) -> Path:
    """Compile ``csrc/*.cu`` into one shared library and return its path (reused when already built).

    Writes nvcc's output to ``build.log`` next to the library; raises BuildError naming that log on failure.
    The library is written to a temporary name and renamed, so concurrent builds never load a partial file.
    """
    arch = normalize_arch(arch) if arch else device_arch()
    src = csrc_dir()
    missing = [n for n in SOURCES + HEADERS if not (src / n).is_file()]
    if missing:
        raise BuildError(f"CUDA sources not found in {src} (missing {', '.join(missing)}); "
                         "set MOE_ROUTING_CSRC to the repository's csrc/ directory")
    lib = library_path(arch, out_dir)
    if lib.is_file() and not force:
        return lib
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc not found (not on PATH, $CUDA_HOME/bin or /usr/local/cuda/bin)")
    lib.parent.mkdir(parents=True, exist_ok=True)
    log = lib.parent / "build.log"
    fd, tmp = tempfile.mkstemp(prefix=".libmoe_ops.", suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", f"-I{src}", *(str(src / n) for n in SOURCES), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text("$ " + " ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise BuildError(f"nvcc failed (exit {proc.returncode}) building {LIB_NAME} for {arch}; log: {log}", log)
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_routing.build_cuda", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", help="target, e.g. sm_90 (default: the current CUDA device's)")
    parser.add_argument("--out", type=Path, help="output directory (default: the cache, $MOE_ROUTING_CACHE)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the library exists")
    args = parser.parse_args(argv)
    try:
        path = build(args.arch, args.out, force=args.force)
    except (BuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
