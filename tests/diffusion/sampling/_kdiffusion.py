"""Load the PyPI `k-diffusion` package's sampling.py and external.py as parity references.

The wheel's package __init__ imports every submodule (torchvision, kornia, wandb, ...), so it is
installed with --no-deps and only these two files are loaded, by path, under a stub package whose
`utils` provides `append_dims` (samplers.md section 8.2). Tests skip when it is not installed.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


def _append_dims(x, target_dims):  # type: ignore[no-untyped-def]
    dims = target_dims - x.ndim
    if dims < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims]


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external), or pytest.skip when unavailable."""
    name = "_kdiff_ref"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"], sys.modules[f"{name}.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion not installed (pip install --no-deps k-diffusion==0.1.1.post1)")
    for dep in ("torchsde", "scipy", "tqdm"):
        if importlib.util.find_spec(dep) is None:
            pytest.skip(f"k-diffusion's sampling.py needs {dep}")
    if importlib.util.find_spec("torchdiffeq") is None and "torchdiffeq" not in sys.modules:
        # only k-diffusion's log_likelihood uses odeint; none of the samplers compared here do
        stub = types.ModuleType("torchdiffeq")

        def odeint(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise RuntimeError("torchdiffeq is not installed")
        stub.odeint = odeint  # type: ignore[attr-defined]
        sys.modules["torchdiffeq"] = stub
    root = Path(list(spec.submodule_search_locations)[0])
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(root)]
    utils = types.ModuleType(f"{name}.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    sys.modules[name] = pkg
    sys.modules[f"{name}.utils"] = utils
    mods = []
    for sub in ("sampling", "external"):
        s = importlib.util.spec_from_file_location(f"{name}.{sub}", root / f"{sub}.py")
        assert s is not None and s.loader is not None
        mod = importlib.util.module_from_spec(s)
        sys.modules[f"{name}.{sub}"] = mod
        s.loader.exec_module(mod)
        setattr(pkg, sub, mod)
        mods.append(mod)
    return mods[0], mods[1]
