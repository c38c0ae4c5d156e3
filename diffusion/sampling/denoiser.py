"""From DiffusionModel.apply_model to the k-diffusion denoiser D(x; sigma) with CFG.

- `ModelSampling`: the discrete sigma table of a checkpoint, sigma -> timestep (ComfyUI's nearest
  entry, or k-diffusion's fractional t) and the eps / v scalings (samplers.md section 2):
  eps: D = x - sigma * eps(c_in x, t);  v: D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(c_in x, t),
  c_in = 1 / sqrt(sigma^2 + 1).
- `encode_conditioning`: CONDITIONING entries ([cond [1|B, T, D], dict]) -> `CondEntry` records with
  what the UNet needs (SDXL text_embeds = pooled_output, time_ids from width/height/crop/target
  defaulting to the latent size x 8) and where/when it applies (area, mask, strength,
  start/end_percent as sigmas, A1111 denoiser-call ranges).
- `CFGDenoiser`: D = D_uncond + cfg (D_cond - D_uncond) on the denoised outputs (ComfyUI), cond and
  uncond batched into one UNet call when their shapes allow; several entries per side are averaged
  with their strengths and feathered areas (ComfyUI's rule); uncond skipped when cfg == 1. Entries
  of A1111 `AND` parts (key `a1111_and` = the part's weight) combine A1111's way instead:
  D = D_uncond + cfg * sum_k w_k (D_k - D_uncond) (composable diffusion), which equals the strength
  average only when the weights sum to 1.
- `MaskedDenoiser`: LATENT noise_mask sampling (ComfyUI KSamplerX0Inpaint).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion.sampling import schedules

Prediction = Literal["eps", "v"]


@dataclass(frozen=True)
class ModelSampling:
    """Sigma table (increasing Tensor[1000], float32 as ComfyUI) and prediction type."""

    sigmas: Tensor
    prediction: Prediction = "eps"
    quantize: bool = True          # ComfyUI's integer timesteps; False: k-diffusion / A1111 fractional

    @classmethod
    def from_model(cls, model: Any, quantize: bool = True, prediction: Prediction | None = None,
                   zsnr: bool | None = None) -> ModelSampling:
        """From a DiffusionModel: its `alphas_cumprod`, `prediction` and the family's `zsnr` marker,
        unless overridden (ModelSamplingDiscrete)."""
        if zsnr is None:
            zsnr = bool(getattr(getattr(model, "family", None), "zsnr", False))
        table = schedules.sigmas_from_alphas_cumprod(model.alphas_cumprod, torch.float64)
        if zsnr:
            table = schedules.rescale_zero_terminal_snr(table)
        return cls(table.float(), prediction or model.prediction, quantize)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: Tensor) -> Tensor:
        return schedules.sigma_to_t(self.sigmas, sigma.float().cpu(), self.quantize)

    def percent_to_sigma(self, percent: float) -> float:
        return schedules.percent_to_sigma(self.sigmas, percent)

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """c_in x; sigma [B]."""
        return x / (sigma.reshape(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5

    def calculate_denoised(self, sigma: Tensor, model_output: Tensor, x: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1)
        if self.prediction == "v":
            return x / (s * s + 1.0) - model_output * (s / (s * s + 1.0) ** 0.5)
        return x - model_output * s

    def noise_scaling(self, sigma: float, noise: Tensor, latent: Tensor, max_denoise: bool = False) -> Tensor:
        """Start of sampling: latent + noise * sigma, or * sqrt(1 + sigma^2) at sigma_max (ComfyUI)."""
        scale = math.sqrt(1.0 + sigma * sigma) if max_denoise else sigma
        return latent + noise * scale

    def is_max_denoise(self, sigma0: float) -> bool:
        return math.isclose(self.sigma_max, sigma0, rel_tol=1e-5) or sigma0 > self.sigma_max


@dataclass(frozen=True)
class CondEntry:
    """One conditioning entry, ready for the UNet. Tensors have batch 1 or the latent's batch."""

    context: Tensor                        # [1|B, T, D]
    strength: float = 1.0
    area: tuple[int, int, int, int] | None = None     # (h, w, y, x) in latent cells
    mask: Tensor | None = None             # [1|B, 1, h, w] at latent size, times mask_strength
    sigma_start: float = math.inf          # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    calls: tuple[int, int | None] | None = None       # A1111 denoiser-call range (first, last)
    text_embeds: Tensor | None = None      # SDXL pooled text [1|B, P]
    time_ids: Tensor | None = None         # SDXL [1|B, 6]: height, width, crop_h, crop_w, target_h, target_w
    concat: Tensor | None = None           # inpainting models: [1|B, 5, h, w] mask + masked-image latent
    and_weight: float | None = None        # A1111 AND part weight (composable diffusion), None: ComfyUI averaging


def _as_area(value: Any) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, (tuple, list)) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
        return (int(value[0]), int(value[1]), int(value[2]), int(value[3]))
    raise ValueError(f"diffusion.sampling.denoiser: conditioning 'area' must be (h, w, y, x) in latent cells, got {value!r}")


def latent_mask(mask: Tensor, size: tuple[int, int], batch: int) -> Tensor:
    """A pixel- or latent-size mask [H, W] / [B, H, W] / [B, 1, H, W] -> [batch, 1, h, w] (bilinear)."""
    m = mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1])
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    if m.shape[0] != batch:
        m = m.repeat(math.ceil(batch / m.shape[0]), 1, 1, 1)[:batch]
    return m


def encode_conditioning(conditioning: Sequence[Sequence[Any]], sampling: ModelSampling, latent_shape: Sequence[int],
                        is_sdxl: bool = False, pooled_dim: int = 0, inpaint: bool = False,
                        latent_image: Tensor | None = None, noise_mask: Tensor | None = None,
                        name: str = "positive", device: torch.device | str = "cpu",
                        latent_scale: float = 1.0) -> list[CondEntry]:
    """CONDITIONING -> CondEntry list (see the module doc), tensors moved to `device` once.
    `latent_shape` = [B, C, h, w]; `latent_image` is in the model's space (VAE latent times
    `latent_scale`), a `concat_latent_image` key holds a VAE latent and is scaled here."""
    if not isinstance(conditioning, (list, tuple)):
        raise TypeError(f"diffusion.sampling.denoiser: {name} conditioning must be a list of [tensor, dict], "
                        f"got {type(conditioning).__name__}")
    b, _, h, w = (int(v) for v in latent_shape)
    out: list[CondEntry] = []
    for k, item in enumerate(conditioning):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], Tensor)):
            raise TypeError(f"diffusion.sampling.denoiser: {name} conditioning entry {k} must be [Tensor[B, T, D], dict]")
        cond, opts = item[0], dict(item[1] or {})
        if cond.ndim != 3:
            raise ValueError(f"diffusion.sampling.denoiser: {name} conditioning entry {k} has shape {tuple(cond.shape)}, "
                             "expected [B, T, D]")
        strength = float(opts.get("strength", 1.0))
        start = float(opts.get("start_percent", 0.0))
        end = float(opts.get("end_percent", 1.0))
        mask = None
        if opts.get("mask") is not None:
            mask = latent_mask(opts["mask"], (h, w), 1 if opts["mask"].ndim < 3 or opts["mask"].shape[0] == 1 else b)
            mask = mask * float(opts.get("mask_strength", 1.0))
        text_embeds = time_ids = None
        if is_sdxl:
            pooled = opts.get("pooled_output")
            text_embeds = pooled if pooled is not None else torch.zeros(cond.shape[0], pooled_dim)
            width = float(opts.get("width") or w * 8)
            height = float(opts.get("height") or h * 8)
            ids = [height, width, float(opts.get("crop_h", 0)), float(opts.get("crop_w", 0)),
                   float(opts.get("target_height") or height), float(opts.get("target_width") or width)]
            time_ids = torch.tensor([ids], dtype=torch.float32)
        concat = None
        if inpaint:
            concat = inpaint_concat(opts, latent_image, noise_mask, (b, h, w), latent_scale)
        calls = opts.get("a1111_calls")
        and_weight = opts.get("a1111_and")

        def dev(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)
        out.append(CondEntry(
            context=cond.to(device), strength=strength, area=_as_area(opts.get("area")), mask=dev(mask),
            sigma_start=sampling.percent_to_sigma(start) if start > 0 else math.inf,
            sigma_end=sampling.percent_to_sigma(end) if end < 1 else 0.0,
            calls=(int(calls[0]), None if calls[1] is None else int(calls[1])) if calls is not None else None,
            text_embeds=dev(text_embeds), time_ids=dev(time_ids), concat=dev(concat),
            and_weight=None if and_weight is None else float(and_weight)))
    return out


def inpaint_concat(opts: dict, latent_image: Tensor | None, noise_mask: Tensor | None,
                   bhw: tuple[int, int, int], latent_scale: float = 1.0) -> Tensor | None:
    """Inpainting-model input [B, 5, h, w]: mask (1 = repaint) + masked-image latent, from the cond's
    concat_mask / concat_latent_image (InpaintModelConditioning) or the LATENT's noise_mask and
    samples (VAEEncodeForInpaint). None: the model's text-to-image default (ones + grey latent)."""
    b, h, w = bhw
    image = opts.get("concat_latent_image")
    if image is not None:
        image = image.float() * latent_scale                # a VAE latent -> the model's space
    mask = opts.get("concat_mask", noise_mask)
    if image is None:
        image = latent_image if mask is not None else None
    if image is None:
        return None
    image = image.float()
    if tuple(image.shape[-2:]) != (h, w):
        image = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=False)
    if image.shape[0] != b:
        image = image.repeat(math.ceil(b / image.shape[0]), 1, 1, 1)[:b]
    m = torch.ones(b, 1, h, w) if mask is None else latent_mask(mask, (h, w), b).round()
    return torch.cat([m.to(image), image], dim=1)


def _feather(mult: Tensor, area: tuple[int, int, int, int], full: tuple[int, int], rr: int = 8) -> Tensor:
    """ComfyUI's linear fade over `rr` latent cells at area edges that are inside the image."""
    ah, aw, ay, ax = area
    for t in range(min(rr, ah)):
        f = (t + 1) / rr
        if ay != 0:
            mult[:, :, t:t + 1, :] *= f
        if ah + ay < full[0]:
            mult[:, :, ah - 1 - t:ah - t, :] *= f
    for t in range(min(rr, aw)):
        f = (t + 1) / rr
        if ax != 0:
            mult[:, :, :, t:t + 1] *= f
        if aw + ax < full[1]:
            mult[:, :, :, aw - 1 - t:aw - t] *= f
    return mult


def _batch(t: Tensor, b: int) -> Tensor:
    return t if t.shape[0] == b else t.repeat(math.ceil(b / t.shape[0]), *[1] * (t.ndim - 1))[:b]


def _match_context(ctxs: list[Tensor]) -> list[Tensor] | None:
    """Contexts of different token lengths repeated to their least common multiple (at most 4x the
    longest, which leaves cross-attention unchanged, ComfyUI); None when that is not possible."""
    lengths = {c.shape[1] for c in ctxs}
    if len(lengths) == 1:
        return ctxs
    if len({c.shape[2] for c in ctxs}) != 1:
        return None
    lcm = math.lcm(*lengths)
    if lcm > 4 * max(lengths):
        return None
    return [c.repeat(1, lcm // c.shape[1], 1) for c in ctxs]


class CFGDenoiser:
    """k-diffusion model: `denoiser(x [B, C, h, w], sigma [B]) -> D` with classifier-free guidance.

    `model` is a DiffusionModel (apply_model); x and the result stay in x's dtype and device.
    `max_batch` caps the batch of one UNet call (None: all chunks of a step in one call).
    """

    def __init__(self, model: Any, sampling: ModelSampling, positive: list[CondEntry],
                 negative: list[CondEntry], cfg: float, max_batch: int | None = None) -> None:
        self.model = model
        self.sampling = sampling
        self.positive = positive
        self.negative = negative
        self.cfg = float(cfg)
        # A1111 AND parts need D_uncond even at cfg 1 (their weights need not sum to 1)
        self.skip_uncond = math.isclose(self.cfg, 1.0) and not any(e.and_weight is not None for e in positive)
        self.max_batch = max_batch
        self.calls = 0                 # denoiser calls so far (A1111 prompt-schedule ranges)
        self._ts_cache: dict[float, Tensor] = {}
        self._ctx_cache: dict[tuple, Tensor | None] = {}

    def _timestep(self, sigma: Tensor) -> Tensor:
        key = float(sigma[0])
        if bool((sigma == sigma[0]).all()):
            t = self._ts_cache.get(key)
            if t is None:
                t = self.sampling.timestep(sigma[:1])
                self._ts_cache = {key: t}
            return t.expand(sigma.shape[0])
        return self.sampling.timestep(sigma)

    def _active(self, entries: list[CondEntry], s: float) -> list[CondEntry]:
        out = []
        for e in entries:
            if s > e.sigma_start or s < e.sigma_end:
                continue
            if e.calls is not None and (self.calls < e.calls[0] or (e.calls[1] is not None and self.calls > e.calls[1])):
                continue
            out.append(e)
        return out

    def __call__(self, x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        sigma = sigma.cpu()                # samplers pass CPU sigmas: no device sync here
        s = float(sigma[0])
        sides = [self._active(self.positive, s)]
        if not self.skip_uncond:
            sides.append(self._active(self.negative, s))
        self.calls += 1
        outs = self._calc(x, sigma, sides)
        if self.skip_uncond:
            return outs[0]
        cond, uncond = outs
        return uncond + (cond - uncond) * self.cfg

    def _calc(self, x: Tensor, sigma: Tensor, sides: list[list[CondEntry]]) -> list[Tensor]:
        b, _, h, w = x.shape
        # chunks: (side, entry); simple = full frame, no mask, only entry of its side
        chunks = [(k, e) for k, entries in enumerate(sides) for e in entries]
        simple = {k: len(entries) == 1 and entries[0].area is None and entries[0].mask is None
                  for k, entries in enumerate(sides)}
        # group by area size: chunks of one group go through the UNet in one batch
        groups: dict[tuple[int, int], list[tuple[int, CondEntry]]] = {}
        for k, e in chunks:
            size = (e.area[0], e.area[1]) if e.area is not None else (h, w)
            groups.setdefault(size, []).append((k, e))
        results: list[tuple[int, CondEntry, Tensor]] = []
        for members in groups.values():
            step = len(members) if self.max_batch is None else max(1, self.max_batch // b)
            for i in range(0, len(members), step):
                results.extend(self._run(x, sigma, members[i:i + step]))
        outs: list[Tensor] = []
        composable = (len(sides) == 2 and bool(sides[0]) and
                      all(e.and_weight is not None and e.area is None and e.mask is None for e in sides[0]))
        for k in range(len(sides)):
            mine = [(e, d) for kk, e, d in results if kk == k]
            if simple[k] or (k == 0 and composable):
                outs.append(mine[0][1])           # composable: replaced below, once D_uncond is known
                continue
            acc = torch.zeros_like(x)
            count = torch.full_like(x, 1e-37)
            for e, d in mine:
                mult = torch.full_like(d, e.strength)
                if e.mask is not None:
                    m = _batch(e.mask, b).to(mult)
                    if e.area is not None:
                        m = m[:, :, e.area[2]:e.area[2] + e.area[0], e.area[3]:e.area[3] + e.area[1]]
                    mult = mult * m
                if e.area is not None:
                    mult = _feather(mult, e.area, (h, w))
                    ys, xs = slice(e.area[2], e.area[2] + e.area[0]), slice(e.area[3], e.area[3] + e.area[1])
                    acc[:, :, ys, xs] += d * mult
                    count[:, :, ys, xs] += mult
                else:
                    acc += d * mult
                    count += mult
            outs.append(acc / count)
        if composable:
            # A1111: the effective cond is D_uncond + sum_k w_k (D_k - D_uncond), so that the CFG
            # step gives D_uncond + cfg * sum_k w_k (D_k - D_uncond)
            uncond = outs[1]
            eff = uncond.clone()
            for kk, e, d in results:
                if kk == 0:
                    eff += (d - uncond) * float(e.and_weight)   # type: ignore[arg-type]
            outs[0] = eff
        return outs

    def _context(self, part: list[tuple[int, CondEntry]], b: int) -> Tensor | None:
        """The batched context of a group of chunks (cached: it is the same at every step)."""
        key = (tuple(id(e) for _, e in part), b)
        if key not in self._ctx_cache:
            ctxs = _match_context([_batch(e.context, b) for _, e in part])
            self._ctx_cache[key] = None if ctxs is None else (ctxs[0] if len(ctxs) == 1 else torch.cat(ctxs))
        return self._ctx_cache[key]

    def _run(self, x: Tensor, sigma: Tensor, part: list[tuple[int, CondEntry]]) -> list[tuple[int, CondEntry, Tensor]]:
        """One UNet call for the chunks of `part` (same area size), batched along dim 0; one call
        per chunk when their contexts cannot be batched."""
        b = x.shape[0]
        context = self._context(part, b)
        if context is None:
            return [r for item in part for r in self._run(x, sigma, [item])]
        xs, extra_te, extra_ti, extra_cc = [], [], [], []
        for _, e in part:
            xi = x
            if e.area is not None:
                xi = x[:, :, e.area[2]:e.area[2] + e.area[0], e.area[3]:e.area[3] + e.area[1]]
            xs.append(xi)
            if e.text_embeds is not None and e.time_ids is not None:
                extra_te.append(_batch(e.text_embeds, b))
                extra_ti.append(_batch(e.time_ids, b))
            if e.concat is not None:
                cc = _batch(e.concat, b)
                if e.area is not None:
                    cc = cc[:, :, e.area[2]:e.area[2] + e.area[0], e.area[3]:e.area[3] + e.area[1]]
                extra_cc.append(cc)
        n = len(part)
        x_in = xs[0] if n == 1 else torch.cat(xs)
        sig = sigma if n == 1 else sigma.repeat(n)
        kwargs: dict[str, Tensor] = {}
        if len(extra_te) == n:
            kwargs["text_embeds"] = torch.cat(extra_te).to(x.device)
            kwargs["time_ids"] = torch.cat(extra_ti).to(x.device)
        if len(extra_cc) == n:
            kwargs["concat"] = torch.cat(extra_cc).to(x.device, x.dtype)
        context = context.to(x.device)
        t = self._timestep(sig)
        sig = sig.to(x.device, x.dtype, non_blocking=True)
        out = self.model.apply_model(self.sampling.calculate_input(sig, x_in), t, context, **kwargs)
        denoised = self.sampling.calculate_denoised(sig, out.to(x_in.dtype), x_in)
        return [(k, e, d) for (k, e), d in zip(part, denoised.split(b))]


class MaskedDenoiser:
    """Sampling under a LATENT noise_mask m [B, C, h, w] (1 = may change): before each call
    x <- x m + (latent + noise sigma)(1 - m); after, D <- D m + latent (1 - m)."""

    def __init__(self, inner: Any, latent_image: Tensor, noise: Tensor, mask: Tensor) -> None:
        self.inner, self.latent_image, self.noise, self.mask = inner, latent_image, noise, mask

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        keep = 1.0 - self.mask
        s = sigma.to(x.device, x.dtype).reshape(-1, 1, 1, 1)
        x = x * self.mask + (self.latent_image + self.noise * s) * keep
        return self.inner(x, sigma, **kwargs) * self.mask + self.latent_image * keep
