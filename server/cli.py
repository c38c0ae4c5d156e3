"""`easel`: run saved workflows, list node definitions, serve the ComfyUI-compatible API."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graph.cache import OutputCache
from graph.events import EXECUTED, EXECUTING, EXPLAIN, PROGRESS, WARNING
from graph.executor import Executor, RunResult
from graph.workflow import WorkflowFormatError, check_api_prompt
from graph.workflow_file import WorkflowFileError, load_workflow_file
from nodes.environment import configure_devices, ensure_demo_files
from nodes.folders import ModelFolders, use_folders
from nodes.registry import Registry, build_registry

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def parse_set(items: Sequence[str]) -> list[tuple[str, str, Any]]:
    """`ID.INPUT=VALUE` -> (id, input, value); VALUE is JSON when it parses, else a string."""
    out = []
    for item in items:
        target, sep, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not sep or not dot or not node_id or not name:
            raise ValueError(f"--set {item!r}: expected ID.INPUT=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((node_id, name, value))
    return out


class ConsoleProgress:
    """Event sink for a terminal: a tqdm bar per sampling node when stderr is a TTY, else lines."""

    def __init__(self, explain: bool, stream: Any = None) -> None:
        self.explain = explain
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.bar: Any = None

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == PROGRESS:
            if self.tty:
                from tqdm import tqdm
                if self.bar is None or self.bar.total != data["max"] or data["value"] <= self.bar.n:
                    self._close_bar()
                    self.bar = tqdm(total=data["max"], desc=f"node {data['node']}", file=self.stream, leave=False)
                self.bar.update(data["value"] - self.bar.n)
            elif data["value"] == data["max"] or data["value"] == 1:
                print(f"node {data['node']}: step {data['value']}/{data['max']}", file=self.stream)
        elif event == EXECUTING:
            self._close_bar()
        elif event == WARNING:
            self._close_bar()
            print(f"warning: node {data.get('node')}: {data.get('message')}", file=self.stream)
        elif event == EXPLAIN and self.explain:
            print(f"node {data['node']} ({data['class_type']}) runs: " + "; ".join(data["reasons"]), file=self.stream)
        elif event == EXECUTED and data.get("output"):
            for item in data["output"].get("images", []):
                print(f"node {data['node']}: {item.get('type', 'output')}/{item.get('subfolder') or ''}"
                      f"{'/' if item.get('subfolder') else ''}{item['filename']}", file=self.stream)


def load_prompt(path: Path, registry: Registry, folders: ModelFolders) -> tuple[dict[str, Any], dict[str, Any]]:
    """The API prompt and extra_pnginfo of a workflow file (API/UI JSON, ComfyUI or A1111 PNG)."""
    source = load_workflow_file(path)
    if source.kind == "a1111":
        from server.a1111_import import a1111_to_api
        prompt = a1111_to_api(source.parameters or "", folders=folders)
        return prompt, {}
    with use_folders(folders):
        definitions = registry.definitions() if source.kind == "ui" else {}
    return source.api_prompt(definitions), source.extra_pnginfo


def setup_folders(args: argparse.Namespace) -> tuple[ModelFolders, list[Path]]:
    """Model folders (base dir, extra-paths configs, an A1111 install) and the plugin folders."""
    from nodes.extra_paths import a1111_preset, apply_extra_paths
    folders = ModelFolders(args.base_dir, output_dir=getattr(args, "output_dir", None))
    configs = [Path(p) for p in getattr(args, "extra_model_paths", None) or []]
    default_config = Path(args.base_dir) / "extra_model_paths.yaml"
    if default_config.is_file():
        configs.append(default_config)
    extra = apply_extra_paths(folders, *configs)
    plugin_dirs = [Path(args.base_dir) / "custom_nodes", *extra.custom_nodes]
    if getattr(args, "a1111_dir", None):
        preset = a1111_preset(args.a1111_dir)
        preset.apply(folders)
        extra.warnings.extend(preset.warnings)
    for warning in extra.warnings:
        logging.getLogger("easel").warning("model paths: %s", warning)
    return folders, [p for p in plugin_dirs if Path(p).is_dir()]


def cmd_run(args: argparse.Namespace) -> int:
    configure_devices(cpu=args.cpu, lowvram=args.lowvram)
    try:
        folders, plugin_dirs = setup_folders(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    registry = build_registry(plugin_dirs=plugin_dirs)
    try:
        prompt, pnginfo = load_prompt(Path(args.workflow), registry, folders)
        prompt = check_api_prompt(prompt)
        for node_id, name, value in parse_set(args.set or []):
            if node_id not in prompt:
                raise ValueError(f"--set {node_id}.{name}: the workflow has no node {node_id!r}")
            prompt[node_id].setdefault("inputs", {})[name] = value
    except (WorkflowFileError, WorkflowFormatError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    ensure_demo_files(prompt, folders)
    executor = Executor(registry, OutputCache(), ConsoleProgress(args.explain), folders=folders)
    with use_folders(folders):
        result = executor.run(prompt, extra_data={"extra_pnginfo": pnginfo, "preview_method": "none"},
                              targets=args.target or None)
    return report(result)


def report(result: RunResult) -> int:
    if result.status == "invalid" and result.validation is not None:
        print("error: the workflow is invalid", file=sys.stderr)
        print(result.validation.describe(), file=sys.stderr)
        return EXIT_INVALID
    if result.status == "error" and result.error:
        err = result.error
        print(f"error: node {err['node_id']} ({err['node_type']}) failed: {err['exception_type']}: "
              f"{err['exception_message']}", file=sys.stderr)
        return EXIT_FAILED
    if result.status == "interrupted":
        print("interrupted", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps({"prompt_id": result.prompt_id, "outputs": result.outputs,
                      "executed": result.executed, "cached": result.cached,
                      "node_records": result.node_records}, indent=1))      # plain data (executor)
    return EXIT_OK


def cmd_nodes(args: argparse.Namespace) -> int:
    registry = build_registry()
    with use_folders(ModelFolders(args.base_dir)):
        if args.class_type:
            if args.class_type not in registry:
                print(f"error: no node class {args.class_type!r}", file=sys.stderr)
                return EXIT_INVALID
            print(json.dumps({args.class_type: registry.definition(args.class_type)}, indent=1))
        else:
            print(json.dumps(registry.definitions(), indent=1))
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import serve
    return serve(args)


def cmd_import_a1111(args: argparse.Namespace) -> int:
    from server.a1111_import import a1111_to_api
    try:
        source = load_workflow_file(Path(args.image))
    except WorkflowFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_INVALID
    if not source.parameters:
        print(f"error: {args.image} has no A1111 'parameters' text chunk", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(a1111_to_api(source.parameters, folders=ModelFolders(args.base_dir)), indent=1))
    return EXIT_OK


def add_folder_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extra-model-paths", action="append", metavar="FILE",
                        help="an extra_model_paths.yaml-style file mapping model kinds to more folders (repeatable)")
    parser.add_argument("--a1111-dir", metavar="DIR", help="also use the model folders of this AUTOMATIC1111 install")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easel", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a workflow file (API or UI JSON, or a PNG with a workflow)")
    run.add_argument("workflow")
    run.add_argument("--set", action="append", metavar="ID.INPUT=VALUE", help="override a node input")
    run.add_argument("--output-dir", default=None, help="where SaveImage writes (default BASE/output)")
    run.add_argument("--base-dir", default=".", help="folder holding models/, input/, output/ (default .)")
    run.add_argument("--target", action="append", metavar="ID", help="run only this node and what it needs")
    run.add_argument("--explain", action="store_true", help="say why each node ran instead of coming from the cache")
    add_folder_options(run)
    run.add_argument("--cpu", action="store_true", help="never use an accelerator")
    run.add_argument("--lowvram", action="store_true", help="offload models right after use")
    run.set_defaults(func=cmd_run)

    nodes = sub.add_parser("nodes", help="print node definitions as JSON (as /object_info does)")
    nodes.add_argument("class_type", nargs="?")
    nodes.add_argument("--base-dir", default=".")
    nodes.set_defaults(func=cmd_nodes)

    serve = sub.add_parser("serve", help="serve the ComfyUI-compatible HTTP + websocket API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (all interfaces)")
    serve.add_argument("--base-dir", default=".")
    serve.add_argument("--token", default=None, help="require this token on every request")
    add_folder_options(serve)
    serve.add_argument("--cpu", action="store_true")
    serve.add_argument("--lowvram", action="store_true")
    serve.add_argument("--preview-method", default="none", choices=["none", "auto", "latent2rgb", "taesd"],
                       help="sampler previews sent to websocket clients: auto = TAESD when "
                            "models/vae_approx has its decoder, else latent2rgb (default none, as ComfyUI; "
                            "a prompt may ask with extra_data.preview_method)")
    serve.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                       help="run prompts on Ray workers: 'auto' joins the running cluster or starts a local one, "
                            "ADDRESS joins that cluster (needs easel[ray])")
    serve.add_argument("--workers", type=int, default=None, metavar="N",
                       help="with --ray: N CPU workers instead of one worker per GPU")
    serve.set_defaults(func=cmd_serve)

    imp = sub.add_parser("import-a1111", help="print the API workflow equivalent to an A1111 PNG")
    imp.add_argument("image")
    imp.add_argument("--base-dir", default=".")
    imp.set_defaults(func=cmd_import_a1111)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
