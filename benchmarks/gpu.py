"""txt2img on CUDA with full-size random-weight checkpoints: Easel's pipeline vs a bare UNet loop.

For an SD1.5-architecture checkpoint (512x512, 20 steps, fp16) and an SDXL-architecture one
(1024x1024, bf16), both built by this script (random weights, ldm layout, generated on the GPU):
- time to first image: load_checkpoint + text encoding + sampling (euler, normal, cfg 7, batch 1)
  + VAE decode, from a cold start of the models;
- it/s of the sampling loop (median of --runs);
- peak VRAM (torch.cuda.max_memory_allocated) during load + sampling + decode;
- a bare loop of 20 UNet calls on the same inputs (batch 2: cond + uncond, as CFG does) and the
  ratio sampler time / bare time (target <= 1.03).
Skips cleanly (exit 0, one line) when CUDA is absent.

    python benchmarks/gpu.py [--dir /tmp/easel-bench] [--runs 3] [--families sd1 sdxl]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = {"sd1": dict(size=512, dtype="fp16"), "sdxl": dict(size=1024, dtype="bf16")}
STEPS, CFG = 20, 7.0
PROMPT, NEGATIVE = "a photograph of a lighthouse at dawn, detailed", "blurry, lowres"


def _sync() -> None:
    import torch
    torch.cuda.synchronize()


def bench_family(name: str, folder: Path, runs: int) -> dict[str, float]:
    import torch

    from diffusion.loaders.checkpoint import load_checkpoint
    from diffusion.demo.checkpoint import write_full_size_checkpoint
    from diffusion.models.devices import DeviceConfig
    from diffusion.sampling.sample import sample

    size, dtype = SETTINGS[name]["size"], SETTINGS[name]["dtype"]
    path = folder / f"{name}-random-fp16.safetensors"
    if not path.is_file():
        t = time.perf_counter()
        write_full_size_checkpoint(path, name, torch.float16, device="cuda")
        print(f"[{name}] built {path.name} ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    config = DeviceConfig(unet_dtype=dtype, text_dtype="fp16" if dtype == "fp16" else "bf16")  # type: ignore[arg-type]

    # --- time to first image (cold models) -----------------------------------------------------
    t0 = time.perf_counter()
    patcher, clip, vae = load_checkpoint(path, config)
    positive, negative = clip.encode(PROMPT), clip.encode(NEGATIVE)
    if name == "sdxl":
        for cond in (positive, negative):
            cond[0][1].update(width=size, height=size, target_width=size, target_height=size, crop_w=0, crop_h=0)
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    out = sample(patcher, 0, STEPS, CFG, "euler", "normal", positive, negative, latent)
    image = vae.decode(out["samples"])
    _sync()
    first_image = time.perf_counter() - t0
    if not torch.isfinite(image).all():
        print(f"[{name}] note: random weights gave non-finite pixels (timing is unaffected)")

    # --- sampler loop, warm ------------------------------------------------------------------
    sampler_times = []
    for i in range(runs):
        _sync()
        t = time.perf_counter()
        sample(patcher, i + 1, STEPS, CFG, "euler", "normal", positive, negative, latent)
        _sync()
        sampler_times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30

    # --- bare UNet loop on the same inputs (batch 2 = cond + uncond) ----------------------------
    model = patcher.patch_model(patcher.load_device)
    dev, mdtype = patcher.load_device, model.dtype
    x = torch.randn(2, 4, size // 8, size // 8, device=dev, dtype=mdtype)
    ctx = torch.cat([positive[0][0], negative[0][0]]).to(dev, mdtype)
    kw = {}
    if name == "sdxl":
        pooled = torch.cat([positive[0][1]["pooled_output"], negative[0][1]["pooled_output"]]).to(dev, mdtype)
        kw = dict(text_embeds=pooled, time_ids=torch.tensor([[size, size, 0, 0, size, size]] * 2, device=dev))
    bare_times = []
    with torch.no_grad():
        model.apply_model(x, torch.full((2,), 999.0, device=dev), ctx, **kw)
        for _ in range(runs):
            _sync()
            t = time.perf_counter()
            for step in range(STEPS):
                model.apply_model(x, torch.full((2,), 999.0 - step * 50, device=dev), ctx, **kw)
            _sync()
            bare_times.append(time.perf_counter() - t)
    patcher.unpatch_model(offload=True)
    s, b = statistics.median(sampler_times), statistics.median(bare_times)
    print(f"[{name}] {size}x{size} {dtype}, {STEPS} steps euler/normal cfg {CFG}: "
          f"{STEPS / s:.2f} it/s (sampler {s:.2f} s), bare UNet loop {STEPS / b:.2f} it/s ({b:.2f} s), "
          f"ratio {s / b:.3f}; time to first image {first_image:.1f} s (incl. load); peak VRAM {peak:.1f} GiB")
    del patcher, clip, vae
    torch.cuda.empty_cache()
    return {"its": STEPS / s, "ratio": s / b, "first_image_s": first_image, "peak_gib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("EASEL_BENCH_DIR", "/tmp/easel-bench")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=sorted(SETTINGS))
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device; skipped")
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for fam in args.families:
        bench_family(fam, args.dir, args.runs)


if __name__ == "__main__":
    main()
