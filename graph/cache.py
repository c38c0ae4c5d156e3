"""The output cache: node outputs by signature, bounded in entries and estimated bytes, LRU.

Models are cached like any other output. Sizes are estimated without importing torch: tensors
report `element_size() * nelement()`, modules the sum of their parameters and buffers, objects
may offer `cache_size_bytes()`.
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, NamedTuple


class CacheEntry(NamedTuple):
    """One node's outputs (a NamedTuple: one is built per executed node, so it must be cheap)."""

    outputs: tuple[list[Any], ...]   # one list of items per output slot (lists fan out downstream)
    output_sigs: tuple[str, ...]     # the signature each output passes to its consumers
    ui: dict[str, Any] | None        # what an output node reported
    size: int
    # facts the node recorded while it ran (NodeRuntime.record: name, data), kept so that a prompt
    # served from the cache still carries them in its history (e.g. LoRA key coverage)
    node_records: tuple[tuple[str, Any], ...] = ()


def estimate_bytes(value: Any, limit: int = 10_000) -> int:
    """A rough size of a value in bytes: exact for tensors and modules, shallow elsewhere."""
    total = 0
    stack = [value]
    seen: set[int] = set()
    steps = 0
    while stack and steps < limit:
        obj = stack.pop()
        steps += 1
        if id(obj) in seen or obj is None:
            continue
        seen.add(id(obj))
        sizer = getattr(obj, "cache_size_bytes", None)
        if callable(sizer):
            total += int(sizer())
        elif hasattr(obj, "element_size") and hasattr(obj, "nelement"):
            total += int(obj.element_size()) * int(obj.nelement())
        elif callable(getattr(obj, "parameters", None)) and callable(getattr(obj, "buffers", None)):
            total += sum(int(t.element_size()) * int(t.nelement()) for t in obj.parameters())
            total += sum(int(t.element_size()) * int(t.nelement()) for t in obj.buffers())
        elif isinstance(obj, dict):
            total += sys.getsizeof(obj)
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            total += sys.getsizeof(obj)
            stack.extend(obj)
        elif isinstance(obj, (str, bytes, int, float, bool)):
            total += sys.getsizeof(obj)
        else:
            total += sys.getsizeof(obj)
            attrs = getattr(obj, "__dict__", None)
            if attrs:
                stack.extend(attrs.values())
    return total


_SCALARS = (str, int, float, bool, type(None))


def outputs_size(outputs: tuple[list[Any], ...]) -> int:
    """Bytes of a node's outputs; scalars are counted without the generic walk (the hot path)."""
    total = 0
    for items in outputs:
        for item in items:
            total += sys.getsizeof(item) if type(item) in _SCALARS else estimate_bytes(item)
    return total


class OutputCache:
    """Least-recently-used cache of node outputs keyed by signature."""

    def __init__(self, max_entries: int = 100_000, max_bytes: int = 16 * 2**30) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._bytes = 0
        self.evicted: set[str] = set()   # signatures dropped by the bounds, for "why did it run"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, sig: str) -> bool:
        return sig in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, sig: str) -> CacheEntry | None:
        entry = self._entries.get(sig)
        if entry is not None:
            self._entries.move_to_end(sig)
        return entry

    def put(self, sig: str, outputs: tuple[list[Any], ...], output_sigs: tuple[str, ...],
            ui: dict[str, Any] | None, size: int | None = None,
            node_records: tuple[tuple[str, Any], ...] = ()) -> CacheEntry:
        if size is None:
            size = outputs_size(outputs)
        old = self._entries.pop(sig, None)
        if old is not None:
            self._bytes -= old.size
        entry = CacheEntry(outputs, output_sigs, ui, size, node_records)
        self._entries[sig] = entry
        self._bytes += size
        self.evicted.discard(sig)
        self._shrink(keep=sig)
        return entry

    def _shrink(self, keep: str) -> None:
        while len(self._entries) > self.max_entries or (self._bytes > self.max_bytes and len(self._entries) > 1):
            sig, entry = next(iter(self._entries.items()))
            if sig == keep:
                self._entries.move_to_end(sig)
                if len(self._entries) == 1:
                    break
                continue
            del self._entries[sig]
            self._bytes -= entry.size
            self.evicted.add(sig)
            if len(self.evicted) > 4 * self.max_entries:
                self.evicted.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self.evicted.clear()
