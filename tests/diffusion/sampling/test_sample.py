"""diffusion.sampling.sample / denoiser / noise on tiny seeded UNets: KSamplerAdvanced halves, denoise,
seeds, CFG batching, conditioning ranges and areas, SDXL size conditioning, masks, v-prediction."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from diffusion.sampling import noise as nz
from diffusion.sampling import schedules as sch
from diffusion.demo.checkpoint import tiny_components
from diffusion.sampling.denoiser import CFGDenoiser, ModelSampling, encode_conditioning
from diffusion.models.diffusion_model import DiffusionModel
from diffusion.patches.patcher import ModelPatcher
from diffusion.sampling.sample import NoiseSpec, Guider, SamplerChoice, cut_sigmas, sample, sample_custom, sigmas_for


def _patcher(family: str, prediction: str = "eps", inpaint: bool = False) -> ModelPatcher:
    torch.set_num_threads(2)
    c = tiny_components(family, seed=3, inpaint=inpaint, prediction=prediction)   # type: ignore[arg-type]
    return ModelPatcher(DiffusionModel(c.unet, c.family, prediction))             # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sd1() -> ModelPatcher:
    return _patcher("sd1")


def _cond(dim: int, seed: int, tokens: int = 77, **opts: Any) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, dim, generator=g), dict(opts)]]


class Spy:
    """Records the inputs of every apply_model call of a DiffusionModel (the real call still runs)."""

    def __init__(self, dm: DiffusionModel) -> None:
        self.dm, self.calls = dm, []
        self.orig = dm.apply_model

    def __enter__(self) -> Spy:
        def spy(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, **kw: Any) -> torch.Tensor:
            self.calls.append({"x": x, "t": t, "context": context, **kw})
            return self.orig(x, t, context, **kw)
        self.dm.apply_model = spy          # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.dm.apply_model


@pytest.fixture
def latent() -> dict:
    return {"samples": torch.zeros(2, 4, 8, 8)}


def _run(model: ModelPatcher, latent: dict, **kw: Any) -> torch.Tensor:
    args = dict(seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="karras",
                positive=_cond(32, 1), negative=_cond(32, 2), latent=latent)
    args.update(kw)
    return sample(model, **args)["samples"]


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_advanced_split_in_two_halves_equals_one_run(sd1: ModelPatcher, sampler: str) -> None:
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    full = _run(sd1, latent, sampler_name=sampler, start_step=0, end_step=10000)
    first = sample(sd1, 7, 4, 5.0, sampler, "karras", _cond(32, 1), _cond(32, 2), latent,
                   start_step=0, end_step=2, return_with_leftover_noise=True)
    second = _run(sd1, first, sampler_name=sampler, add_noise=False, start_step=2, end_step=10000)
    # LATENT is unscaled between the halves (x / 0.18215 * 0.18215): fp32 rounding, relative
    assert (second - full).abs().max().item() <= 1e-5 * (1 + full.abs().max().item())
    # without leftover noise the first half ends fully denoised (a different latent)
    forced = sample(sd1, 7, 4, 5.0, sampler, "karras", _cond(32, 1), _cond(32, 2), latent, end_step=2)
    assert not torch.allclose(forced["samples"], first["samples"])


def test_cut_sigmas_rules() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    assert cut_sigmas(s, 0, 2, True).tolist() == [4.0, 3.0, 0.0]
    assert cut_sigmas(s, 0, 2, False).tolist() == [4.0, 3.0, 2.0]
    assert cut_sigmas(s, 2, 10000, True).tolist() == [2.0, 1.0, 0.0]
    assert cut_sigmas(s, 4, 10000, True) is None
    assert s.tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]          # the input is not modified


def test_start_past_the_end_returns_the_latent(sd1: ModelPatcher) -> None:
    lat = {"samples": torch.randn(1, 4, 8, 8)}
    out = _run(sd1, lat, start_step=4, end_step=10000)
    assert torch.equal(out, lat["samples"])
    assert torch.equal(_run(sd1, lat, denoise=0.0), lat["samples"])


def test_denoise_one_img2img_is_txt2img_from_the_same_start(sd1: ModelPatcher) -> None:
    """denoise = 1.0 runs the full txt2img schedule from x0 = s * latent + noise * sqrt(1 + sigma_max^2)
    (s the latent scale factor): it equals txt2img whose noise is shifted by s * latent / sqrt(1 + sigma_max^2)."""
    g = torch.Generator().manual_seed(5)
    image = torch.randn(2, 4, 8, 8, generator=g)
    noise = nz.prepare_noise(image, 7)
    img2img = _run(sd1, {"samples": image}, denoise=1.0)
    scale = math.sqrt(1 + ModelSampling.from_model(sd1.model).sigma_max ** 2)
    s = sd1.model.latent_scale_factor
    txt2img = _run(sd1, {"samples": torch.zeros_like(image)}, noise=noise + image * s / scale)
    assert (img2img - txt2img).abs().max().item() <= 1e-5 * (1 + img2img.abs().max().item())  # fp32 rounding
    assert torch.allclose(_run(sd1, {"samples": image}, denoise=0.99995), img2img)    # > 0.9999: full


def test_denoise_cuts_the_schedule_as_comfyui() -> None:
    ms = ModelSampling(sch.default_sigma_table())
    tail = sigmas_for(ms, "euler", "normal", 10, 0.5)
    assert tail.tolist() == pytest.approx([1.4806, 1.2458, 1.0481, 0.8784, 0.7297, 0.5964, 0.4736, 0.3555,
                                           0.2322, 0.0292, 0.0], abs=6e-5)
    # discard-penultimate samplers: schedule for steps + 1 with the last non-zero sigma dropped
    d = sigmas_for(ms, "dpm_2", "karras", 10)
    assert d.tolist() == pytest.approx([14.6146, 9.5583, 6.0822, 3.7513, 2.2322, 1.2741, 0.6926, 0.3552,
                                        0.1698, 0.0744, 0], abs=6e-5)
    assert len(sigmas_for(ms, "euler", "normal", 10, 0.0)) == 0


def test_same_seed_same_result_other_seed_differs(sd1: ModelPatcher, latent: dict) -> None:
    for name in ("euler_ancestral", "dpmpp_2m_sde"):
        a = _run(sd1, latent, sampler_name=name, steps=2)
        b = _run(sd1, latent, sampler_name=name, steps=2)
        c = _run(sd1, latent, sampler_name=name, steps=2, seed=8)
        assert torch.equal(a, b), name
        assert not torch.allclose(a, c), name
        assert torch.isfinite(a).all()
        assert not torch.allclose(a[0], a[1])          # batch images get different noise


def test_comfyui_noise_convention() -> None:
    lat = torch.zeros(3, 4, 8, 8)
    n = nz.prepare_noise(lat, 1234)
    torch.manual_seed(1234)
    assert torch.equal(n, torch.randn(3, 4, 8, 8))
    # batch_index: draws [1, ...] for 0..max in order and picks the requested ones
    picked = nz.prepare_noise(lat[:2], 1234, batch_index=[2, 0])
    g = torch.Generator().manual_seed(1234)
    singles = [torch.randn(1, 4, 8, 8, generator=g) for _ in range(3)]
    assert torch.equal(picked, torch.cat([singles[2], singles[0]]))
    # A1111: image i uses seed + i; image 0 equals ComfyUI's batch-of-1 noise
    a = nz.prepare_noise_a1111(lat[:2], nz.a1111_seeds(1234, 2))
    assert torch.equal(a[0:1], nz.prepare_noise(lat[:1], 1234))
    assert torch.equal(a[1:2], nz.prepare_noise(lat[:1], 1235))
    with pytest.raises(ValueError, match="seed must be in 0..2"):
        nz.prepare_noise(lat, -1)
    nz.prepare_noise(lat, 2 ** 64 - 1)                 # the top of ComfyUI's seed range works


def test_a1111_mode_images_are_independent_of_batch(sd1: ModelPatcher) -> None:
    """Per-image seeds: image 1 of a batch of 2 with seed s equals image 0 of a batch of 1 with s + 1,
    step noise included (euler_ancestral)."""
    two = _run(sd1, {"samples": torch.zeros(2, 4, 8, 8)}, sampler_name="euler_ancestral", noise_mode="a1111")
    one = _run(sd1, {"samples": torch.zeros(1, 4, 8, 8)}, sampler_name="euler_ancestral", noise_mode="a1111",
               seed=8, positive=_cond(32, 1), negative=_cond(32, 2))
    # fp32 noise only: a batch of 2 takes other gemm kernels than a batch of 1 (latents reach ~200,
    # so the bound is relative to their size; a wrong seed differs by the size itself)
    assert (two[1:2] - one).abs().max().item() <= 1e-5 * one.abs().max().item()


def test_cfg_batches_cond_and_uncond_and_skips_uncond_at_cfg_1(sd1: ModelPatcher, latent: dict) -> None:
    dm = sd1.model
    with Spy(dm) as spy:
        _run(sd1, latent, steps=3)
    assert len(spy.calls) == 3 and all(c["x"].shape[0] == 4 for c in spy.calls)   # [cond, uncond] x B=2
    with Spy(dm) as spy:
        _run(sd1, latent, steps=3, cfg=1.0)
    assert len(spy.calls) == 3 and all(c["x"].shape[0] == 2 for c in spy.calls)
    assert torch.equal(spy.calls[0]["context"][0], _cond(32, 1)[0][0][0])        # the positive only


def test_cfg_formula_on_denoised_outputs(sd1: ModelPatcher) -> None:
    dm = sd1.model
    ms = ModelSampling.from_model(dm)
    shape = (2, 4, 8, 8)
    pos = encode_conditioning(_cond(32, 1), ms, shape)
    neg = encode_conditioning(_cond(32, 2), ms, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    sigma = torch.full((2,), 2.5)
    with torch.no_grad():
        both = CFGDenoiser(dm, ms, pos, neg, 6.0)(x, sigma)
        c = CFGDenoiser(dm, ms, pos, neg, 1.0)(x, sigma)
        u = CFGDenoiser(dm, ms, neg, pos, 1.0)(x, sigma)
    assert torch.allclose(both, u + 6.0 * (c - u), atol=1e-4)
    # eps model: D = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma))
    t = ms.timestep(sigma)
    assert t.tolist() == [float(sch.sigma_to_t(ms.sigmas, torch.tensor([2.5])))] * 2 and float(t[0]).is_integer()
    with torch.no_grad():
        eps = dm.apply_model(x / math.sqrt(2.5 ** 2 + 1), t, _cond(32, 1)[0][0].expand(2, -1, -1))
    assert torch.allclose(c, x - 2.5 * eps, atol=1e-5)


def test_v_prediction_scalings() -> None:
    ms = ModelSampling(sch.default_sigma_table(), "v")
    x, v, s = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([3.0])
    expected = x / 10.0 - v * 3.0 / math.sqrt(10.0)
    assert torch.allclose(ms.calculate_denoised(s, v, x), expected)
    assert torch.allclose(ms.calculate_input(s, x), x / math.sqrt(10.0))
    vmodel = _patcher("sd2", prediction="v")
    out = sample(vmodel, 1, 2, 4.0, "euler", "normal", _cond(32, 1), _cond(32, 2),
                 {"samples": torch.zeros(1, 4, 8, 8)})["samples"]
    assert torch.isfinite(out).all()


def test_timestep_ranges_and_a1111_call_ranges(sd1: ModelPatcher) -> None:
    dm = sd1.model
    ms = ModelSampling.from_model(dm)
    shape = (1, 4, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 10
    base = encode_conditioning(_cond(32, 1), ms, shape)
    late = encode_conditioning(_cond(32, 9, start_percent=0.6), ms, shape)   # only below sigma(0.6)
    hi, lo = torch.full((1,), 10.0), torch.full((1,), 0.3)
    with torch.no_grad():
        assert torch.equal(CFGDenoiser(dm, ms, base + late, [], 1.0)(x, hi), CFGDenoiser(dm, ms, base, [], 1.0)(x, hi))
        assert not torch.allclose(CFGDenoiser(dm, ms, base + late, [], 1.0)(x, lo),
                                  CFGDenoiser(dm, ms, base, [], 1.0)(x, lo))
        # a1111_calls (first, last): active for denoiser calls first..last only
        first = encode_conditioning(_cond(32, 1, a1111_calls=(0, 0)), ms, shape)
        then = encode_conditioning(_cond(32, 9, a1111_calls=(1, None)), ms, shape)
        den = CFGDenoiser(dm, ms, first + then, [], 1.0)
        d0, d1 = den(x, hi), den(x, hi)
        assert torch.equal(d0, CFGDenoiser(dm, ms, first, [], 1.0)(x, hi))
        plain = encode_conditioning(_cond(32, 9), ms, shape)
        assert torch.equal(d1, CFGDenoiser(dm, ms, plain, [], 1.0)(x, hi))


def test_areas_and_strengths_average_entries(sd1: ModelPatcher) -> None:
    dm = sd1.model
    ms = ModelSampling.from_model(dm)
    shape = (1, 4, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 5
    sigma = torch.full((1,), 5.0)
    a = encode_conditioning(_cond(32, 1), ms, shape)
    b = encode_conditioning(_cond(32, 2, strength=3.0), ms, shape)
    with torch.no_grad():
        da, db = CFGDenoiser(dm, ms, a, [], 1.0)(x, sigma), CFGDenoiser(dm, ms, b, [], 1.0)(x, sigma)
        both = CFGDenoiser(dm, ms, a + b, [], 1.0)(x, sigma)
        assert torch.allclose(both, (da + 3 * db) / 4, atol=1e-5)
        # an area entry (h, w, y, x) = (4, 8, 0, 0): the top half only, faded over its inner edge
        top = encode_conditioning(_cond(32, 2, area=(4, 8, 0, 0)), ms, shape)
        mixed = CFGDenoiser(dm, ms, a + top, [], 1.0)(x, sigma)
        assert torch.allclose(mixed[:, :, 4:], da[:, :, 4:], atol=1e-5)          # bottom: entry a alone
        assert not torch.allclose(mixed[:, :, :4], da[:, :, :4])


def test_a1111_and_parts_combine_as_composable_diffusion(sd1: ModelPatcher) -> None:
    dm = sd1.model
    ms = ModelSampling.from_model(dm)
    shape = (1, 4, 8, 8)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 5
    sigma = torch.full((1,), 5.0)
    a = encode_conditioning(_cond(32, 1, a1111_and=1.0, strength=1.0), ms, shape)
    b = encode_conditioning(_cond(32, 2, a1111_and=0.8, strength=0.8), ms, shape)
    neg = encode_conditioning(_cond(32, 3), ms, shape)
    plain_a = encode_conditioning(_cond(32, 1, strength=1.0), ms, shape)
    plain_b = encode_conditioning(_cond(32, 2, strength=0.8), ms, shape)
    with torch.no_grad():
        da = CFGDenoiser(dm, ms, plain_a, [], 1.0)(x, sigma)
        db = CFGDenoiser(dm, ms, plain_b, [], 1.0)(x, sigma)
        du = CFGDenoiser(dm, ms, neg, [], 1.0)(x, sigma)
        # A1111: D_u + cfg * sum_k w_k (D_k - D_u); the weights sum to 1.8, not 1
        got = CFGDenoiser(dm, ms, a + b, neg, 7.0)(x, sigma)
        assert torch.allclose(got, du + 7.0 * (1.0 * (da - du) + 0.8 * (db - du)), atol=2e-3)
        # at cfg 1 the uncond is still needed: D_u + sum_k w_k (D_k - D_u)
        one = CFGDenoiser(dm, ms, a + b, neg, 1.0)(x, sigma)
        assert torch.allclose(one, du + (da - du) + 0.8 * (db - du), atol=5e-4)
        # the same entries without the key are averaged by strength (ComfyUI)
        avg = CFGDenoiser(dm, ms, plain_a + plain_b, neg, 7.0)(x, sigma)
        assert torch.allclose(avg, du + 7.0 * ((da + 0.8 * db) / 1.8 - du), atol=2e-3)
        assert not torch.allclose(avg, got, atol=0.1)


def test_sdxl_size_conditioning_defaults_to_latent_size() -> None:
    xl = _patcher("sdxl")
    dm = xl.model
    pooled = torch.randn(1, dm.pooled_dim)
    pos = _cond(dm.context_dim, 1, pooled_output=pooled)
    neg = _cond(dm.context_dim, 2, pooled_output=pooled, width=1024, height=768, crop_w=8, crop_h=16,
                target_width=512, target_height=256)
    with Spy(dm) as spy:
        sample(xl, 1, 1, 5.0, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 8, 12)})
    call = spy.calls[0]
    assert call["time_ids"].tolist() == [[64.0, 96.0, 0.0, 0.0, 64.0, 96.0], [768.0, 1024.0, 16.0, 8.0, 256.0, 512.0]]
    assert torch.equal(call["text_embeds"][0], pooled[0])


def test_noise_mask_keeps_the_unmasked_latent(sd1: ModelPatcher) -> None:
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1.0                                   # repaint the right half (pixel space)
    out = _run(sd1, {"samples": image, "noise_mask": mask}, denoise=0.7)
    assert torch.allclose(out[..., :3], image[..., :3], atol=1e-5)           # left latent cells untouched
    assert not torch.allclose(out[..., 5:], image[..., 5:])


def test_inpaint_model_gets_mask_and_masked_latent() -> None:
    inp = _patcher("sd1", inpaint=True)
    dm = inp.model
    image = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    with Spy(dm) as spy:
        sample(inp, 1, 1, 5.0, "euler", "normal", _cond(32, 1), _cond(32, 2), {"samples": image, "noise_mask": mask})
    concat = spy.calls[0]["concat"]
    assert concat.shape == (2, 5, 8, 8)
    # the masked-image latent in the model's space: the LATENT (a VAE latent) times the scale factor
    assert torch.equal(concat[0, 0], mask[0]) and torch.allclose(concat[0, 1:], image[0] * dm.latent_scale_factor)
    with Spy(dm) as spy:          # txt2img on an inpainting model: the model's own default (None here)
        sample(inp, 1, 1, 5.0, "euler", "normal", _cond(32, 1), _cond(32, 2), {"samples": torch.zeros(1, 4, 8, 8)})
    assert spy.calls[0].get("concat") is None


def test_patched_model_is_used_then_kept_patched_until_another_patch_set(sd1: ModelPatcher, latent: dict) -> None:
    plain = _run(sd1, latent, steps=2)
    patched = sd1.clone()
    key = "unet.conv_in.bias"
    patched.add_patches({key: torch.full_like(dict(sd1.model.named_parameters())[key], 0.5)}, 1.0, "test")
    before = dict(sd1.model.named_parameters())[key].clone()
    out = _run(patched, latent, steps=2)
    assert not torch.allclose(out, plain)
    # as in ComfyUI the module stays patched after the run (a strength change re-patches in place)
    assert torch.equal(dict(sd1.model.named_parameters())[key], before + 0.5) and sd1.is_patched()
    assert torch.equal(_run(patched, latent, steps=2), out)
    # the plain model brings the originals back bit-exactly before it samples
    assert torch.equal(_run(sd1, latent, steps=2), plain)
    assert torch.equal(dict(sd1.model.named_parameters())[key], before) and not sd1.is_patched()


def test_sample_custom_and_split_sigmas(sd1: ModelPatcher, latent: dict) -> None:
    ms = ModelSampling.from_model(sd1.model)
    sigmas = sch.calculate_sigmas(ms.sigmas, "karras", 4)
    guider = Guider(sd1, _cond(32, 1), _cond(32, 2), 5.0)
    out, denoised = sample_custom(guider, NoiseSpec(7), SamplerChoice("euler"), sigmas, latent)
    assert torch.allclose(out["samples"], _run(sd1, latent), atol=1e-6)
    assert torch.allclose(out["samples"], denoised["samples"], atol=1e-5)     # euler's last step is D
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(sd1, 1, 2, 5.0, "nope", "karras", _cond(32, 1), _cond(32, 2), latent)


def test_ztsnr_family_samples_with_rescaled_sigmas() -> None:
    c = tiny_components("sdxl", seed=3, prediction="v")
    plain = DiffusionModel(c.unet, c.family.with_(prediction="v"), "v")
    zsnr = DiffusionModel(c.unet, c.family.with_(prediction="v", zsnr=True), "v")
    assert ModelSampling.from_model(plain).sigma_max == pytest.approx(14.6146, abs=1e-3)
    ms = ModelSampling.from_model(zsnr)
    assert ms.sigma_max == pytest.approx(4518.76, abs=0.01) and ms.prediction == "v"
    assert ModelSampling.from_model(zsnr, zsnr=False).sigma_max == pytest.approx(14.6146, abs=1e-3)
