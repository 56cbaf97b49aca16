"""Importing megatron-core's dataset code: only when a text dataset is used (the import takes seconds),
without the warnings its package import raises, and with a clear message when its C++ helpers are missing."""

from __future__ import annotations

import warnings


def import_megatron_datasets() -> None:
    """Import `megatron.core.datasets` (later `from megatron.core.datasets... import` lines are then cheap).

    The wheel ships `helpers_cpp` prebuilt, which GPTDataset needs to build its sample index. It is checked
    here rather than compiled on demand: `compile_helpers()` runs `make` inside site-packages, races when
    several ranks do it, and calls `sys.exit` when it fails.
    """
    with warnings.catch_warnings():
        # megatron.core's package import pulls in its model-parallel and inference stack; the warnings it
        # raises (missing Transformer Engine / Apex, deprecations) are about code lsys does not use.
        warnings.simplefilter("ignore")
        import megatron.core.datasets  # noqa: F401
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "megatron-core's C++ dataset helpers (megatron.core.datasets.helpers_cpp) do not import; build "
            "them once, in a single process, with `python -c 'from megatron.core.datasets.utils import "
            "compile_helpers; compile_helpers()'` (needs make and a C++ compiler)") from err
