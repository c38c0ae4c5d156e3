from __future__ import annotations

import pytest

from graph.cache import OutputCache, estimate_bytes


class Tensorish:
    """Duck-typed like a tensor: 4 bytes x n elements."""

    def __init__(self, n: int) -> None:
        self.n = n

    def element_size(self) -> int:
        return 4

    def nelement(self) -> int:
        return self.n


def test_estimate_counts_tensor_bytes() -> None:
    assert estimate_bytes([Tensorish(1000)]) >= 4000
    assert estimate_bytes({"samples": Tensorish(10_000)}) >= 40_000


def test_lru_by_entries() -> None:
    cache = OutputCache(max_entries=2)
    cache.put("a", ([1],), ("a:0",), None)
    cache.put("b", ([2],), ("b:0",), None)
    assert cache.get("a") is not None        # a becomes most recent
    cache.put("c", ([3],), ("c:0",), None)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert "b" in cache.evicted


def test_lru_by_bytes() -> None:
    cache = OutputCache(max_bytes=100_000)
    cache.put("a", ([Tensorish(10_000)],), ("a:0",), None)   # ~40 kB
    cache.put("b", ([Tensorish(10_000)],), ("b:0",), None)
    cache.put("c", ([Tensorish(10_000)],), ("c:0",), None)   # over 100 kB: a goes
    assert "a" not in cache and "b" in cache and "c" in cache
    assert cache.bytes <= 100_000


def test_single_oversized_entry_is_kept() -> None:
    cache = OutputCache(max_bytes=10)
    cache.put("a", ([Tensorish(100)],), ("a:0",), None)
    assert "a" in cache


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        OutputCache(max_entries=0)
