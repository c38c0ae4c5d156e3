"""Per-format tests: a tiny SD1 model, a file of that format written here, the merged weight vs the
delta computed by hand from the formula (formats.md 2.3 / 2.5), and vs LyCORIS where it has one."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusion.demo.checkpoint import tiny_components
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.patches.lora.load import load_lora
from diffusion.patches.lora.weights import IA3, LoHa, LoKr, LoRA, dora_weight, fit_delta, lora_delta
from diffusion.patches.patcher import ModelPatcher

LIN = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"      # Linear [256, 32]
CONV = "down_blocks.1.resnets.0.conv1"                                      # Conv2d [64, 32, 3, 3]
TOL = 1e-6


def kohya(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def make_model(seed: int = 0, family: str = "sd1", inpaint: bool = False) -> ModelPatcher:
    c = tiny_components(family, seed=seed, inpaint=inpaint)
    return ModelPatcher(DiffusionModel(c.unet, c.family, "eps"), "cpu", "cpu")


def weight(mp: ModelPatcher, path: str) -> torch.Tensor:
    return dict(mp.model.named_parameters())["unet." + path + ".weight"].detach().clone()


def merged(mp: ModelPatcher, file: Path, strength: float, path: str) -> torch.Tensor:
    new, _, cov = load_lora(mp, None, file, strength)
    if cov.unmatched:
        raise AssertionError(f"unmatched keys: {cov.unmatched}")
    new.patch_model()
    try:
        return weight(new, path)
    finally:
        new.unpatch_model()


def r(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.fixture(scope="module")
def mp() -> ModelPatcher:
    return make_model()


def check(mp: ModelPatcher, tmp_path: Path, tensors: dict[str, torch.Tensor], path: str,
          expected_delta: torch.Tensor, strength: float = 0.7) -> None:
    f = tmp_path / "x.safetensors"
    save_file(tensors, str(f))
    w0 = weight(mp, path)
    got = merged(mp, f, strength, path)
    want = w0 + strength * expected_delta.reshape(w0.shape)
    assert (got - want).abs().max().item() <= TOL
    assert torch.equal(weight(mp, path), w0)         # unpatched again, bit-exact


def test_lora_linear_with_alpha(mp, tmp_path):
    up, down = r(256, 4, seed=1), r(4, 32, seed=2)
    k = kohya(LIN)
    check(mp, tmp_path, {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(2.0)},
          LIN, (2.0 / 4) * up @ down)


def test_lora_without_alpha_has_scale_one(mp, tmp_path):
    up, down = r(256, 4, seed=3), r(4, 32, seed=4)
    k = kohya(LIN)
    check(mp, tmp_path, {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down}, LIN, up @ down, strength=-1.3)


def test_locon_conv(mp, tmp_path):
    up, down = r(64, 4, 1, 1, seed=5), r(4, 32, 3, 3, seed=6)
    k = kohya(CONV)
    expected = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * (3.0 / 4)
    check(mp, tmp_path, {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(3.0)},
          CONV, expected)


def test_locon_tucker_mid(mp, tmp_path):
    up, mid, down = r(64, 4, 1, 1, seed=7), r(4, 4, 3, 3, seed=8), r(4, 32, 1, 1, seed=9)
    k = kohya(CONV)
    expected = torch.zeros(64, 32, 3, 3)
    for p in range(4):
        for q in range(4):
            expected += up[:, p, 0, 0][:, None, None, None] * mid[p, q][None, None] * down[q, :, 0, 0][None, :, None, None]
    expected *= 1.0 / 4
    check(mp, tmp_path, {f"{k}.lora_up.weight": up, f"{k}.lora_mid.weight": mid, f"{k}.lora_down.weight": down,
                         f"{k}.alpha": torch.tensor(1.0)}, CONV, expected)


def test_loha_linear(mp, tmp_path):
    a1, b1, a2, b2 = r(256, 4, seed=10), r(4, 32, seed=11), r(256, 4, seed=12), r(4, 32, seed=13)
    k = kohya(LIN)
    expected = (a1 @ b1) * (a2 @ b2) * (8.0 / 4)
    check(mp, tmp_path, {f"{k}.hada_w1_a": a1, f"{k}.hada_w1_b": b1, f"{k}.hada_w2_a": a2, f"{k}.hada_w2_b": b2,
                         f"{k}.alpha": torch.tensor(8.0)}, LIN, expected)


def test_loha_conv_tucker(mp, tmp_path):
    t1, t2 = r(4, 4, 3, 3, seed=14), r(4, 4, 3, 3, seed=15)
    a1, b1, a2, b2 = r(4, 64, seed=16), r(4, 32, seed=17), r(4, 64, seed=18), r(4, 32, seed=19)
    k = kohya(CONV)
    m1 = torch.einsum("pqyx,po,qi->oiyx", t1, a1, b1)
    m2 = torch.einsum("pqyx,po,qi->oiyx", t2, a2, b2)
    check(mp, tmp_path, {f"{k}.hada_t1": t1, f"{k}.hada_t2": t2, f"{k}.hada_w1_a": a1, f"{k}.hada_w1_b": b1,
                         f"{k}.hada_w2_a": a2, f"{k}.hada_w2_b": b2, f"{k}.alpha": torch.tensor(4.0)}, CONV, m1 * m2)


def test_lokr_full_w1_factored_w2(mp, tmp_path):
    w1 = r(8, 4, seed=20)                           # [a, c]; out = 8 * 32, in = 4 * 8
    w2a, w2b = r(32, 2, seed=21), r(2, 8, seed=22)
    k = kohya(LIN)
    expected = torch.kron(w1, w2a @ w2b) * (1.0 / 2)
    check(mp, tmp_path, {f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b, f"{k}.alpha": torch.tensor(1.0)},
          LIN, expected)


def test_lokr_unfactored_ignores_alpha(mp, tmp_path):
    w1, w2 = r(8, 4, seed=23), r(32, 8, seed=24)
    k = kohya(LIN)
    check(mp, tmp_path, {f"{k}.lokr_w1": w1, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(123.0)},
          LIN, torch.kron(w1, w2))


def test_lokr_conv_factored_w1_and_4d_w2(mp, tmp_path):
    w1a, w1b = r(4, 2, seed=25), r(2, 4, seed=26)     # w1 [4, 4]
    w2 = r(16, 8, 3, 3, seed=27)                       # out 4*16 = 64, in 4*8 = 32
    k = kohya(CONV)
    w1 = w1a @ w1b
    expected = torch.einsum("ac,bdyx->abcdyx", w1, w2).reshape(64, 32, 3, 3) * (1.0 / 2)
    check(mp, tmp_path, {f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_w2": w2, f"{k}.alpha": torch.tensor(1.0)},
          CONV, expected)


def test_lokr_conv_tucker_t2(mp, tmp_path):
    w1 = r(4, 4, seed=28)
    t2, w2a, w2b = r(2, 2, 3, 3, seed=29), r(2, 16, seed=30), r(2, 8, seed=31)
    k = kohya(CONV)
    w2 = torch.einsum("pqyx,pb,qd->bdyx", t2, w2a, w2b)
    expected = torch.einsum("ac,bdyx->abcdyx", w1, w2).reshape(64, 32, 3, 3) * (2.0 / 2)
    check(mp, tmp_path, {f"{k}.lokr_w1": w1, f"{k}.lokr_t2": t2, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b,
                         f"{k}.alpha": torch.tensor(2.0)}, CONV, expected)


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora(mp, tmp_path, axis):
    up, down = r(256, 4, seed=32), r(4, 32, seed=33)
    k = kohya(LIN)
    w0 = weight(mp, LIN)
    wp = w0 + (4.0 / 4) * up @ down
    if axis == "out":
        mag = wp.norm(dim=1, keepdim=True) * 1.1                            # [out, 1]
        wd = wp * mag / (wp.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    else:
        mag = wp.norm(dim=0, keepdim=True) * 0.9                            # [1, in]
        wd = wp * mag / (wp.norm(dim=0, keepdim=True) + torch.finfo(torch.float32).eps)
    check(mp, tmp_path, {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down, f"{k}.alpha": torch.tensor(4.0),
                         f"{k}.dora_scale": mag}, LIN, wd - w0, strength=0.6)


def test_lokr_both_factored_unequal_ranks_uses_w2_rank(mp, tmp_path):
    # formats.md 2.3: r = w2_b.shape[0] when w2 is factored (here 2, not w1's 3). LyCORIS'
    # functional rank_scale takes w1a.shape[1] first, so it would give 3/3; not compared to it here.
    w1a, w1b = r(8, 3, seed=90), r(3, 4, seed=91)
    w2a, w2b = r(32, 2, seed=92), r(2, 8, seed=93)
    k = kohya(LIN)
    expected = torch.kron(w1a @ w1b, w2a @ w2b) * (3.0 / 2)
    check(mp, tmp_path, {f"{k}.lokr_w1_a": w1a, f"{k}.lokr_w1_b": w1b, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b,
                         f"{k}.alpha": torch.tensor(3.0)}, LIN, expected)


def test_lokr_t2_scale_uses_w2_b_rank(mp, tmp_path):
    # formats.md 2.3: LoKr + Tucker has r = w2_b.shape[0] (2). LyCORIS' functional rank_scale reads
    # w2a.shape[1], which with t2 is b (16), not the rank; so this pins the formula by hand instead.
    w1 = r(4, 4, seed=94)
    t2, w2a, w2b = r(2, 2, 3, 3, seed=95), r(2, 16, seed=96), r(2, 8, seed=97)
    k = kohya(CONV)
    w2 = torch.einsum("pqyx,pb,qd->bdyx", t2, w2a, w2b)
    expected = torch.einsum("ac,bdyx->abcdyx", w1, w2).reshape(64, 32, 3, 3) * (3.0 / 2)
    check(mp, tmp_path, {f"{k}.lokr_w1": w1, f"{k}.lokr_t2": t2, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b,
                         f"{k}.alpha": torch.tensor(3.0)}, CONV, expected)


def test_dora_on_loha_output_axis(mp, tmp_path):
    a1, b1, a2, b2 = r(256, 4, seed=98), r(4, 32, seed=99), r(256, 4, seed=100), r(4, 32, seed=101)
    k = kohya(LIN)
    w0 = weight(mp, LIN)
    wp = w0 + (2.0 / 4) * (a1 @ b1) * (a2 @ b2)
    mag = wp.norm(dim=1, keepdim=True) * 1.3                                # [out, 1]
    wd = wp * mag / (wp.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    check(mp, tmp_path, {f"{k}.hada_w1_a": a1, f"{k}.hada_w1_b": b1, f"{k}.hada_w2_a": a2, f"{k}.hada_w2_b": b2,
                         f"{k}.alpha": torch.tensor(2.0), f"{k}.dora_scale": mag}, LIN, wd - w0, strength=0.8)


def test_dora_on_lokr_conv_input_axis(mp, tmp_path):
    w1, w2a, w2b = r(4, 4, seed=102), r(16, 2, seed=103), r(2, 8, 3, 3, seed=104)
    k = kohya(CONV)
    w0 = weight(mp, CONV)
    w2 = (w2a @ w2b.reshape(2, -1)).reshape(16, 8, 3, 3)
    wp = w0 + (1.0 / 2) * torch.einsum("ac,bdyx->abcdyx", w1, w2).reshape(64, 32, 3, 3)
    norm = wp.transpose(0, 1).reshape(32, -1).norm(dim=1).reshape(1, 32, 1, 1)   # over out and kernel axes
    mag = norm * 0.9                                                        # [1, in, 1, 1]
    wd = wp * mag / (norm + torch.finfo(torch.float32).eps)
    check(mp, tmp_path, {f"{k}.lokr_w1": w1, f"{k}.lokr_w2_a": w2a, f"{k}.lokr_w2_b": w2b,
                         f"{k}.alpha": torch.tensor(1.0), f"{k}.dora_scale": mag}, CONV, wd - w0, strength=0.6)


def test_full_diff_and_diff_b(mp, tmp_path):
    diff, diff_b = r(256, 32, seed=34), r(256, seed=35)
    k = kohya(LIN)
    f = tmp_path / "full.safetensors"
    save_file({f"{k}.diff": diff, f"{k}.diff_b": diff_b}, str(f))
    params = dict(mp.model.named_parameters())
    w0, b0 = weight(mp, LIN), params[f"unet.{LIN}.bias"].detach().clone()
    new, _, _ = load_lora(mp, None, f, 0.5)
    new.patch_model()
    assert (params[f"unet.{LIN}.weight"] - (w0 + 0.5 * diff)).abs().max() <= TOL
    assert (params[f"unet.{LIN}.bias"] - (b0 + 0.5 * diff_b)).abs().max() <= TOL
    new.unpatch_model()
    assert torch.equal(params[f"unet.{LIN}.bias"], b0)


def test_set_weight_ignores_strength(mp, tmp_path):
    value = r(256, 32, seed=36)
    k = kohya(LIN)
    w0 = weight(mp, LIN)
    check(mp, tmp_path, {f"{k}.set_weight": value}, LIN, (value - w0) / 0.3, strength=0.3)


@pytest.mark.parametrize("on_input", [False, True])
def test_ia3(mp, tmp_path, on_input):
    w = r(32 if on_input else 256, seed=37)
    k = kohya(LIN)
    w0 = weight(mp, LIN)
    expected = w0 * (w[None, :] if on_input else w[:, None])
    check(mp, tmp_path, {f"{k}.weight": w, f"{k}.on_input": torch.tensor(on_input)}, LIN, expected)


def test_peft_names_with_alpha_and_magnitude(mp, tmp_path):
    a, b = r(4, 32, seed=38), r(256, 4, seed=39)
    w0 = weight(mp, LIN)
    wp = w0 + (8.0 / 4) * b @ a
    mag = wp.norm(dim=1) * 1.05                                              # PEFT: [out]
    wd = wp * (mag / (wp.norm(dim=1) + torch.finfo(torch.float32).eps))[:, None]
    check(mp, tmp_path, {f"unet.{LIN}.lora_A.weight": a, f"unet.{LIN}.lora_B.weight": b,
                         f"unet.{LIN}.alpha": torch.tensor(8.0), f"unet.{LIN}.lora_magnitude_vector": mag},
          LIN, wd - w0, strength=1.0)


def test_inpaint_conv_in_is_zero_padded(tmp_path):
    mpi = make_model(inpaint=True)
    up, down = r(32, 4, 1, 1, seed=40), r(4, 4, 3, 3, seed=41)            # trained on 4 input channels
    k = kohya("conv_in")
    expected = torch.zeros(32, 9, 3, 3)
    expected[:, :4] = (up[:, :, 0, 0] @ down.reshape(4, -1)).reshape(32, 4, 3, 3)
    check(mpi, tmp_path, {f"{k}.lora_up.weight": up, f"{k}.lora_down.weight": down}, "conv_in", expected)


def test_fit_delta_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="does not fit"):
        fit_delta(torch.zeros(3, 5), (4, 4))


# ---------------------------------------------------------------------------------------- LyCORIS


def test_against_lycoris_locon_loha_lokr_dora():
    locon = pytest.importorskip("lycoris.functional.locon")
    loha = pytest.importorskip("lycoris.functional.loha")
    lokr = pytest.importorskip("lycoris.functional.lokr")
    general = pytest.importorskip("lycoris.functional.general")
    w = torch.zeros(64, 32, 3, 3)
    # LoCon conv, plain and Tucker
    up, down = r(64, 4, 1, 1, seed=50), r(4, 32, 3, 3, seed=51)
    ours = LoRA(up=up, down=down, alpha=2.0).delta(w)
    ref = locon.diff_weight(down, up, None, gamma=0.5, backend="torch")
    assert (ours - ref).abs().max() <= TOL
    mid, down1 = r(4, 4, 3, 3, seed=52), r(4, 32, 1, 1, seed=53)
    ours = LoRA(up=up, down=down1, mid=mid, alpha=4.0).delta(w)
    ref = locon.diff_weight(down1, up, mid, gamma=1.0, backend="torch")
    assert (ours - ref).abs().max() <= TOL
    # LoHa linear (LyCORIS: w1u = hada_w1_a, w1d = hada_w1_b) and Tucker
    wl = torch.zeros(256, 32)
    a1, b1, a2, b2 = r(256, 4, seed=54), r(4, 32, seed=55), r(256, 4, seed=56), r(4, 32, seed=57)
    ours = LoHa(a1, b1, a2, b2, alpha=2.0).delta(wl)
    ref = loha.diff_weight(b1, a1, b2, a2, None, None, gamma=0.5, backend="torch")
    assert (ours - ref.reshape(wl.shape)).abs().max() <= TOL
    t1, t2 = r(4, 4, 3, 3, seed=58), r(4, 4, 3, 3, seed=59)
    ta1, tb1, ta2, tb2 = r(4, 64, seed=60), r(4, 32, seed=61), r(4, 64, seed=62), r(4, 32, seed=63)
    ours = LoHa(ta1, tb1, ta2, tb2, t1, t2, alpha=4.0).delta(w)
    ref = loha.diff_weight(tb1, ta1, tb2, ta2, t1, t2, gamma=1.0, backend="torch")
    assert (ours - ref).abs().max() <= TOL
    # LoKr factored w2 (LyCORIS scale = gamma / rank)
    w1, w2a, w2b = r(8, 4, seed=64), r(32, 2, seed=65), r(2, 8, seed=66)
    ours = LoKr(w1=w1, w2_a=w2a, w2_b=w2b, alpha=1.0).delta(wl)
    ref = lokr.diff_weight(w1, None, None, None, w2a, w2b, None, gamma=1.0, backend="torch")
    assert (ours - ref.reshape(wl.shape)).abs().max() <= TOL
    # DoRA on the output axis: W_d of LyCORIS' weight_decompose at multiplier 1
    w0 = r(256, 32, seed=67)
    sd = lora_delta(r(256, 4, seed=68), r(4, 32, seed=69))
    mag = (w0 + sd).norm(dim=1, keepdim=True) * 1.2
    ours = dora_weight(w0, sd, mag)
    ref = general.weight_decompose(w0 + sd, mag, 1, wd_on_out=True, backend="torch")
    assert (ours - ref).abs().max() <= TOL


def test_against_lycoris_lokr_layouts():
    lokr = pytest.importorskip("lycoris.functional.lokr")
    wl, wc = torch.zeros(256, 32), torch.zeros(64, 32, 3, 3)
    # factored w1, full w2 (both: s = alpha / w1_b.shape[0]; LyCORIS gamma = alpha)
    w1a, w1b, w2 = r(8, 2, seed=110), r(2, 4, seed=111), r(32, 8, seed=112)
    ours = LoKr(w1_a=w1a, w1_b=w1b, w2=w2, alpha=3.0).delta(wl)
    ref = lokr.diff_weight(None, w1a, w1b, w2, None, None, None, gamma=3.0, backend="torch")
    assert (ours - ref.reshape(wl.shape)).abs().max() <= TOL
    # both full: s = 1 whatever alpha says (LyCORIS: rank = gamma)
    w1 = r(8, 4, seed=113)
    ours = LoKr(w1=w1, w2=w2, alpha=5.0).delta(wl)
    ref = lokr.diff_weight(w1, None, None, w2, None, None, None, gamma=5.0, backend="torch")
    assert (ours - ref.reshape(wl.shape)).abs().max() <= TOL
    # conv, full w1 [4, 4], factored 4-D w2 ([16, 2] @ [2, 8, 3, 3])
    c1, c2a, c2b = r(4, 4, seed=114), r(16, 2, seed=115), r(2, 8, 3, 3, seed=116)
    ours = LoKr(w1=c1, w2_a=c2a, w2_b=c2b, alpha=3.0).delta(wc)
    ref = lokr.diff_weight(c1, None, None, None, c2a, c2b, None, gamma=3.0, backend="torch")
    assert (ours - ref).abs().max() <= TOL
    # both factored with equal ranks (unequal ranks: see test_lokr_both_factored_unequal_ranks_uses_w2_rank)
    v2a, v2b = r(32, 2, seed=117), r(2, 8, seed=118)
    ours = LoKr(w1_a=w1a, w1_b=w1b, w2_a=v2a, w2_b=v2b, alpha=3.0).delta(wl)
    ref = lokr.diff_weight(None, w1a, w1b, None, v2a, v2b, None, gamma=3.0, backend="torch")
    assert (ours - ref.reshape(wl.shape)).abs().max() <= TOL


@pytest.mark.parametrize("conv", [False, True])
def test_against_lycoris_dora_input_axis(conv):
    general = pytest.importorskip("lycoris.functional.general")
    shape = (64, 32, 3, 3) if conv else (256, 32)
    w0 = r(*shape, seed=120)
    up = r(shape[0], 4, *([1, 1] if conv else []), seed=121)
    down = r(4, *shape[1:], seed=122)
    ad = LoRA(up=up, down=down, alpha=2.0)
    wp = w0 + ad.delta(w0)
    norm = wp.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
    mag = (norm * 1.1).reshape(1, shape[1], *([1, 1] if conv else []))   # [1, in(, 1, 1)]: input axis
    ours = w0 + LoRA(up=up, down=down, alpha=2.0, dora_scale=mag).delta(w0)
    ref = general.weight_decompose(wp, mag, 1, wd_on_out=False, backend="torch")
    assert (ours - ref).abs().max() <= TOL


def test_against_lycoris_full_diff(mp, tmp_path):
    general = pytest.importorskip("lycoris.functional.general")
    diff, diff_b = r(256, 32, seed=123), r(256, seed=124)
    k = kohya(LIN)
    f = tmp_path / "full.safetensors"
    save_file({f"{k}.diff": diff, f"{k}.diff_b": diff_b}, str(f))
    params = dict(mp.model.named_parameters())
    w0, b0 = weight(mp, LIN), params[f"unet.{LIN}.bias"].detach().clone()
    new, _, _ = load_lora(mp, None, f, 0.7)
    new.patch_model()
    try:      # LyCORIS FullModule.make_weight merges weight and bias with add_scaled(org, diff, scale)
        assert (params[f"unet.{LIN}.weight"] - general.add_scaled(w0, diff, 0.7, backend="torch")).abs().max() <= TOL
        assert (params[f"unet.{LIN}.bias"] - general.add_scaled(b0, diff_b, 0.7, backend="torch")).abs().max() <= TOL
    finally:
        new.unpatch_model()


def test_ia3_record_is_weight_dependent():
    assert IA3(torch.ones(3)).weight_dependent
    assert not LoRA(up=torch.ones(2, 1), down=torch.ones(1, 2)).weight_dependent


def test_norm_w_norm_and_b_norm(mp, tmp_path):
    norm = "down_blocks.0.attentions.0.norm"                                # GroupNorm [32]
    wn, bn = r(32, seed=70), r(32, seed=71)
    params = dict(mp.model.named_parameters())
    w0, b0 = params[f"unet.{norm}.weight"].detach().clone(), params[f"unet.{norm}.bias"].detach().clone()
    f = tmp_path / "norm.safetensors"
    save_file({f"{kohya(norm)}.w_norm": wn, f"{kohya(norm)}.b_norm": bn}, str(f))
    new, _, cov = load_lora(mp, None, f, 2.0)
    assert cov.unmatched == ()
    new.patch_model()
    assert (params[f"unet.{norm}.weight"] - (w0 + 2.0 * wn)).abs().max() <= TOL
    assert (params[f"unet.{norm}.bias"] - (b0 + 2.0 * bn)).abs().max() <= TOL
    new.unpatch_model()
    assert torch.equal(params[f"unet.{norm}.weight"], w0)


def test_unsupported_types_are_reported_not_dropped(mp, tmp_path):
    k = kohya(LIN)
    f = tmp_path / "glora.safetensors"
    save_file({f"{k}.a1.weight": r(32, 2, seed=72), f"{k}.a2.weight": r(2, 32, seed=73),
               f"{k}.b1.weight": r(256, 2, seed=74), f"{k}.b2.weight": r(2, 32, seed=75),
               f"{kohya(CONV)}.lora_up.weight": r(64, 2, 1, 1, seed=76),
               f"{kohya(CONV)}.lora_down.weight": r(2, 32, 3, 3, seed=77)}, str(f))
    _, _, cov = load_lora(mp, None, f, 1.0)
    assert cov.matched_keys == 2
    assert {reason for _, reason in cov.unmatched} == {"GLoRA modules are not supported"}
