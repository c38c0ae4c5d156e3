"""The import direction of design.md: graph knows neither torch nor nodes; diffusion knows none
of graph, nodes, server; server reaches the model layer only through nodes. Inside diffusion/ the
sub-packages stack (models at the bottom, DIFFUSION_LAYERS), and no import cycle exists anywhere in
graph/, nodes/, diffusion/ or server/ (function-level imports count)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(package: str) -> dict[str, set[str]]:
    """file -> the top-level names it imports (see full_imports)."""
    return {str(path.relative_to(ROOT)): {name.split(".")[0] for name in full_imports(path)}
            for path in (ROOT / package).rglob("*.py")}


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


# --- inside diffusion/: sub-packages, bottom to top; a package imports only packages before it
DIFFUSION_LAYERS = ("models", "images", "patches", "prompts", "sampling", "loaders", "demo")


def diffusion_layer_offenders() -> dict[str, set[str]]:
    rank = {name: i for i, name in enumerate(DIFFUSION_LAYERS)}
    found: dict[str, set[str]] = {}
    for path in (ROOT / "diffusion").rglob("*.py"):
        rel = path.relative_to(ROOT / "diffusion").parts
        own = rank.get(rel[0], -1) if len(rel) > 1 else -1            # diffusion/__init__.py: below all
        bad = set()
        for name in full_imports(path):
            parts = name.split(".")
            if parts[0] == "diffusion" and len(parts) > 1 and parts[1] in rank and rank[parts[1]] > own:
                bad.add(name)
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def full_imports(path: Path) -> set[str]:
    """Dotted names a file imports (function-level imports too), `from a import b` as `a.b`."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_diffusion_is_only_sub_packages() -> None:
    loose = sorted(p.name for p in (ROOT / "diffusion").glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in (ROOT / "diffusion").iterdir() if (p / "__init__.py").is_file())
    assert loose == [] and packages == sorted(DIFFUSION_LAYERS), (loose, packages)


def test_diffusion_sub_packages_import_downwards() -> None:
    assert diffusion_layer_offenders() == {}


# --- no import cycle anywhere in the source tree
SOURCE_PACKAGES = ("graph", "nodes", "diffusion", "server")
COMPAT = ROOT / "nodes" / "comfy_compat"          # on sys.path for plugins: its modules are top-level names


def module_name(path: Path) -> str:
    base = COMPAT if COMPAT in path.parents else ROOT
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the source modules it imports (at any depth of the file). `from pkg import x` is an
    edge to `pkg.x` when that is a module, else to `pkg`; relative imports are resolved."""
    files = {module_name(p): p for pkg in SOURCE_PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:             # `import a.b.c` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    out.add(t)
        edges[mod] = out
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    import networkx as nx
    g = nx.DiGraph((a, b) for a, targets in edges.items() for b in targets)
    return sorted(sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1)


def test_no_import_cycle_in_the_source_tree() -> None:
    edges = import_graph()
    assert len(edges) > 100 and "diffusion.loaders.checkpoint" in edges      # the walk found the tree
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle() -> None:
    edges = import_graph()
    edges["diffusion.models.errors"] = edges["diffusion.models.errors"] | {"diffusion.loaders.checkpoint"}
    assert any("diffusion.models.errors" in c for c in cycles(edges))
