"""Per-step overhead of every sampler over bare model evaluations.

For each sampler: a full `diffusion.sampling.sample.sample` run (20 steps, karras, cfg 7, the tiny demo SD1
UNet at 512x512 = 64x64 latent, batch 1, cond + uncond batched into one call) is timed, and so is
every `DiffusionModel.apply_model` call inside it (NFE calls). Two figures, medians over --runs:
- "in-run": run time / time inside the model calls - 1: everything the sampler, CFG, schedule,
  noise, conditioning and patching add (robust on a loaded machine: both come from the same run);
- "vs bare": run time / (NFE x a separately timed bare apply_model call on the same input) - 1.
Setup (noise, schedule, conditioning, patching) is included in the run time. Target: <= 2 %.

    python benchmarks/samplers.py [--runs 3] [--steps 20] [--size 512] [--samplers euler,heun]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusion.demo.checkpoint import tiny_components  # noqa: E402
from diffusion.models.diffusion_model import DiffusionModel  # noqa: E402
from diffusion.patches.patcher import ModelPatcher  # noqa: E402
from diffusion.sampling.sample import sample  # noqa: E402
from diffusion.sampling.samplers.registry import SAMPLER_NAMES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--samplers", default=",".join(SAMPLER_NAMES))
    ap.add_argument("--skip-bare", action="store_true", help="only the in-run figure (half the time)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comps = tiny_components("sd1", seed=0, fast=True)   # the demo checkpoint's layout
    dm = DiffusionModel(comps.unet, comps.family, "eps")
    model = ModelPatcher(dm, load_device=device)
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, dm.context_dim, generator=g), {}]]
    neg = [[torch.randn(1, 77, dm.context_dim, generator=g), {}]]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}

    calls: list[tuple[Any, ...]] = []
    inside = [0.0]
    orig = dm.apply_model

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def counting(*a: Any, **kw: Any) -> torch.Tensor:
        calls.append((a, kw))
        sync()
        t0 = time.perf_counter()
        out = orig(*a, **kw)
        sync()
        inside[0] += time.perf_counter() - t0
        return out

    dm.apply_model = counting          # type: ignore[method-assign]
    sample(model, 0, 2, 7.0, "euler", "karras", pos, neg, latent)       # warm-up
    model.patch_model(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, latent {tuple(latent['samples'].shape)}, "
          f"{args.steps} steps, {args.runs} runs (median)")
    print(f"{'sampler':24s} {'NFE':>5s} {'run s':>8s} {'model s':>8s} {'in-run':>8s} {'vs bare':>8s} "
          f"{'ms/step':>8s}")
    worst = 0.0
    for name in [s for s in args.samplers.split(",") if s]:
        ratios, runs, bares, in_run, extra = [], [], [], [], []
        nfe = 0
        for r in range(args.runs):
            calls.clear()
            inside[0] = 0.0
            sync()
            t0 = time.perf_counter()
            sample(model, r, args.steps, 7.0, name, "karras", pos, neg, latent)
            sync()
            t_run = time.perf_counter() - t0
            nfe = len(calls)
            a, kw = calls[0]
            t_bare = float("nan")
            if not args.skip_bare:
                with torch.no_grad():
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(nfe):
                        orig(*a, **kw)
                    sync()
                    t_bare = time.perf_counter() - t0
            ratios.append(t_run / t_bare - 1.0)
            in_run.append(t_run / inside[0] - 1.0)
            extra.append((t_run - inside[0]) / args.steps)
            runs.append(t_run)
            bares.append(inside[0])
        over = statistics.median(in_run)
        worst = max(worst, over)
        print(f"{name:24s} {nfe:5d} {statistics.median(runs):8.3f} {statistics.median(bares):8.3f} "
              f"{100 * over:7.2f}% {100 * statistics.median(ratios):7.2f}% {1000 * statistics.median(extra):8.2f}")
    print(f"worst in-run overhead {100 * worst:.2f}% (target <= 2%)")


if __name__ == "__main__":
    main()
