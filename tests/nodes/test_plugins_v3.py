"""V3 plugins (comfy_entrypoint, comfy_api.latest) and prestartup scripts, loaded by nodes/plugins.py:
/object_info definitions, built-in protection, entrypoint errors, prestartup order, a running loop."""
from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from nodes.compat_install import install_compat_modules
from nodes.plugins import load_plugins
from nodes.registry import Registry, build_registry


def py(*parts: str) -> str:
    """Python source from pieces, each dedented on its own."""
    return "\n".join(textwrap.dedent(part) for part in parts)


def write_plugin(root: Path, name: str, files: dict[str, str]) -> Path:
    """A plugin package `root/name` with the given files."""
    package = root / name
    package.mkdir(parents=True, exist_ok=True)
    for file_name, source in files.items():
        (package / file_name).write_text(py(source), encoding="utf-8")
    return package


def extension(*classes: str) -> str:
    return textwrap.dedent(f"""
        class _Extension(ComfyExtension):
            async def get_node_list(self):
                return [{", ".join(classes)}]

        async def comfy_entrypoint():
            return _Extension()
        """)


WIDGETS = py("""
    import enum
    from comfy_api.latest import ComfyExtension, io

    class Mode(enum.Enum):
        a = "a"
        b = "b"

    class Widgets(io.ComfyNode):
        \"\"\"Every widget kind.\"\"\"

        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="V3TestWidgets", display_name="Widgets (V3)", category="test/v3",
                description="every widget kind", search_aliases=["knobs"], is_deprecated=True,
                is_experimental=True,
                inputs=[
                    io.Int.Input("seed", default=0, min=0, max=2**32, step=1, control_after_generate=True,
                                 display_mode=io.NumberDisplay.slider, tooltip="the seed"),
                    io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.5, round=0.01),
                    io.String.Input("text", multiline=True, placeholder="type", dynamic_prompts=True),
                    io.Boolean.Input("flag", default=True, label_on="yes", label_off="no"),
                    io.Combo.Input("mode", options=Mode, default=Mode.b),
                    io.Combo.Input("name", options=["x", "y"], control_after_generate=True, optional=True),
                    io.Image.Input("image", display_name="Image", tooltip="pixels"),
                    io.Custom("MY_TYPE").Input("thing", optional=True, lazy=True, raw_link=True),
                    io.Latent.Input("latent", optional=True, extra_dict={"advanced": True}),
                    io.MultiType.Input("either", types=[io.Mask, io.Image], optional=True),
                ],
                outputs=[io.Image.Output(),
                         io.Custom("MY_TYPE").Output("thing_out", display_name="thing", tooltip="a thing",
                                                     is_output_list=True),
                         io.Combo.Output(options=["x"])],
                hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo])

        @classmethod
        def execute(cls, **kwargs):
            return io.NodeOutput(None, None, "x")

    class Sink(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="V3TestSink", is_output_node=True, is_input_list=True,
                             inputs=[io.String.Input("prompt"), io.Vae.Input("vae"), io.Model.Input("model"),
                                     io.Clip.Input("clip"), io.Conditioning.Input("cond"), io.Mask.Input("mask"),
                                     io.Sampler.Input("sampler"), io.Sigmas.Input("sigmas"), io.Noise.Input("noise"),
                                     io.Guider.Input("guider"), io.AnyType.Input("anything")])

        @classmethod
        def execute(cls, **kwargs):
            return io.NodeOutput()
    """, extension("Widgets", "Sink"))


def plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def test_v3_definitions_are_the_classic_form(tmp_path: Path) -> None:
    write_plugin(tmp_path / "custom_nodes", "v3widgets", {"__init__.py": WIDGETS})
    registry = build_registry(plugin_dirs=[tmp_path / "custom_nodes"])
    report = registry.plugin_report  # type: ignore[attr-defined]
    assert [(r.name, r.nodes, r.error) for r in report.results] == \
        [("v3widgets", ("V3TestWidgets", "V3TestSink"), None)]
    d = plain(registry.definition("V3TestWidgets"))
    assert d["input"] == {
        "required": {
            "seed": ["INT", {"tooltip": "the seed", "default": 0, "min": 0, "max": 2**32, "step": 1,
                             "control_after_generate": True, "display": "slider"}],
            "cfg": ["FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5, "round": 0.01}],
            "text": ["STRING", {"multiline": True, "placeholder": "type", "dynamicPrompts": True}],
            "flag": ["BOOLEAN", {"default": True, "label_on": "yes", "label_off": "no"}],
            "mode": ["COMBO", {"default": "b", "multiselect": False, "options": ["a", "b"]}],
            "image": ["IMAGE", {"display_name": "Image", "tooltip": "pixels"}]},
        "optional": {
            "name": ["COMBO", {"multiselect": False, "options": ["x", "y"], "control_after_generate": True}],
            "thing": ["MY_TYPE", {"lazy": True, "rawLink": True}],
            "latent": ["LATENT", {"advanced": True}],
            "either": ["MASK,IMAGE", {}]},
        "hidden": {"unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"}}
    assert d["input_order"] == {"required": ["seed", "cfg", "text", "flag", "mode", "image"],
                                "optional": ["name", "thing", "latent", "either"],
                                "hidden": ["unique_id", "extra_pnginfo"]}
    assert (d["output"], d["output_name"], d["output_is_list"], d["output_tooltips"]) == \
        (["IMAGE", "MY_TYPE", "COMBO"], ["IMAGE", "thing", "COMBO"], [False, True, False], [None, "a thing", None])
    assert (d["name"], d["display_name"], d["category"], d["description"], d["python_module"]) == \
        ("V3TestWidgets", "Widgets (V3)", "test/v3", "every widget kind", "custom_nodes.v3widgets")
    assert (d["deprecated"], d["experimental"], d["search_aliases"], d["output_node"], d["api_node"]) == \
        (True, True, ["knobs"], False, False)
    cls = registry.get("V3TestWidgets")
    assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.v3widgets" and cls.V3_NODE.__name__ == "Widgets"
    assert cls.__qualname__ == "Widgets" and cls.__doc__ == "Every widget kind."
    sink = plain(registry.definition("V3TestSink"))
    assert sink["display_name"] == "V3TestSink" and sink["category"] == "sd"      # schema defaults
    assert sink["output_node"] is True and sink["is_input_list"] is True and sink["output"] == []
    assert [spec[0] for spec in sink["input"]["required"].values()] == \
        ["STRING", "VAE", "MODEL", "CLIP", "CONDITIONING", "MASK", "SAMPLER", "SIGMAS", "NOISE", "GUIDER", "*"]
    # an output node gets PROMPT and EXTRA_PNGINFO; "prompt" is an input here, so the hidden one is renamed
    assert sink["input"]["hidden"] == {"hidden_prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}


def test_versioned_alias_and_v3_class_in_node_class_mappings(tmp_path: Path) -> None:
    root = tmp_path / "custom_nodes"
    write_plugin(root, "mixed", {"__init__.py": """
        from comfy_api.v0_0_2 import io

        class Listed(io.ComfyNode):
            @classmethod
            def define_schema(cls):
                return io.Schema(node_id="V3Listed", display_name="Listed (V3)",
                                 inputs=[io.Int.Input("a")], outputs=[io.Int.Output()])

            @classmethod
            def execute(cls, a):
                return io.NodeOutput(a)

        class Classic:
            INPUT_TYPES = classmethod(lambda cls: {"required": {}})
            RETURN_TYPES = ("INT",)
            FUNCTION = "run"

        NODE_CLASS_MAPPINGS = {"MixedListed": Listed, "MixedClassic": Classic}
        """})
    registry = build_registry(plugin_dirs=[root], builtins=False)
    assert registry.plugin_report.results[0].nodes == ("MixedListed", "MixedClassic")  # type: ignore[attr-defined]
    assert registry.display_name("MixedListed") == "Listed (V3)"
    assert plain(registry.definition("MixedListed")["input"]) == {"required": {"a": ["INT", {}]}}
    install_compat_modules()
    import comfy_api.latest
    import comfy_api.v0_0_2
    assert comfy_api.v0_0_2.io is comfy_api.latest.io is comfy_api.latest.IO
    assert comfy_api.v0_0_2.ComfyExtension is comfy_api.latest.ComfyExtension


BUILTIN_CLASH = py("""
    from comfy_api.latest import ComfyExtension, io

    class FakeEmpty(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="EmptyLatentImage", outputs=[io.Latent.Output()])

        @classmethod
        def execute(cls):
            return io.NodeOutput({"samples": None})

    class Fine(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(node_id="V3TestFine", outputs=[io.Int.Output()])

        @classmethod
        def execute(cls):
            return io.NodeOutput(1)
    """, extension("FakeEmpty", "Fine"))


def test_v3_node_cannot_replace_a_builtin(tmp_path: Path) -> None:
    write_plugin(tmp_path / "custom_nodes", "clash", {"__init__.py": BUILTIN_CLASH})
    registry = build_registry(plugin_dirs=[tmp_path / "custom_nodes"])
    report = registry.plugin_report  # type: ignore[attr-defined]
    assert report.results[0].ok and report.results[0].nodes == ("V3TestFine",)
    assert registry.is_builtin("EmptyLatentImage")
    assert registry.get("EmptyLatentImage").__module__ == "nodes.builtin.latent"
    warning = next(w for w in report.warnings if "'EmptyLatentImage'" in w)
    assert "plugin clash" in warning and "custom_nodes.clash.FakeEmpty" in warning
    assert "would replace the built-in" in warning and "built-in is kept" in warning


def test_entrypoint_errors_are_reported_and_other_plugins_load(tmp_path: Path) -> None:
    root = tmp_path / "custom_nodes"
    header = "from comfy_api.latest import ComfyExtension, io\n"
    write_plugin(root, "a_boom", {"__init__.py": py(header, """
        async def comfy_entrypoint():
            raise RuntimeError("boom in entrypoint")
        """)})
    write_plugin(root, "b_not_extension", {"__init__.py": "def comfy_entrypoint():\n    return 42\n"})
    write_plugin(root, "c_bad_schema", {"__init__.py": py(header, """
        class Good(io.ComfyNode):
            @classmethod
            def define_schema(cls):
                return io.Schema(node_id="V3TestGoodButNotAlone", outputs=[io.Int.Output()])

            @classmethod
            def execute(cls):
                return io.NodeOutput(1)

        class Twice(io.ComfyNode):
            @classmethod
            def define_schema(cls):
                return io.Schema(node_id="V3TestTwice", inputs=[io.Int.Input("a"), io.Float.Input("a")])

            @classmethod
            def execute(cls, a):
                return io.NodeOutput()
        """, extension("Good", "Twice"))})
    write_plugin(root, "d_fine", {"__init__.py": py(header, """
        LOADED = []

        class One(io.ComfyNode):
            @classmethod
            def define_schema(cls):
                return io.Schema(node_id="V3TestOne", inputs=[io.Int.Input("v")], outputs=[io.Int.Output()])

            @classmethod
            def execute(cls, v):
                return io.NodeOutput(v)

        class _Extension(ComfyExtension):
            async def on_load(self):
                LOADED.append("on_load")

            async def get_node_list(self):
                return [One, "not a class"] if LOADED == ["on_load"] else []

        def comfy_entrypoint():                      # a plain function may return the extension too
            return _Extension()
        """)})
    write_plugin(root, "e_not_callable", {"__init__.py": "comfy_entrypoint = 3\n"})
    registry = build_registry(plugin_dirs=[root], builtins=False)
    report = registry.plugin_report  # type: ignore[attr-defined]
    failed = {r.name: r for r in report.failed}
    assert set(failed) == {"a_boom", "b_not_extension", "c_bad_schema", "e_not_callable"}
    assert failed["a_boom"].error == "RuntimeError: boom in entrypoint"
    assert "boom in entrypoint" in failed["a_boom"].traceback and failed["a_boom"].seconds >= 0
    assert failed["b_not_extension"].error.startswith("TypeError: comfy_entrypoint() returned int")
    assert failed["c_bad_schema"].error.startswith("ValueError: node V3TestTwice: Input ids must be unique")
    assert "V3TestGoodButNotAlone" not in registry                # a broken schema registers nothing
    assert failed["e_not_callable"].error == "comfy_entrypoint is not callable"
    assert [r.nodes for r in report.loaded] == [("V3TestOne",)]
    assert any("d_fine" in w and "'not a class' skipped" in w for w in report.warnings)
    assert sum("(IMPORT FAILED)" in line for line in report.timing_table().splitlines()) == 4


def test_prestartup_scripts_run_before_any_import(tmp_path: Path) -> None:
    root = tmp_path / "custom_nodes"
    log_file = tmp_path / "order.txt"
    note = f"def note(text):\n    open({str(log_file)!r}, 'a').write(text + chr(10))\n"
    write_plugin(root, "a_reader", {"__init__.py": py(note, """
        note("a_reader import")
        SEEN = open(__import__("pathlib").Path(__file__).parents[1] / "z_writer" / "written.txt").read()
        NODE_CLASS_MAPPINGS = {}
        """)})
    write_plugin(root, "b_broken", {"prestartup_script.py": py(note, """
        note("b_broken prestartup")
        raise ValueError("bad prestartup")
        """), "__init__.py": py(note, """
        note("b_broken import")
        NODE_CLASS_MAPPINGS = {}
        """)})
    write_plugin(root, "z_writer", {"prestartup_script.py": py(note, """
        import folder_paths                 # the compat modules are importable already
        from pathlib import Path
        note("z_writer prestartup")
        (Path(__file__).parent / "written.txt").write_text("written by prestartup")
        """), "__init__.py": py(note, "note('z_writer import')\nNODE_CLASS_MAPPINGS = {}\n")})
    report = load_plugins([root], Registry())
    assert log_file.read_text().splitlines() == ["b_broken prestartup", "z_writer prestartup", "a_reader import",
                                                 "b_broken import", "z_writer import"]
    assert sys.modules["custom_nodes.a_reader"].SEEN == "written by prestartup"
    assert [r.name for r in report.loaded] == ["a_reader", "b_broken", "z_writer"]   # b_broken still loads
    pre = {r.plugin: r for r in report.prestartup}
    assert set(pre) == {"b_broken", "z_writer"} and pre["z_writer"].ok
    assert pre["b_broken"].error == "ValueError: bad prestartup" and "bad prestartup" in pre["b_broken"].traceback
    assert pre["b_broken"].path == root / "b_broken" / "prestartup_script.py"
    assert any("b_broken" in w and "prestartup_script.py failed" in w for w in report.warnings)
    assert "(PRESTARTUP FAILED)" in report.prestartup_table()
    again = load_plugins([root], Registry())             # once per process, as ComfyUI runs them at start-up
    assert len(log_file.read_text().splitlines()) == 5 and len(again.prestartup) == 2


def test_v3_plugin_loads_while_this_thread_runs_an_event_loop(tmp_path: Path) -> None:
    write_plugin(tmp_path / "custom_nodes", "in_loop", {"__init__.py": BUILTIN_CLASH})

    async def serve() -> Any:
        return load_plugins([tmp_path / "custom_nodes"], Registry())

    report = asyncio.run(serve())
    assert report.results[0].ok and report.results[0].nodes == ("EmptyLatentImage", "V3TestFine")
