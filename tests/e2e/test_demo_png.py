"""`easel run workflows/txt2img.json` on the demo checkpoint gives a pinned PNG, byte for byte.

Refactors of the model layer must not change a single pixel or metadata byte: this test runs the
real CLI in a subprocess (fresh base dir, so the demo checkpoint is written anew from its seed) at
the workflow's fixed seed and compares the file's sha256 with the value recorded for this platform.

Float results depend on the CPU's kernels (AVX2 vs AVX-512, the vendor's gemm blocking) and on the
UNet dtype Easel picks there (bf16 where the CPU computes it natively), so a hash is recorded per
(torch version, CPU model, UNet dtype); threads are fixed to 2 so the core count does not matter.
On a platform with no recorded hash the test is skipped with the hash it found, for a maintainer
to add after checking the picture.
"""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# smaller and shorter than the saved workflow (same graph, seed and prompts), to keep the suite fast
OVERRIDES = ["5.width=192", "5.height=128", "3.steps=6"]

PINNED = {
    # (torch version, CPU model, UNet dtype) -> sha256 of output/txt2img_00001_.png
    ("2.13.0+cpu", "AMD EPYC", "torch.bfloat16"):
        "3b21dae77e6df145efb11d04bb7b349ca4eb9dee577929b7684a29bae461e2cf",
}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def unet_dtype() -> str:
    from diffusion.models import devices
    return str(devices.unet_dtype(devices.DeviceConfig()))


def test_txt2img_demo_png_is_pinned(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "server.cli", "run", str(ROOT / "workflows" / "txt2img.json"),
           "--base-dir", str(tmp_path), *(a for o in OVERRIDES for a in ("--set", o))]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    png = tmp_path / "output" / "txt2img_00001_.png"
    digest = hashlib.sha256(png.read_bytes()).hexdigest()
    key = (torch.__version__, cpu_model(), unet_dtype())
    if key not in PINNED:
        pytest.skip(f"no PNG hash recorded for {key}; this run gave {digest}")
    assert digest == PINNED[key]
