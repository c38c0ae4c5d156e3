"""LoRA patching on a full-size SD1.5-architecture model (random weights, fp32 or --dtype, CPU).

Builds the SD1.5 UNet (diffusers config of the real model) and the CLIP-L text encoder with random
weights, writes a rank-16 kohya LoRA (every Linear / 1x1 conv of the UNet transformer blocks + the
text encoder's attention and MLP) and a rank-16 LoCon (the same plus every 3x3 conv of the resnets
and samplers), then times, as medians of several runs:
  first patch   load_lora (read + resolve, caches emptied) + patch_model of UNet and text encoder, as
                the first LoRA on a loaded model: the patched weights need new memory (freed memory is
                handed back to the OS with malloc_trim before each run, as in a fresh process)
  unpatch       unpatch_model of both
  re-patch      load_lora with a new strength_model (file cached) + patch_model of the UNet, starting
                from the model patched at the old strength (what a strength change costs: the
                sampler leaves the model patched after its run)
  re-patch (cold) the same strength change after an explicit unpatch_model (e.g. /free)
and the peak extra RSS of the first patch (VmHWM reset through /proc/self/clear_refs) against the size
of the weights it patches. Targets: re-patch <= 25% of first patch; peak extra RSS <= 1.2x.
References in the same process: torch's addmm doing the same re-patch; over the same UNet weights, a
plain copy W0 -> W (the least an exact re-patch must do) and one torch.add of a precomputed delta per
weight (a re-patch that keeps full deltas).

    python benchmarks/lora.py [--runs 5] [--only lora|locon] [--cache-lowrank] [--dtype fp32|bf16|fp16|auto]

--dtype auto: the dtypes Easel itself picks on this machine's CPU (diffusion.models.devices: UNet bf16 where
the CPU has native bf16, else fp32; text encoder fp32).
EASEL_NATIVE_KERNEL=0 in the environment: everything through the torch path, as on a machine without
a C compiler or without AVX (the in-process torch reference then has no kernel to compare with).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from diffusion.models import devices  # noqa: E402
from diffusion.patches.lora import load as lora_mod  # noqa: E402
from diffusion.patches import lowrank_kernel  # noqa: E402
from diffusion.patches import weight_patch as patcher_mod  # noqa: E402
from diffusion.prompts.clip import CLIP  # noqa: E402
from diffusion.models.detect import SD1  # noqa: E402
from diffusion.patches.lora.load import load_lora  # noqa: E402
from diffusion.models.diffusion_model import DiffusionModel  # noqa: E402
from diffusion.patches.patcher import ModelPatcher  # noqa: E402

LINEAR_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


@torch.no_grad()
def random_fill(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.normal_(0.0, 0.02, generator=g)


def build_sd15(dtype: torch.dtype = torch.float32, te_dtype: torch.dtype | None = None) -> tuple[ModelPatcher, CLIP]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                                    cross_attention_dim=768, attention_head_dim=8, layers_per_block=2)
        te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                          num_hidden_layers=12, num_attention_heads=12,
                                          max_position_embeddings=77, hidden_act="quick_gelu"))
    unet = unet.to_empty(device="cpu")
    te = te.to_empty(device="cpu")
    random_fill(unet, 0)
    random_fill(te, 1)
    unet, te = unet.to(dtype), te.to(te_dtype or dtype)
    model = ModelPatcher(DiffusionModel(unet.eval(), SD1, "eps"), "cpu", "cpu")
    return model, CLIP({"l": te.eval()}, SD1, "cpu", "cpu")


def make_lora(model: ModelPatcher, clip: CLIP, rank: int, convs: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    out: dict[str, torch.Tensor] = {}

    def add(name: str, w: torch.Tensor, k: int = 1) -> None:
        out[f"{name}.lora_down.weight"] = (torch.randn(rank, w.shape[1], k, k, generator=g) if w.dim() == 4
                                           else torch.randn(rank, w.shape[1], generator=g)) * 0.01
        out[f"{name}.lora_up.weight"] = (torch.randn(w.shape[0], rank, 1, 1, generator=g) if w.dim() == 4
                                         else torch.randn(w.shape[0], rank, generator=g)) * 0.01
        out[f"{name}.alpha"] = torch.tensor(float(rank // 2))

    for n, w in model.model.unet.named_parameters():
        if not n.endswith(".weight"):
            continue
        path = n[: -len(".weight")]
        kname = "lora_unet_" + path.replace(".", "_")
        if "attentions" in path and path.endswith(LINEAR_TARGETS):
            add(kname, w)
        elif convs and w.dim() == 4 and w.shape[-1] == 3 and ("resnets" in path or "samplers" in path):
            add(kname, w, 3)
    for n, w in clip.encoders["l"].named_parameters():
        path = n[: -len(".weight")] if n.endswith(".weight") else ""
        if path.endswith(TE_TARGETS):
            t = path if path.startswith("text_model.") else "text_model." + path
            add("lora_te_" + t.replace(".", "_"), w)
    return out


def patched_bytes(*patchers: ModelPatcher) -> int:
    total = 0
    for p in patchers:
        params = dict(p.model.named_parameters())
        total += sum(params[k].numel() * params[k].element_size() for k in p.patches)
    return total


def clear_caches() -> None:
    lora_mod._FILES.clear()
    lora_mod._RESOLVED.clear()
    patcher_mod.DELTA_CACHE.clear()
    gc.collect()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc), so the next allocation faults them in again as
    in a fresh process (call after clear_caches, which drops the references)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.no_grad()
def pass_references(model: ModelPatcher, clip: CLIP, file: Path, runs: int) -> dict[str, float]:
    """Two passes over the UNet weights a strength change rewrites, timed in this process (medians):
    copy_s  W <- W0: what any exact re-patch must at least do (read the originals, write the weights)
    add_s   W <- W0 + c * delta with every delta precomputed in the weight's dtype: "one add per
            weight", the cost of a re-patch that keeps full deltas (the deltas are made here, untimed)"""
    clear_caches()
    m, _, _ = load_lora(model, clip, file, 1.0, 1.0)
    params = dict(m.model.named_parameters())
    originals = [params[k].data for k in m.patches]
    m.patch_model()
    outs = [params[k].data for k in m.patches]          # the patched tensors (pages already mapped)
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(o.shape, generator=g).mul_(0.01).to(o.dtype) for o in originals]

    def copy() -> None:
        for o, w in zip(originals, outs):
            w.copy_(o)

    def add() -> None:
        for o, d, w in zip(originals, deltas, outs):
            torch.add(o, d, alpha=0.5, out=w)

    res = {}
    for name, fn in (("copy_s", copy), ("add_s", add)):
        fn()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name] = statistics.median(times)
    m.unpatch_model()
    clear_caches()
    return res


def bench(name: str, file: Path, model: ModelPatcher, clip: CLIP, runs: int) -> dict[str, float]:
    first, unpatch, repatch, peaks, ratio, cold = [], [], [], [], [], []
    size = 0
    clear_caches()
    base = rss_bytes()          # before any patching: memory kept by the allocator counts against us
    for i in range(runs):
        clear_caches()
        release_free_memory()
        reset_peak()
        t0 = time.perf_counter()
        m1, c1, cov = load_lora(model, clip, file, 1.0, 1.0)
        m1.patch_model()
        c1.patcher.patch_model()
        first.append(time.perf_counter() - t0)
        peaks.append(peak_bytes() - base)
        size = patched_bytes(m1, c1.patcher)
        # strength change: the model stays patched at 1.0, the new clone asks for 0.5
        t0 = time.perf_counter()
        m2, c2, _ = load_lora(model, clip, file, 0.5 + 0.01 * i, 1.0)
        m2.patch_model()
        c2.patcher.patch_model()           # same fingerprint as c1: nothing to do
        repatch.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        m2.unpatch_model()
        c2.patcher.unpatch_model()
        unpatch.append(time.perf_counter() - t0)
        ratio.append(repatch[-1] / first[-1])
        # the same strength change when the sampler had unpatched the model after its run
        t0 = time.perf_counter()
        m3, _, _ = load_lora(model, clip, file, 0.25 + 0.01 * i, 1.0)
        m3.patch_model()
        cold.append(time.perf_counter() - t0)
        m3.unpatch_model()
        del m1, c1, m2, c2, m3
    # reference in the same process: the same strength change with torch's addmm instead of the kernel
    torch_repatch = []
    if lowrank_kernel.available() and not patcher_mod.CACHE_LOWRANK:
        lowrank_kernel.ENABLED = False
        try:
            for i in range(runs):
                clear_caches()
                m1, _, _ = load_lora(model, clip, file, 1.0, 1.0)
                m1.patch_model()
                t0 = time.perf_counter()
                m2, _, _ = load_lora(model, clip, file, 0.5 + 0.01 * i, 1.0)
                m2.patch_model()
                torch_repatch.append(time.perf_counter() - t0)
                m2.unpatch_model()
                del m1, m2
        finally:
            lowrank_kernel.ENABLED = True
    refs = pass_references(model, clip, file, runs)
    med = statistics.median
    res = {"first_s": med(first), "repatch_s": med(repatch), "unpatch_s": med(unpatch),
           "repatch_ratio": med(ratio), "peak_extra_gib": med(peaks) / 2**30, "patched_gib": size / 2**30,
           "peak_ratio": med(peaks) / size, "cold_repatch_s": med(cold), "weights": cov.model_weights + cov.clip_weights}
    print(f"{name:6s} patched weights {res['weights']} ({res['patched_gib']:.2f} GiB): "
          f"first patch {res['first_s']:.3f} s, re-patch after strength change {res['repatch_s']:.3f} s "
          f"({100 * res['repatch_ratio']:.0f}% of first; target <= 25%), after an unpatch_model "
          f"{res['cold_repatch_s']:.3f} s ({100 * res['cold_repatch_s'] / res['first_s']:.0f}%), unpatch {res['unpatch_s']:.3f} s, "
          f"peak extra RSS {res['peak_extra_gib']:.2f} GiB = {res['peak_ratio']:.2f}x patched size (target <= 1.2x)",
          flush=True)
    res.update(refs)
    print(f"{'':6s} over the same UNet weights: copy W0 -> W {refs['copy_s']:.3f} s, one torch.add of a precomputed "
          f"delta per weight {refs['add_s']:.3f} s (re-patch = {res['repatch_s'] / refs['copy_s']:.2f}x the copy, "
          f"{res['repatch_s'] / refs['add_s']:.2f}x the add)", flush=True)
    if torch_repatch:
        res["torch_repatch_s"] = med(torch_repatch)
        print(f"{'':6s} the same re-patch through torch addmm instead of the kernel: {res['torch_repatch_s']:.3f} s "
              f"(kernel / torch = {res['repatch_s'] / res['torch_repatch_s']:.2f})", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--only", choices=["lora", "locon"], default=None)
    ap.add_argument("--cache-lowrank", action="store_true",
                    help="keep full up@down deltas in the delta cache instead of the fused low-rank path")
    ap.add_argument("--dtype", choices=sorted(DTYPES) + ["auto"], default="fp32",
                    help="dtype of the model weights (auto: Easel's choice for this CPU)")
    args = ap.parse_args()
    patcher_mod.CACHE_LOWRANK = args.cache_lowrank
    if args.cache_lowrank:
        mode = "cached full deltas"
    elif lowrank_kernel.available():
        mode = "fused C kernel (diffusion/patches/lowrank_add.c)"
    else:
        mode = f"torch addmm of factors (kernel unavailable: {lowrank_kernel.unavailable_reason()})"
    if args.dtype == "auto":
        cfg = devices.DeviceConfig(cpu=True)
        unet_dtype, te_dtype = devices.unet_dtype(cfg), devices.text_dtype(cfg)
    else:
        unet_dtype = te_dtype = DTYPES[args.dtype]
    names = {v: k for k, v in DTYPES.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, weights: UNet {names[unet_dtype]}, "
          f"text encoder {names[te_dtype]} ({args.dtype}), low-rank path: {mode}",
          flush=True)
    t0 = time.perf_counter()
    model, clip = build_sd15(unet_dtype, te_dtype)
    print(f"built SD1.5-size UNet + CLIP-L in {time.perf_counter() - t0:.1f} s, RSS {rss_bytes() / 2**30:.2f} GiB",
          flush=True)
    with tempfile.TemporaryDirectory() as d:
        for name, convs in (("lora", False), ("locon", True)):
            if args.only and args.only != name:
                continue
            f = Path(d) / f"{name}.safetensors"
            save_file(make_lora(model, clip, 16, convs), str(f))
            bench(name, f, model, clip, args.runs)
            f.unlink()


if __name__ == "__main__":
    main()
