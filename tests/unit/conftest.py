"""Fixtures of the unit tests that run a block layer in process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from qmpd.block.core import BlockLayer


@pytest.fixture
async def layer() -> AsyncIterator[BlockLayer]:
    """An empty block layer, closed after the test."""
    block = BlockLayer()
    yield block
    await block.close_all()
    block.graph.close()
