"""Which `Task` class each task name builds, and the options the config gives it.

The names are `lsys.config.TASKS` (the config is loaded without torch, so they live there); this table adds the
classes. What differs between tasks (how a curriculum shortens a batch, where the vocabulary comes from, whether
building the task reads a dataset) is a `Task` method or attribute, so nothing outside `lsys.data` branches on a
task's name.
"""

from __future__ import annotations

from typing import Any

from lsys.config import TASKS, LsysConfig, to_dict
from lsys.data.mqar import MqarTask
from lsys.data.passkey import PasskeyTask
from lsys.data.task import Task, check_int
from lsys.data.text import TextTask

TASK_TYPES: dict[str, type[Task]] = {"passkey": PasskeyTask, "mqar": MqarTask, "text": TextTask}


def task_type(kind: str) -> type[Task]:
    """The class of task `kind`, one of `lsys.config.TASKS`."""
    if kind not in TASKS:
        raise ValueError(f"task kind={kind!r}: choose one of {', '.join(TASKS)}")
    return TASK_TYPES[kind]


def build_task(kind: str, seq_len: int, seed: int, *, document_masks: bool | None = None,
               restart_positions: bool | None = None, **options: Any) -> Task:
    """The task `kind` ("passkey", "mqar" or "text") for sequences of `seq_len` tokens.

    `options` are the task's own (see PasskeyTask, MqarTask, TextTask); unknown or bad ones raise ValueError
    naming the option, the value and the fix. The text task imports megatron-core (a few seconds) only here.
    `document_masks`, `restart_positions`: see `Task.set_documents` (None: the task's default).
    """
    cls = task_type(kind)
    check_int(kind, "seq_len", seq_len, 2)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r}: must be an integer")
    task = cls(seq_len, seed, **options)
    task.set_documents(document_masks, restart_positions)
    return task


def configured_task(cfg: LsysConfig) -> Task:
    """The task the config describes, with its document options (data.document_masks, data.restart_positions)."""
    return build_task(cfg.data.task, cfg.data.seq_len, cfg.data.seed, document_masks=cfg.data.document_masks,
                      restart_positions=cfg.data.restart_positions, **task_options(cfg))


def task_options(cfg: LsysConfig) -> dict[str, Any]:
    """The options of the configured task: its section of the data config (`data.passkey`, `data.text`, ...)."""
    section = getattr(cfg.data, cfg.data.task)
    return {k: v for k, v in to_dict(cfg)["data"][cfg.data.task].items() if hasattr(section, k)}


def model_vocabulary(cfg: LsysConfig, task_vocab: int) -> int:
    """The model's vocabulary: model.vocab_size (at least the task's `task_vocab`), or the task's when it is 0;
    with model.pretrained, the checkpoint's (its config.json's, at least the task's: data prepared with another
    tokenizer would index past the pretrained embedding)."""
    if cfg.model.pretrained:
        from lsys.hf.config import resolve_pretrained

        vocab = resolve_pretrained(cfg).model.vocab_size
        if vocab < task_vocab:
            raise ValueError(f"model.pretrained={cfg.model.pretrained}: its vocabulary {vocab} is smaller than the "
                             f"{cfg.data.task} task's {task_vocab}; prepare the data with its tokenizer "
                             f"(lsys prepare-data ... --pretrained {cfg.model.pretrained})")
        return vocab
    if cfg.model.vocab_size and cfg.model.vocab_size < task_vocab:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {cfg.data.task} task's "
                         f"vocabulary {task_vocab}; raise it or use 0 for the task's")
    return cfg.model.vocab_size or task_vocab


def task_vocabulary(cfg: LsysConfig) -> int:
    """The configured task's vocabulary size, without building a task that reads a dataset (see
    `Task.vocabulary`)."""
    return task_type(cfg.data.task).vocabulary(cfg.data.seq_len, cfg.data.seed, task_options(cfg))
