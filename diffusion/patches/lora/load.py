"""LoRA-family files: read, resolve keys, build patch records, report coverage (formats.md 2).

    model2, clip2, coverage = load_lora(model, clip, path, strength_model, strength_clip, strict=False)

- The file is read once per (path, mtime, size) (`read_lora_file`, a small LRU), and the adapters
  built for one (file, model) pair are memoised, so a LoraLoader that re-runs because only a
  strength changed re-reads nothing and hands the patcher the same adapter objects (their deltas
  stay in the patcher's delta cache, and the other side's fingerprint stays equal).
- Every key of the file is either applied, skipped (text-encoder keys when no CLIP is given) or
  reported in `coverage.unmatched` with the reason; `strict` turns any unmatched key into an error.
- A file that matches nothing of the given models raises ModelFileError naming the family the file
  seems to be for.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffusion.models.errors import ModelFileError
from diffusion.models.state_dict import load_state_dict
from diffusion.patches.lora.keys import clip_key_map, looks_like_text_encoder, split_key, unet_key_map
from diffusion.patches.lora.weights import IA3, Full, LoHa, LoKr, LoRA, SetWeight, padded_in_channels
from diffusion.patches.patcher import ModelPatcher, identity_token

# ----------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True, eq=False)
class LoraFile:
    path: str
    token: str                              # "path|mtime_ns|size": identifies the content
    tensors: Mapping[str, torch.Tensor]
    metadata: Mapping[str, str] = field(default_factory=dict)


_FILES: OrderedDict[str, LoraFile] = OrderedDict()
_FILES_MAX = 8
_lock = threading.Lock()


def file_token(path: str | os.PathLike[str]) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_mtime_ns}|{st.st_size}"


def read_lora_file(path: str | os.PathLike[str]) -> LoraFile:
    """The tensors and metadata of a LoRA file (.safetensors, or a torch pickle read weights-only)."""
    path = str(path)
    try:
        token = file_token(path)
    except OSError as e:
        raise ModelFileError(path, f"cannot read it: {e}") from e
    with _lock:
        hit = _FILES.get(token)
        if hit is not None:
            _FILES.move_to_end(token)
            return hit
    # the reader follows the file's content (a safetensors file named .pt still loads), refuses
    # pickles that ask for code, and names empty, text and truncated files for what they are
    tensors, metadata = load_state_dict(path, with_metadata=True)
    lf = LoraFile(path=path, token=token, tensors=tensors, metadata=metadata)
    with _lock:
        _FILES[token] = lf
        while len(_FILES) > _FILES_MAX:
            _FILES.popitem(last=False)
    return lf


# ----------------------------------------------------------------------------------------------
# grouping keys per module and building adapters


def group_modules(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], list[str]]:
    """file keys -> {module name: {part: (file key, tensor)}}, plus keys with no known part suffix."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        groups.setdefault(module, {})[part] = (key, t)
    return groups, unknown


class NotApplicable(Exception):
    """A module of the file that cannot be applied to its target (the reason is the message)."""


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_fits(delta_shape: tuple[int, ...], shape: torch.Size, what: str, same_out: bool = False) -> None:
    """The delta has the weight's size (or is an inpainting-padded conv delta); `same_out`: also its
    output dimension (a [64, 16] product is no [32, 32] weight, though the sizes agree)."""
    if padded_in_channels(tuple(delta_shape), tuple(shape)) or (
            _numel(tuple(delta_shape)) == _numel(tuple(shape))
            and (not same_out or tuple(delta_shape)[:1] == tuple(shape)[:1])):
        return
    raise NotApplicable(f"{what} delta has shape {list(delta_shape)}, the weight {list(shape)}")


def _check_combines(ad: Any, shape: torch.Size, what: str) -> None:
    """The adapter's factors multiply out to a delta for the weight: the delta is built on the meta
    device (shapes only, no arithmetic), so a file whose factors disagree (an up of rank 4 with a down
    of rank 2) is refused here, naming its key, instead of failing in the sampler."""
    fields = {f.name: v.to("meta") for f in dataclasses.fields(ad)
              if isinstance(v := getattr(ad, f.name), torch.Tensor)}
    factors = ", ".join(f"{k} {list(v.shape)}" for k, v in fields.items())
    try:
        dataclasses.replace(ad, **fields).delta(torch.empty(tuple(shape), device="meta"))
    except (RuntimeError, ValueError, IndexError) as e:
        raise NotApplicable(f"{what} factors ({factors}) do not make a delta for the weight {list(shape)}: "
                            f"{str(e).splitlines()[0]}") from None


def build_adapters(parts: Mapping[str, tuple[str, torch.Tensor]], target: str,
                   shapes: Mapping[str, torch.Size]) -> dict[str, Any]:
    """One module's parts -> {parameter key: adapter}; NotApplicable with the reason otherwise."""
    t = {p: v for p, (_, v) in parts.items()}
    wkey, bkey = target + ".weight", target + ".bias"
    if wkey not in shapes:
        raise NotApplicable(f"the model has no weight {wkey}")
    shape = shapes[wkey]
    alpha = float(t["alpha"]) if "alpha" in t else None
    dora = t.get("dora_scale")
    out: dict[str, Any] = {}
    if "up" in t and "down" in t:
        if "scale" in t and alpha is None:      # A1111 `scale` overrides alpha / rank
            alpha = float(t["scale"]) * int(t["down"].shape[0])
        ad: Any = LoRA(up=t["up"], down=t["down"], mid=t.get("mid"), alpha=alpha, dora_scale=dora)
        _check_fits(ad.delta_shape(), shape, "LoRA", same_out=True)
        if ad.mid is None and ad.dora_scale is None:       # the common case, checked directly
            if ad.up.dim() < 2 or ad.up.shape[1] != ad.down.shape[0]:
                raise NotApplicable(f"LoRA up {list(ad.up.shape)} and down {list(ad.down.shape)} disagree on the "
                                    f"rank ({ad.up.shape[1] if ad.up.dim() > 1 else '?'} vs {ad.down.shape[0]})")
        else:
            _check_combines(ad, shape, "LoRA")
        out[wkey] = ad
    elif "hada_w1_a" in t:
        need = [p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if p not in t]
        if need:
            raise NotApplicable(f"LoHa module lacks {need}")
        ad = LoHa(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2"),
                  alpha=alpha, dora_scale=dora)
        _check_fits(ad.delta_shape(), shape, "LoHa", same_out=True)
        _check_combines(ad, shape, "LoHa")
        out[wkey] = ad
    elif any(p.startswith("lokr_") for p in t):
        try:
            ad = LoKr(w1=t.get("lokr_w1"), w1_a=t.get("lokr_w1_a"), w1_b=t.get("lokr_w1_b"), w2=t.get("lokr_w2"),
                      w2_a=t.get("lokr_w2_a"), w2_b=t.get("lokr_w2_b"), t2=t.get("lokr_t2"), alpha=alpha,
                      dora_scale=dora)
            dshape = ad.delta_shape()
        except (ValueError, RuntimeError) as e:
            raise NotApplicable(f"LoKr module: {e}") from e
        _check_fits(dshape, shape, "LoKr", same_out=True)
        _check_combines(ad, shape, "LoKr")
        out[wkey] = ad
    elif "diff" in t or "diff_b" in t:
        if "diff" in t:
            _check_fits(tuple(t["diff"].shape), shape, "diff")
            out[wkey] = Full(t["diff"])
        if "diff_b" in t:
            if bkey not in shapes:
                raise NotApplicable(f"the model has no bias {bkey} for diff_b")
            _check_fits(tuple(t["diff_b"].shape), shapes[bkey], "diff_b")
            out[bkey] = Full(t["diff_b"])
    elif "w_norm" in t or "b_norm" in t:
        if "w_norm" in t:
            _check_fits(tuple(t["w_norm"].shape), shape, "w_norm")
            out[wkey] = Full(t["w_norm"])
        if "b_norm" in t and bkey in shapes:
            _check_fits(tuple(t["b_norm"].shape), shapes[bkey], "b_norm")
            out[bkey] = Full(t["b_norm"])
    elif "set_weight" in t:
        _check_fits(tuple(t["set_weight"].shape), shape, "set_weight")
        out[wkey] = SetWeight(t["set_weight"])
    elif "weight" in t and "on_input" in t:
        on_input = bool(t["on_input"].reshape(-1)[0]) if t["on_input"].numel() else False
        n = int(t["weight"].numel())
        if n != int(shape[1 if on_input else 0]):
            raise NotApplicable(f"IA3 vector of {n} does not match the weight's "
                                f"{'input' if on_input else 'output'} size {shape[1 if on_input else 0]}")
        out[wkey] = IA3(t["weight"], on_input=on_input)
    elif any(p.startswith("glora_") for p in t):
        raise NotApplicable("GLoRA modules are not supported")
    elif any(p.startswith("oft_") for p in t):
        raise NotApplicable("OFT/BOFT modules are not supported")
    else:
        raise NotApplicable(f"no delta in parts {sorted(t)}")
    return out


# ----------------------------------------------------------------------------------------------
# family guess for "this LoRA is for another model" errors


def guess_lora_family(lf: LoraFile) -> tuple[str | None, str]:
    """(family name or None, the evidence) from metadata, key names and widths."""
    meta = lf.metadata
    base = str(meta.get("ss_base_model_version", ""))
    # kohya's values: sd_v1, sd_v2, sd_v2_v (v-prediction), sdxl_base_v1-0, sd3, flux1
    for prefix, fam in (("sdxl", "sdxl"), ("sd_v1", "sd1"), ("sd_v2", "sd2"), ("flux", "flux"),
                        ("sd3", "a DiT model (SD3/Flux)")):
        if base.startswith(prefix):
            return fam, f"metadata ss_base_model_version={base}"
    if str(meta.get("ss_v2", "")).lower() == "true":
        return "sd2", "metadata ss_v2=True"
    keys = list(lf.tensors)
    if any(k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks", "transformer.single_transformer"))
           for k in keys):
        return "flux", "Flux transformer keys (double_blocks / single_blocks)"
    if any(k.startswith(("lora_unet_joint_blocks", "transformer.transformer_blocks")) for k in keys):
        return "a DiT model (SD3/Flux)", "transformer block keys"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl", "it has second-text-encoder keys (lora_te2_ / text_encoder_2.)"
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")) for k in keys):
        return "sdxl", "it has ldm-style UNet keys (lora_unet_input_blocks_...), which kohya writes for SDXL"
    for k, v in lf.tensors.items():
        if "attn2" in k and ("to_k" in k) and split_key(k) and split_key(k)[1] == "down" and v.dim() >= 2:  # type: ignore[index]
            width = int(v.shape[1])
            fam = {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(width)
            if fam:
                return fam, f"its cross-attention keys read a context width of {width}"
    for k, v in lf.tensors.items():
        if looks_like_text_encoder(k) and "q_proj" in k and split_key(k) and split_key(k)[1] == "down":  # type: ignore[index]
            width = int(v.shape[1])
            fam = {768: "sd1", 1024: "sd2"}.get(width)
            if fam:
                return fam, f"its text-encoder keys have width {width}"
    return None, "no family marker found"


# ----------------------------------------------------------------------------------------------
# coverage and the main entry point


@dataclass(frozen=True)
class LoraCoverage:
    """What one file did to the models it was given."""

    file: str
    total_keys: int
    matched_keys: int                          # file keys applied to MODEL or CLIP
    model_weights: int                         # parameters patched in MODEL
    clip_weights: int                          # parameters patched in CLIP
    skipped_text_encoder: int                  # text-encoder keys ignored because no CLIP was given
    unmatched: tuple[tuple[str, str], ...]     # (file key, reason)
    family_hint: str | None = None             # "it seems to be a LoRA for sdxl (...)" when that differs


    @property
    def unmatched_keys(self) -> list[str]:
        return [k for k, _ in self.unmatched]

    def as_dict(self, limit: int = 50) -> dict[str, Any]:
        return {"file": self.file, "total_keys": self.total_keys, "matched_keys": self.matched_keys,
                "unmatched_count": len(self.unmatched), "model_weights": self.model_weights,
                "clip_weights": self.clip_weights, "skipped_text_encoder": self.skipped_text_encoder,
                "unmatched_keys": [k for k, _ in self.unmatched[:limit]], "family_hint": self.family_hint,
                "unmatched_reasons": sorted({r for _, r in self.unmatched})[:limit]}


@dataclass(frozen=True)
class ResolvedLora:
    model_patches: dict[str, Any]
    clip_patches: dict[str, Any]
    coverage: LoraCoverage


_RESOLVED: OrderedDict[tuple, ResolvedLora] = OrderedDict()
_RESOLVED_MAX = 16


def resolve_lora(lf: LoraFile, model: ModelPatcher | None, clip_patcher: ModelPatcher | None,
                 display_name: str | None = None) -> ResolvedLora:
    """Match every key of `lf` against the models; memoised per (file, model modules)."""
    cache_key = (lf.token, None if model is None else identity_token(model.model),
                 None if clip_patcher is None else identity_token(clip_patcher.model))
    with _lock:
        hit = _RESOLVED.get(cache_key)
        if hit is not None:
            _RESOLVED.move_to_end(cache_key)
            return hit
    groups, unknown = group_modules(lf.tensors)
    unmatched: list[tuple[str, str]] = [(k, "no known LoRA part suffix") for k in unknown]
    model_patches: dict[str, Any] = {}
    clip_patches: dict[str, Any] = {}
    skipped_te = matched = 0
    sides: list[tuple[dict[str, str], Mapping[str, torch.Size], dict[str, Any]]] = []
    if model is not None:
        shapes = model.parameter_shapes()
        sides.append((unet_key_map(shapes), shapes, model_patches))
    if clip_patcher is not None:
        cshapes = clip_patcher.parameter_shapes()
        sides.append((clip_key_map(cshapes), cshapes, clip_patches))
    for module, parts in groups.items():
        keys = [k for k, _ in parts.values()]
        hit_side = next(((kmap[module], shp, dest) for kmap, shp, dest in sides if module in kmap), None)
        if hit_side is None:
            if clip_patcher is None and looks_like_text_encoder(module):
                skipped_te += len(keys)
            else:
                unmatched += [(k, "matches no weight of the model") for k in keys]
            continue
        target, shp, dest = hit_side
        try:
            adapters = build_adapters(parts, target, shp)
        except NotApplicable as e:
            unmatched += [(k, str(e)) for k in keys]
            continue
        dest.update(adapters)
        matched += len(keys)
    cov = LoraCoverage(file=display_name or lf.path, total_keys=len(lf.tensors), matched_keys=matched,
                       model_weights=len(model_patches), clip_weights=len(clip_patches),
                       skipped_text_encoder=skipped_te, unmatched=tuple(sorted(unmatched)))
    res = ResolvedLora(model_patches, clip_patches, cov)
    with _lock:
        _RESOLVED[cache_key] = res
        while len(_RESOLVED) > _RESOLVED_MAX:
            _RESOLVED.popitem(last=False)
    return res


def _family_name(obj: Any) -> str | None:
    fam = getattr(obj, "family", None)
    return getattr(fam, "name", None)


def load_lora(model: ModelPatcher | None, clip: Any | None, path: str | os.PathLike[str],
              strength_model: float, strength_clip: float = 0.0, strict: bool = False,
              display_name: str | None = None) -> tuple[ModelPatcher | None, Any | None, LoraCoverage]:
    """Clone `model` (a ModelPatcher) and `clip` (a diffusion.prompts.clip.CLIP) with the LoRA recorded at
    the given strengths. A side whose strength is 0 is returned unchanged (the same object)."""
    lf = read_lora_file(path)
    name = display_name or Path(str(path)).name
    clip_patcher = None if clip is None else clip.patcher
    res = resolve_lora(lf, model, clip_patcher, name)
    cov = res.coverage
    ours = _family_name(getattr(model, "model", None)) if model is not None else None
    ours = ours or (_family_name(clip) if clip is not None else None) or "loaded"
    if cov.unmatched:
        fam, why = guess_lora_family(lf)
        if fam is not None and fam != ours and ours != "loaded":
            cov = dataclasses.replace(cov, family_hint=f"it seems to be a LoRA for {fam} ({why}), "
                                                       f"not for this {ours} model")
    if cov.matched_keys == 0:
        fam, why = guess_lora_family(lf)
        if cov.skipped_text_encoder and not cov.unmatched:
            hint = (f"all {cov.skipped_text_encoder} of its keys are for the text encoder, which a model-only "
                    f"load does not patch; load it with LoraLoader (model and clip)")
        elif fam is not None and fam != ours:
            hint = f"it seems to be a LoRA for {fam} ({why})"
        elif fam is not None:
            hint = f"it looks like a {fam} LoRA ({why}) but none of its module names or shapes fit"
        elif cov.unmatched and any(r != "matches no weight of the model" for _, r in cov.unmatched):
            k, r = next((k, r) for k, r in cov.unmatched if r != "matches no weight of the model")
            hint = f"e.g. {k}: {r}"
        else:
            hint = "its keys match neither the UNet nor the text encoders (" + ", ".join(list(lf.tensors)[:3]) + ", ...)"
        raise ModelFileError(lf.path, f"LoRA {name!r} matched no weight of this {ours} model "
                                      f"({cov.total_keys} keys); {hint}")
    if strict and cov.unmatched:
        shown = ", ".join(f"{k} ({r})" for k, r in cov.unmatched[:10])
        more = f" and {len(cov.unmatched) - 10} more" if len(cov.unmatched) > 10 else ""
        raise ModelFileError(lf.path, f"strict: {len(cov.unmatched)} of {cov.total_keys} keys of LoRA {name!r} "
                                      f"were not applied: {shown}{more}")
    new_model = model
    if model is not None and strength_model != 0 and res.model_patches:
        new_model = model.clone()
        new_model.add_patches(res.model_patches, strength_model, lf.token)
    new_clip = clip
    if clip is not None and strength_clip != 0 and res.clip_patches:
        new_clip = clip.clone()
        new_clip.patcher.add_patches(res.clip_patches, strength_clip, lf.token)
    return new_model, new_clip, cov
