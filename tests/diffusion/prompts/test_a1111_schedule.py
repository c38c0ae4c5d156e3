"""From A1111 schedules to denoiser-call ranges and CONDITIONING entries (prompts.md §3.3).

The step tables themselves (prompts.md §10.2) are in test_a1111_prompt.py."""
from __future__ import annotations

import itertools

import pytest
import torch

from diffusion.prompts.a1111.schedule import (
    CallRange,
    SubPrompt,
    a1111_subprompts,
    active_text,
    call_ranges,
    prompt_schedule,
    scheduled_conditioning,
)


def test_call_ranges_follow_the_a1111_counter() -> None:
    schedule = prompt_schedule("[cat:dog:10]", 20)
    assert call_ranges(schedule, 20) == [CallRange("cat", 0, 10, 0.0, 0.55), CallRange("dog", 11, None, 0.55, 1.0)]


@pytest.mark.parametrize("prompt, steps", [
    ("[cat:dog:10]", 20), ("[a|b|c]", 7), ("[a:b:3] [c|d]", 8), ("[x:[y:z:0.6]:0.2]", 10), ("plain", 5),
    ("[a::2] [b:5]", 6),
])
def test_ranges_tile_the_calls_and_agree_with_the_counter(prompt: str, steps: int) -> None:
    schedule = prompt_schedule(prompt, steps)
    ranges = call_ranges(schedule, steps)
    assert ranges[0].first == 0 and ranges[-1].last is None
    for a, b in itertools.pairwise(ranges):
        assert b.first == a.last + 1                                   # no gap, no overlap
    # every call of a first-order run (and the extra calls of a second-order one) gets the text
    # A1111's counter picks; past the last end step Easel keeps the last entry
    for call in range(2 * steps):
        mine = next(r.text for r in ranges if r.first <= call and (r.last is None or call <= r.last))
        want = active_text(schedule, call) if call <= schedule[-1][0] else schedule[-1][1]
        assert mine == want


def test_alternation_ranges_are_one_call_long_after_the_first() -> None:
    ranges = call_ranges(prompt_schedule("[a|b]", 4), 4)
    assert [(r.text, r.first, r.last) for r in ranges] == [("a", 0, 1), ("b", 2, 2), ("a", 3, 3), ("b", 4, None)]


def encoder() -> tuple[list[str], object]:
    calls: list[str] = []

    def encode(text: str):
        calls.append(text)
        return torch.full((1, 77, 4), float(len(text))), {"pooled_output": torch.zeros(1, 4)}
    return calls, encode


def test_each_distinct_text_is_encoded_once() -> None:
    calls, encode = encoder()
    cond = scheduled_conditioning(a1111_subprompts("[a|bb] x", 4), 4, encode)
    assert calls == ["a x", "bb x"]
    assert [e[1]["a1111_calls"] for e in cond] == [(0, 1), (2, 2), (3, 3), (4, None)]
    assert cond[0][0] is cond[2][0]                                   # same tensor reused
    assert all("start_percent" not in e[1] and "strength" not in e[1] for e in cond)


def test_unscheduled_prompt_has_no_range_keys() -> None:
    _, encode = encoder()
    (entry,) = scheduled_conditioning(a1111_subprompts("a cat", 20), 20, encode)
    assert set(entry[1]) == {"pooled_output"}


def test_and_parts_carry_their_weight_as_strength_and_a1111_and() -> None:
    _, encode = encoder()
    subs = a1111_subprompts("a [b:c:2] AND d:0.4", 4)
    assert subs == [SubPrompt(1.0, ((2, "a b"), (4, "a c"))), SubPrompt(0.4, ((4, " d"),))]
    cond = scheduled_conditioning(subs, 4, encode)
    assert [(e[1].get("strength"), e[1].get("a1111_calls")) for e in cond] == [(1.0, (0, 2)), (1.0, (3, None)),
                                                                             (0.4, None)]
    assert [e[1].get("a1111_and") for e in cond] == [1.0, 1.0, 0.4]


def test_negative_prompts_are_not_split() -> None:
    assert a1111_subprompts("a AND b", 4, split=False) == [SubPrompt(1.0, ((4, "a AND b"),))]
