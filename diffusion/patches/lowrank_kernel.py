"""A fused CPU kernel for low-rank weight patches: `W = cast(W0 + sum_i c_i up_i @ down_i)` in one pass.

Why: a LoRA strength change rewrites every patched weight from the originals. torch's
`addmm(W0, up, down, out=W)` does that as a copy pass plus an in-place gemm pass over W (about
0.16 s/GiB on a 2-core CPU); the kernel in `lowrank_add.c` reads W0 once, keeps each tile's
rank-r product in registers and streams W out (about 0.08 s/GiB), for fp32, bf16 and fp16 weights.
No library offers that (BLAS gemm updates C in place; oneDNN's fused binary-add was measured no
faster), so the C source ships with the package and is compiled on first use with the system C
compiler (`$CC`, else cc / gcc / clang) into the user cache, keyed by source, compiler and CPU.

Without a compiler, on a failed build, on CPUs other than x86-64 with AVX (unmeasured there), or with
`EASEL_NATIVE_KERNEL=0`, `available()` is False and the patcher uses torch (same values up to float
rounding). Whichever path patches a weight, it also does every later re-patch in this process, so a
strength change and a fresh patch at the same strength give bitwise the same weights.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lowrank_add.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-pthread")
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class _Job(ctypes.Structure):
    # mirrors lr_job in lowrank_add.c
    _fields_ = [("w0", ctypes.c_void_p), ("w", ctypes.c_void_p), ("up", ctypes.c_void_p),
                ("down", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("rank", ctypes.c_int64), ("dtype", ctypes.c_int32), ("stream", ctypes.c_int32),
                ("scale", ctypes.c_float), ("pad", ctypes.c_int32)]


# False: supports() answers False, so patches take the torch path (benchmarks compare both in one process)
ENABLED = True

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failure: str | None = None          # why the kernel is unavailable, once known


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name.split()[0]):
            return name
    return None


def _cpu_id() -> str:
    """Identifies the instruction set -march=native compiles for (a shared cache must not mix CPUs:
    the same model name can come with different features, e.g. AVX-512 hidden by a hypervisor)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags", "Features", "CPU part") and name not in found:
                    found[name] = line.strip()
    except OSError:
        pass
    return "\n".join(found.values()) or (platform.processor() or platform.machine())


def _cache_dir() -> Path:
    base = os.environ.get("EASEL_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "easel", "kernels")
    return Path(base)


def _private(path: Path) -> bool:
    """True when `path` belongs to this user and nobody else may write it: a library loaded from a
    folder others can write to (e.g. a pre-created /tmp/easel-kernels-<uid>) would run their code."""
    if not hasattr(os, "getuid"):
        return True
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build(cc: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(src + version.encode() + " ".join(FLAGS).encode() + _cpu_id().encode()
                         + platform.machine().encode()).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    skipped: list[str] = []
    for d in (_cache_dir(), Path(tempfile.gettempdir()) / f"easel-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        target = d / f"lowrank_add-{key}{suffix}"
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            skipped.append(f"{d} (cannot create)")
            continue
        if not _private(d):
            skipped.append(f"{d} (not owned by this user, or writable by others)")
            continue
        if target.exists():
            if _private(target):
                return target
            skipped.append(f"{target} (not owned by this user, or writable by others)")
            continue
        try:
            fd, tmp = tempfile.mkstemp(suffix=suffix, dir=d)
        except OSError:
            skipped.append(f"{d} (not writable)")
            continue
        os.close(fd)
        try:
            res = subprocess.run([*cc.split(), *FLAGS, str(SOURCE), "-o", tmp],
                                 capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed on {SOURCE.name}: {res.stderr.strip()[-800:]}")
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)             # atomic: concurrent builders agree on one file
            return target
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no usable folder for the compiled kernel: " + "; ".join(skipped))


def _load() -> ctypes.CDLL | None:
    global _lib, _failure
    if _lib is not None or _failure is not None:
        return _lib
    with _lock:
        if _lib is not None or _failure is not None:
            return _lib
        if os.environ.get("EASEL_NATIVE_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
            _failure = "disabled by EASEL_NATIVE_KERNEL"
            return None
        cc = _compiler()
        if cc is None:
            _failure = "no C compiler found ($CC, cc, gcc or clang)"
            log.info("fused LoRA kernel unavailable (%s); patching with torch", _failure)
            return None
        try:
            lib = ctypes.CDLL(str(_build(cc)))
            if lib.lr_abi() != ctypes.sizeof(_Job):
                raise RuntimeError(f"job layout mismatch ({lib.lr_abi()} != {ctypes.sizeof(_Job)} bytes)")
            lib.lr_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
            lib.lr_run.restype = ctypes.c_int
            if lib.lr_vector_width() < 8:
                # measured only on x86-64 with AVX2 / AVX-512; an SSE-only build is no faster than
                # torch (fp16 converts lane by lane) and ARM builds are unmeasured: torch there
                raise RuntimeError("the kernel is used on x86-64 CPUs with AVX; this CPU patches with torch")
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _failure = str(exc)
            log.warning("fused LoRA kernel unavailable (%s); patching with torch", _failure)
        return _lib


def available() -> bool:
    """True when the compiled kernel can be used (builds it on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    _load()
    return _failure


def supports(weight: torch.Tensor) -> bool:
    """Whether the kernel can patch `weight` (CPU, contiguous, fp32/bf16/fp16, at least 2-D)."""
    if weight.device.type != "cpu" or weight.dim() < 2 or weight.numel() == 0 or not weight.is_contiguous():
        return False
    if weight.dtype not in DTYPES or not ENABLED:
        return False
    lib = _load()
    if lib is None:
        return False
    return weight.dtype != torch.float16 or bool(lib.lr_has_f16())


class LowrankBatch:
    """Patches collected over one `patch_model` and run in one multi-threaded call.

    `add(W0, W, terms)` records `W = cast(W0 + sum_i c_i up_i @ down_i)`; nothing is written until `run()`.
    The batch keeps every tensor it was given alive until then."""

    def __init__(self) -> None:
        self._jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, bool]] = []

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, original: torch.Tensor, dest: torch.Tensor,
            terms: Sequence[tuple[torch.Tensor, torch.Tensor, float]], reused: bool = False) -> None:
        """`terms`: (up `[rows, r]`, down `[r, cols]`, c) with rows = W.shape[0], cols = the rest.

        `reused`: `dest` held data before (its pages are mapped), so the kernel writes it with
        streaming stores; a fresh allocation is written with plain stores, which take its page faults
        faster (measured 0.28 vs 0.41 s/GiB here; on a reused buffer streaming wins, 0.08 vs 0.11)."""
        if not terms:
            raise ValueError("a low-rank job needs at least one term")
        if dest is original or dest.shape != original.shape or dest.dtype != original.dtype \
                or not dest.is_contiguous() or not supports(original):
            raise ValueError(f"kernel cannot write weight {tuple(original.shape)} {original.dtype} into "
                             f"{tuple(dest.shape)} {dest.dtype}")
        lo, hi = original.data_ptr(), original.data_ptr() + original.numel() * original.element_size()
        if dest.data_ptr() < hi and lo < dest.data_ptr() + dest.numel() * dest.element_size():
            raise ValueError("the destination overlaps the original weight's memory")
        rows = original.shape[0]
        cols = original.numel() // rows
        for u, d, _ in terms:                   # up [rows, r, (1, 1)], down [r, cols or in, kh, kw]
            r = d.shape[0] if d.dim() else 0
            if u.shape[0] != rows or u.numel() != rows * r or d.numel() != r * cols:
                raise ValueError(f"factors up {tuple(u.shape)} / down {tuple(d.shape)} do not fit weight "
                                 f"{tuple(original.shape)}")
        # [rows, sum r]: each term's up times its coefficient; [sum r, cols]: the downs stacked
        if len(terms) == 1:
            u, d, scale = terms[0]
            up, down = u.reshape(rows, -1), d.reshape(-1, cols)
        else:
            up = torch.cat([u.reshape(rows, -1) * c for u, _, c in terms], dim=1)
            down = torch.cat([d.reshape(-1, cols) for _, d, _ in terms], dim=0)
            scale = 1.0
        if up.dtype != torch.float32 or down.dtype != torch.float32:
            up, down = up.float(), down.float()
        up, down = up.contiguous(), down.contiguous()     # [rows, r], [r, cols]: checked per term above
        self._jobs.append((original, dest, up, down, float(scale), reused))

    def run(self, threads: int | None = None) -> None:
        if not self._jobs:
            return
        lib = _load()
        if lib is None:
            raise RuntimeError(f"fused LoRA kernel unavailable: {_failure}")
        n = len(self._jobs)
        jobs = (_Job * n)()
        for k, (w0, w, up, down, scale, reused) in enumerate(self._jobs):
            jobs[k] = _Job(w0.data_ptr(), w.data_ptr(), up.data_ptr(), down.data_ptr(), w0.shape[0],
                           w0.numel() // w0.shape[0], up.shape[1], DTYPES[w0.dtype], int(reused), scale, 0)
        nthreads = max(1, int(threads if threads is not None else torch.get_num_threads()))
        lib.lr_run(ctypes.addressof(jobs), n, nthreads)        # ctypes releases the GIL meanwhile
        self._jobs.clear()
