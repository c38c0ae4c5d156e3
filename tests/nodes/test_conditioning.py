"""nodes/builtin/conditioning.py on tiny seeded CLIP encoders."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from diffusion.demo.checkpoint import tiny_components
from diffusion.prompts.clip import CLIP
from graph.runtime import NodeRuntime, running
from nodes.builtin import conditioning as cn

torch.set_num_threads(2)


def _clip(family: str) -> CLIP:
    c = tiny_components(family, seed=2)
    return CLIP(c.text_encoders, c.family, "cpu", "cpu")


@pytest.fixture(scope="module")
def sd1() -> CLIP:
    return _clip("sd1")


@pytest.fixture(scope="module")
def sdxl() -> CLIP:
    return _clip("sdxl")


def _cond(value: float, tokens: int = 77, width: int = 8, pooled: float | None = None) -> list[list[Any]]:
    extras = {} if pooled is None else {"pooled_output": torch.full((1, 4), pooled)}
    return [[torch.full((1, tokens, width), value), extras]]


def test_node_api_matches_comfyui() -> None:
    order = {name: list(cls.INPUT_TYPES()["required"]) for name, cls in cn.NODE_CLASS_MAPPINGS.items()}
    assert order["CLIPTextEncode"] == ["text", "clip"]
    assert order["CLIPSetLastLayer"] == ["clip", "stop_at_clip_layer"]
    assert order["CLIPTextEncodeSDXL"] == ["clip", "width", "height", "crop_w", "crop_h", "target_width",
                                           "target_height", "text_g", "text_l"]
    assert order["ConditioningCombine"] == ["conditioning_1", "conditioning_2"]
    assert order["ConditioningAverage"] == ["conditioning_to", "conditioning_from", "conditioning_to_strength"]
    assert order["ConditioningConcat"] == ["conditioning_to", "conditioning_from"]
    assert order["ConditioningSetArea"] == ["conditioning", "width", "height", "x", "y", "strength"]
    assert order["ConditioningZeroOut"] == ["conditioning"]
    assert order["ConditioningSetTimestepRange"] == ["conditioning", "start", "end"]
    layer = cn.CLIPSetLastLayer.INPUT_TYPES()["required"]["stop_at_clip_layer"][1]
    assert (layer["default"], layer["min"], layer["max"]) == (-1, -24, -1)
    for name, cls in cn.NODE_CLASS_MAPPINGS.items():
        assert hasattr(cls, cls.FUNCTION) and name in cn.NODE_DISPLAY_NAME_MAPPINGS


def test_clip_text_encode_and_set_last_layer(sd1: CLIP) -> None:
    (cond,) = cn.CLIPTextEncode().encode(sd1, "a (red:1.2) fox")
    assert len(cond) == 1 and cond[0][0].shape == (1, 77, 32) and cond[0][1]["pooled_output"].shape == (1, 32)
    torch.testing.assert_close(cond[0][0], sd1.encode("a (red:1.2) fox")[0][0], rtol=0, atol=0)
    (skipped,) = cn.CLIPSetLastLayer().set_last_layer(sd1, -2)
    assert skipped is not sd1 and skipped.layer_idx == -2 and sd1.layer_idx is None
    (cond2,) = cn.CLIPTextEncode().encode(skipped, "a (red:1.2) fox")
    assert (cond2[0][0] - cond[0][0]).abs().max() > 1e-3
    with pytest.raises(RuntimeError, match="no text encoder"):
        cn.CLIPTextEncode().encode(None, "x")


def test_missing_embedding_becomes_a_warning_event(sd1: CLIP) -> None:
    events: list[tuple[str, dict]] = []
    with running(NodeRuntime(node_id="6", emit=lambda e, d: events.append((e, d)))):
        (cond,) = cn.CLIPTextEncode().encode(sd1, "embedding:nosuch fox")
    warnings = [d for e, d in events if e == "warning"]
    assert len(warnings) == 1 and "nosuch" in warnings[0]["message"] and warnings[0]["node"] == "6"
    torch.testing.assert_close(cond[0][0], sd1.encode("fox")[0][0], rtol=0, atol=0)


def test_clip_text_encode_sdxl(sdxl: CLIP) -> None:
    (cond,) = cn.CLIPTextEncodeSDXL().encode(sdxl, 1024, 768, 16, 8, 2048, 1536, "a castle", "oil painting")
    z, extras = cond[0]
    assert z.shape == (1, 77, 96) and extras["pooled_output"].shape == (1, 64)
    assert {k: extras[k] for k in ("width", "height", "crop_w", "crop_h", "target_width", "target_height")} == \
        {"width": 1024, "height": 768, "crop_w": 16, "crop_h": 8, "target_width": 2048, "target_height": 1536}
    # l channels from text_l, g channels (and pooled) from text_g
    torch.testing.assert_close(z[..., :32], sdxl.encode("oil painting")[0][0][..., :32], rtol=0, atol=0)
    same = sdxl.encode("a castle")[0]
    torch.testing.assert_close(z[..., 32:], same[0][..., 32:], rtol=0, atol=0)
    torch.testing.assert_close(extras["pooled_output"], same[1]["pooled_output"], rtol=0, atol=0)
    (long,) = cn.CLIPTextEncodeSDXL().encode(sdxl, 1024, 1024, 0, 0, 1024, 1024, "a castle", "tower " * 90)
    assert long[0][0].shape == (1, 154, 96)


def test_combine_keeps_both_lists_unchanged() -> None:
    a, b = _cond(1.0), _cond(2.0) + _cond(3.0)
    (out,) = cn.ConditioningCombine().combine(a, b)
    assert [float(c[0, 0, 0]) for c, _ in out] == [1.0, 2.0, 3.0]
    out[0][1]["x"] = 1
    assert "x" not in a[0][1]


def test_average_mixes_tokens_and_pooled() -> None:
    to, frm = _cond(1.0, pooled=1.0), _cond(3.0, tokens=154, pooled=5.0)
    (out,) = cn.ConditioningAverage().addWeighted(to, frm, 0.25)
    z, extras = out[0]
    assert z.shape == (1, 77, 8)                                        # cut to the `to` length
    torch.testing.assert_close(z, torch.full((1, 77, 8), 1.0 * 0.25 + 3.0 * 0.75))
    torch.testing.assert_close(extras["pooled_output"], torch.full((1, 4), 0.25 + 5.0 * 0.75))
    (padded,) = cn.ConditioningAverage().addWeighted(_cond(1.0, tokens=154), _cond(3.0), 0.5)
    assert float(padded[0][0][0, 0, 0]) == 2.0 and float(padded[0][0][0, 100, 0]) == 0.5   # zero-padded `from`
    (no_pool,) = cn.ConditioningAverage().addWeighted(_cond(1.0), _cond(3.0, pooled=5.0), 0.5)
    assert float(no_pool[0][1]["pooled_output"][0, 0]) == 5.0
    with pytest.raises(ValueError, match="width"):
        cn.ConditioningAverage().addWeighted(_cond(1.0), _cond(1.0, width=16), 0.5)


def test_concat_appends_tokens() -> None:
    (out,) = cn.ConditioningConcat().concat(_cond(1.0, pooled=1.0), _cond(2.0))
    z, extras = out[0]
    assert z.shape == (1, 154, 8) and float(z[0, 0, 0]) == 1.0 and float(z[0, 100, 0]) == 2.0
    assert float(extras["pooled_output"][0, 0]) == 1.0


def test_set_area_zero_out_and_timestep_range() -> None:
    src = _cond(1.0, pooled=2.0)
    (area,) = cn.ConditioningSetArea().append(src, 256, 128, 64, 32, 0.8)
    assert area[0][1]["area"] == (16, 32, 4, 8) and area[0][1]["strength"] == 0.8
    assert area[0][1]["set_area_to_bounds"] is False and "area" not in src[0][1]
    (zero,) = cn.ConditioningZeroOut().zero_out(src)
    assert torch.count_nonzero(zero[0][0]) == 0 and torch.count_nonzero(zero[0][1]["pooled_output"]) == 0
    assert zero[0][0].shape == src[0][0].shape and float(src[0][0][0, 0, 0]) == 1.0
    (ranged,) = cn.ConditioningSetTimestepRange().set_range(src, 0.2, 0.7)
    assert (ranged[0][1]["start_percent"], ranged[0][1]["end_percent"]) == (0.2, 0.7)
    assert "start_percent" not in src[0][1]


def test_nodes_validate_in_the_registry(tmp_path) -> None:
    """A graph using these nodes passes the engine's validation with ComfyUI input names."""
    from graph.executor import Executor
    from nodes.folders import ModelFolders, use_folders
    from nodes.registry import build_registry

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "m.safetensors").write_bytes(b"")
    with use_folders(ModelFolders(tmp_path)):
        reg = build_registry()
        for name in cn.NODE_CLASS_MAPPINGS:
            assert reg.get(name) is cn.NODE_CLASS_MAPPINGS[name]
        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
            "2": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": -2}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["2", 0]}},
            "4": {"class_type": "ConditioningSetTimestepRange", "inputs": {"conditioning": ["3", 0],
                                                                           "start": 0.0, "end": 0.5}},
        }
        report = Executor(reg).validate(prompt, targets=["4"])
        assert report.ok, report
        bad = dict(prompt)
        bad["2"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["1", 1], "stop_at_clip_layer": 0}}
        bad_report = Executor(reg).validate(bad, targets=["4"])
        assert not bad_report.ok and "2" in bad_report.node_errors
        assert "stop_at_clip_layer" in str(bad_report.node_errors["2"])
