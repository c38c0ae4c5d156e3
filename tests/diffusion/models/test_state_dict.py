"""diffusion/models/state_dict.py: safe reading of safetensors and torch files, clear errors for bad ones."""
from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import load_state_dict, open_state_dict, pickle_globals


def test_safetensors_tensors_and_metadata(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    save_file({"w": torch.arange(6.0).reshape(2, 3)}, str(p), metadata={"k": "v"})
    sd, meta = load_state_dict(p, with_metadata=True)
    assert torch.equal(sd["w"], torch.arange(6.0).reshape(2, 3))
    assert meta["k"] == "v"


def test_ckpt_unwraps_state_dict_and_drops_non_tensors(tmp_path: Path) -> None:
    p = tmp_path / "a.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3), "step": 4}, "global_step": 10, "epoch": 1}, p)
    assert list(load_state_dict(p)) == ["w"]
    q = tmp_path / "b.pt"
    torch.save({"only": {"x": torch.zeros(2)}}, q)            # a single key holding a dict: unwrapped
    assert list(load_state_dict(q)) == ["x"]


def test_legacy_lightning_checkpoint_object_is_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Original SD .ckpt files pickle pytorch_lightning's ModelCheckpoint callback; it must load
    # (as an inert stand-in) without pytorch_lightning installed.
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.setitem(sys.modules, name, mod if name == mod.__name__ else types.ModuleType(name))
    p = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "callbacks": {"cb": ModelCheckpoint()}}, p)
    monkeypatch.delitem(sys.modules, mod.__name__)
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in pickle_globals(p)
    assert list(load_state_dict(p)) == ["w"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "plain_pickle"])
def test_code_executing_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"w": torch.ones(2)}, "x": _Evil(marker)}
    if writer == "torch_zip":
        torch.save(payload, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ModelFileError) as err:
        load_state_dict(p)
    msg = str(err.value)
    assert "evil.ckpt" in msg and "refused" in msg and "system" in msg
    assert not marker.exists()


def test_truncated_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(p))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"cut\.safetensors.*truncated"):
        load_state_dict(p)


def test_truncated_ckpt(tmp_path: Path) -> None:
    p = tmp_path / "cut.ckpt"
    torch.save({"w": torch.randn(64, 64)}, p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(ModelFileError, match=r"cut\.ckpt.*not a torch checkpoint or truncated"):
        load_state_dict(p)


@pytest.mark.parametrize("name", ["noise.safetensors", "noise.ckpt", "noise.weird"])
def test_random_bytes(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelFileError) as err:
        load_state_dict(p)
    assert name in str(err.value) and "found 4096 bytes" in str(err.value)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nope\.safetensors.*file not found"):
        load_state_dict(tmp_path / "nope.safetensors")
    with pytest.raises(ModelFileError, match="not a file"):
        load_state_dict(tmp_path)


def test_file_without_tensors(tmp_path: Path) -> None:
    p = tmp_path / "empty.pt"
    torch.save({"a": 1, "b": "text"}, p)
    with pytest.raises(ModelFileError, match="no tensors"):
        load_state_dict(p)


def test_empty_and_text_files_say_what_they_are(tmp_path: Path) -> None:
    empty = tmp_path / "model.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"model\.safetensors.*empty \(0 bytes\)"):
        load_state_dict(empty)
    page = tmp_path / "lora.pt"
    page.write_text("<!DOCTYPE html><html><head><title>Sign in to download</title></head></html>")
    with pytest.raises(ModelFileError, match=r"lora\.pt.*a text file.*<!DOCTYPE html>.*failed download"):
        load_state_dict(page)


def test_the_content_decides_the_reader_not_the_extension(tmp_path: Path) -> None:
    st = tmp_path / "really_safetensors.ckpt"
    save_file({"w": torch.ones(2)}, str(st), metadata={"k": "v"})
    tensors, meta = load_state_dict(st, with_metadata=True)
    assert torch.equal(tensors["w"], torch.ones(2)) and meta == {"k": "v"}
    assert torch.equal(open_state_dict(st)["w"], torch.ones(2))
    pk = tmp_path / "really_pickle.safetensors"
    torch.save({"w": torch.zeros(3)}, pk)
    assert torch.equal(load_state_dict(pk)["w"], torch.zeros(3))
    assert torch.equal(open_state_dict(pk)["w"], torch.zeros(3))


def test_a_header_length_that_begins_like_a_pickle_is_still_safetensors(tmp_path: Path) -> None:
    # a 128-byte header: the file's first byte is 0x80, the pickle marker
    p = tmp_path / "t.safetensors"
    save_file({"k" * 68: torch.arange(2.0)}, str(p))
    assert p.read_bytes()[0] == 0x80
    assert torch.equal(load_state_dict(p)["k" * 68], torch.arange(2.0))
    assert torch.equal(open_state_dict(p)["k" * 68], torch.arange(2.0))
