"""Make ComfyUI's module names importable: put `nodes/comfy_compat/` on `sys.path` (protocol.md 7).

With the folder on the path, `import folder_paths`, `import comfy.utils`,
`import comfy.model_management`, `from comfy_execution.graph_utils import GraphBuilder`,
`import node_helpers` and `from comfy_api.latest import ComfyExtension, io, ui` resolve to Easel's
thin modules in that folder (what they offer: `nodes/comfy_compat/README.md`).

This module imports nothing of Easel's, so both the plugin loader (`nodes/plugins.py`) and the V3
adapter (`nodes/v3_adapter.py`) can use it without importing each other.
"""
from __future__ import annotations

import sys
from pathlib import Path

COMPAT_DIR: Path = Path(__file__).resolve().parent / "comfy_compat"


def install_compat_modules() -> None:
    """Put the ComfyUI compatibility modules (folder_paths, comfy, ...) on sys.path, once."""
    path = str(COMPAT_DIR)
    # First on the path, so these names win over any same-named package installed in the
    # environment; checked first, so repeated loads (a second registry) add no duplicates.
    if path not in sys.path:
        sys.path.insert(0, path)
