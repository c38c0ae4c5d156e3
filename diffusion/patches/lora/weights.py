"""Weight deltas of the LoRA family (formats.md 2.3 - 2.5): pure functions from tensors to deltas,
and one frozen record per module type that the model patcher applies.

Notation: W original weight `[out, in]` or `[out, in, kh, kw]`, r rank, alpha the stored alpha,
s = alpha / r (1 when the file has no alpha), m the user strength. Every record's
`delta(W)` returns `s * dW` in fp32 with W's shape (the strength is applied by the patcher:
`W <- W + m * delta(W)`). DoRA and IA3 deltas depend on the running weight W
(`weight_dependent = True`); the patcher caches them keyed by what was applied before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

F32 = torch.float32


def _f32(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    return t.to(device=device, dtype=F32)


def alpha_scale(alpha: float | None, rank: int) -> float:
    """s = alpha / r; s = 1 when the file stores no alpha."""
    return 1.0 if alpha is None else float(alpha) / float(rank)


# ----------------------------------------------------------------------------------------------
# pure delta functions (no scale, no strength)


def lora_delta(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA / LoCon: dW = up @ down, flattened to 2-D `[out, in*kh*kw]`.

    up `[out, r]` or `[out, r, 1, 1]`; down `[r, in]` or `[r, in, kh, kw]`.
    Tucker (mid `[r, r, kh, kw]`, down `[r, in, 1, 1]`): dW[o,i,y,x] = sum_{p,q} up[o,p] mid[p,q,y,x] down[q,i],
    returned 4-D `[out, in, kh, kw]`."""
    up2 = up.reshape(up.shape[0], -1)                     # [out, r]
    down2 = down.reshape(down.shape[0], -1)               # [r, in*kh*kw]
    if mid is None:
        return up2 @ down2
    return torch.einsum("op,pqyx,qi->oiyx", up2, mid, down2)


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """M[o,i,y,x] = sum_{p,q} t[p,q,y,x] * wa[p,o] * wb[q,i]; t `[r, r, kh, kw]`, wa `[r, out]`, wb `[r, in]`."""
    return torch.einsum("pqyx,po,qi->oiyx", t, wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1))


def loha_delta(w1_a: torch.Tensor, w1_b: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor,
               t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b) (Hadamard product), 2-D `[out, in*kh*kw]`.

    With Tucker cores (conv): dW = tucker(t1, w1_a, w1_b) * tucker(t2, w2_a, w2_b), 4-D; there
    the `_a` factors are `[r, out]` (transposed)."""
    if t1 is not None and t2 is not None:
        return tucker_rebuild(t1, w1_a, w1_b) * tucker_rebuild(t2, w2_a, w2_b)
    m1 = w1_a.reshape(w1_a.shape[0], -1) @ w1_b.reshape(w1_b.shape[0], -1)
    m2 = w2_a.reshape(w2_a.shape[0], -1) @ w2_b.reshape(w2_b.shape[0], -1)
    return m1 * m2


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """LoKr: dW = w1 (x) w2 (Kronecker). w1 `[a, c]`; w2 `[b, d]` or `[b, d, kh, kw]` (then w1 is
    viewed as `[a, c, 1, 1]`); result `[a*b, c*d(, kh, kw)]`."""
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1.contiguous(), w2.contiguous())


def dora_weight(weight: torch.Tensor, scaled_delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA: W' = W + s*dW; W_d = W' * dora_scale / (||W'|| + eps).

    The norm axis follows dora_scale's shape: `[out]`, `[out, 1(, 1, 1)]` -> per output row (norm over
    all other axes); `[1, in(, 1, 1)]` -> per input column (norm over out and the kernel axes)."""
    w = weight + scaled_delta
    eps = torch.finfo(F32).eps
    mag = dora_scale.to(device=w.device, dtype=F32)
    if _dora_on_output(mag, w):
        norm = w.reshape(w.shape[0], -1).norm(dim=1)                               # [out]
        shape = (w.shape[0],) + (1,) * (w.dim() - 1)
        return w * (mag.reshape(shape) / (norm.reshape(shape) + eps))
    norm = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)                    # [in]
    shape = (1, w.shape[1]) + (1,) * (w.dim() - 2)
    return w * (mag.reshape(shape) / (norm.reshape(shape) + eps))


def _dora_on_output(mag: torch.Tensor, w: torch.Tensor) -> bool:
    if mag.dim() == 1:
        return mag.shape[0] == w.shape[0]
    return mag.shape[0] == w.shape[0] and mag.shape[1] == 1 and not (mag.shape[0] == 1 and w.shape[0] != 1)


def ia3_delta(weight: torch.Tensor, w: torch.Tensor, on_input: bool) -> torch.Tensor:
    """IA3: dW = W * w, broadcast per output row (`w[:, None, ...]`) or per input column."""
    w = w.to(device=weight.device, dtype=F32)
    if on_input:
        return weight * w.reshape((1, -1) + (1,) * (weight.dim() - 2))
    return weight * w.reshape((-1,) + (1,) * (weight.dim() - 1))


def fit_delta(delta: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Reshape a (flattened) delta to the weight's shape; a conv delta with fewer input channels
    (a 4-channel LoRA on a 9-channel inpainting conv_in) is zero-padded along the input axis."""
    shape = tuple(shape)
    if delta.numel() == _numel(shape):
        return delta.reshape(shape)
    padded = padded_in_channels(tuple(delta.shape), shape)
    if padded is None:
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a weight of shape {shape}")
    d4 = delta.reshape(padded)
    out = torch.zeros(shape, dtype=delta.dtype, device=delta.device)
    out[:, : padded[1]] = d4
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def padded_in_channels(delta_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The 4-D shape `[out, in', kh, kw]` (in' < in) a delta has when it can be zero-padded into a conv
    weight of `shape`, else None."""
    if len(shape) != 4:
        return None
    out, cin, kh, kw = shape
    n = _numel(delta_shape)
    if delta_shape[0] != out or n % (out * kh * kw):
        return None
    cin2 = n // (out * kh * kw)
    return (out, cin2, kh, kw) if 0 < cin2 < cin else None


# ----------------------------------------------------------------------------------------------
# records: what the patcher applies per parameter


@dataclass(frozen=True, eq=False)
class _Adapter:
    def scaled(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight_dependent(self) -> bool:
        return getattr(self, "dora_scale", None) is not None

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """fp32 `s*dW` with the weight's shape; DoRA: `W_d - W`."""
        d = fit_delta(self.scaled(weight.shape, weight.device), weight.shape)
        dora = getattr(self, "dora_scale", None)
        if dora is None:
            return d
        return dora_weight(weight, d, dora) - weight


@dataclass(frozen=True, eq=False)
class LoRA(_Adapter):
    """LoRA / LoCon (optionally Tucker `mid`) / PEFT `lora_A`/`lora_B`; s = alpha / down.shape[0]."""

    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    kind = "lora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return alpha_scale(self.alpha, self.rank)

    def delta_shape(self) -> tuple[int, ...]:
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def scaled(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        d = lora_delta(_f32(self.up, device), _f32(self.down, device),
                       None if self.mid is None else _f32(self.mid, device))
        return d * self.scale

    def lowrank_factors(self, shape: torch.Size, device: torch.device
                        ) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(up `[out, r]`, down `[r, in*kh*kw]`, s) in fp32 when `s * up @ down` is the whole delta
        for a weight of `shape` (no Tucker mid, no DoRA, sizes match); else None."""
        if self.mid is not None or self.dora_scale is not None or _numel(self.delta_shape()) != _numel(shape):
            return None
        up2 = _f32(self.up, device).reshape(shape[0], -1)
        down2 = _f32(self.down, device).reshape(up2.shape[1], -1)
        return up2, down2, self.scale

    def addmm_into(self, base: torch.Tensor, strength: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """`base + strength * s * up @ down` in one fused pass over W (plain LoRA, no mid/DoRA).

        out None: a new fp32 tensor; out is base: base (fp32) is updated in place; else written into
        out (fp32, base's shape)."""
        shape = base.shape
        if self.mid is not None or _numel(self.delta_shape()) != base.numel():
            d = fit_delta(self.scaled(shape, base.device), shape)
            if out is base:
                return base.add_(d, alpha=strength)
            return torch.add(base.float(), d, alpha=strength, out=out) if out is not None else base.float().add(d, alpha=strength)
        up2 = _f32(self.up, base.device).reshape(shape[0], -1)          # [out, r]
        down2 = _f32(self.down, base.device).reshape(up2.shape[1], -1)  # [r, in*kh*kw]
        c = float(strength) * self.scale
        if out is base:
            base.view(shape[0], -1).addmm_(up2, down2, alpha=c)
            return base
        b2 = base.reshape(shape[0], -1)
        if b2.dtype != F32:
            b2 = b2.float()
            return (b2.addmm_(up2, down2, alpha=c).reshape(shape) if out is None
                    else out.copy_(b2.addmm_(up2, down2, alpha=c).reshape(shape)))
        if out is not None:
            torch.addmm(b2, up2, down2, alpha=c, out=out.view(shape[0], -1))
            return out
        return torch.addmm(b2, up2, down2, alpha=c).reshape(shape)


@dataclass(frozen=True, eq=False)
class LoHa(_Adapter):
    """LoHa (Hadamard product of two low-rank products), optional Tucker cores; s = alpha / w1_b.shape[0]."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    kind = "loha"

    @property
    def scale(self) -> float:
        return alpha_scale(self.alpha, int(self.w1_b.shape[0]))

    def delta_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (self.w1_a.shape[1], self.w1_b.shape[1], *self.t1.shape[2:])
        return (self.w1_a.shape[0], _numel(tuple(self.w1_b.shape[1:])))

    def scaled(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        opt = (lambda t: None if t is None else _f32(t, device))
        d = loha_delta(_f32(self.w1_a, device), _f32(self.w1_b, device), _f32(self.w2_a, device),
                       _f32(self.w2_b, device), opt(self.t1), opt(self.t2))
        return d * self.scale


@dataclass(frozen=True, eq=False)
class LoKr(_Adapter):
    """LoKr: dW = w1 (x) w2, each side full or factored (`_a @ _b`), w2 optionally Tucker (t2).
    s = alpha / r with r = w2_b.shape[0] if w2 is factored, else w1_b.shape[0] if w1 is; s = 1 when
    neither side is factored (whatever alpha says)."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    kind = "lokr"

    def __post_init__(self) -> None:
        if self.w1 is None and (self.w1_a is None or self.w1_b is None):
            raise ValueError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if self.w2 is None and (self.w2_a is None or self.w2_b is None):
            raise ValueError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")

    @property
    def scale(self) -> float:
        if self.w2 is None:
            return alpha_scale(self.alpha, int(self.w2_b.shape[0]))       # type: ignore[union-attr]
        if self.w1 is None:
            return alpha_scale(self.alpha, int(self.w1_b.shape[0]))       # type: ignore[union-attr]
        return 1.0

    def factors(self, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1_a, device) @ _f32(self.w1_b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = tucker_rebuild(_f32(self.t2, device), _f32(self.w2_a, device), _f32(self.w2_b, device))
        else:
            a, b = _f32(self.w2_a, device), _f32(self.w2_b, device)
            w2 = (a @ b.reshape(b.shape[0], -1)).reshape(a.shape[0], *b.shape[1:])   # [b, d(, kh, kw)]
        return w1, w2

    def delta_shape(self) -> tuple[int, ...]:
        # w1 [a, c] (x) w2 [b, d(, kh, kw)] -> [a*b, c*d(, kh, kw)]
        a, c = (self.w1.shape if self.w1 is not None else (self.w1_a.shape[0], self.w1_b.shape[-1]))  # type: ignore[union-attr]
        if self.w2 is not None:
            w2s = tuple(self.w2.shape)
        elif self.t2 is not None:
            w2s = (self.w2_a.shape[1], self.w2_b.shape[1], *self.t2.shape[2:])             # type: ignore[union-attr]
        else:
            w2s = (self.w2_a.shape[0], *self.w2_b.shape[1:])                                # type: ignore[union-attr]
        if len(w2s) < 2:
            raise ValueError(f"lokr_w2 has shape {list(w2s)}")
        return (a * w2s[0], c * w2s[1], *w2s[2:])

    def scaled(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        w1, w2 = self.factors(device)
        d = lokr_delta(w1, w2)
        if d.dim() != len(shape) and d.numel() == _numel(tuple(shape)):
            d = d.reshape(shape)
        return d * self.scale


@dataclass(frozen=True, eq=False)
class Full(_Adapter):
    """Full difference: dW = diff (`diff` for weights, `diff_b` for biases, `w_norm`/`b_norm` for norms)."""

    diff: torch.Tensor
    dora_scale: torch.Tensor | None = None

    kind = "full"

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.diff.shape)

    def scaled(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        return _f32(self.diff, device)


@dataclass(frozen=True, eq=False)
class SetWeight(_Adapter):
    """`set_weight` (ComfyUI): W <- value, whatever the strength (strength 0 still means no patch)."""

    value: torch.Tensor

    kind = "set"
    sets_weight = True

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """Here: the new weight itself (the patcher copies it in)."""
        return fit_delta(_f32(self.value, weight.device), weight.shape)


@dataclass(frozen=True, eq=False)
class IA3(_Adapter):
    """IA3 (A1111): dW = W * w per output row, or per input column when `on_input`; no alpha."""

    w: torch.Tensor
    on_input: bool = False

    kind = "ia3"

    @property
    def weight_dependent(self) -> bool:
        return True

    def delta_shape(self) -> tuple[int, ...]:
        return ()

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        return ia3_delta(weight, self.w, self.on_input)


Adapter = LoRA | LoHa | LoKr | Full | SetWeight | IA3
