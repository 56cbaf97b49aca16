"""Training data: synthetic long-context tasks (passkey retrieval, multi-query associative recall) and real
text through megatron-core indexed datasets, all behind one `Task` interface addressed by sample index.

    task = build_task("passkey", seq_len=1024, seed=0, key_len=4)
    batch = task.batch(range(8))                      # Batch of [8, 1024] tensors
    totals = task.eval_totals(batch, predictions, token_losses)
    totals.metric(task.metric_name)

Task names are `lsys.config.TASKS`; `TASK_TYPES` maps them to classes, and `task_options(cfg)` /
`task_vocabulary(cfg)` read a task from the config, so no caller branches on a task's name.

A prepared text dataset is checked before use (`check_text_dataset`, `check_text_inputs`): a missing, truncated
or mismatched file is a ValueError naming it, never a megatron-core assert or samples read from garbage.

Nothing here touches torch.distributed, except that building the "text" task lets megatron-core coordinate
its index cache over the default process group when one exists (see `lsys.data.text`).
"""

from __future__ import annotations

from lsys.config import TASKS
from lsys.data.prepare import prepare_text_dataset
from lsys.data.registry import (
    TASK_TYPES,
    build_task,
    configured_task,
    model_vocabulary,
    task_options,
    task_type,
    task_vocabulary,
)
from lsys.data.task import METRICS, SPLITS, Batch, EvalTotals, Task
from lsys.data.tokenizer import load_tokenizer
from lsys.data.verify import check_text_dataset, check_text_inputs

__all__ = ["METRICS", "SPLITS", "TASKS", "TASK_TYPES", "Batch", "EvalTotals", "Task", "build_task",
           "check_text_dataset", "check_text_inputs", "configured_task", "load_tokenizer", "model_vocabulary",
           "prepare_text_dataset", "task_options", "task_type", "task_vocabulary"]
