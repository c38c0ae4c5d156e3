"""Which LoRA key patches which weight (formats.md 2.2, 2.6).

A LoRA-family file is a flat dict "<module name><part>" -> tensor. `split_key` recognises the part
suffix (`.lora_down.weight`, `.lora_A.weight`, `_lora.up.weight`, `.hada_w1_a`, `.alpha`, ...);
the module name is then looked up in a spelling map built from the model's own parameter names:

  UNet (diffusers path D, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"; our
  parameter key is "unet." + D + ".weight"):
    lora_unet_<D with _>          kohya, diffusers-style (SD1/SD2)
    lora_unet_<ldm path with _>   kohya, ldm-style (SDXL): input_blocks_4_1_..., middle_block_1_...
    lycoris_<D with _>            SimpleTuner LyCORIS exports
    unet.<D>, <D>, base_model.model.<D>   diffusers / PEFT (lora.down, lora_A, ...)
    [unet.]<D with attnN.processor.to_q / to_out>  old attention-processor files
    diffusion_model.<ldm path>    ComfyUI's plain spelling
  Text encoder `k` (transformers key T, written with `text_model.`):
    lora_te_ / lora_te1_ / lora_te2_ + <T with _>;  text_encoder. / text_encoder_2. + T (with and
    without `text_model.`);  text_encoders.<k>.<T>
    SD1 "l" and SD2 "h" take lora_te_, lora_te1_, text_encoder.; SDXL "l" takes those too and "g"
    takes lora_te2_, text_encoder_2. (and lora_te_, text_encoder. when it is the only encoder).
The maps give module paths of the patched module ("unet.<D>", "<k>.<T as it exists>"); the part
decides whether `.weight` or `.bias` is patched.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

# part suffix -> canonical part, longest first when probing
PART_SUFFIXES: dict[str, str] = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_mid.weight": "mid",
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora_A.default.weight": "down", ".lora_B.default.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    "_lora.down.weight": "down", "_lora.up.weight": "up",
    ".lora_magnitude_vector": "dora_scale", ".lora_magnitude_vector.weight": "dora_scale",
    ".dora_scale": "dora_scale", ".alpha": "alpha", ".scale": "scale",
    ".hada_w1_a": "hada_w1_a", ".hada_w1_b": "hada_w1_b", ".hada_w2_a": "hada_w2_a", ".hada_w2_b": "hada_w2_b",
    ".hada_t1": "hada_t1", ".hada_t2": "hada_t2",
    ".lokr_w1": "lokr_w1", ".lokr_w1_a": "lokr_w1_a", ".lokr_w1_b": "lokr_w1_b",
    ".lokr_w2": "lokr_w2", ".lokr_w2_a": "lokr_w2_a", ".lokr_w2_b": "lokr_w2_b", ".lokr_t2": "lokr_t2",
    ".diff": "diff", ".diff_b": "diff_b", ".set_weight": "set_weight",
    ".w_norm": "w_norm", ".b_norm": "b_norm",
    ".on_input": "on_input", ".weight": "weight",
    # recognised so that they are reported as unsupported types rather than unknown keys
    ".a1.weight": "glora_a1", ".a2.weight": "glora_a2", ".b1.weight": "glora_b1", ".b2.weight": "glora_b2",
    ".oft_blocks": "oft_blocks", ".oft_diag": "oft_diag", ".rescale": "oft_rescale",
}
_SUFFIXES_BY_LENGTH = sorted(PART_SUFFIXES, key=len, reverse=True)


def split_key(key: str) -> tuple[str, str] | None:
    """"<module><suffix>" -> (module, canonical part), or None if no known part suffix ends it."""
    for suffix in _SUFFIXES_BY_LENGTH:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], PART_SUFFIXES[suffix]
    return None


# ----------------------------------------------------------------------------------------------
# UNet: diffusers path -> ldm path (formats.md 1.6), computed from the module's own block layout

_RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_BASIC_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
              "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK_RE = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.*))?$")
_MID_RE = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)(?:\.(.*))?$")


def _block_layout(module_paths: Iterable[str]) -> dict[tuple[str, int], dict[str, int]]:
    """(down_blocks|up_blocks, b) -> {"resnets": count, "attentions": count, "samplers": count}."""
    layout: dict[tuple[str, int], dict[str, set[int]]] = {}
    for path in module_paths:
        m = _BLOCK_RE.match(path)
        if m:
            kind = "samplers" if m.group(3).endswith("samplers") else m.group(3)
            layout.setdefault((m.group(1), int(m.group(2))), {}).setdefault(kind, set()).add(int(m.group(4)))
    return {k: {kind: len(v) for kind, v in d.items()} for k, d in layout.items()}


def _resnet_rest(rest: str | None) -> str | None:
    if rest is None:
        return None
    head, _, tail = rest.partition(".")
    mapped = _RESNET_LDM.get(head)
    if mapped is None:
        return None
    return mapped + ("." + tail if tail else "")


def diffusers_to_ldm(path: str, layout: dict[tuple[str, int], dict[str, int]]) -> str | None:
    """A diffusers UNet module path -> the ldm (original SD) path, or None if it has none."""
    for d, l in _BASIC_LDM.items():
        if path == d or path.startswith(d + "."):
            return l + path[len(d):]
    m = _MID_RE.match(path)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return "middle_block.1" + ("." + rest if rest else "")
        r = _resnet_rest(rest)
        return None if r is None else f"middle_block.{2 * j}.{r}"
    m = _BLOCK_RE.match(path)
    if not m:
        return None
    side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if side == "down_blocks":
        # input block 0 is conv_in; each level has its resnets then (maybe) one downsampler
        start = 1 + sum(layout[(side, i)].get("resnets", 0) + layout[(side, i)].get("samplers", 0)
                        for i in range(b) if (side, i) in layout)
        if kind == "resnets":
            r = _resnet_rest(rest)
            return None if r is None else f"input_blocks.{start + j}.0.{r}"
        if kind == "attentions":
            return f"input_blocks.{start + j}.1" + ("." + rest if rest else "")
        n_res = layout[(side, b)].get("resnets", 0)
        return f"input_blocks.{start + n_res}.0.op" + (rest[len("conv"):] if rest and rest.startswith("conv") else "")
    start = sum(layout[(side, i)].get("resnets", 0) for i in range(b) if (side, i) in layout)
    if kind == "resnets":
        r = _resnet_rest(rest)
        return None if r is None else f"output_blocks.{start + j}.0.{r}"
    if kind == "attentions":
        return f"output_blocks.{start + j}.1" + ("." + rest if rest else "")
    last = start + layout[(side, b)].get("resnets", 1) - 1
    slot = 2 if layout[(side, b)].get("attentions", 0) else 1
    return f"output_blocks.{last}.{slot}" + ("." + rest if rest else "")


def _processor_form(path: str) -> str | None:
    """"...attn1.to_q" -> "...attn1.processor.to_q"; "...attn2.to_out.0" -> "...attn2.processor.to_out"."""
    m = re.match(r"^(.*\.attn\d)\.(to_q|to_k|to_v|to_out\.0)$", path)
    if not m:
        return None
    return f"{m.group(1)}.processor.{m.group(2).replace('.0', '')}"


def module_paths(param_names: Iterable[str]) -> list[str]:
    """Parameter names -> module paths of modules that own a `.weight` (order kept, unique)."""
    seen: dict[str, None] = {}
    for name in param_names:
        if name.endswith(".weight"):
            seen.setdefault(name[: -len(".weight")], None)
    return list(seen)


def unet_key_map(param_names: Iterable[str], prefix: str = "unet.") -> dict[str, str]:
    """Every accepted LoRA spelling of every UNet module -> its module path in the patched model.
    `param_names` are the patched model's parameter names; only those under `prefix` count."""
    paths = [p[len(prefix):] for p in module_paths(param_names) if p.startswith(prefix)]
    layout = _block_layout(paths)
    out: dict[str, str] = {}
    for d in paths:
        target = prefix + d
        flat = d.replace(".", "_")
        spellings = [f"lora_unet_{flat}", f"lycoris_{flat}", f"unet.{d}", d, f"base_model.model.{d}"]
        ldm = diffusers_to_ldm(d, layout)
        if ldm is not None:
            spellings += [f"lora_unet_{ldm.replace('.', '_')}", f"diffusion_model.{ldm}"]
        proc = _processor_form(d)
        if proc is not None:
            spellings += [proc, f"unet.{proc}"]
        for s in spellings:
            out.setdefault(s, target)
    return out


# ----------------------------------------------------------------------------------------------
# text encoders


def encoder_prefixes(encoder_keys: Sequence[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Encoder key -> (kohya prefixes, diffusers prefixes), formats.md 2.2 / 2.6."""
    keys = list(encoder_keys)
    out: dict[str, tuple[list[str], list[str]]] = {}
    first = next((k for k in ("l", "h") if k in keys), None)
    if first is not None:
        out[first] = (["lora_te_", "lora_te1_"], ["text_encoder."])
    if "g" in keys:
        if first is None:      # refiner: bigG is the only encoder
            out["g"] = (["lora_te_", "lora_te2_"], ["text_encoder_2.", "text_encoder."])
        else:
            out["g"] = (["lora_te2_"], ["text_encoder_2."])
    for k in keys:
        out.setdefault(k, ([], []))
    return out


def clip_key_map(param_names: Iterable[str], encoder_keys: Sequence[str] | None = None) -> dict[str, str]:
    """Every accepted LoRA spelling of every text-encoder module -> its module path in the CLIP
    patcher's module (parameter names "<k>.<transformers key>")."""
    paths = module_paths(param_names)
    keys = encoder_keys or sorted({p.split(".", 1)[0] for p in paths})
    prefixes = encoder_prefixes(keys)
    out: dict[str, str] = {}
    for path in paths:
        k, _, inner = path.partition(".")
        if k not in prefixes or not inner:
            continue
        top_level = inner.startswith("text_projection")
        canonical = inner if inner.startswith("text_model.") or top_level else "text_model." + inner
        bare = canonical[len("text_model."):] if canonical.startswith("text_model.") else canonical
        kohya, diffusers = prefixes[k]
        spellings = [p + canonical.replace(".", "_") for p in kohya]
        spellings += [p + form for p in diffusers for form in (canonical, bare)]
        spellings += [f"text_encoders.{k}.{canonical}", f"text_encoders.{k}.{bare}"]
        for s in spellings:
            out.setdefault(s, path)
    return out


def looks_like_text_encoder(module: str) -> bool:
    """A LoRA module name that targets a text encoder (by its prefix)."""
    return module.startswith(("lora_te", "text_encoder", "text_encoders.", "te_", "te1_", "te2_"))
