"""A1111 hypernetworks: every activation with and without LayerNorm against a hand-computed
`x + strength * MLP(x)`, the file options and their A1111 defaults, dropout off at inference,
strength 0 as exact identity, chaining, and the k/v context of a real attention layer."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffusion.demo.checkpoint import tiny_components
from diffusion.demo.extras import hypernetwork_file, write_hypernetwork
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.models.errors import ModelFileError
from diffusion.patches.hypernetwork import (
    ACTIVATIONS,
    HypernetworkHook,
    add_hypernetwork,
    apply_hypernetwork,
    dropout_structure_for,
    load_hypernetwork,
)
from diffusion.patches.patcher import ModelPatcher

torch.set_num_threads(2)

# hand-written formulas, independent of torch.nn modules
HAND = {
    None: lambda x: x,
    "linear": lambda x: x,
    "relu": lambda x: x.clamp(min=0),
    "leakyrelu": lambda x: torch.where(x > 0, x, 0.01 * x),
    "elu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "swish": lambda x: x * (x + 3).clamp(0, 6) / 6,                 # A1111: Hardswish, not SiLU
    "tanh": lambda x: (torch.exp(2 * x) - 1) / (torch.exp(2 * x) + 1),
    "sigmoid": lambda x: 1 / (1 + torch.exp(-x)),
    "mish": lambda x: x * torch.tanh(torch.log1p(torch.exp(x))),
    "softsign": lambda x: x / (1 + x.abs()),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "selu": lambda x: 1.0507009873554805 * torch.where(x > 0, x, 1.6732632423543772 * (torch.exp(x) - 1)),
    "celu": lambda x: torch.where(x > 0, x, torch.exp(x) - 1),
    "softplus": lambda x: torch.log1p(torch.exp(x)),
    "hardtanh": lambda x: x.clamp(-1, 1),
    "relu6": lambda x: x.clamp(0, 6),
    "hardsigmoid": lambda x: ((x + 3) / 6).clamp(0, 1),
    "logsigmoid": lambda x: -torch.log1p(torch.exp(-x)),
    "tanhshrink": lambda x: x - torch.tanh(x),
}


def hand_mlp(sd: dict[str, torch.Tensor], x: torch.Tensor, act: str | None, layer_norm: bool,
             activate_output: bool, n_linear: int) -> torch.Tensor:
    """MLP(x) from the raw A1111-numbered tensors: walk linear.{j} in index order."""
    idx = sorted({int(k.split(".")[1]) for k in sd})
    j = 0
    for n in range(n_linear):
        w, b = sd[f"linear.{idx[j]}.weight"], sd[f"linear.{idx[j]}.bias"]
        x = x @ w.T + b
        j += 1
        if not (n == n_linear - 1 and not activate_output):
            x = HAND[act](x)
        if layer_norm:
            g, beta = sd[f"linear.{idx[j]}.weight"], sd[f"linear.{idx[j]}.bias"]
            mu = x.mean(-1, keepdim=True)
            var = ((x - mu) ** 2).mean(-1, keepdim=True)
            x = (x - mu) / torch.sqrt(var + 1e-5) * g + beta
            j += 1
    return x


def context(width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, width, generator=torch.Generator().manual_seed(seed)) * 2   # [B, T, D]


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layernorm"])
@pytest.mark.parametrize("act", sorted(HAND, key=str), ids=str)
def test_each_activation_matches_hand_formula(tmp_path: Path, act: str | None, layer_norm: bool) -> None:
    ls = (1, 2, 1.5, 1)
    data = hypernetwork_file([8], seed=3, layer_structure=ls, activation_func=act, is_layer_norm=layer_norm,
                             scale=0.4)
    torch.save(data, tmp_path / "h.pt")
    hook = HypernetworkHook(load_hypernetwork(tmp_path / "h.pt"), strength=0.7)
    x = context(8)
    got_k, got_v = hook(x, x + 1)
    sd_k, sd_v = data[8]
    want_k = x + 0.7 * hand_mlp(sd_k, x, act, layer_norm, True, len(ls) - 1)
    want_v = (x + 1) + 0.7 * hand_mlp(sd_v, x + 1, act, layer_norm, True, len(ls) - 1)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_v, want_v, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_k, x)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_activate_output_false_skips_the_last_activation(tmp_path: Path, layer_norm: bool) -> None:
    data = hypernetwork_file([8], seed=4, activation_func="tanh", is_layer_norm=layer_norm,
                             activate_output=False, scale=0.5)
    torch.save(data, tmp_path / "h.pt")
    hook = HypernetworkHook(load_hypernetwork(tmp_path / "h.pt"), 1.0)
    x = context(8, 1)
    got, _ = hook(x, x)
    torch.testing.assert_close(got, x + hand_mlp(data[8][0], x, "tanh", layer_norm, False, 2), rtol=1e-5, atol=1e-5)


def test_activate_output_defaults_to_true_as_a1111(tmp_path: Path) -> None:
    data = hypernetwork_file([8], seed=5, activation_func="relu", scale=0.5)
    del data["activate_output"]                                 # ComfyUI would default to False
    torch.save(data, tmp_path / "h.pt")
    hn = load_hypernetwork(tmp_path / "h.pt")
    assert hn.config.activate_output is True
    x = context(8, 2)
    got, _ = HypernetworkHook(hn, 1.0)(x, x)
    torch.testing.assert_close(got, x + hand_mlp(data[8][0], x, "relu", False, True, 2), rtol=1e-5, atol=1e-5)


def test_layer_norm_index_gap_overrides_a_wrong_flag(tmp_path: Path) -> None:
    # written with activate_output=False (LayerNorm right after the last Linear), flag says True
    data = hypernetwork_file([8], seed=6, activation_func="sigmoid", is_layer_norm=True, activate_output=False)
    data["activate_output"] = True
    torch.save(data, tmp_path / "h.pt")
    x = context(8, 3)
    got, _ = HypernetworkHook(load_hypernetwork(tmp_path / "h.pt"), 1.0)(x, x)
    torch.testing.assert_close(got, x + hand_mlp(data[8][0], x, "sigmoid", True, False, 2), rtol=1e-5, atol=1e-5)


def test_prelu_carries_its_weight(tmp_path: Path) -> None:
    data = hypernetwork_file([8], seed=7, activation_func="prelu", scale=0.5)
    torch.save(data, tmp_path / "h.pt")
    sd = data[8][0]
    a1, a2 = sd["linear.1.weight"].item(), sd["linear.3.weight"].item()
    x = context(8, 4)
    h = x @ sd["linear.0.weight"].T + sd["linear.0.bias"]
    h = torch.where(h > 0, h, a1 * h)
    h = h @ sd["linear.2.weight"].T + sd["linear.2.bias"]
    h = torch.where(h > 0, h, a2 * h)
    got, _ = HypernetworkHook(load_hypernetwork(tmp_path / "h.pt"), 0.5)(x, x)
    torch.testing.assert_close(got, x + 0.5 * h, rtol=1e-5, atol=1e-5)


def test_dropout_is_off_at_inference(tmp_path: Path) -> None:
    data = hypernetwork_file([8], seed=8, layer_structure=(1, 2, 2, 1), activation_func="relu",
                             use_dropout=True, dropout_structure=(0, 0.3, 0.3, 0), scale=0.5)
    torch.save(data, tmp_path / "h.pt")
    hn = load_hypernetwork(tmp_path / "h.pt")
    assert hn.config.use_dropout and hn.config.dropout_structure == (0, 0.3, 0.3, 0)
    hook = HypernetworkHook(hn, 1.0)
    x = context(8, 5)
    first, _ = hook(x, x)
    second, _ = hook(x, x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, x + hand_mlp(data[8][0], x, "relu", False, True, 3), rtol=1e-5, atol=1e-5)


def test_derived_dropout_structure() -> None:
    assert dropout_structure_for((1, 2, 1), False, False) == (0, 0, 0)
    assert dropout_structure_for((1, 2, 2, 1), True, False) == (0, 0.3, 0, 0)
    assert dropout_structure_for((1, 2, 2, 1), True, True) == (0, 0.3, 0.3, 0)


def test_oldest_files_linear1_linear2_and_no_options(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(9)
    sd = {"linear1.weight": torch.randn(16, 8, generator=g), "linear1.bias": torch.randn(16, generator=g),
          "linear2.weight": torch.randn(8, 16, generator=g), "linear2.bias": torch.randn(8, generator=g)}
    torch.save({8: (sd, sd)}, tmp_path / "old.pt")
    hn = load_hypernetwork(tmp_path / "old.pt")
    assert hn.config.layer_structure == (1, 2, 1) and hn.config.activation_func is None
    x = context(8, 6)
    got, _ = HypernetworkHook(hn, 1.0)(x, x)
    want = x + ((x @ sd["linear1.weight"].T + sd["linear1.bias"]) @ sd["linear2.weight"].T + sd["linear2.bias"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_strength_zero_is_exact_identity_and_uncovered_widths_pass(tmp_path: Path) -> None:
    write_hypernetwork(tmp_path / "h.pt", [8])
    hn = load_hypernetwork(tmp_path / "h.pt")
    x, y = context(8), context(8, 1)
    k, v = HypernetworkHook(hn, 0.0)(x, y)
    assert k is x and v is y
    z = context(12)
    k, v = HypernetworkHook(hn, 1.0)(z, z)                  # width 12 not in the file
    assert k is z and v is z


def test_hypernetworks_chain(tmp_path: Path) -> None:
    write_hypernetwork(tmp_path / "a.pt", [8], seed=1, activation_func="elu")
    write_hypernetwork(tmp_path / "b.pt", [8], seed=2, activation_func="softsign")
    a, b = HypernetworkHook(load_hypernetwork(tmp_path / "a.pt"), 0.6), HypernetworkHook(load_hypernetwork(tmp_path / "b.pt"), 1.3)
    x = context(8)
    ak, av = a(x, x)
    want = b(ak, av)
    patcher = ModelPatcher(torch.nn.Linear(1, 1))
    patcher = apply_hypernetwork(apply_hypernetwork(patcher, a.hypernetwork, 0.6), b.hypernetwork, 1.3)
    hooks = patcher.model_options["attn2_kv"]
    assert [h.strength for h in hooks] == [0.6, 1.3] and patcher.model_options["attn1_kv"] == hooks
    k, v = x, x
    for h in hooks:
        k, v = h(k, v)
    torch.testing.assert_close(k, want[0], rtol=0, atol=0)
    torch.testing.assert_close(v, want[1], rtol=0, atol=0)


@pytest.mark.parametrize("data, message", [
    ({8: ({}, {}), "activation_func": "wiggle"}, "unknown activation_func 'wiggle'"),
    ({"layer_structure": [1, 2, 1]}, "no hypernetwork layers"),
    ({8: "nope"}, "must be a pair"),
    ({"layer_structure": [2, 1]}, "start and end with 1"),
])
def test_bad_files_name_the_problem(tmp_path: Path, data: dict, message: str) -> None:
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=message) as err:
        load_hypernetwork(tmp_path / "bad.pt")
    assert "bad.pt" in str(err.value)


def test_empty_text_and_safetensors_files_say_what_they_are(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"empty\.pt.*empty \(0 bytes\)"):
        load_hypernetwork(tmp_path / "empty.pt")
    (tmp_path / "page.pt").write_text("Access denied. Please log in to download this file.")
    with pytest.raises(ModelFileError, match=r"page\.pt.*a text file"):
        load_hypernetwork(tmp_path / "page.pt")
    from safetensors.torch import save_file
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, str(tmp_path / "lora.pt"))
    with pytest.raises(ModelFileError, match=r"lora\.pt.*a safetensors file.*hypernetworks are torch \.pt"):
        load_hypernetwork(tmp_path / "lora.pt")


def test_shape_mismatch_names_the_layer(tmp_path: Path) -> None:
    data = hypernetwork_file([8], seed=1)
    data[8][0]["linear.0.weight"] = torch.zeros(16, 9)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=r"width 8 k: linear.0 has weight \(16, 9\)"):
        load_hypernetwork(tmp_path / "bad.pt")


def test_all_a1111_activation_names_known() -> None:
    for name in ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "mish", "softsign",
                 "gelu", "silu", "selu", "celu", "softplus", "hardtanh", "relu6", "hardsigmoid", "prelu"):
        assert name in ACTIVATIONS
    assert ACTIVATIONS["swish"] is torch.nn.Hardswish


# --- inside the UNet's cross-attention ---------------------------------------------------------

def test_attention_key_value_context_in_the_unet(tmp_path: Path) -> None:
    c = tiny_components("sd1", seed=2)
    model = ModelPatcher(DiffusionModel(c.unet, c.family, "eps", torch.linspace(0.99, 0.01, 1000)), "cpu", "cpu")
    data = hypernetwork_file([32], seed=11, activation_func="swish", is_layer_norm=True, scale=0.3)
    torch.save(data, tmp_path / "h.pt")
    hn = load_hypernetwork(tmp_path / "h.pt")
    patched = apply_hypernetwork(model, hn, 0.8)
    assert "attn2_kv" not in model.model_options                # the input patcher is untouched
    attn = dict(c.unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn2"]
    seen: dict[str, torch.Tensor] = {}
    hk = attn.to_k.register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0].detach().clone()))
    hv = attn.to_v.register_forward_pre_hook(lambda m, a: seen.__setitem__("v", a[0].detach().clone()))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = context(32)[:1]
    t = torch.tensor([500.0])
    try:
        unet = patched.patch_model()
        with torch.no_grad():
            out_h = unet.apply_model(x, t, ctx)
        k_in, v_in = seen["k"], seen["v"]
        patched.unpatch_model()
        with torch.no_grad():
            out_0 = model.patch_model().apply_model(x, t, ctx)
            out_00 = apply_hypernetwork(model, hn, 0.0).patch_model().apply_model(x, t, ctx)
    finally:
        hk.remove()
        hv.remove()
    sd_k, sd_v = data[32]
    torch.testing.assert_close(k_in, ctx + 0.8 * hand_mlp(sd_k, ctx, "swish", True, True, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_in, ctx + 0.8 * hand_mlp(sd_v, ctx, "swish", True, True, 2), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_h, out_0)
    assert torch.equal(out_0, out_00)                            # strength 0: bit-identical
    # a hook installed at strength 0 is an exact identity too
    zero = model.clone()
    add_hypernetwork(zero, hn, 0.0)
    with torch.no_grad():
        out_z = zero.patch_model().apply_model(x, t, ctx)
    zero.unpatch_model()
    assert torch.equal(out_z, out_0)


def test_other_dtype_uses_a_cast_copy(tmp_path: Path) -> None:
    data = hypernetwork_file([8], seed=12, activation_func="mish", is_layer_norm=True, scale=0.4)
    torch.save(data, tmp_path / "h.pt")
    hn = load_hypernetwork(tmp_path / "h.pt")
    x = context(8, 7).double()
    got, _ = hn.hook(0.9)(x, x)
    assert got.dtype == torch.float64 and hn.hook(0.9) is hn.hook(0.9)
    want = x + 0.9 * hand_mlp({k: v.double() for k, v in data[8][0].items()}, x, "mish", True, True, 2)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert hn.modules[8][0].net[0].weight.dtype == torch.float32      # the original stays fp32


def test_self_attention_context_in_the_unet(tmp_path: Path) -> None:
    c = tiny_components("sd1", seed=2)
    model = ModelPatcher(DiffusionModel(c.unet, c.family, "eps", torch.linspace(0.99, 0.01, 1000)), "cpu", "cpu")
    data = hypernetwork_file([64], seed=13, activation_func="relu", scale=0.3)    # mid-block self-attention width
    torch.save(data, tmp_path / "h.pt")
    patched = apply_hypernetwork(model, load_hypernetwork(tmp_path / "h.pt"), 1.0)
    attn = dict(c.unet.named_modules())["mid_block.attentions.0.transformer_blocks.0.attn1"]
    seen: dict[str, torch.Tensor] = {}
    hq = attn.to_q.register_forward_pre_hook(lambda m, a: seen.__setitem__("q", a[0].detach().clone()))
    hk = attn.to_k.register_forward_pre_hook(lambda m, a: seen.__setitem__("k", a[0].detach().clone()))
    try:
        with torch.no_grad():
            patched.patch_model().apply_model(torch.randn(1, 4, 8, 8), torch.tensor([500.0]), context(32)[:1])
    finally:
        hq.remove()
        hk.remove()
        patched.unpatch_model()
    hidden = seen["q"]                                   # the normed hidden state feeds q, k and v
    torch.testing.assert_close(seen["k"], hidden + hand_mlp(data[64][0], hidden, "relu", False, True, 2),
                               rtol=1e-5, atol=1e-5)
