"""The fused low-rank CPU kernel (diffusion/patches/lowrank_add.c via diffusion.patches.lowrank_kernel):
values against a float64 reference over awkward shapes and every dtype, determinism across
threads and store kinds, argument checks, path independence through ModelPatcher, the torch
fallback (fp32 / bf16 / fp16 weights against a hand computation, bitwise unpatch) when the kernel is
disabled, when no C compiler is on PATH (Windows; macOS without even the cc shim), when the compiler
fails (e.g. macOS's cc shim without the Xcode tools), and on a CPU whose build has no AVX (what aarch64 /
arm64 builds look like), and the C source built for other -march."""
from __future__ import annotations

import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion.patches import lowrank_kernel
from diffusion.patches.lora.weights import LoRA
from diffusion.patches.lowrank_kernel import DTYPES, LowrankBatch, _Job
from diffusion.patches.patcher import ModelPatcher
from tests.diffusion.patches._weights import bit_equal, snapshot

U32 = 2.0 ** -24                        # unit roundoff of fp32
COMPILER = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
ROWS = (1, 2, 3, 4, 5, 6, 7, 33)        # below / at / between the row tiles (RT = 5 or 3)
COLS = (1, 5, 16, 17, 48, 64, 80, 100, 64 * 3 + 17, 1280)   # tail only, one vector, NV tiles + vector + tail
RANKS = (1, 3, 16, 40)
X86 = platform.machine().lower() in ("x86_64", "amd64")

needs_kernel = pytest.mark.skipif(not lowrank_kernel.available(),
                                  reason=f"kernel unavailable: {lowrank_kernel.unavailable_reason()}")


def kernel_dtypes() -> list[torch.dtype]:
    out = [torch.float32, torch.bfloat16]
    if lowrank_kernel.supports(torch.zeros(2, 2, dtype=torch.float16)):
        out.append(torch.float16)
    return out


# ----------------------------------------------------------------------------------------------
# reference and comparison


def factors(rows: int, cols: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up [rows, rank], down [rank, cols] with up @ down of magnitude ~1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g), torch.randn(rank, cols, generator=g) / rank ** 0.5


def base_weight(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def reference(w0: torch.Tensor, terms) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 `W0 + sum c up @ down` and an elementwise bound on the error of any fp32 evaluation
    of it (gamma_n bound: (total rank + a few roundings) * u * (|W0| + sum |c| |up| @ |down|))."""
    rows = w0.shape[0]
    ref = w0.double().reshape(rows, -1).clone()
    mag = ref.abs()
    rank = 0
    for u, d, c in terms:
        u2, d2 = u.double().reshape(rows, -1), d.double().reshape(-1, ref.shape[1])
        ref += c * (u2 @ d2)
        mag = mag + abs(c) * (u2.abs() @ d2.abs())
        rank += u2.shape[1]
    return ref.reshape(w0.shape), ((rank + 6) * U32 * mag).reshape(w0.shape)


def ordered(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 bit patterns as integers whose order and differences are the values' order and ulps."""
    bits = t.view(torch.int16).to(torch.int32)
    return torch.where(bits < 0, -(bits & 0x7FFF), bits)


def check(got: torch.Tensor, w0: torch.Tensor, terms, what: str = "") -> None:
    ref, bound = reference(w0, terms)
    assert got.dtype == w0.dtype and got.shape == w0.shape, what
    assert torch.isfinite(got).all(), what
    if got.dtype == torch.float32:
        err = (got.double() - ref).abs()
        assert (err <= bound).all(), f"{what}: fp32 error {err.max().item():.3g} over the bound"
        # values are ~1: the absolute error stays within 1e-6 of the largest magnitude
        assert err.max().item() <= 1e-6 * max(1.0, ref.abs().max().item()), f"{what}: {err.max().item():.3g}"
        return
    dt = got.dtype
    # the kernel rounds (to nearest even) an fp32 value within `bound` of ref: the result lies
    # between the roundings of ref - bound and ref + bound (rounding is monotone)
    g, lo, hi = ordered(got), ordered((ref - bound).to(dt)), ordered((ref + bound).to(dt))
    bad = (g < lo) | (g > hi)
    assert not bad.any(), f"{what}: {int(bad.sum())} values outside the rounding interval, e.g. " \
                          f"{got[bad][:4].tolist()} vs {ref[bad][:4].tolist()}"
    # at most one unit in the last place from ref rounded to the dtype where the fp32 error is
    # below half an ulp (everywhere except near exact cancellation)
    ulps = (g - ordered(ref.to(dt))).abs()
    sure = bound <= torch.finfo(dt).eps * ref.abs() / 4
    assert sure.float().mean() > 0.9, what
    assert ulps[sure].max().item() <= 1, f"{what}: {ulps[sure].max().item()} ulps"


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    it = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and \
        torch.equal(a.reshape(-1).view(it), b.reshape(-1).view(it))


def kernel(w0: torch.Tensor, terms, reused: bool = False, threads: int | None = 2,
           dest: torch.Tensor | None = None) -> torch.Tensor:
    dest = torch.empty_like(w0) if dest is None else dest
    b = LowrankBatch()
    b.add(w0, dest, terms, reused=reused)
    assert len(b) == 1
    b.run(threads=threads)
    assert len(b) == 0
    return dest


# ----------------------------------------------------------------------------------------------
# 1. availability


def test_available_wherever_a_compiler_is():
    if COMPILER is None:
        pytest.skip("no C compiler (cc, gcc, clang) on PATH")
    if os.environ.get("EASEL_NATIVE_KERNEL", "1").strip().lower() in ("0", "false", "no", "off"):
        pytest.skip("EASEL_NATIVE_KERNEL disables the kernel in this environment")
    assert lowrank_kernel.available(), lowrank_kernel.unavailable_reason()
    assert lowrank_kernel.unavailable_reason() is None
    assert lowrank_kernel.supports(torch.zeros(3, 4)) and lowrank_kernel.supports(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert not lowrank_kernel.supports(torch.zeros(3, 4, dtype=torch.float64))
    assert not lowrank_kernel.supports(torch.zeros(4))                      # 1-D
    assert not lowrank_kernel.supports(torch.zeros(4, 3).t())               # not contiguous


# ----------------------------------------------------------------------------------------------
# 2. values over shapes and dtypes


@needs_kernel
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_matches_float64_reference(rows, dtype):
    seed = 0
    for cols in COLS:
        for rank in RANKS:
            seed += 1
            w0 = base_weight((rows, cols), dtype, seed)
            up, down = factors(rows, cols, rank, seed + 1000)
            terms = [(up, down, 0.7)]
            check(kernel(w0, terms, threads=3), w0, terms, f"[{rows}, {cols}] rank {rank} {dtype}")


@needs_kernel
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (7, 5, 3, 3), (33, 16, 3, 3), (12, 40, 3, 3)], ids=str)
def test_conv_weights(shape, dtype):
    out, cols = shape[0], shape[1] * 9
    w0 = base_weight(shape, dtype, 7)
    for rank in (1, 4, 16):
        up, down = factors(out, cols, rank, rank)
        # LoCon layout: up [out, r, 1, 1], down [r, in, 3, 3]
        terms = [(up.reshape(out, rank, 1, 1), down.reshape(rank, *shape[1:]), -1.3)]
        got = kernel(w0, terms)
        assert got.shape == shape
        check(got, w0, terms, f"{shape} rank {rank} {dtype}")


def test_ordered_counts_ulps():
    # the helper the bf16/fp16 checks rely on
    for dt in (torch.bfloat16, torch.float16):
        x = torch.tensor([1.0, -1.0, 0.0, -0.0], dtype=dt)
        up = torch.nextafter(x.float(), torch.full_like(x.float(), 10)).to(dt)   # fp32 step rounds back
        assert torch.equal(ordered(up), ordered(x))
        eps = torch.finfo(dt).eps
        one_ulp = torch.tensor([1 + eps, -1 - eps, torch.finfo(dt).tiny * eps, 0.0], dtype=dt)
        assert (ordered(one_ulp) - ordered(x)).tolist() == [1, -1, 1, 0]
        assert (ordered(torch.tensor([1.0], dtype=dt)) - ordered(torch.tensor([1 - eps / 2], dtype=dt))).item() == 1
        assert ordered(torch.tensor([-0.0], dtype=dt)).item() == 0


# ----------------------------------------------------------------------------------------------
# 3. stacked LoRAs


@needs_kernel
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [(33, 100), (6, 1280), (7, 5, 3, 3), (1, 17)], ids=str)
def test_several_terms_on_one_weight(shape, dtype):
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    w0 = base_weight(shape, dtype, 3)
    terms = []
    for k, (rank, c) in enumerate(((4, 0.7), (1, -1.3), (8, 0.25), (3, 0.0))):
        up, down = factors(rows, cols, rank, 50 + k)
        terms.append((up, down.reshape(rank, *shape[1:]), c))
    got = kernel(w0, terms, threads=3)
    check(got, w0, terms, f"{shape} {dtype}")
    # the stack is not one of its terms alone
    for t in terms[:3]:
        assert not torch.equal(got, kernel(w0, [t]))


# ----------------------------------------------------------------------------------------------
# 4. determinism: streaming vs plain stores, thread counts


@needs_kernel
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
@pytest.mark.parametrize("shape", [(37, 1280), (33, 64), (11, 209), (4, 5), (23, 32, 3, 3)], ids=str)
def test_streaming_stores_and_threads_are_bitwise_identical(shape, dtype):
    rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
    w0 = base_weight(shape, dtype, 11)
    up, down = factors(rows, cols, 16, 12)
    terms = [(up, down.reshape(16, *shape[1:]), 0.55)]
    plain = kernel(w0, terms, reused=False, threads=1)
    check(plain, w0, terms, f"{shape} {dtype}")
    for threads in (1, 2, 3, 7, 100):
        for reused in (False, True):
            # a reused destination holds the previous weight's bytes: fill it with NaN
            dest = torch.full_like(w0, float("nan")) if reused else None
            if reused and (cols * w0.element_size()) % 64 == 0:
                assert dest.data_ptr() % 64 == 0        # so the kernel really takes the streaming path
            got = kernel(w0, terms, reused=reused, threads=threads, dest=dest)
            assert bitwise_equal(got, plain), f"threads={threads} reused={reused}"


@needs_kernel
def test_one_batch_of_many_jobs_equals_the_jobs_run_alone():
    jobs = []
    for k, (shape, dtype) in enumerate([((33, 100), torch.float32), ((7, 5, 3, 3), torch.bfloat16),
                                        ((1, 1280), torch.float32), ((12, 64), torch.bfloat16)]):
        rows, cols = shape[0], int(torch.Size(shape[1:]).numel())
        w0 = base_weight(shape, dtype, 20 + k)
        up, down = factors(rows, cols, 3 + k, 30 + k)
        jobs.append((w0, [(up, down, 0.3 * (k + 1))]))
    b = LowrankBatch()
    dests = [torch.empty_like(w0) for w0, _ in jobs]
    for (w0, terms), d in zip(jobs, dests):
        b.add(w0, d, terms)
    assert len(b) == 4
    b.run(threads=3)
    for (w0, terms), d in zip(jobs, dests):
        assert torch.equal(d, kernel(w0, terms, threads=1))
        check(d, w0, terms)


# ----------------------------------------------------------------------------------------------
# 5. argument checks


@needs_kernel
def test_add_rejects_bad_destinations_and_weights():
    w0 = base_weight((4, 6), torch.float32, 1)
    up, down = factors(4, 6, 2, 2)
    terms = [(up, down, 1.0)]
    b = LowrankBatch()
    bad = {
        "dest is the original": (w0, w0),
        "dtype mismatch": (w0, torch.empty(4, 6, dtype=torch.bfloat16)),
        "shape mismatch": (w0, torch.empty(6, 4)),
        "non-contiguous dest": (w0, torch.empty(6, 4).t()),
        "float64 weight": (w0.double(), torch.empty(4, 6, dtype=torch.float64)),
        "non-contiguous original": (torch.empty(6, 4).t(), torch.empty(4, 6)),
        "non-CPU weight": (torch.empty(4, 6, device="meta"), torch.empty(4, 6, device="meta")),
    }
    for what, (orig, dest) in bad.items():
        with pytest.raises(ValueError):
            b.add(orig, dest, terms)
        assert len(b) == 0, what
    with pytest.raises(ValueError):
        b.add(w0, torch.empty_like(w0), [])                                  # no terms
    with pytest.raises(ValueError):
        b.add(w0, torch.empty_like(w0), [(up, torch.randn(3, 6), 1.0)])      # rank 2 up, rank 3 down
    with pytest.raises(ValueError):                                           # count fits, rank does not
        b.add(w0, torch.empty_like(w0), [(up, torch.randn(3, 4), 1.0)])
    buf = torch.randn(4 * 6 + 6)
    with pytest.raises(ValueError):                                           # dest overlaps W0's memory
        b.add(buf[:24].view(4, 6), buf[6:].view(4, 6), terms)
    assert not lowrank_kernel.supports(torch.zeros(0, 4)) and not lowrank_kernel.supports(torch.zeros(4, 0))
    assert len(b) == 0
    b.run()                                                                   # empty: a no-op
    assert torch.equal(kernel(w0, terms), kernel(w0.clone(), terms))          # still usable


# ----------------------------------------------------------------------------------------------
# 6. ModelPatcher: a strength change gives the weights of a fresh patch at that strength


def tiny_module(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(24, 8),
                            torch.nn.Linear(100, 37), torch.nn.Linear(64, 40))
    return m.to(dtype)


def lora_for(shape: tuple[int, ...], seed: int, rank: int = 4, alpha: float = 2.0) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    n_in = int(torch.Size(shape[1:]).numel())
    return LoRA(up=torch.randn(shape[0], rank, generator=g),
                down=(torch.randn(rank, n_in, generator=g) * 0.1).reshape(rank, *shape[1:]), alpha=alpha)


def adapters(m: torch.nn.Module, seed: int) -> dict[str, LoRA]:
    return {k: lora_for(tuple(v.shape), seed + i) for i, (k, v) in enumerate(m.state_dict().items())
            if k.endswith("weight")}


def patched_clone(base: ModelPatcher, a: dict[str, LoRA], strength_a: float, b: dict[str, LoRA]) -> ModelPatcher:
    """A clone of `base` with `a` at `strength_a` and `b` at -0.4, patched."""
    q = base.clone()
    q.add_patches(a, strength_a, "a")
    q.add_patches(b, -0.4, "b")
    q.patch_model()
    return q


@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=str)
def test_strength_change_equals_fresh_patch_bitwise(dtype):
    m1 = tiny_module(dtype)
    ref = snapshot(m1)
    a, b = adapters(m1, 1), adapters(m1, 100)
    b = {"0.weight": b["0.weight"], "3.weight": b["3.weight"]}              # a second LoRA on two weights

    # fresh: a at 0.7, b at -0.4
    p1 = ModelPatcher(m1, "cpu", "cpu")
    q = patched_clone(p1, a, 0.7, b)
    fresh = snapshot(m1)
    for key, ad in a.items():
        w0 = ref[key]
        terms = [(ad.up, ad.down, 0.7 * ad.scale)] + ([(b[key].up, b[key].down, -0.4 * b[key].scale)] if key in b else [])
        check(fresh[key], w0, terms, key)
    q.unpatch_model()
    assert bit_equal(m1, ref)

    # a at 1.0, then re-patched at 0.7 (b unchanged)
    m2 = tiny_module(dtype)
    assert bit_equal(m2, ref)
    p2 = ModelPatcher(m2, "cpu", "cpu")
    patched_clone(p2, a, 1.0, b)
    at_one = snapshot(m2)
    ptrs = {k: v.data_ptr() for k, v in m2.named_parameters()}
    r2 = patched_clone(p2, a, 0.7, b)
    params = dict(m2.named_parameters())
    for key in a:
        assert not torch.equal(at_one[key], fresh[key]), key
        assert params[key].data_ptr() == ptrs[key], key      # rewritten in place (streaming stores)
        assert torch.equal(params[key].detach(), fresh[key]), key
    assert bit_equal(m2, fresh)
    r2.unpatch_model()
    assert bit_equal(m2, ref)


# ----------------------------------------------------------------------------------------------
# 7. fallback to torch


FALLBACK_SCRIPT = r"""
import json
import torch
from diffusion.patches import lowrank_kernel
from diffusion.patches.lora.weights import LoRA
from diffusion.patches.patcher import ModelPatcher

U32 = 2.0 ** -24
RANK, ALPHA = 4, 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def lora(shape: tuple[int, ...], seed: int) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(shape[0], RANK, generator=g)
    down = torch.randn(RANK, int(torch.Size(shape[1:]).numel()), generator=g) * 0.1
    if len(shape) == 4:                         # LoCon: up [out, r, 1, 1], down [r, in, kh, kw]
        return LoRA(up=up.reshape(shape[0], RANK, 1, 1), down=down.reshape(RANK, *shape[1:]), alpha=ALPHA)
    return LoRA(up=up, down=down, alpha=ALPHA)


def by_hand(w0: torch.Tensor, ad: LoRA, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    # W0 + strength * alpha / rank * up @ down in float64, and the error bound of an fp32 evaluation
    # rounded once to the weight's dtype: one ulp of the dtype (eps |ref|, or a subnormal step) plus
    # the fp32 accumulation error ((rank + 4) u (|W0| + |c| |up| @ |down|))
    rows = w0.shape[0]
    up, down = ad.up.double().reshape(rows, RANK), ad.down.double().reshape(RANK, -1)
    c = strength * ALPHA / RANK
    w = w0.double().reshape(rows, -1)
    ref = w + c * (up @ down)
    fi = torch.finfo(w0.dtype)
    bound = fi.eps * ref.abs() + fi.tiny * fi.eps + (RANK + 4) * U32 * (w.abs() + abs(c) * (up.abs() @ down.abs()))
    return ref.reshape(w0.shape), bound.reshape(w0.shape)


out = {"available": lowrank_kernel.available(), "reason": lowrank_kernel.unavailable_reason(),
       "supports": {n: lowrank_kernel.supports(torch.zeros(4, 4, dtype=dt)) for n, dt in DTYPES.items()},
       "dtypes": {}}
for name, dt in DTYPES.items():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(100, 37), torch.nn.Conv2d(4, 8, 3)).to(dt)
    w0 = {k: v.detach().clone() for k, v in m.state_dict().items()}
    ads = {k: lora(tuple(v.shape), i) for i, (k, v) in enumerate(w0.items()) if k.endswith("weight")}
    p = ModelPatcher(m, "cpu", "cpu")
    res = {}
    # a first patch, then a strength change re-patching the patched model
    for step, strength in (("patch", 0.7), ("re-patch", -1.3)):
        q = p.clone()
        q.add_patches(ads, strength, "x")
        q.patch_model()
        sd = m.state_dict()
        worst, unpatched = 0.0, 0.0
        for k, ad in ads.items():
            ref, bound = by_hand(w0[k], ad, strength)
            assert sd[k].dtype == dt and sd[k].shape == w0[k].shape, k
            worst = max(worst, ((sd[k].double() - ref).abs() / bound).max().item())
            # share of the original values the check would pass: it must tell patched from unpatched
            unpatched = max(unpatched, ((w0[k].double() - ref).abs() <= bound).double().mean().item())
        res[step] = {"worst": worst, "unpatched_pass": unpatched}
    q.unpatch_model()
    sd = m.state_dict()
    res["restored"] = all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in w0.items())
    out["dtypes"][name] = res
print("RESULT " + json.dumps(out))
"""


def run_fallback(env_overrides: dict[str, str]) -> dict:
    """FALLBACK_SCRIPT in a fresh interpreter (the module decides once per process), run from the
    repository root with `CC`, `EASEL_NATIVE_KERNEL` and `EASEL_KERNEL_CACHE` cleared, then `env_overrides`."""
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "EASEL_NATIVE_KERNEL", "EASEL_KERNEL_CACHE")}
    env.update(env_overrides)
    res = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True, check=False,
                         timeout=180, cwd=Path(__file__).resolve().parents[3])
    assert res.returncode == 0, res.stderr[-2000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def check_patched_weights(out: dict) -> None:
    """Every dtype's Linear and conv weights, after a patch and after a strength change, within one
    ulp of the weight dtype of W0 + c up @ down computed by hand; bitwise W0 after unpatch."""
    assert set(out["dtypes"]) == {"fp32", "bf16", "fp16"}
    for name, res in out["dtypes"].items():
        for step in ("patch", "re-patch"):
            assert res[step]["worst"] <= 1.0, f"{name} {step}: error {res[step]['worst']:.3g}x the bound"
            assert res[step]["unpatched_pass"] < 0.05, f"{name} {step}: the weights barely moved"
        assert res["restored"], f"{name}: unpatch did not restore the weights bitwise"


def check_torch_path(out: dict) -> None:
    assert out["available"] is False, out
    assert not any(out["supports"].values()), out
    check_patched_weights(out)


def test_fallback_when_disabled_by_environment() -> None:
    out = run_fallback({"EASEL_NATIVE_KERNEL": "0"})
    assert "EASEL_NATIVE_KERNEL" in out["reason"]
    check_torch_path(out)


def test_fallback_without_a_compiler_on_path(tmp_path: Path) -> None:
    # Windows (or any machine without one): no $CC and no cc / gcc / clang on PATH (PATH holds only
    # the Python executable). macOS without the Xcode tools still has the /usr/bin/cc shim, which
    # fails when run: that is test_fallback_when_the_compiler_fails
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / Path(sys.executable).name).symlink_to(sys.executable)
    for name in ("cc", "gcc", "clang"):
        assert shutil.which(name, path=str(bin_dir)) is None
    cache = tmp_path / "cache"
    out = run_fallback({"PATH": str(bin_dir), "EASEL_KERNEL_CACHE": str(cache)})
    assert out["available"] is False and out["reason"], out
    assert "no C compiler" in out["reason"] and "$CC" in out["reason"], out["reason"]
    check_torch_path(out)
    assert not cache.exists()                                  # nothing was built or cached


def test_fallback_on_a_cpu_without_avx(tmp_path: Path) -> None:
    # Linux aarch64, macOS arm64 and SSE-only x86 CPUs: where the source builds there (GCC / clang
    # vector extensions) it has 4-float vectors, and the module refuses such a build
    # (lr_vector_width() < 8); platform.machine() is not consulted (it only enters the cache key).
    # Reproduced with the real compiler told the CPU has no AVX (a build that fails instead:
    # test_fallback_when_the_compiler_fails).
    gcc = shutil.which("gcc")
    if not X86 or gcc is None:
        pytest.skip("needs gcc on x86-64 (-mno-avx)")
    cc = tmp_path / "cc-no-avx"
    cc.write_text(f'#!/bin/sh\nexec "{gcc}" "$@" -mno-avx\n')
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    out = run_fallback({"CC": str(cc), "EASEL_KERNEL_CACHE": str(cache)})
    assert out["available"] is False and out["reason"], out
    assert "x86-64 CPUs with AVX" in out["reason"], out["reason"]
    check_torch_path(out)
    built = list(cache.glob("lowrank_add-*.so"))               # it was built, then refused
    assert len(built) == 1, list(cache.iterdir()) if cache.exists() else "no cache"
    lib = ctypes.CDLL(str(built[0]))
    assert lib.lr_vector_width() == 4 and lib.lr_abi() == ctypes.sizeof(_Job)


def test_unusable_cache_directory_falls_back_to_the_temp_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    out = run_fallback({"EASEL_KERNEL_CACHE": str(blocker / "kernels")})
    assert out["available"] is True and out["reason"] is None, out
    check_patched_weights(out)                                 # the kernel's weights pass the same check


def test_cache_key_names_the_instruction_set():
    if platform.system() != "Linux":
        pytest.skip("reads /proc/cpuinfo")
    cpu = lowrank_kernel._cpu_id()
    assert "flags" in cpu or "Features" in cpu, cpu


def test_fallback_when_the_compiler_fails(tmp_path: Path) -> None:
    cc = tmp_path / "broken-cc"
    cc.write_text("#!/bin/sh\necho 'broken-cc: cannot compile' >&2\nexit 1\n")
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    out = run_fallback({"CC": str(cc), "EASEL_KERNEL_CACHE": str(cache)})
    assert "failed" in out["reason"] and str(cc) in out["reason"]
    assert "cannot compile" in out["reason"]                  # the compiler's message is kept
    check_torch_path(out)
    assert not list(cache.glob("*.so")) and not list(cache.glob("*.dylib"))   # nothing half-built left


# ----------------------------------------------------------------------------------------------
# 8. the C source built for other instruction sets


MARCHES = ("x86-64", "haswell", "native")


@pytest.fixture(scope="module")
def built_libs(tmp_path_factory) -> dict[str, ctypes.CDLL]:
    if not X86:
        pytest.skip("x86-64 only")
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("lowrank_march")
    procs = {}
    for march in MARCHES:       # build in parallel
        so = d / f"lowrank_{march}.so"
        procs[march] = (so, subprocess.Popen(
            ["gcc", "-O3", f"-march={march}", "-shared", "-fPIC", "-pthread", str(lowrank_kernel.SOURCE),
             "-o", str(so)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    libs = {}
    for march, (so, proc) in procs.items():
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"-march={march}: {err[-2000:]}"
        lib = ctypes.CDLL(str(so))
        lib.lr_run.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        lib.lr_run.restype = ctypes.c_int
        lib.lr_abi.restype = ctypes.c_int
        lib.lr_has_f16.restype = ctypes.c_int
        libs[march] = (lib, so)
    return libs


def run_lib(lib: ctypes.CDLL, w0: torch.Tensor, up: torch.Tensor, down: torch.Tensor, c: float,
            stream: int = 0, threads: int = 2, dest: torch.Tensor | None = None) -> torch.Tensor:
    w = torch.empty_like(w0) if dest is None else dest
    rows = w0.shape[0]
    up, down = up.float().contiguous(), down.float().contiguous()
    jobs = (_Job * 1)()
    jobs[0] = _Job(w0.data_ptr(), w.data_ptr(), up.data_ptr(), down.data_ptr(), rows, w0.numel() // rows,
                   up.shape[1], DTYPES[w0.dtype], stream, c, 0)
    assert lib.lr_run(ctypes.addressof(jobs), 1, threads) == 0
    return w


@pytest.mark.parametrize("march", MARCHES)
def test_source_builds_and_computes_for_other_instruction_sets(built_libs, march):
    lib, _ = built_libs[march]
    assert lib.lr_abi() == ctypes.sizeof(_Job)
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if lib.lr_has_f16() == 1 else [])
    seed = 0
    for dtype in dtypes:
        for rows, cols, rank in ((1, 5, 1), (4, 17, 3), (7, 100, 40), (33, 209, 16), (6, 48, 2), (11, 1280, 5)):
            seed += 1
            w0 = base_weight((rows, cols), dtype, seed)
            up, down = factors(rows, cols, rank, seed + 500)
            got = run_lib(lib, w0, up, down, -0.9, threads=3)
            check(got, w0, [(up, down, -0.9)], f"-march={march} [{rows}, {cols}] rank {rank} {dtype}")
            if (cols * w0.element_size()) % 64 == 0:    # streaming stores where the target has them
                streamed = run_lib(lib, w0, up, down, -0.9, stream=1, threads=1,
                                   dest=torch.full_like(w0, float("nan")))
                assert torch.equal(streamed, got), f"-march={march} [{rows}, {cols}] {dtype} streamed"


@pytest.mark.parametrize("march", ["x86-64"])
def test_baseline_build_has_no_avx(built_libs, march):
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump not found")
    _, so = built_libs[march]
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(so)], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    assert "lr_run" in text
    for reg in ("%ymm", "%zmm", "vmovnt", "vfmadd"):
        assert reg not in text, f"-march=x86-64 build uses {reg}"


def test_bf16_subnormals_are_kept_and_nan_stays_nan():
    # the AVX512-BF16 conversion flushes subnormal inputs to zero; such vectors must take the exact path
    if not lowrank_kernel.supports(torch.zeros(2, 2, dtype=torch.bfloat16)):
        pytest.skip("kernel unavailable")
    row = [1e-39, -3e-39, float("nan"), 1.0] + [0.5] * 12 + [2.0 ** -126, 1.5, -1e-40, 3.0] + [0.25] * 12
    w0 = torch.tensor([row, [0.75] * 32], dtype=torch.float32).to(torch.bfloat16)
    got = kernel(w0, [(torch.zeros(2, 1), torch.zeros(1, 32), 1.0)], reused=True)
    finite = ~torch.isnan(w0.float())
    assert torch.equal(got.view(torch.int16)[finite], w0.view(torch.int16)[finite])
    assert got[0, 0].item() != 0 and got[0, 18].item() != 0          # subnormals not flushed
    assert torch.isnan(got[0, 2].float())


def test_a_folder_others_can_write_is_not_used(tmp_path):
    # a library found in a folder other users can write to could be theirs: it is neither loaded nor
    # built there (the kernel then lives in the per-user temp folder)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "kernels").mkdir()
    (shared / "kernels").chmod(0o777)
    out = run_fallback({"EASEL_KERNEL_CACHE": str(shared / "kernels")})
    assert out["available"] is True, out
    assert not list((shared / "kernels").iterdir())
