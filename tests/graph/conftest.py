from __future__ import annotations

import pytest

from graph.cache import OutputCache
from graph.events import EventLog
from graph.executor import Executor
from nodes.registry import Registry

from . import testnodes


@pytest.fixture
def registry() -> Registry:
    reg = Registry()
    reg.register_module(testnodes, builtin=True)
    return reg


@pytest.fixture
def log() -> EventLog:
    testnodes.CALLS.clear()
    return EventLog()


@pytest.fixture
def executor(registry: Registry, log: EventLog) -> Executor:
    return Executor(registry, OutputCache(), log)
