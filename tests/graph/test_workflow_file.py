"""Workflow files: API JSON, UI JSON, PNG metadata (tEXt, zTXt, iTXt), and the bad-file messages."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from graph.workflow_file import WorkflowFileError, load_workflow_file, read_png_text

DEFS = {
    "EmptyLatentImage": {"input": {"required": {"width": ["INT"], "height": ["INT"], "batch_size": ["INT"]}},
                         "input_order": {"required": ["width", "height", "batch_size"]}, "output": ["LATENT"]},
    "PreviewLatent": {"input": {"required": {"samples": ["LATENT"]}}, "input_order": {"required": ["samples"]},
                      "output": []},
}
API = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 32, "batch_size": 1}},
       "2": {"class_type": "PreviewLatent", "inputs": {"samples": ["1", 0]}}}


def ui_workflow(dangling: bool = False) -> dict[str, Any]:
    return {"version": 0.4, "last_node_id": 2, "last_link_id": 1, "groups": [], "config": {}, "extra": {},
            "nodes": [{"id": 1, "type": "EmptyLatentImage", "mode": 0, "widgets_values": [64, 32, 1],
                       "inputs": [], "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1]}]},
                      {"id": 2, "type": "PreviewLatent", "mode": 0,
                       "inputs": [{"name": "samples", "type": "LATENT", "link": 5 if dangling else 1}],
                       "outputs": []}],
            "links": [[1, 1, 0, 2, 0, "LATENT"]]}


def png_bytes(text: dict[str, str], zipped: bool = False) -> bytes:
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v, zip=zipped)
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 20, 30)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def test_api_json(tmp_path: Path) -> None:
    f = tmp_path / "w.json"
    f.write_text(json.dumps(API))
    src = load_workflow_file(f)
    assert src.kind == "api" and src.container == "json"
    assert src.api_prompt(DEFS) == API and src.extra_pnginfo == {}


def test_ui_json_is_converted_with_the_definitions(tmp_path: Path) -> None:
    f = tmp_path / "w.json"
    f.write_text(json.dumps(ui_workflow()))
    src = load_workflow_file(f)
    assert src.kind == "ui"
    got = src.api_prompt(DEFS)
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in got.items()} == API
    assert src.extra_pnginfo == {"workflow": ui_workflow()}


def test_prompt_request_body_is_accepted(tmp_path: Path) -> None:
    f = tmp_path / "body.json"
    f.write_text(json.dumps({"client_id": "x", "prompt": API,
                             "extra_data": {"extra_pnginfo": {"workflow": ui_workflow()}}}))
    src = load_workflow_file(f)
    assert src.kind == "api" and src.prompt == API and src.ui == ui_workflow()


def test_png_with_prompt_and_workflow_chunks(tmp_path: Path) -> None:
    for zipped in (False, True):
        f = tmp_path / f"img{zipped}.png"
        f.write_bytes(png_bytes({"prompt": json.dumps(API), "workflow": json.dumps(ui_workflow())}, zipped))
        src = load_workflow_file(f)
        assert src.container == "png" and src.kind == "api"
        assert src.prompt == API and src.ui == ui_workflow()


def test_png_with_only_a_workflow_chunk_converts_it(tmp_path: Path) -> None:
    f = tmp_path / "ui.png"
    f.write_bytes(png_bytes({"workflow": json.dumps(ui_workflow())}))
    src = load_workflow_file(f)
    assert src.kind == "ui"
    assert src.api_prompt(DEFS)["2"]["inputs"] == {"samples": ["1", 0]}


def test_png_text_chunk_kinds_and_unicode() -> None:
    text = {"parameters": "ein Fuchs, café, 狐狸\nSteps: 5", "plain": "abc"}
    chunks = read_png_text(png_bytes(text))           # non-latin text becomes iTXt
    assert chunks["parameters"] == text["parameters"] and chunks["plain"] == "abc"
    assert read_png_text(png_bytes(text, zipped=True)) == chunks


def test_a1111_png_is_reported_as_such(tmp_path: Path) -> None:
    f = tmp_path / "a1111.png"
    params = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    f.write_bytes(png_bytes({"parameters": params}))
    src = load_workflow_file(f)
    assert src.kind == "a1111" and src.parameters == params
    with pytest.raises(WorkflowFileError, match="AUTOMATIC1111 parameters"):
        src.api_prompt(DEFS)


def test_truncated_json_names_the_file_and_the_problem(tmp_path: Path) -> None:
    f = tmp_path / "cut.json"
    f.write_text(json.dumps(API)[:40])
    with pytest.raises(WorkflowFileError, match=r"cut\.json is not valid JSON: .*line 1 .*truncated"):
        load_workflow_file(f)


def test_ui_file_with_a_dangling_link(tmp_path: Path) -> None:
    f = tmp_path / "dangling.json"
    f.write_text(json.dumps(ui_workflow(dangling=True)))
    src = load_workflow_file(f)
    with pytest.raises(WorkflowFileError, match=r"dangling\.json: node 2 \(PreviewLatent\) input 'samples': "
                                                r"link 5 does not exist"):
        src.api_prompt(DEFS)


def test_png_without_metadata(tmp_path: Path) -> None:
    f = tmp_path / "plain.png"
    f.write_bytes(png_bytes({"Software": "paint"}))
    with pytest.raises(WorkflowFileError, match=r"plain\.png has no workflow metadata.*found: Software"):
        load_workflow_file(f)


def test_truncated_png_and_other_garbage(tmp_path: Path) -> None:
    data = png_bytes({"prompt": json.dumps(API)})
    f = tmp_path / "cut.png"
    f.write_bytes(data[:60])
    with pytest.raises(WorkflowFileError, match=r"cut\.png: PNG is truncated"):
        load_workflow_file(f)
    g = tmp_path / "list.json"
    g.write_text("[1, 2]")
    with pytest.raises(WorkflowFileError, match="neither an API-format workflow .* found list"):
        load_workflow_file(g)
    h = tmp_path / "nodes.json"
    h.write_text(json.dumps({"1": {"inputs": {}}}))
    with pytest.raises(WorkflowFileError, match="node '1' has no 'class_type'"):
        load_workflow_file(h)
    with pytest.raises(WorkflowFileError, match="cannot read workflow file"):
        load_workflow_file(tmp_path / "missing.json")
    e = tmp_path / "empty.json"
    e.write_text("  \n")
    with pytest.raises(WorkflowFileError, match="is empty"):
        load_workflow_file(e)


def exif_image(fmt: str, prompt: str | None = None, workflow: str | None = None,
               comment: bytes | None = None) -> bytes:
    exif = Image.Exif()
    if prompt is not None:
        exif[0x0110] = "prompt:" + prompt            # ComfyUI: IFD0 Model
    if workflow is not None:
        exif[0x010F] = "workflow:" + workflow        # ComfyUI: IFD0 Make
    if comment is not None:
        exif.get_ifd(0x8769)[0x9286] = comment      # A1111: Exif UserComment
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, fmt, exif=exif.tobytes())
    return buf.getvalue()


def test_webp_and_jpeg_with_comfyui_exif(tmp_path: Path) -> None:
    for fmt in ("WEBP", "JPEG"):
        f = tmp_path / f"img.{fmt.lower()}"
        f.write_bytes(exif_image(fmt, prompt=json.dumps(API), workflow=json.dumps(ui_workflow())))
        src = load_workflow_file(f)
        assert src.container == "exif" and src.kind == "api"
        assert src.prompt == API and src.ui == ui_workflow()


def test_a1111_jpeg_user_comment_in_either_byte_order(tmp_path: Path) -> None:
    text = "a fox, 狐\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 1, Size: 512x512"
    for encoding in ("utf-16-be", "utf-16-le"):
        f = tmp_path / f"a1111-{encoding}.jpg"
        f.write_bytes(exif_image("JPEG", comment=b"UNICODE\0" + text.encode(encoding)))
        src = load_workflow_file(f)
        assert src.kind == "a1111" and src.parameters == text
    bare = tmp_path / "bare.jpg"
    bare.write_bytes(exif_image("JPEG"))
    with pytest.raises(WorkflowFileError, match=r"bare\.jpg has no workflow metadata.*EXIF entry"):
        load_workflow_file(bare)
