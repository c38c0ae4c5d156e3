"""The fused low-rank kernel (diffusion/patches/lowrank_add.c) per instruction set, against torch.

Compiles the kernel source for several -march targets (x86-64 only; the CPU must run them all),
then times one pass `W = cast(W0 + c * up @ down)` over SD1.5-sized transformer weights (rank 16
and rank 1, re-patch into an existing tensor, all threads) and, as the reference in the same
process, torch's `addmm(W0, up, down, out=W)` (fp32; bf16/fp16 via an fp32 temporary). Prints
nanoseconds per weight element, medians of several runs, and kernel / torch.

    python benchmarks/lowrank_kernel.py [--runs 5] [--march x86-64-v3 native ...]
"""
from __future__ import annotations

import argparse
import ctypes
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.patches import lowrank_kernel  # noqa: E402
from diffusion.patches.lowrank_kernel import DTYPES, SOURCE, _Job  # noqa: E402

DT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def sd15_linear_shapes() -> list[tuple[int, int]]:
    """The transformer linears of the SD1.5 UNet a kohya LoRA patches (~0.99 GiB in fp32)."""
    shapes = []
    for dim, blocks in ((320, 5), (640, 5), (1280, 6)):
        for _ in range(blocks):
            shapes += [(dim, dim)] * 4 + [(dim, 768)] * 2 + [(dim, dim)] * 2 + [(dim * 8, dim), (dim, dim * 4)]
    return shapes


def build(march: str, out: Path) -> ctypes.CDLL:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise SystemExit("no C compiler")
    so = out / f"lowrank_{march}.so"
    subprocess.run([cc, "-O3", f"-march={march}", "-shared", "-fPIC", "-pthread", "-Wno-psabi", str(SOURCE),
                    "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.lr_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def median_time(fn, runs: int) -> float:
    fn()                                    # warm: pages touched, code loaded
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--march", nargs="+", default=["x86-64-v3", "native"],
                    help="targets to compile for (x86-64-v3 = AVX2/FMA/F16C, the usual desktop CPU)")
    args = ap.parse_args()
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise SystemExit("x86-64 only")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; kernel source {SOURCE.name}; "
          f"the module's own build: {'available' if lowrank_kernel.available() else lowrank_kernel.unavailable_reason()}")
    shapes = sd15_linear_shapes()
    n = sum(r * c for r, c in shapes)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        libs = {m: build(m, Path(d)) for m in args.march}
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w0 = [torch.randn(s, generator=g).to(dtype) for s in shapes]
            w = [torch.empty_like(t) for t in w0]
            for rank in (16, 1):
                f = [(torch.randn(s[0], rank, generator=g) * 0.01, torch.randn(rank, s[1], generator=g) * 0.01)
                     for s in shapes]

                def torch_pass() -> None:
                    for a, b, (u, dn) in zip(w0, w, f):
                        if dtype == torch.float32:
                            torch.addmm(a, u, dn, alpha=0.7, out=b)
                        else:
                            b.copy_(torch.addmm(a.float(), u, dn, alpha=0.7))

                ref = median_time(torch_pass, args.runs)
                row = [f"{DT_NAMES[dtype]} rank {rank:2d}: torch {ref / n * 1e9:.3f} ns/element"]
                for march, lib in libs.items():
                    jobs = (_Job * len(shapes))()
                    for k, (a, b, (u, dn)) in enumerate(zip(w0, w, f)):
                        jobs[k] = _Job(a.data_ptr(), b.data_ptr(), u.data_ptr(), dn.data_ptr(), a.shape[0], a.shape[1],
                                       rank, DTYPES[dtype], 1, 0.7, 0)
                    t = median_time(lambda: lib.lr_run(ctypes.addressof(jobs), len(shapes), threads), args.runs)
                    row.append(f"{march} {t / n * 1e9:.3f} ({t / ref:.2f}x torch)")
                print(", ".join(row), flush=True)


if __name__ == "__main__":
    main()
