"""Checkpoint loading: Easel's loader vs diffusers' own single-file loading, on the same file.

Builds (once) a full-size SD1.5-architecture checkpoint with random fp16 weights in the ldm layout
(diffusion.demo.checkpoint.write_full_size_checkpoint), plus a local diffusers config folder so diffusers never
reaches the Hub, then measures for each loader: wall time of the load and peak RSS growth over the
process's RSS before the load. Each load runs in a fresh child process (peak RSS is per process),
alternating loaders, medians over --runs. Ratios are Easel / diffusers (target <= 1.0).
A check step first loads both in one process and compares every UNet, VAE and text-encoder tensor.

    python benchmarks/models.py [--dir /tmp/easel-bench] [--runs 3] [--dtypes fp32 fp16] [--no-check]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """VmHWM: this process's peak resident set (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def prepare(folder: Path) -> tuple[Path, Path]:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from diffusion.models.convert.clip import clip_config
    from diffusion.demo.checkpoint import (
        SD15_UNET_CONFIG,
        SD15_VAE_CONFIG,
        write_full_size_checkpoint,
    )

    ckpt = folder / "sd15-random-fp16.safetensors"
    if not ckpt.is_file():
        t = time.perf_counter()
        write_full_size_checkpoint(ckpt, "sd1", torch.float16)
        print(f"built {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t:.1f} s")
    cfg = folder / "sd15-diffusers-config"
    if not (cfg / "model_index.json").is_file():
        with torch.device("meta"):
            UNet2DConditionModel(**SD15_UNET_CONFIG).save_config(cfg / "unet")
            AutoencoderKL(**SD15_VAE_CONFIG).save_config(cfg / "vae")
        clip_config("l", 768, 12, 3072, 49408, 77).save_pretrained(cfg / "text_encoder")
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      clip_sample=False).save_config(cfg / "scheduler")
        (cfg / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None]}))
    return ckpt, cfg


def load_easel(ckpt: Path, dtype: str) -> dict:
    from diffusion.loaders.checkpoint import load_checkpoint
    from diffusion.models.devices import DeviceConfig
    patcher, clip, vae = load_checkpoint(ckpt, DeviceConfig(cpu=True, unet_dtype=dtype, vae_dtype=dtype,  # type: ignore[arg-type]
                                                            text_dtype=dtype))  # type: ignore[arg-type]
    return {"unet": patcher.model.unet, "vae": vae.module, "text": clip.encoders["l"]}


def load_diffusers(ckpt: Path, cfg: Path, dtype: str) -> dict:
    import logging
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    pipe = StableDiffusionPipeline.from_single_file(
        str(ckpt), config=str(cfg), local_files_only=True, tokenizer=None, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
        torch_dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    return {"unet": pipe.unet, "vae": pipe.vae, "text": pipe.text_encoder}


def child(which: str, ckpt: Path, cfg: Path, dtype: str) -> None:
    import diffusers  # noqa: F401
    import torch  # noqa: F401  (imports before the baseline)
    import transformers  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401

    from diffusion.loaders import checkpoint  # noqa: F401
    base = _rss_mb()
    t = time.perf_counter()
    mods = load_easel(ckpt, dtype) if which == "easel" else load_diffusers(ckpt, cfg, dtype)
    elapsed = time.perf_counter() - t
    n = sum(p.numel() for m in mods.values() for p in m.parameters())
    print(json.dumps({"load_s": elapsed, "peak_growth_mb": _peak_mb() - base, "params": n,
                      "unet_dtype": str(next(mods["unet"].parameters()).dtype)}))


def check(ckpt: Path, cfg: Path) -> None:
    """Every tensor of Easel's modules equals diffusers' conversion of the same file."""
    import torch
    ours, theirs = load_easel(ckpt, "fp16"), load_diffusers(ckpt, cfg, "fp16")
    for part in ("unet", "vae", "text"):
        a, b = ours[part].state_dict(), theirs[part].state_dict()
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        b = {k: v for k, v in b.items() if not k.endswith("position_ids")}
        if set(a) != set(b):
            raise SystemExit(f"check failed: {part} keys differ: {sorted(set(a) ^ set(b))[:5]}")
        bad = [k for k in a if not torch.equal(a[k], b[k].reshape(a[k].shape))]
        if bad:
            raise SystemExit(f"check failed: {part} tensors differ: {bad[:5]}")
        print(f"check: {part}: {len(a)} tensors identical to diffusers' conversion")


def sampler_overhead(ckpt: Path, steps: int, size: int, runs: int) -> None:
    """KSampler's time per step over one bare UNet forward on the same input (cond + uncond
    batched, as the CFG wrapper calls it), default dtype of this machine (bf16 on native-bf16 CPUs)."""
    import torch

    from diffusion.loaders.checkpoint import load_checkpoint
    from diffusion.sampling.sample import sample

    torch.set_grad_enabled(False)
    patcher, clip, _vae = load_checkpoint(ckpt)
    positive, negative = clip.encode("a photo of a cat"), clip.encode("")
    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    model = patcher.model
    dtype = next(model.unet.parameters()).dtype
    x = torch.randn(2, 4, size // 8, size // 8, dtype=dtype)
    t = torch.tensor([500.0, 500.0])              # float32 timesteps, as DiffusionModel.apply_model passes them
    context = torch.cat([positive[0][0], negative[0][0]]).to(dtype)
    sample(patcher, 0, 1, 7.0, "euler", "normal", positive, negative, latent)    # warm-up (kernels, patching)
    model.unet(x, t, encoder_hidden_states=context, return_dict=False)
    bare, sampled = [], []
    for i in range(runs):
        for which in (("bare", "sample") if i % 2 == 0 else ("sample", "bare")):   # alternate the order
            start = time.perf_counter()
            if which == "bare":
                for _ in range(steps):
                    model.unet(x, t, encoder_hidden_states=context, return_dict=False)
                bare.append((time.perf_counter() - start) / steps)
            else:
                sample(patcher, 0, steps, 7.0, "euler", "normal", positive, negative, latent)
                sampled.append((time.perf_counter() - start) / steps)
    b, k = statistics.median(bare), statistics.median(sampled)
    print(f"[{dtype}] sampler overhead at {size}x{size}, {steps} euler steps, cfg 7 (batched cond+uncond), "
          f"medians of {runs}: KSampler step {k:.3f} s, bare UNet forward {b:.3f} s, ratio {k / b:.3f} (target <= 1.03)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(os.environ.get("EASEL_BENCH_DIR", "/tmp/easel-bench")))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtypes", nargs="*", default=["fp32", "fp16"], help="load-time dtypes (none: skip)")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "DTYPE"), help=argparse.SUPPRESS)
    ap.add_argument("--sampler-steps", type=int, default=4, help="steps per sampler-overhead run (0: skip)")
    ap.add_argument("--sampler-size", type=int, default=512)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = prepare(args.dir)
    if args.child:
        child(args.child[0], ckpt, cfg, args.child[1])
        return
    if not args.no_check:
        check(ckpt, cfg)
    print(f"file: {ckpt.name}, {ckpt.stat().st_size / 2**30:.2f} GiB fp16; {os.cpu_count()} CPUs; "
          f"medians of {args.runs} fresh-process loads each")
    for dtype in args.dtypes:
        runs: dict[str, list[dict]] = {"easel": [], "diffusers": []}
        for _ in range(args.runs):
            for which in ("easel", "diffusers"):
                out = subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--child", which, dtype],
                                     capture_output=True, text=True, check=True)
                runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {w: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "peak_growth_mb")} for w, rs in runs.items()}
        e, d = med["easel"], med["diffusers"]
        print(f"[{dtype}] load time  easel {e['load_s']:.2f} s  diffusers {d['load_s']:.2f} s  "
              f"ratio {e['load_s'] / d['load_s']:.2f}")
        print(f"[{dtype}] peak RSS   easel {e['peak_growth_mb']:.0f} MiB  diffusers {d['peak_growth_mb']:.0f} MiB  "
              f"ratio {e['peak_growth_mb'] / d['peak_growth_mb']:.2f}")
    if args.sampler_steps:
        sampler_overhead(ckpt, args.sampler_steps, args.sampler_size, args.runs)


if __name__ == "__main__":
    main()
