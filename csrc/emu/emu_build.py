"""Build csrc/*.cu for the CPU emulator in this directory (tests only; see cuda_runtime.h here).

    python csrc/emu/emu_build.py [--out DIR] [--check] [--torch]

Copies each ``csrc/<name>.cu`` to ``DIR/<name>.cpp`` with every ``kernel<<<grid, block, smem, stream>>>(args)``
rewritten to ``moe_emu::launch(kernel, grid, block, smem, stream, args)`` (nothing else changes), then compiles
with g++ (``$CXX``) against the stand-in CUDA headers here:

- ``libmoe_ops_emu.so``: the ABI functions (moe_ops.h) on host pointers, plus ``moe_emu_launches()`` (kernel launches
  so far), for ctypes (tests/test_csrc.py compares it with the torch reference ops);
- ``emu_check`` (``--check``): ``emu_check.cpp``'s driver, built with AddressSanitizer and UBSan (exact-size
  buffers, misaligned views): any out-of-bounds access, misaligned vector access or wrong value fails it;
- ``libmoe_routing_emu_ext.so`` (``--torch``): ``csrc/torch_binding.cpp`` compiled with ``-DMOE_ROUTING_EMULATE``
  against torch's headers and linked with the emulated launchers: loaded with ``torch.ops.load_library`` it
  registers ``torch.ops.moe_routing_cuda.*`` for CPU tensors, so the binding's checks and calls run in CI.

`declare_abi` sets the ctypes signatures of the C launchers for tests that call ``libmoe_ops_emu.so`` directly.
"""
from __future__ import annotations

import argparse
import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

EMU = Path(__file__).resolve().parent
CSRC = EMU.parent
SOURCES = tuple(sorted(p.name for p in CSRC.glob("*.cu")))  # every kernel source: what setup.py builds
_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:\s*<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
CXXFLAGS = ["-std=c++20", "-pthread", "-fPIC", "-Wall", "-Wno-unknown-pragmas", f"-I{EMU}", f"-I{CSRC}"]
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


class EmuBuildError(RuntimeError):
    pass


def find_cxx() -> Optional[str]:
    import os

    return shutil.which(os.environ.get("CXX", "g++"))


def rewrite(text: str) -> str:
    """``k<T><<<g, b, s, st>>>(`` -> ``moe_emu::launch(k<T>, g, b, s, st, ``; raises when nothing matched."""
    out, n = _LAUNCH.subn(lambda m: f"moe_emu::launch({m.group(1)}, {m.group(2).strip()}, ", text)
    if "<<<" in out or ">>>" in out:
        raise EmuBuildError("a kernel launch was not rewritten (unexpected <<< >>> form)")
    return out


def translate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in SOURCES:
        dst = out_dir / (Path(name).stem + ".cpp")
        dst.write_text(f'#line 1 "{CSRC / name}"\n' + rewrite((CSRC / name).read_text()))
        paths.append(dst)
    return paths


def declare_abi(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the ctypes signatures of the ``csrc/moe_ops.h`` launchers on ``lib`` (the emulated library)."""
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "moe_permute_fwd": [ptr, ptr, ptr, i64, i64, i32, ptr],
        "moe_combine_fwd": [ptr, ptr, ptr, ptr, ptr, i64, i64, i32, ptr],
        "moe_combine_bwd": [ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i32, ptr],
        "moe_expert_counts": [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr],
        "moe_topk_softmax_fwd": [ptr, ptr, ptr, i64, i64, i64, i32, i32, i32, ptr],
    }
    for name, argtypes in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.moe_expert_counts_workspace.argtypes = [i64, i64]
    lib.moe_expert_counts_workspace.restype = i64
    return lib


def _torch_ext_command(cxx: str, srcs: list[str], out: Path) -> list[str]:
    """g++ command for the emulated binding: torch's headers and libraries, the binding in CPU mode."""
    import torch
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libdirs = cpp_extension.library_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [cxx, *CXXFLAGS, "-O1", "-shared", "-DMOE_ROUTING_EMULATE", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes,
            str(CSRC / "torch_binding.cpp"), *srcs, str(EMU / "emu_abi.cpp"), *(f"-L{d}" for d in libdirs),
            *(f"-Wl,-rpath,{d}" for d in libdirs), "-lc10", "-ltorch_cpu", "-ltorch", "-o", str(out)]


def _run_all(jobs: list[tuple[list[str], Path]]) -> None:
    """Run the compiles concurrently (the sanitizer build dominates; the library build overlaps it)."""
    procs = [(cmd, log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
             for cmd, log in jobs]
    errors = []
    for cmd, log, proc in procs:
        out, _ = proc.communicate()
        log.write_text("$ " + " ".join(cmd) + "\n" + out)
        if proc.returncode != 0:
            errors.append(f"emulator build failed (exit {proc.returncode}); log: {log}\n{out[-4000:]}")
    if errors:
        raise EmuBuildError("\n".join(errors))


def build(out_dir: Path, check: bool = False, cxx: Optional[str] = None, torch_ext: bool = False) -> dict[str, Path]:
    cxx = cxx or find_cxx()
    if cxx is None:
        raise EmuBuildError("no host C++ compiler (g++ or $CXX) found")
    out_dir = Path(out_dir)
    srcs = [str(p) for p in translate(out_dir)]
    built = {"lib": out_dir / "libmoe_ops_emu.so"}
    jobs = [([cxx, *CXXFLAGS, "-O2", "-shared", *srcs, str(EMU / "emu_abi.cpp"), "-o", str(built["lib"])],
             out_dir / "build_lib.log")]
    if check:
        built["check"] = out_dir / "emu_check"
        jobs.append(([cxx, *CXXFLAGS, *SANITIZE, *srcs, str(EMU / "emu_abi.cpp"), str(EMU / "emu_check.cpp"),
                      "-o", str(built["check"])], out_dir / "build_check.log"))
    if torch_ext:
        built["torch_ext"] = out_dir / "libmoe_routing_emu_ext.so"
        jobs.append((_torch_ext_command(cxx, srcs, built["torch_ext"]), out_dir / "build_torch_ext.log"))
    _run_all(jobs)
    return built


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/emu"))
    parser.add_argument("--check", action="store_true", help="also build (and run) the sanitizer driver")
    parser.add_argument("--torch", action="store_true", help="also build the emulated torch binding")
    args = parser.parse_args(argv)
    built = build(args.out, check=args.check, torch_ext=args.torch)
    for path in built.values():
        print(path)
    if args.check:
        return subprocess.run([str(built["check"])]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
