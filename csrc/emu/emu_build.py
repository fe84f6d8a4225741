"""Build csrc/*.cu for the CPU emulator in this directory (tests only; see cuda_runtime.h here).

    python csrc/emu/emu_build.py [--out DIR] [--check]

Copies each ``csrc/<name>.cu`` to ``DIR/<name>.cpp`` with every ``kernel<<<grid, block, smem, stream>>>(args)``
rewritten to ``moe_emu::launch(kernel, grid, block, smem, stream, args)`` (nothing else changes), then compiles
with g++ (``$CXX``) against the stand-in CUDA headers here:

- ``libmoe_ops_emu.so``: the ABI functions (moe_ops.h) on host pointers, plus ``moe_emu_launches()`` (kernel launches
  so far), for ctypes (tests/test_csrc.py compares it with the torch reference ops);
- ``emu_check`` (``--check``): ``emu_check.cpp``'s driver, built with AddressSanitizer and UBSan (exact-size
  buffers, misaligned views): any out-of-bounds access, misaligned vector access or wrong value fails it.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

EMU = Path(__file__).resolve().parent
CSRC = EMU.parent
SOURCES = ("permute.cu", "combine.cu", "counts.cu", "topk_softmax.cu")
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


def build(out_dir: Path, check: bool = False, cxx: Optional[str] = None) -> dict[str, Path]:
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
    _run_all(jobs)
    return built


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/emu"))
    parser.add_argument("--check", action="store_true", help="also build (and run) the sanitizer driver")
    args = parser.parse_args(argv)
    built = build(args.out, check=args.check)
    for path in built.values():
        print(path)
    if args.check:
        return subprocess.run([str(built["check"])]).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
