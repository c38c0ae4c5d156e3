"""Plugins: import every package or `.py` file in `custom_nodes/` folders (protocol.md 6.1, 7).

Each entry of a plugin folder is a candidate: a directory (imported as a package from its
`__init__.py`, so relative imports work) or a `*.py` file. Skipped: `__pycache__`, hidden names,
names ending in `.disabled`, other files. Before importing, `nodes/comfy_compat/` is put on
`sys.path` (`nodes/compat_install.py`), so `import folder_paths`, `import comfy.utils`,
`import comfy.model_management`, `from comfy_execution.graph_utils import GraphBuilder`,
`import node_helpers` and `from comfy_api.latest import ComfyExtension, io, ui` resolve to Easel's
thin modules (`from server import PromptServer` resolves to `server.prompt_server_compat`, exported
by the `server` package).

Before any plugin of the folders is imported, each package's `prestartup_script.py` runs (once per
process, as ComfyUI runs them once at start-up); an exception there is logged with the file,
recorded in `PluginReport.prestartup` and `warnings`, and the plugin still loads.

After a successful import: `WEB_DIRECTORY` (or `[tool.comfy] web` in the plugin's pyproject.toml)
is registered in `registry.web_dirs` under the plugin name; every `NODE_CLASS_MAPPINGS` entry is
registered with its `NODE_DISPLAY_NAME_MAPPINGS` name and `python_module = "custom_nodes.<name>"`
(a V3 `io.ComfyNode` class listed there is adapted, see `nodes/v3_adapter.py`). A module without
NODE_CLASS_MAPPINGS but with a callable `comfy_entrypoint` is a V3 plugin: the entrypoint,
`on_load()` and `get_node_list()` are awaited and each class is adapted and registered under
`schema.node_id` with `schema.display_name`. A plugin cannot replace a built-in node (the built-in
stays, a warning names both); a later plugin may replace an earlier plugin's node (with a warning
naming both). An import or entrypoint error is recorded with its traceback and the time spent, and
the next plugin loads.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import sys
import time
import tomllib
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from nodes import v3_adapter
from nodes.compat_install import install_compat_modules

log = logging.getLogger("easel.plugins")

REQUIRED_NODE_ATTRS = ("INPUT_TYPES", "RETURN_TYPES", "FUNCTION")

# Folders of the last load, for folder_paths.get_folder_paths("custom_nodes").
PLUGIN_DIRS: list[Path] = []


class PluginRegistry(Protocol):
    web_dirs: dict[str, Path]

    def register(self, name: str, cls: type, display_name: str | None = None,
                 python_module: str = "nodes", builtin: bool = False) -> None: ...

    def is_builtin(self, name: str) -> bool: ...

    def get(self, class_type: str) -> type | None: ...


@dataclass(frozen=True)
class PluginResult:
    """One plugin: where it came from, how long its import took, what it added or why it failed."""

    name: str
    path: Path
    seconds: float
    nodes: tuple[str, ...] = ()
    web_dir: Path | None = None
    error: str | None = None            # one line: "<ExceptionType>: message" or the reason
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PrestartupResult:
    """One `prestartup_script.py`: how long it ran and why it failed, if it did."""

    plugin: str
    path: Path
    seconds: float
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class PluginReport:
    results: list[PluginResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    prestartup: list[PrestartupResult] = field(default_factory=list)

    @property
    def loaded(self) -> list[PluginResult]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[PluginResult]:
        return [r for r in self.results if not r.ok]

    def timing_table(self) -> str:
        """ComfyUI's start-up table: one line per plugin, slowest last."""
        lines = ["Import times for custom nodes:"]
        for r in sorted(self.results, key=lambda r: r.seconds):
            lines.append(f"{r.seconds:6.1f} seconds{'' if r.ok else ' (IMPORT FAILED)'}: {r.path}")
        return "\n".join(lines)

    def prestartup_table(self) -> str:
        """ComfyUI's prestartup table: one line per script, slowest last."""
        lines = ["Prestartup times for custom nodes:"]
        for r in sorted(self.prestartup, key=lambda r: r.seconds):
            lines.append(f"{r.seconds:6.1f} seconds{'' if r.ok else ' (PRESTARTUP FAILED)'}: {r.path.parent}")
        return "\n".join(lines)


def plugin_candidates(folder: Path) -> list[Path]:
    """The packages and `.py` files of one plugin folder, in name order."""
    if not folder.is_dir():
        return []
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        name = entry.name
        if name.startswith((".", "__")) or name.endswith(".disabled"):
            continue
        if entry.is_dir() or (entry.is_file() and name.endswith(".py")):
            out.append(entry)
    return out


def _module_name(entry: Path) -> str:
    stem = entry.name[:-3] if entry.is_file() else entry.name
    return "custom_nodes." + re.sub(r"\W", "_", stem)


def import_plugin(entry: Path) -> ModuleType:
    """Import one package folder or `.py` file under `custom_nodes.<name>` in sys.modules."""
    name = _module_name(entry)
    if entry.is_dir():
        init = entry / "__init__.py"
        if not init.is_file():
            raise ImportError(f"{entry} is a folder without __init__.py, not a Python package")
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(entry)])
    else:
        spec = importlib.util.spec_from_file_location(name, entry)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot create an import spec for {entry}")
    previous = sys.modules.get(name)
    if previous is not None and getattr(previous, "__file__", None) == spec.origin:
        return previous          # loaded before in this process (a second registry): reuse it
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
        if previous is not None:
            sys.modules[name] = previous
        raise
    return module


def _web_dir(module: ModuleType, entry: Path) -> Path | None:
    root = entry if entry.is_dir() else entry.parent
    pyproject = root / "pyproject.toml" if entry.is_dir() else None
    if pyproject is not None and pyproject.is_file():
        try:
            web = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("comfy", {}).get("web")
        except (tomllib.TOMLDecodeError, OSError):
            web = None
        if isinstance(web, str) and (root / web).is_dir():
            return (root / web).resolve()
    web = getattr(module, "WEB_DIRECTORY", None)
    if isinstance(web, str) and web:
        return (root / web).resolve()
    return None


def _register_one(node_name: str, cls: type, display: str | None, plugin: str, registry: PluginRegistry,
                  owners: dict[str, str], warnings: list[str]) -> bool:
    """Register one node class unless it would replace a built-in; False when refused."""
    if registry.is_builtin(node_name):
        builtin = registry.get(node_name)
        warnings.append(f"plugin {plugin}: node {node_name!r} ({cls.__module__}.{cls.__qualname__}) would "
                        f"replace the built-in node {node_name!r} "
                        f"({getattr(builtin, '__module__', '?')}.{getattr(builtin, '__qualname__', '?')}); "
                        "the built-in is kept")
        return False
    if node_name in owners and owners[node_name] != plugin:
        warnings.append(f"plugin {plugin}: node {node_name!r} replaces the node of the same name from "
                        f"plugin {owners[node_name]}")
    python_module = f"custom_nodes.{plugin}"
    targets: list[Any] = [cls, getattr(cls, "V3_NODE", None)]     # an adapted V3 class: its V3 class too
    for target in targets:
        if target is not None:
            try:
                target.RELATIVE_PYTHON_MODULE = python_module
            except (AttributeError, TypeError):
                pass
    registry.register(node_name, cls, display, python_module=python_module, builtin=False)
    owners[node_name] = plugin
    return True


def _register_nodes(module: ModuleType, plugin: str, registry: PluginRegistry, owners: dict[str, str],
                    warnings: list[str]) -> list[str]:
    mappings: dict[str, Any] = module.NODE_CLASS_MAPPINGS
    display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", None) or {}
    found: list[tuple[str, type, str | None]] = []
    for node_name, cls in mappings.items():
        shown = display.get(node_name)
        if v3_adapter.is_v3_node(cls):                  # a V3 class listed in NODE_CLASS_MAPPINGS
            _, v3_display, cls = v3_adapter.adapt(cls)
            shown = shown or v3_display
        missing = [a for a in REQUIRED_NODE_ATTRS if not hasattr(cls, a)]
        if not isinstance(cls, type) or missing:
            warnings.append(f"plugin {plugin}: node {node_name!r} skipped: not a node class "
                            f"(missing {', '.join(missing) or 'class'})")
            continue
        found.append((node_name, cls, shown))
    return [name for name, cls, shown in found
            if _register_one(name, cls, shown, plugin, registry, owners, warnings)]


def _register_v3(classes: list[Any], plugin: str, registry: PluginRegistry, owners: dict[str, str],
                 warnings: list[str]) -> list[str]:
    """Adapt every class get_node_list() gave (all first, so a broken schema registers nothing)."""
    found: list[tuple[str, type, str | None]] = []
    for cls in classes:
        if not v3_adapter.is_v3_node(cls):
            warnings.append(f"plugin {plugin}: get_node_list() item {cls!r} skipped: not a V3 node class "
                            "(an io.ComfyNode subclass)")
            continue
        node_id, display, classic = v3_adapter.adapt(cls)
        found.append((node_id, classic, display))
    return [name for name, cls, shown in found
            if _register_one(name, cls, shown, plugin, registry, owners, warnings)]


def load_plugin(entry: Path, registry: PluginRegistry, owners: dict[str, str],
                warnings: list[str]) -> PluginResult:
    """Import one plugin and register what it offers; never raises for the plugin's own errors."""
    plugin = entry.name[:-3] if entry.is_file() else entry.name
    start = time.perf_counter()
    try:
        module = import_plugin(entry)
    except (Exception, SystemExit) as err:
        seconds = time.perf_counter() - start
        tb = traceback.format_exc()
        log.error("Cannot import %s module for custom nodes: %s\n%s", entry, err, tb)
        return PluginResult(plugin, entry, seconds, error=f"{type(err).__name__}: {err}", traceback=tb)
    seconds = time.perf_counter() - start
    web = _web_dir(module, entry)
    if web is not None:
        if web.is_dir():
            registry.web_dirs[plugin] = web
        else:
            warnings.append(f"plugin {plugin}: WEB_DIRECTORY {web} does not exist")
            web = None
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if isinstance(mappings, dict):
        try:
            added = _register_nodes(module, plugin, registry, owners, warnings)
        except Exception as err:   # a broken mapping (e.g. INPUT_TYPES access raising) fails the plugin
            tb = traceback.format_exc()
            log.error("Cannot register nodes of %s: %s\n%s", entry, err, tb)
            return PluginResult(plugin, entry, seconds, web_dir=web, error=f"{type(err).__name__}: {err}",
                                traceback=tb)
        return PluginResult(plugin, entry, seconds, tuple(added), web)
    entrypoint = getattr(module, "comfy_entrypoint", None)
    if callable(entrypoint):
        try:
            added = _register_v3(v3_adapter.load_extension(entrypoint), plugin, registry, owners, warnings)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a plugin's own error fails only that plugin
            tb = traceback.format_exc()
            log.error("Error while calling comfy_entrypoint in %s: %s\n%s", entry, err, tb)
            return PluginResult(plugin, entry, time.perf_counter() - start, web_dir=web,
                                error=f"{type(err).__name__}: {err}", traceback=tb)
        return PluginResult(plugin, entry, time.perf_counter() - start, tuple(added), web)
    if entrypoint is not None:
        reason = "comfy_entrypoint is not callable"
    elif web is not None:
        return PluginResult(plugin, entry, seconds, (), web)      # a web-only package
    else:
        reason = "no NODE_CLASS_MAPPINGS dict (need one)"
    log.warning("Skip %s module for custom nodes: %s", entry, reason)
    return PluginResult(plugin, entry, seconds, web_dir=web, error=reason)


_PRESTARTUP_DONE: dict[Path, PrestartupResult] = {}


def _run_prestartup(plugin: str, script: Path) -> PrestartupResult:
    start = time.perf_counter()
    name = "custom_nodes_prestartup." + re.sub(r"\W", "_", plugin)
    try:
        spec = importlib.util.spec_from_file_location(name, script)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot create an import spec for {script}")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    except (Exception, SystemExit) as err:  # noqa: BLE001 - ComfyUI goes on after a failed script too
        tb = traceback.format_exc()
        log.error("Failed to execute startup-script: %s / %s\n%s", script, err, tb)
        return PrestartupResult(plugin, script, time.perf_counter() - start, f"{type(err).__name__}: {err}", tb)
    return PrestartupResult(plugin, script, time.perf_counter() - start)


def run_prestartup_scripts(folders: Sequence[Path]) -> list[PrestartupResult]:
    """Run each plugin package's `prestartup_script.py`, once per process (later calls report the
    first run); call after `compat_install.install_compat_modules()` so the scripts can import the
    compat modules."""
    results = []
    for folder in folders:
        for entry in plugin_candidates(folder):
            script = entry / "prestartup_script.py"
            if not entry.is_dir() or not script.is_file():
                continue
            key = script.resolve()
            if key not in _PRESTARTUP_DONE:
                _PRESTARTUP_DONE[key] = _run_prestartup(entry.name, script)
            results.append(_PRESTARTUP_DONE[key])
    return results


def load_plugins(dirs: Sequence[str | Path], registry: PluginRegistry) -> PluginReport:
    """Load every plugin of every folder in `dirs` into `registry`; the report says what happened."""
    install_compat_modules()
    folders = [Path(d) for d in dirs]
    PLUGIN_DIRS[:] = folders
    report = PluginReport()
    owners: dict[str, str] = {}
    report.prestartup = run_prestartup_scripts([f for f in folders if f.is_dir()])
    for done in report.prestartup:
        if not done.ok:
            report.warnings.append(f"plugin {done.plugin}: {done.path} failed ({done.error}); "
                                   "the plugin is loaded anyway")
    if report.prestartup:
        log.info("%s", report.prestartup_table())
    for folder in folders:
        if not folder.is_dir():
            report.warnings.append(f"plugin folder {folder} does not exist")
            continue
        for entry in plugin_candidates(folder):
            report.results.append(load_plugin(entry, registry, owners, report.warnings))
    for message in report.warnings:
        log.warning("%s", message)
    if report.results:
        log.info("%s", report.timing_table())
    return report
