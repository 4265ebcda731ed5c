"""Fixtures of the security tests: one live coordinator process for the whole directory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_stack import Live, live_coordinator


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    yield from live_coordinator(tmp_path_factory)
