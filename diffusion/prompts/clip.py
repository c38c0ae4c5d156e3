"""The CLIP value: tokenizers + text encoders (behind a ModelPatcher) + clip skip + embeddings.

    clip = CLIP({"l": CLIPTextModel}, family, load_device, offload_device, embedding_dirs=[...])
    tokens = clip.tokenize("a (cat:1.2) embedding:style")     # {"l": [chunk of 77 (item, weight)]}
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)   # [1, 77k, D], [1, P]

Patch keys (what `clip.patcher.add_patches` accepts, for LoRA text-encoder weights): the parameter
names of `TextEncoders`, i.e. `<encoder key>.` + the transformers module's own state-dict key:
  "l." + key of CLIPTextModel, "h." + key of CLIPTextModel, "g." + key of CLIPTextModelWithProjection.
transformers >= 5.6 flattens CLIPTextModel, so its keys have no `text_model.` ("l.encoder.layers.0.
self_attn.q_proj.weight") while CLIPTextModelWithProjection keeps it ("g.text_model.encoder.layers.0.
self_attn.q_proj.weight", "g.text_projection.weight"). `CLIP.patch_key(encoder, key)` maps a key
written either way ("text_model.encoder..." or "encoder...") to the name that exists here.

Hidden state per family (prompts.md 7; `layer_idx` k < 0 is ComfyUI's CLIPSetLastLayer value,
-1 = last layer, -2 = penultimate, transformers `hidden_states[k]`):
  sd1  l: default last layer; the final LayerNorm is applied to whichever layer is chosen.
  sd2  h: default -2, final LayerNorm applied; a 23-layer encoder (diffusers' SD2 folders drop the
       last layer) is read with k shifted by one, so the default gives the same hidden state.
  sdxl l and g: default -2, no final LayerNorm; a clip skip applies the same k to both.
  |k| larger than the layer count means the last layer (ComfyUI).
Pooled output: the final-LayerNorm state of the last layer at the first EOS of the first chunk,
through `text_projection` when the encoder has one (SDXL bigG: the UNet's pooled input).

Weighting (prompts.md 6): "comfy" z[j] = (z[j] - z_empty[j]) * w[j] + z_empty[j] for tokens with
w != 1, z_empty the encoding of the empty prompt in the same batch; "a1111" z' = z * w, rescaled per
chunk so that mean(z') = mean(z). Embedding vectors replace rows of the token-embedding output
(before position embeddings), formats.md 3.2.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from diffusion.models.detect import ModelFamily
from diffusion.models.errors import ModelFileError
from diffusion.models.tokenizer import CHUNK_LENGTH, EOS, Chunk, CLIPTokenizer, WeightedItem, chunk_groups
from diffusion.patches import embeddings
from diffusion.patches.patcher import ModelPatcher, identity_token
from diffusion.prompts.comfy_weights import (
    EMBEDDING_PREFIX,
    parse_weights,
    resolve_embedding_word,
    split_embedding_words,
)

log = logging.getLogger(__name__)

ENCODER_KEYS = ("l", "h", "g")
PAD_IDS = {"l": EOS, "h": 0, "g": 0}          # prompts.md 9: CLIP-L pads with EOS, OpenCLIP with 0
PLACEHOLDER_ID = 0                            # input id at positions that carry an embedding vector
SD2_TRUNCATED_LAYERS = 23                     # OpenCLIP-H (24 layers) as stored in diffusers SD2 folders
Weighting = Literal["comfy", "a1111"]
Tokens = dict[str, list[Chunk]]


class EmbeddingLike(Protocol):
    """What diffusion.patches.embeddings.load_embedding returns (contracts: frozen `name`, `vectors`)."""

    name: str
    vectors: Mapping[str, torch.Tensor]       # encoder key -> Tensor[n, d]


class TextEncoders(torch.nn.Module):
    """The encoders as submodules named by key, so parameter names are "l.…", "g.…", "h.…"."""

    def __init__(self, encoders: Mapping[str, torch.nn.Module]) -> None:
        super().__init__()
        for key, module in encoders.items():
            self.add_module(key, module)

    def forward(self, *args: Any, **kwargs: Any) -> None:   # pragma: no cover - never called
        raise RuntimeError("TextEncoders holds the encoders; call CLIP.encode_* instead")


def _text_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module | None]:
    """(token embedding, final LayerNorm, text projection or None) of a transformers CLIP text model."""
    inner = getattr(model, "text_model", model)
    return inner.embeddings.token_embedding, inner.final_layer_norm, getattr(model, "text_projection", None)


def _layer_count(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def _width(model: torch.nn.Module) -> int:
    return int(_text_parts(model)[0].weight.shape[1])


def default_embedding_lookup(dirs: Sequence[Path]) -> Callable[[str], EmbeddingLike | None]:
    """Name -> embedding through diffusion.patches.embeddings (find_embedding / load_embedding)."""
    def lookup(name: str) -> EmbeddingLike | None:
        path = embeddings.find_embedding(name, list(dirs))
        return None if path is None else embeddings.load_embedding(path)
    return lookup


@functools.lru_cache(maxsize=None)
def shared_tokenizer(pad: int) -> CLIPTokenizer:
    """One tokenizer per padding id for the whole process (building the BPE ranks takes ~0.3 s)."""
    return CLIPTokenizer(pad=pad)


class CLIP:
    """Tokenizer(s) + text encoder(s) of one checkpoint (docs/contracts.md)."""

    def __init__(self, encoders: Mapping[str, torch.nn.Module], family: ModelFamily,
                 load_device: torch.device | str = "cpu", offload_device: torch.device | str = "cpu", *,
                 embedding_dirs: Sequence[str | Path] = (),
                 embedding_lookup: Callable[[str], EmbeddingLike | None] | None = None,
                 patcher: ModelPatcher | None = None) -> None:
        unknown = [k for k in encoders if k not in ENCODER_KEYS]
        if unknown or not encoders:
            raise ValueError(f"CLIP encoders must be keyed by {ENCODER_KEYS}; got {sorted(encoders)}")
        self.family = family
        self.patcher = patcher if patcher is not None else ModelPatcher(TextEncoders(encoders), load_device,
                                                                        offload_device)
        self.keys: tuple[str, ...] = tuple(k for k in ("l", "h", "g") if k in encoders)
        self.tokenizers: dict[str, CLIPTokenizer] = {k: shared_tokenizer(PAD_IDS[k]) for k in self.keys}
        self.layer_idx: int | None = None
        self.embedding_dirs: list[Path] = [Path(d) for d in embedding_dirs]
        self.embedding_lookup = embedding_lookup

    # ------------------------------------------------------------------ value semantics
    def clone(self) -> CLIP:
        c = CLIP.__new__(CLIP)
        c.family = self.family
        c.patcher = self.patcher.clone()
        c.keys = self.keys
        c.tokenizers = self.tokenizers
        c.layer_idx = self.layer_idx
        c.embedding_dirs = list(self.embedding_dirs)
        c.embedding_lookup = self.embedding_lookup
        return c

    def clip_layer(self, layer_idx: int | None) -> None:
        """Clip skip (ComfyUI CLIPSetLastLayer): -1 last layer, -2 penultimate, None the default."""
        if layer_idx is not None and layer_idx >= 0:
            raise ValueError(f"CLIP layer index must be negative (-1 = last layer); got {layer_idx}")
        self.layer_idx = layer_idx

    @property
    def encoders(self) -> dict[str, torch.nn.Module]:
        return {k: getattr(self.patcher.model, k) for k in self.keys}

    def patch_key(self, encoder: str, key: str) -> str | None:
        """The parameter name under which `key` (a transformers CLIP key, with or without
        `text_model.`) of `encoder` is patched here; None if the encoder or the weight is absent."""
        if encoder not in self.keys:
            return None
        names = self.patcher.parameter_shapes()
        bare = key[len("text_model."):] if key.startswith("text_model.") else key
        for cand in (f"{encoder}.{key}", f"{encoder}.{bare}", f"{encoder}.text_model.{bare}"):
            if cand in names:
                return cand
        return None

    def __repr__(self) -> str:
        return f"CLIP({self.family.name}, encoders={list(self.keys)}, layer_idx={self.layer_idx})"

    def patch_fingerprint(self) -> str:
        """Equal fingerprints encode equally: the encoders and their patches, the clip-skip layer
        and where embeddings come from. The graph cache compares CLIP values by it, so a LoRA
        loader that changed only its model strength leaves text encoding cached."""
        lookup = "" if self.embedding_lookup is None else f"lookup:{identity_token(self.embedding_lookup)}"
        parts = [self.patcher.patch_fingerprint(), repr(self.layer_idx), lookup,
                 *(str(d.resolve()) for d in self.embedding_dirs)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    # ------------------------------------------------------------------ tokenizing
    def _lookup(self) -> Callable[[str], EmbeddingLike | None]:
        return self.embedding_lookup or default_embedding_lookup(self.embedding_dirs)

    def _vectors_for(self, emb: EmbeddingLike, key: str, width: int, name: str,
                     warn: Callable[[str], None]) -> torch.Tensor | None:
        """The rows of `emb` for encoder `key` (Tensor[n, width]) or None with a warning."""
        vectors = dict(emb.vectors)
        vec = vectors.get(key)
        if vec is None and len(vectors) == 1:
            vec = next(iter(vectors.values()))     # a single-encoder file: use it where the width fits
        if vec is None:
            warn(f"embedding {name!r} has no vectors for text encoder {key!r} (it has {sorted(vectors)}); "
                 f"encoded without it")
            return None
        vec = vec.reshape(-1, vec.shape[-1]) if vec.dim() != 2 else vec
        if vec.shape[-1] != width:
            widths = {k: _width(m) for k, m in self.encoders.items()}
            if vec.shape[-1] not in widths.values():
                # made for another model family: an error naming the file and both sizes
                raise ModelFileError(getattr(emb, "path", None) or name,
                                     f"embedding {name!r} has vectors of width {vec.shape[-1]}, but this "
                                     f"{self.family.name} text encoder {key!r} expects width {width}")
            warn(f"embedding {name!r} has width {vec.shape[-1]}, text encoder {key!r} expects {width}; "
                 f"encoded without it there")
            return None
        return vec.detach().float().cpu()

    def tokenize(self, text: str, on_warning: Callable[[str], None] | None = None) -> Tokens:
        """ComfyUI tokenization: weights `(text:w)`, `embedding:NAME` words, 77-item chunks per encoder.
        Missing or unusable embeddings are reported through `on_warning` (default: logging) and left out."""
        warned: set[str] = set()

        def warn(message: str) -> None:
            if message in warned:
                return
            warned.add(message)
            (on_warning or log.warning)(message)

        lookup = self._lookup()
        found: dict[str, EmbeddingLike | None] = {}
        failed: set[str] = set()                   # names whose file exists but could not be read

        def get(name: str) -> EmbeddingLike | None:
            if name not in found:
                try:
                    found[name] = lookup(name)
                except Exception as exc:           # a broken file: report it, encode without it
                    warn(f"embedding {name!r} could not be loaded: {exc}; prompt encoded without it")
                    found[name] = None
                    failed.add(name)
            return found[name]

        # segment -> list of (kind, payload, weight): text to tokenize, or a resolved embedding
        pieces: list[tuple[str, Any, float, str]] = []
        for segment, weight in parse_weights(text):
            for word in split_embedding_words(segment):
                if word.startswith(EMBEDDING_PREFIX):
                    res = resolve_embedding_word(word, get)
                    if res.embedding is not None:
                        pieces.append(("embedding", res.embedding, weight, res.name))
                    elif res.name not in failed:           # a failed load was reported already
                        searched = ", ".join(str(d) for d in self.embedding_dirs) or "no embeddings folder"
                        warn(f"embedding {res.name!r} not found ({searched}); prompt encoded without it")
                    if res.leftover:
                        pieces.append(("text", res.leftover, weight, ""))
                else:
                    pieces.append(("text", word, weight, ""))

        tokens: Tokens = {}
        for key in self.keys:
            tok = self.tokenizers[key]
            width = _width(self.encoders[key])
            groups: list[list[WeightedItem]] = []
            for kind, payload, weight, name in pieces:
                if kind == "text":
                    groups.append([(t, weight) for t in tok.encode(payload)])
                    continue
                vec = self._vectors_for(payload, key, width, name, warn)
                if vec is not None:
                    groups.append([(row, weight) for row in vec])
            tokens[key] = chunk_groups(groups, tok.pad)
        return tokens

    def tokenize_pair(self, text_g: str, text_l: str,
                      on_warning: Callable[[str], None] | None = None) -> Tokens:
        """SDXL with separate texts (CLIPTextEncodeSDXL): "g" from text_g, "l" from text_l, the shorter
        padded with empty-prompt chunks so both have the same chunk count (as ComfyUI)."""
        if "g" not in self.keys or "l" not in self.keys:
            raise ValueError(f"separate text_g/text_l needs an SDXL CLIP with encoders l and g; this one has "
                             f"{list(self.keys)}")
        tokens = self.tokenize(text_g, on_warning)
        tokens["l"] = self.tokenize(text_l, on_warning)["l"]
        empty = self.tokenize("")
        for key in ("l", "g"):
            other = "g" if key == "l" else "l"
            while len(tokens[key]) < len(tokens[other]):
                tokens[key] = tokens[key] + empty[key]
        return tokens

    # ------------------------------------------------------------------ encoding
    def _hidden_choice(self, key: str, layers: int) -> tuple[int | None, bool]:
        """(hidden_states index or None for the last layer, apply final LayerNorm)."""
        name = self.family.name
        default = {"sd1": None, "sd2": -2, "sdxl": -2}.get(name)
        layer_norm = name != "sdxl"
        idx = self.layer_idx if self.layer_idx is not None else default
        if name == "sd2" and key == "h" and layers == SD2_TRUNCATED_LAYERS:
            # diffusers' SD2 folders store OpenCLIP-H without its last layer: their last hidden
            # state is the full model's penultimate one. k of the full model is k + 1 here; the
            # full model's last layer (k = -1) does not exist, the nearest one is used.
            idx = None if idx is None or idx >= -2 else idx + 1
        if idx is not None and -idx > layers:
            idx = None
        return idx, layer_norm

    @torch.no_grad()
    def _run(self, key: str, chunks: Sequence[Chunk]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode chunks of one encoder: (hidden Tensor[k, 77, D], pooled Tensor[k, P]) in fp32 on CPU."""
        model = self.encoders[key]
        tok_embed, final_norm, projection = _text_parts(model)
        device = tok_embed.weight.device
        ids = torch.full((len(chunks), CHUNK_LENGTH), PLACEHOLDER_ID, dtype=torch.long)
        spliced: list[tuple[int, int, torch.Tensor]] = []          # (row, position, vector [D])
        for r, chunk in enumerate(chunks):
            if len(chunk) != CHUNK_LENGTH:
                raise ValueError(f"text encoder {key!r}: a token chunk has {len(chunk)} items, expected "
                                 f"{CHUNK_LENGTH} (BOS, 75 items, EOS/padding)")
            for p, (item, _w) in enumerate(chunk):
                if isinstance(item, torch.Tensor):
                    spliced.append((r, p, item))
                else:
                    ids[r, p] = int(item)
        ids = ids.to(device)

        def splice(_module: torch.nn.Module, _inputs: Any, out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            for r, p, vec in spliced:
                out[r, p] = vec.to(device=out.device, dtype=out.dtype)
            return out

        handle = tok_embed.register_forward_hook(splice) if spliced else None
        try:
            result = model(input_ids=ids, output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        idx, layer_norm = self._hidden_choice(key, _layer_count(model))
        states = result.hidden_states                              # L + 1 tensors [k, 77, D]
        if idx is None:
            hidden = final_norm(states[-1]) if layer_norm else states[-1]
        else:
            hidden = final_norm(states[idx]) if layer_norm else states[idx]
        # pooled: last layer, final LayerNorm, at the first EOS of each row (placeholders are never EOS)
        last = final_norm(states[-1])
        first_eos = (ids == EOS).int().argmax(dim=1)
        pooled = last[torch.arange(last.shape[0], device=last.device), first_eos]
        if projection is not None:
            pooled = projection(pooled)
        return hidden.float().cpu(), pooled.float().cpu()

    def encode_token_chunks(self, chunks: Mapping[str, Sequence[Chunk]],
                            weighting: Weighting = "comfy") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contracts: chunks per encoder key (77 items each, BOS/EOS/padding placed) ->
        (cond Tensor[1, 77k, D], pooled Tensor[1, P]); SDXL concatenates l and g on channels."""
        if weighting not in ("comfy", "a1111"):
            raise ValueError(f"weighting must be 'comfy' or 'a1111'; got {weighting!r}")
        missing = [k for k in self.keys if k not in chunks]
        if missing:
            raise ValueError(f"token chunks for text encoder(s) {missing} are missing; got {sorted(chunks)}")
        self.patcher.patch_model()
        outs: dict[str, torch.Tensor] = {}
        pooled: dict[str, torch.Tensor] = {}
        for key in self.keys:
            key_chunks = list(chunks[key]) or self.tokenize("")[key]
            weights = torch.tensor([[float(w) for _, w in c] for c in key_chunks])    # [k, 77]
            weighted = bool((weights != 1.0).any())
            batch = key_chunks
            if weighted and weighting == "comfy":
                empty = [(t, 1.0) for t in self.tokenizers[key].empty_chunk()]
                batch = key_chunks + [empty]
            z, pool = self._run(key, batch)
            if weighted:
                z = apply_weights(z, weights, weighting)
            outs[key] = torch.cat(list(z[: len(key_chunks)]), dim=0).unsqueeze(0)   # [1, 77k, D]
            pooled[key] = pool[:1]                                                  # first chunk
        if len(outs) == 1:
            key = self.keys[0]
            return outs[key], pooled[key]
        cut = min(o.shape[1] for o in outs.values())       # ComfyUI: both cut to the shorter length
        cond = torch.cat([outs[k][:, :cut] for k in ("l", "g") if k in outs], dim=-1)
        return cond, pooled.get("g", pooled[self.keys[-1]])

    def encode_from_tokens(self, tokens: Mapping[str, Sequence[Chunk]], return_pooled: bool = False
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        cond, pooled = self.encode_token_chunks(tokens, "comfy")
        return (cond, pooled) if return_pooled else cond

    def encode(self, text: str, on_warning: Callable[[str], None] | None = None) -> list[list[Any]]:
        """CONDITIONING for a ComfyUI prompt: [[cond Tensor[1, 77k, D], {"pooled_output": ...}]]."""
        cond, pooled = self.encode_token_chunks(self.tokenize(text, on_warning), "comfy")
        return [[cond, {"pooled_output": pooled}]]


def apply_weights(z: torch.Tensor, weights: torch.Tensor, weighting: Weighting) -> torch.Tensor:
    """Token weights on encoded chunks. z: [k(+1), 77, D] (comfy: the last row is the empty prompt);
    weights: [k, 77]. Returns the weighted [k, 77, D] rows (plus the untouched empty row for comfy)."""
    k = weights.shape[0]
    w = weights.to(z.dtype).unsqueeze(-1)                                   # [k, 77, 1]
    if weighting == "comfy":
        if z.shape[0] != k + 1:
            raise ValueError(f"comfy weighting needs the empty prompt as the last row: {z.shape[0]} rows "
                             f"for {k} chunks")
        empty = z[k:k + 1]                                                   # [1, 77, D]
        moved = (z[:k] - empty) * w + empty
        out = torch.where(w != 1.0, moved, z[:k])
        return torch.cat([out, empty], dim=0)
    # a1111 "Original": multiply, then restore each chunk's overall mean
    out = z[:k] * w
    before = z[:k].mean(dim=(1, 2), keepdim=True)
    after = out.mean(dim=(1, 2), keepdim=True)
    return out * (before / after)
