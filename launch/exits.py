"""Exit codes of the `lsys` commands, one home for all of them (docs/reliability.md lists them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

INVALID_INPUT = 2  # a bad config, override, path or option: one `lsys: invalid input: ...` line, nothing started
NONFINITE = 3  # train.nonfinite ended the run: a step's loss or gradient norm was not finite
TIMEOUT = 124  # --timeout expired and every rank was stopped (as timeout(1) reports it)


def invalid_input(console: Console, exc: Exception) -> int:
    """Refuse a bad input the one way every command does: one `lsys: invalid input: ...` line, INVALID_INPUT."""
    from rich.markup import escape

    # Escaped: a message may hold brackets (a pip extra, a list) that rich would take for markup and drop.
    console.print(f"[bold red]lsys: invalid input:[/] {escape(str(exc))}", highlight=False)
    return INVALID_INPUT
