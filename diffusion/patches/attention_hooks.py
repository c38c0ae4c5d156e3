"""Attention hooks: an attention processor that passes the key/value input of diffusers attention
modules through `model_options["attn1_kv"]` / `["attn2_kv"]` callables (docs/contracts.md), which
hypernetworks provide. The model patcher installs and removes it."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F



class KVHookProcessor:
    """A diffusers attention processor that passes the key/value input (the text context for
    `attn2`, the hidden states for self-attention `attn1`) through the `<kind>_kv` hooks before
    the key and value projections (hypernetworks)."""

    def __init__(self, hooks: Sequence[Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]) -> None:
        self.hooks = list(hooks)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:                                            # [B, C, H, W] -> [B, HW, C]
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, seq_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        context_k, context_v = context, context                       # [B, T, D] each
        for fn in self.hooks:
            context_k, context_v = fn(context_k, context_v)
        key = attn.to_k(context_k)
        value = attn.to_v(context_v)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)   # [B, heads, N, hd]
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                             is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


HOOK_KINDS = ("attn1", "attn2")   # self-attention, cross-attention: model_options["<kind>_kv"]


def attention_modules(model: torch.nn.Module, kind: str) -> list[tuple[str, torch.nn.Module]]:
    return [(name, mod) for name, mod in model.named_modules()
            if name.endswith(kind) and hasattr(mod, "set_processor") and hasattr(mod, "processor")]
