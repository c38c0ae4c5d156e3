#!/usr/bin/env bash
# Test-only extras that cannot be plain dependencies of the `test` extra:
# reference packages installed without their heavy dependency trees (they would pull
# torchvision or a CUDA torch), and system packages for the browser test.
set -euo pipefail
python -m pip install --no-deps "k-diffusion==0.1.1.post1"
python -m pip install --no-deps "lycoris-lora==4.1.3" einops toml
