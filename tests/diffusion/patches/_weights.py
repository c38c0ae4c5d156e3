"""Helpers the patcher tests share: copies of a module's weights and a bitwise comparison."""
from __future__ import annotations

import torch


def snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def bit_equal(m: torch.nn.Module, ref: dict[str, torch.Tensor]) -> bool:
    sd = m.state_dict()
    return all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in ref.items())
