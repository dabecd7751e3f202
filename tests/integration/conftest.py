"""Fixtures of the integration tests (the qemu marker's tool checks are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.migration_helpers import Cluster, short_dir


@pytest.fixture
def mig() -> Iterator[Cluster]:
    """A short work directory and the processes of one test, stopped and checked at teardown."""
    with short_dir() as path:
        cluster = Cluster(path)
        try:
            yield cluster
        finally:
            cluster.close()
