"""The import direction of design.md: graph knows neither torch nor nodes; diffusion knows none
of graph, nodes, server; server reaches the model layer only through nodes."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def offenders(package: str, forbidden: set[str]) -> dict[str, set[str]]:
    return {path: names & forbidden for path, names in imported_modules(package).items() if names & forbidden}


def test_graph_imports_neither_torch_nor_nodes() -> None:
    assert offenders("graph", {"torch", "nodes", "server", "diffusion", "diffusers", "transformers"}) == {}


def test_diffusion_imports_no_upper_layer() -> None:
    assert offenders("diffusion", {"graph", "nodes", "server"}) == {}


def test_server_reaches_models_only_through_nodes() -> None:
    assert offenders("server", {"diffusion", "torch"}) == {}


def test_nodes_do_not_import_server() -> None:
    # the plugin shims may forward to the server's compatibility module; nothing else may
    found = offenders("nodes", {"server"})
    assert all("comfy_compat" in path or path.endswith("plugins.py") for path in found), found


def test_graph_imports_without_torch_loaded() -> None:
    import subprocess
    import sys
    code = ("import sys; import graph.executor, graph.validate, graph.cache, graph.ui_format; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
