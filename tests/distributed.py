"""Multi-rank test harness: run a module-level function on N gloo ranks over loopback, bounded in time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from launch.local import spawn

DEFAULT_TIMEOUT_S = 180.0


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    """`fn(*args)` on `world_size` gloo ranks (process group already initialised); returns results by rank.

    A failing rank's exception is re-raised in the test as `RankFailedError` with its traceback and rank.
    """
    return spawn(fn, world_size, args, init_backend="gloo", timeout_s=timeout_s, collective_timeout_s=60.0)


def all_ranks(results: Sequence[Any]) -> Any:
    """The one result every rank agreed on (asserts they are equal)."""
    first = results[0]
    assert all(r == first for r in results), f"ranks disagree: {results}"
    return first
