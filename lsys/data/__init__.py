"""Training data: synthetic long-context tasks (passkey retrieval, multi-query associative recall) and real
text through megatron-core indexed datasets, all behind one `Task` interface addressed by sample index.

    task = build_task("passkey", seq_len=1024, seed=0, key_len=4)
    batch = task.batch(range(8))                      # Batch of [8, 1024] tensors
    totals = task.eval_totals(batch, predictions, token_losses)
    totals.metric(task.metric_name)

A prepared text dataset is checked before use (`check_text_dataset`, `check_text_inputs`): a missing, truncated
or mismatched file is a ValueError naming it, never a megatron-core assert or samples read from garbage.

Nothing here touches torch.distributed, except that building the "text" task lets megatron-core coordinate
its index cache over the default process group when one exists (see `lsys.data.text`).
"""

from __future__ import annotations

from typing import Any

from lsys.config import TASKS
from lsys.data.mqar import MqarTask
from lsys.data.passkey import PasskeyTask
from lsys.data.prepare import prepare_text_dataset
from lsys.data.task import METRICS, SPLITS, Batch, EvalTotals, Task, check_int
from lsys.data.tokenizer import load_tokenizer
from lsys.data.verify import check_text_dataset, check_text_inputs

__all__ = ["METRICS", "SPLITS", "TASKS", "Batch", "EvalTotals", "Task", "build_task", "check_text_dataset",
           "check_text_inputs", "load_tokenizer", "prepare_text_dataset"]


def build_task(kind: str, seq_len: int, seed: int, **options: Any) -> Task:
    """The task `kind` ("passkey", "mqar" or "text") for sequences of `seq_len` tokens.

    `options` are the task's own (see PasskeyTask, MqarTask, TextTask); unknown or bad ones raise ValueError
    naming the option, the value and the fix. The text task imports megatron-core (a few seconds) only here.
    """
    if kind not in TASKS:
        raise ValueError(f"task kind={kind!r}: choose one of {', '.join(TASKS)}")
    check_int(kind, "seq_len", seq_len, 2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")
    if kind == "passkey":
        return PasskeyTask(seq_len, seed, **options)
    if kind == "mqar":
        return MqarTask(seq_len, seed, **options)
    from lsys.data.text import TextTask

    return TextTask(seq_len, seed, **options)
