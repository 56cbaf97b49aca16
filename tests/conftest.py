"""Which tests run. `make test` (CI) runs everything except the `exhaustive` variants: cases whose path a
cheaper or neighbouring case already exercises, kept for `make test-all` (LSYS_EXHAUSTIVE=1) before a release."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("LSYS_EXHAUSTIVE") == "1":
        return
    skip = pytest.mark.skip(reason="exhaustive variant: LSYS_EXHAUSTIVE=1 (make test-all) runs it")
    for item in items:
        if item.get_closest_marker("exhaustive"):
            item.add_marker(skip)
