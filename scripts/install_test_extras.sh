#!/usr/bin/env bash
# Test-only extras that cannot be plain dependencies of the `test` extra:
# reference packages installed without their heavy dependency trees (they would pull
# torchvision or a CUDA torch), and the browser and web frontend for the browser test.
set -euo pipefail
python -m pip install --no-deps "k-diffusion==0.1.1.post1"
python -m pip install --no-deps "lycoris-lora==4.1.3" einops toml
python -m pip install playwright comfyui-frontend-package
# Playwright drives the system Chromium (never downloads a browser of its own).
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
fi
# Ray for the scale-out tests (pinned: the loopback-only local cluster reaches into its internals)
python -m pip install "ray==2.60.0"
