"""A1111 prompt editing over sampling steps: which text is active at which denoiser call.

`prompt_schedule(prompt, steps)` gives A1111's `[(end_step, text)]` list (prompts.md §3.2):
switch points come from every `[a:b:when]` node (a `when` with a `.` is a fraction of `steps`,
otherwise a step number; `min(steps, int(...))`, kept only if >= 1), plus every step `1..steps` when
the prompt has an alternation. For each point `t` the tree is rebuilt: a schedule node yields `before`
when `t <= when`, else `after`; an alternation yields option `(t - 1) % n`.

`call_ranges(schedule)` turns that list into the denoiser-call ranges A1111 uses (prompts.md §3.3):
a counter starts at 0 and grows by one per denoiser call (so twice per step for second-order
samplers); call `c` uses the first entry whose `end_step >= c`. Entry k therefore covers calls
`end_{k-1} + 1 … end_k` (the first one from 0) and the last entry covers every call after it.
Difference from A1111: past the last `end_step` (only second-order samplers get there) A1111 falls
back to the *first* entry; Easel keeps the last one.

`scheduled_conditioning(...)` encodes each distinct text once and returns ComfyUI-style
CONDITIONING entries with `"a1111_calls": (first, last)` (`last` None = open ended): the exact
A1111 counter range, which the sampler (diffusion.sampling.denoiser) honours as "active at denoiser call c
when first <= c <= last". No `start_percent`/`end_percent` are set: ComfyUI's timestep ranges are
in sigma terms, so a step-exact switch cannot be written with them for every scheduler, and both
filters together could leave a call with no active entry. `CallRange.start_percent/end_percent`
give the step fractions for display.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffusion.prompts.a1111.chunks import EmbeddingIndex, encode_a1111
from diffusion.prompts.a1111.syntax import (
    Alternate,
    Node,
    Scheduled,
    parse_schedule_tree,
    split_and,
)


@dataclass(frozen=True)
class CallRange:
    """An entry of a schedule with the denoiser calls it covers (`last` None: to the end)."""
    text: str
    first: int
    last: int | None
    start_percent: float
    end_percent: float


@dataclass(frozen=True)
class SubPrompt:
    """One `AND` part: its composition weight and its step schedule."""
    weight: float
    schedule: tuple[tuple[int, str], ...]


def _when_step(number: str, steps: int, int_offset: int, frac_offset: float, old: bool) -> int:
    """A1111's switch step for the number text of `[a:b:number]` (may be <= 0: never `before`)."""
    value = float(number)
    if old:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - frac_offset) * steps
    else:
        value = value - int_offset
    return min(steps, int(value))


def _walk(nodes: Sequence[Node], visit: Callable[[Node], None]) -> None:
    for node in nodes:
        visit(node)
        if isinstance(node, Scheduled):
            _walk(node.before or (), visit)
            _walk(node.after, visit)
        elif isinstance(node, Alternate):
            for option in node.options:
                _walk(option, visit)


def _text_at(nodes: Sequence[Node], step: int, when: dict[int, int]) -> str:
    out: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Scheduled):
            chosen = (node.before or ()) if step <= when[id(node)] else node.after
            out.append(_text_at(chosen, step, when))
        else:
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step, when))
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, *, hires_steps: int | None = None,
                    use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """A1111's `[(end_step, text)]` schedule of one (sub-)prompt for `steps` sampling steps.

    With `hires_steps` (a hires-fix second pass over `steps` base steps) integers are offset by
    `steps` and fractions by 1.0, and the schedule is over the `hires_steps` of that pass.
    """
    if steps < 1:
        raise ValueError(f"prompt schedule: steps must be >= 1, got {steps}")
    if hires_steps is None or use_old_scheduling:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps
    tree = parse_schedule_tree(prompt)
    if tree is None:
        return [(total, prompt)]

    points = {total}
    when: dict[int, int] = {}

    def collect(node: Node) -> None:
        if isinstance(node, Scheduled):
            step = _when_step(node.when, total, int_offset, frac_offset, use_old_scheduling)
            when[id(node)] = step
            if step >= 1:
                points.add(step)
        elif isinstance(node, Alternate):
            points.update(range(1, total + 1))

    _walk(tree, collect)
    return [(t, _text_at(tree, t, when)) for t in sorted(points)]


def a1111_subprompts(prompt: str, steps: int, *, split: bool = True, **kwargs: Any) -> list[SubPrompt]:
    """AND-split (positive prompts only, `split=False` for negatives) then schedule each part."""
    parts = split_and(prompt) if split else [(prompt, 1.0)]
    return [SubPrompt(w, tuple(prompt_schedule(text, steps, **kwargs))) for text, w in parts]


def call_ranges(schedule: Sequence[tuple[int, str]], steps: int) -> list[CallRange]:
    """The denoiser calls each schedule entry covers (A1111 counter semantics, see module doc)."""
    out: list[CallRange] = []
    first = 0
    for k, (end, text) in enumerate(schedule):
        last = None if k == len(schedule) - 1 else end
        start_pct = 0.0 if k == 0 else min(1.0, first / steps)
        end_pct = 1.0 if last is None else min(1.0, (last + 1) / steps)
        out.append(CallRange(text, first, last, start_pct, end_pct))
        first = end + 1
    return out


def active_text(schedule: Sequence[tuple[int, str]], call: int) -> str:
    """The text A1111 conditions denoiser call `call` on (the reference for the ranges above)."""
    for end, text in schedule:
        if call <= end:
            return text
    return schedule[-1][1]


Encoded = tuple[Any, dict[str, Any]]     # (cond Tensor[1, T, D], extras such as pooled_output)


def scheduled_conditioning(subprompts: Sequence[SubPrompt], steps: int,
                           encode: Callable[[str], Encoded]) -> list[list[Any]]:
    """CONDITIONING for a scheduled prompt: one entry per (sub-prompt, schedule entry).

    Each distinct text is encoded once. A schedule with a single entry gets no range keys, so an
    unscheduled prompt gives exactly what a plain text encode gives. AND parts carry their weight
    as `a1111_and` (the sampler combines them A1111's way, D_u + cfg sum_k w_k (D_k - D_u)) and as
    `strength` (what ComfyUI's averaging uses where the entries travel on to other nodes).
    """
    cache: dict[str, Encoded] = {}
    out: list[list[Any]] = []
    for sub in subprompts:
        ranges = call_ranges(sub.schedule, steps)
        for r in ranges:
            if r.text not in cache:
                cache[r.text] = encode(r.text)
            cond, extras = cache[r.text]
            info = dict(extras)
            if len(ranges) > 1:
                info["a1111_calls"] = (r.first, r.last)
            if len(subprompts) > 1 or sub.weight != 1.0:
                info["strength"] = sub.weight
                info["a1111_and"] = sub.weight
            out.append([cond, info])
    return out


def a1111_conditioning(clip: Any, text: str, steps: int, *, embeddings: EmbeddingIndex | None = None,
                       weighting: str = "a1111", negative: bool = False) -> list[list[Any]]:
    """CONDITIONING of an A1111 prompt (extra-network tags already stripped) for `steps` steps:
    AND parts (positive only), schedules and alternation, A1111 chunks and weighting.
    A1111 quirk kept: on SDXL an empty negative prompt is all zeros (cond and pooled)."""
    if negative and text == "" and getattr(getattr(clip, "family", None), "name", None) == "sdxl":
        cond, extras = encode_a1111(clip, "", embeddings, weighting)
        return [[torch.zeros_like(cond), {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v
                                           for k, v in extras.items()}]]
    subprompts = a1111_subprompts(text, steps, split=not negative)
    return scheduled_conditioning(subprompts, steps, lambda t: encode_a1111(clip, t, embeddings, weighting))


__all__ = [
    "CallRange",
    "SubPrompt",
    "a1111_conditioning",
    "a1111_subprompts",
    "active_text",
    "call_ranges",
    "prompt_schedule",
    "scheduled_conditioning",
]
