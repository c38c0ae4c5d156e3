"""TAESD decoder files (both key layouts) and the preview choice of the sampler callback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffusion.images import taesd
from diffusion.images.latent_preview import make_previewer
from diffusion.models.errors import ModelFileError

C = 16          # channels of the test decoder (the real files have 64)
LEVELS = ((1, 3), (7, 3), (12, 3), (17, 1))   # original index of each level's conv and its block count


def original_layout(seed: int = 0, latent_channels: int = 4) -> dict[str, torch.Tensor]:
    """A decoder in the TAESD repository's nn.Sequential layout, keys written out by hand:
    0 Clamp, 1 conv, 2 ReLU, 3-5 blocks, 6 upsample, 7 conv (no bias), 8-10 blocks, 11 upsample,
    12 conv, 13-15 blocks, 16 upsample, 17 conv, 18 block, 19 RGB conv."""
    g = torch.Generator().manual_seed(seed)

    def conv(cout: int, cin: int) -> torch.Tensor:
        return torch.randn(cout, cin, 3, 3, generator=g) * (1.0 / (cin * 9) ** 0.5)

    sd = {"1.weight": conv(C, latent_channels), "1.bias": torch.randn(C, generator=g) * 0.1}
    idx = 3
    for level, (_, blocks) in enumerate(LEVELS):
        if level > 0:
            sd[f"{idx}.weight"] = conv(C, C)          # the bias-free conv after an upsample
            idx += 1
        for _ in range(blocks):
            for j in (0, 2, 4):
                sd[f"{idx}.conv.{j}.weight"] = conv(C, C)
                sd[f"{idx}.conv.{j}.bias"] = torch.randn(C, generator=g) * 0.1
            idx += 1
        if level < len(LEVELS) - 1:
            idx += 1                                  # the upsample
    sd[f"{idx}.weight"] = conv(3, C)
    sd[f"{idx}.bias"] = torch.randn(3, generator=g) * 0.1
    assert idx == 19 and "7.weight" in sd and "7.bias" not in sd
    return sd


def reference_decode(sd: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """The TAESD decoder written out with functional ops: [B, 4, h, w] -> [B, 3, 8h, 8w] in 0..1."""
    def conv(x: torch.Tensor, k: str) -> torch.Tensor:
        return F.conv2d(x, sd[f"{k}.weight"], sd.get(f"{k}.bias"), padding=1)

    def block(x: torch.Tensor, i: int) -> torch.Tensor:
        h = conv(F.relu(conv(F.relu(conv(x, f"{i}.conv.0")), f"{i}.conv.2")), f"{i}.conv.4")
        return F.relu(h + x)

    x = torch.tanh(z / 3) * 3
    x = F.relu(conv(x, "1"))
    for i in (3, 4, 5):
        x = block(x, i)
    for up_conv, blocks in ((7, (8, 9, 10)), (12, (13, 14, 15)), (17, (18,))):
        x = conv(F.interpolate(x, scale_factor=2, mode="nearest"), str(up_conv))
        for i in blocks:
            x = block(x, i)
    return conv(x, "19")


def test_original_layout_decodes_like_the_reference(tmp_path: Path) -> None:
    sd = original_layout()
    z = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    want = reference_decode(sd, z).clamp(0, 1)
    for name, write in (("taesd_decoder.safetensors", lambda p: save_file(sd, str(p))),
                        ("taesd_decoder.pth", lambda p: torch.save(sd, p))):
        path = tmp_path / name
        write(path)
        dec = taesd.load_decoder(path)
        with torch.no_grad():
            got = dec.layers(torch.tanh(z / 3) * 3).clamp(0, 1)
        assert got.shape == (1, 3, 48, 40)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        img = taesd.decode_preview(dec, z)
        assert img.size == (40, 48)
        assert torch.equal(torch.tensor(list(img.getdata()), dtype=torch.uint8).reshape(48, 40, 3),
                           (want[0].permute(1, 2, 0) * 255).round().to(torch.uint8))


def test_diffusers_layout_and_large_previews(tmp_path: Path) -> None:
    sd = original_layout(seed=2)
    dif = {f"decoder.layers.{int(k.split('.')[0]) - 1}.{k.split('.', 1)[1]}": v for k, v in sd.items()}
    save_file(dif, str(tmp_path / "taesdxl_decoder.safetensors"))
    path = taesd.find_decoder("sdxl", [tmp_path / "missing", tmp_path])
    assert path == tmp_path / "taesdxl_decoder.safetensors"
    assert taesd.find_decoder("sd1", [tmp_path]) is None
    z = torch.randn(2, 4, 96, 80, generator=torch.Generator().manual_seed(3))
    dec = taesd.load_decoder(path)
    # 768x640 would cost a full decode; on a CPU the latent is area-averaged 3x first (32x27 -> 256x216)
    assert taesd.decode_preview(dec, z).size == (216, 256)
    assert taesd.decode_preview(dec, z, max_side=512).size == (320, 384)     # 2x: 48x40 -> 384x320
    small = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():                             # under the cap: the latent is decoded as it is
        want = dec.layers(torch.tanh(small / 3) * 3)[0].clamp(0, 1)
    got = torch.tensor(list(taesd.decode_preview(dec, small).getdata()), dtype=torch.float32).reshape(64, 64, 3)
    assert (got - (want.permute(1, 2, 0) * 255).round()).abs().max() <= 0

    assert taesd.load_decoder(path) is taesd.load_decoder(path)   # read once per file version


def test_files_that_are_not_taesd_decoders_say_so(tmp_path: Path) -> None:
    bad = tmp_path / "taesd_decoder.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(bad))
    with pytest.raises(ModelFileError, match="not a TAESD decoder: unexpected key 'encoder.conv_in.weight'"):
        taesd.load_decoder(bad)
    sd = original_layout()
    sd["19.weight"] = torch.zeros(4, C, 3, 3)
    sd["19.bias"] = torch.zeros(4)
    save_file(sd, str(bad))
    with pytest.raises(ModelFileError, match=r"expected an RGB conv \[3, C, 3, 3\]"):
        taesd.load_decoder(bad)


def test_make_previewer_choices(tmp_path: Path) -> None:
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    assert make_previewer("none", "sd1", [tmp_path]) is None
    assert make_previewer("latent2rgb", "sd1", [tmp_path])(z).size == (8, 8)
    assert make_previewer("auto", "sd1", [tmp_path])(z).size == (8, 8)          # no file: projection
    save_file(original_layout(), str(tmp_path / "taesd_decoder.safetensors"))
    assert make_previewer("auto", "sd1", [tmp_path])(z).size == (64, 64)        # TAESD at 8x
    assert make_previewer("taesd", "sd2", [tmp_path])(z).size == (64, 64)
    assert make_previewer("latent2rgb", "sd1", [tmp_path])(z).size == (8, 8)
    assert make_previewer("auto", "sdxl", [tmp_path])(z).size == (8, 8)         # no taesdxl file
    warnings: list[tuple[str, dict]] = []
    (tmp_path / "taesdxl_decoder.safetensors").write_bytes(b"\x00" * 20)
    prev = make_previewer("auto", "sdxl", [tmp_path], lambda m, d: warnings.append((m, d)))
    assert prev(z).size == (8, 8)
    assert len(warnings) == 1 and "TAESD previews off" in warnings[0][0]
    assert warnings[0][1]["file"].endswith("taesdxl_decoder.safetensors")
