"""The node registry: class_type -> node class, and the definitions `/object_info` returns.

Built-in node files are the modules of `nodes/builtin/`, each with NODE_CLASS_MAPPINGS and
NODE_DISPLAY_NAME_MAPPINGS; plugins from `custom_nodes/` are added by nodes.plugins.
"""
from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("easel.nodes")


class Registry:
    def __init__(self) -> None:
        self._classes: dict[str, type] = {}
        self._display: dict[str, str] = {}
        self._module: dict[str, str] = {}
        self._builtin: set[str] = set()
        self.web_dirs: dict[str, Path] = {}

    def register(self, name: str, cls: type, display_name: str | None = None,
                 python_module: str = "nodes", builtin: bool = False) -> None:
        self._classes[name] = cls
        if display_name:
            self._display[name] = display_name
        self._module[name] = python_module
        if builtin:
            self._builtin.add(name)

    def register_module(self, module: Any, python_module: str = "nodes", builtin: bool = False) -> list[str]:
        mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
        if not isinstance(mappings, dict):
            raise TypeError(f"{module.__name__} has no NODE_CLASS_MAPPINGS dict")
        display = getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}) or {}
        for name, cls in mappings.items():
            self.register(name, cls, display.get(name), python_module, builtin)
        return list(mappings)

    def get(self, class_type: str) -> type | None:
        return self._classes.get(class_type)

    def is_builtin(self, name: str) -> bool:
        return name in self._builtin

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def names(self) -> list[str]:
        return list(self._classes)

    def display_name(self, name: str) -> str:
        return self._display.get(name, name)

    def definition(self, name: str) -> dict[str, Any]:
        """The V1 node definition of protocol.md 3.5 (every standard key, right types)."""
        cls = self._classes[name]
        types = cls.INPUT_TYPES()
        returns = list(getattr(cls, "RETURN_TYPES", ()))
        out_list = list(getattr(cls, "OUTPUT_IS_LIST", ()) or ())
        out_list = [bool(x) for x in out_list] + [False] * (len(returns) - len(out_list))
        names = list(getattr(cls, "RETURN_NAMES", None) or [r if isinstance(r, str) else "COMBO" for r in returns])
        info: dict[str, Any] = {
            "input": {section: dict(types.get(section) or {}) for section in ("required", "optional", "hidden")
                      if types.get(section) is not None},
            "input_order": {section: list((types.get(section) or {}).keys())
                            for section in ("required", "optional", "hidden") if types.get(section) is not None},
            "is_input_list": bool(getattr(cls, "INPUT_IS_LIST", False)),
            "output": returns,
            "output_is_list": out_list,
            "output_name": names,
            "name": name,
            "display_name": self.display_name(name),
            "description": str(getattr(cls, "DESCRIPTION", "") or ""),
            "python_module": self._module.get(name, "nodes"),
            "category": str(getattr(cls, "CATEGORY", "sd") or "sd"),
            "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
            "has_intermediate_output": bool(getattr(cls, "HAS_INTERMEDIATE_OUTPUT", False)),
            "search_aliases": list(getattr(cls, "SEARCH_ALIASES", []) or []),
        }
        if "required" not in info["input"]:
            info["input"]["required"] = {}
            info["input_order"]["required"] = []
        for attr, key in (("DEPRECATED", "deprecated"), ("EXPERIMENTAL", "experimental"), ("DEV_ONLY", "dev_only")):
            if getattr(cls, attr, False):
                info[key] = True
        if getattr(cls, "API_NODE", None) is not None:
            info["api_node"] = bool(cls.API_NODE)
        if getattr(cls, "OUTPUT_TOOLTIPS", None):
            info["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
        return info

    def definitions(self) -> dict[str, dict[str, Any]]:
        """Every definition; a class whose INPUT_TYPES raises is skipped and logged."""
        out = {}
        for name in self._classes:
            try:
                out[name] = self.definition(name)
            except Exception:
                log.exception("node %s: building its definition failed; skipped", name)
        return out


def builtin_modules() -> list[str]:
    import nodes.builtin as package
    return sorted(f"nodes.builtin.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_"))


def build_registry(plugin_dirs: Iterable[str | Path] = (), builtins: bool = True) -> Registry:
    """All built-in nodes, then the plugins found in `plugin_dirs` (custom_nodes folders)."""
    registry = Registry()
    if builtins:
        for module_name in builtin_modules():
            registry.register_module(importlib.import_module(module_name), "nodes", builtin=True)
    dirs = [Path(d) for d in plugin_dirs]
    if dirs:
        from nodes.plugins import load_plugins
        report = load_plugins(dirs, registry)
        registry.plugin_report = report  # type: ignore[attr-defined]
        if report.results:
            log.info("%s", report.timing_table())
        for warning in report.warnings:
            log.warning("%s", warning)
        for failed in report.failed:
            log.error("Cannot import %s module for custom nodes:\n%s", failed.path, getattr(failed, "traceback", ""))
    return registry
