"""What every task shares: the batch layout, summable evaluation totals, per-sample random generators and the
`Task` protocol the trainer programs against."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

SPLITS = ("train", "valid")
METRICS = ("loss", "passkey_accuracy", "recall_accuracy", "bits_per_byte")

_MASK64 = (1 << 64) - 1


@dataclass
class Batch:
    """A batch of next-token-prediction sequences, all `[B, S]` on one device.

    `labels[b, i]` is the target for position `i` (the token at `i + 1`); `loss_mask[b, i]` says whether that
    target is trained and evaluated. `positions` are explicit per token (`0..S-1`, or restarting at 0 with each
    document, see `Task.restart_positions`), so they stay correct after the sequence dimension is sharded for
    context parallelism (RoPE needs them). `document_ids` say which document each token belongs to (a packed
    sequence holds several, each one contiguous run of ids increasing along the sequence); a sequence of one
    document, or a task whose attention is not masked by document, has all zeros.
    """

    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] bool
    positions: torch.Tensor  # [B, S] int64
    # [B, S] int64; a batch sharded with the "balanced" context-parallel layout holds them with that layout
    # (parallel.context.ShardedDocuments, see lsys.sharding).
    document_ids: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


@dataclass
class EvalTotals:
    """Evaluation sums that add up across batches and ranks (all-reduce `to_tensor()`, then `from_tensor`).

    Counts are floats so that one float64 vector carries them all. A "sequence" is a document of a row (the
    whole row unless packed) with at least one masked target; it is correct when every masked target in it is
    predicted right.
    """

    loss_sum: float = 0.0  # cross-entropy in nats, summed over masked targets
    tokens: float = 0.0  # masked targets
    correct_tokens: float = 0.0
    sequences: float = 0.0
    correct_sequences: float = 0.0
    bytes: float = 0.0  # UTF-8 bytes the masked targets stand for (text tasks only)

    def to_tensor(self) -> torch.Tensor:
        # -> [6] float64, in field order
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> EvalTotals:
        # values: [6] float64, as made by to_tensor (any device)
        items = values.detach().to("cpu", torch.float64).tolist()
        if len(items) != len(fields(cls)):
            raise ValueError(f"EvalTotals.from_tensor: expected {len(fields(cls))} values, got {len(items)}")
        return cls(*items)

    def __add__(self, other: EvalTotals) -> EvalTotals:
        return EvalTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    @property
    def loss(self) -> float:
        """Mean cross-entropy per masked target, in nats."""
        return self.metric("loss")

    def metric(self, name: str) -> float:
        """`loss` (nats per target), `passkey_accuracy` (share of sequences with every target right),
        `recall_accuracy` (share of targets right) or `bits_per_byte` (loss_sum / ln 2 / bytes).

        NaN when the denominator is zero, e.g. bits_per_byte of a task that has no bytes.
        """
        numerator, denominator = {
            "loss": (self.loss_sum, self.tokens),
            "passkey_accuracy": (self.correct_sequences, self.sequences),
            "recall_accuracy": (self.correct_tokens, self.tokens),
            "bits_per_byte": (self.loss_sum / math.log(2.0), self.bytes),
        }.get(name, (None, None))
        if numerator is None:
            raise ValueError(f"metric={name!r}: unknown metric; choose one of {', '.join(METRICS)}")
        return numerator / denominator if denominator else math.nan


def sample_seed(seed: int, split: str, index: int) -> int:
    """A 64-bit seed that depends only on (seed, split, index), the same in every process and world size.

    SplitMix64 finalisers chained over the three values: Python's `hash()` is salted per process, and a plain
    `seed + index` would make neighbouring seeds share most of their samples.
    """
    state = 0
    for value in (seed, SPLITS.index(split), index):
        state = _splitmix64((state ^ value) & _MASK64)
    return state


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A fresh CPU generator for one sample (see `sample_seed`)."""
    return torch.Generator().manual_seed(sample_seed(seed, split, index))


def next_token_labels(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    # tokens: [S] int64 -> labels: [S] int64, labels[i] = tokens[i + 1], the last one pad_id
    labels = torch.roll(tokens, -1)
    labels[-1] = pad_id
    return labels


def pack_samples(samples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Samples of one document each, concatenated into one sample whose `documents` number them 0, 1, ...

    Each sample's own targets stay inside it (its last label is padding, never the next sample's first token).
    """
    packed = {key: torch.cat([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
    lengths = torch.tensor([len(s["tokens"]) for s in samples])
    ids = torch.repeat_interleave(torch.arange(len(samples)), lengths)
    # [S + 1]: each token's document, then the last target's (the last sample's own padding label)
    packed["documents"] = torch.cat([ids, ids[-1:]])
    return packed


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    # document_ids: [B, S] int64 -> positions [B, S] int64, restarting at 0 wherever the id changes
    index = torch.arange(document_ids.shape[1]).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return index - torch.where(starts, index, 0).cummax(dim=1).values


def option_error(task: str, name: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{task} option {name}={value!r}: {fix}")


def check_int(task: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise option_error(task, name, value, f"must be an integer >= {minimum}")
    return value


def take_options(task: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`defaults` updated with `options`; unknown names are an error (typos must not pass silently)."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(f"{task} option {unknown[0]!r} is unknown; valid options: {', '.join(defaults)}")
    return {**defaults, **options}


class Task(ABC):
    """A next-token-prediction task of fixed sequence length.

    `sample(index, split)` is a pure function of (task options, seed, split, index): the same in every call,
    process and world size, so each data-parallel rank can draw its own share of a global batch by index and
    a resumed run sees the same data. Splits are "train" and "valid"; the same index in the two splits never
    gives the same sequence.
    """

    metric_name: str
    vocab_size: int
    bytes_per_token: float = 0.0  # UTF-8 bytes per token for bits per byte; 0 where bytes mean nothing
    reads_dataset: ClassVar[bool] = False  # building it opens files (so the memory planner does not)
    packed: bool = False  # several documents per sequence: masks and restarted positions are then the default
    # Every token is a target, so loss by position says whether later tokens gain from the context before them
    # (synthetic tasks score only their answers).
    scores_every_position: ClassVar[bool] = False

    def __init__(self, seq_len: int, seed: int, options: Mapping[str, Any]) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.options = dict(options)  # as given, to build the same task at another length
        self._shorter: dict[int, Task] = {}
        self._documents: tuple[bool | None, bool | None] = (None, None)

    def set_documents(self, masks: bool | None = None, restart_positions: bool | None = None) -> None:
        """Whether attention is masked by document (`document_masks`) and positions restart at each document
        (`restart_positions`); None is the task's default: on for a packed task, restarting iff masked."""
        for name, value in (("data.document_masks", masks), ("data.restart_positions", restart_positions)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: use true, false or null (the task's default)")
        self._documents = (masks, restart_positions)

    @property
    def document_masks(self) -> bool:
        """Whether a query attends only within its document (and a document's last token has no target)."""
        masks = self._documents[0]
        return self.packed if masks is None else masks

    @property
    def restart_positions(self) -> bool:
        """Whether RoPE positions restart at 0 with each document, as if each were its own sequence."""
        restart = self._documents[1]
        return self.document_masks if restart is None else restart

    @classmethod
    def vocabulary(cls, seq_len: int, seed: int, options: Mapping[str, Any]) -> int:
        """The vocabulary size of the task these arguments build, checking them as building it does. Synthetic
        tasks are cheap to build; a task that reads a dataset overrides this to read no more than it must."""
        return cls(seq_len, seed, **options).vocab_size

    @abstractmethod
    def sample(self, index: int, split: str = "train") -> dict[str, torch.Tensor]:
        """One sequence: `tokens` [S] int64, `labels` [S] int64 (next tokens), `loss_mask` [S] bool; a packed
        one adds `documents` [S + 1] int64, the document of each token and then of the last label."""

    def batch(self, indices: Sequence[int], split: str = "train") -> Batch:
        """Samples `indices` of `split` stacked into a CPU `Batch` [len(indices), S]."""
        samples = [self.sample(int(i), split) for i in indices]
        if not samples:
            raise ValueError("indices: empty; a batch needs at least one sample index")
        stacked = {key: torch.stack([s[key] for s in samples]) for key in ("tokens", "labels", "loss_mask")}
        one_document = torch.zeros(self.seq_len + 1, dtype=torch.int64)
        documents = torch.stack([s.get("documents", one_document) for s in samples])  # [B, S + 1]
        document_ids = documents[:, :-1].contiguous()
        if self.restart_positions:
            positions = document_positions(document_ids)
        else:
            positions = torch.arange(self.seq_len, dtype=torch.int64).expand(len(samples), -1).contiguous()
        if not self.document_masks:
            return Batch(positions=positions, document_ids=torch.zeros_like(document_ids), **stacked)
        # A document's last token cannot see the next document, so predicting its first token is not trained.
        stacked["loss_mask"] = stacked["loss_mask"] & (documents[:, 1:] == document_ids)
        return Batch(positions=positions, document_ids=document_ids, **stacked)

    def batch_of_length(self, indices: Sequence[int], length: int, split: str = "train") -> Batch:
        """Samples `indices` of `split` at `length` <= seq_len tokens, for a sequence-length curriculum.

        Generated at that length (so the answer still ends every sequence) by this task rebuilt with the same
        seed and options, once per length.
        """
        if length == self.seq_len:
            return self.batch(indices, split)
        if length not in self._shorter:
            self._shorter[length] = type(self)(length, self.seed, **self.options)
            self._shorter[length].set_documents(*self._documents)
        return self._shorter[length].batch(indices, split)

    @classmethod
    def needle_tokens(cls, options: Mapping[str, Any]) -> int:
        """For a task that reads a dataset (so `lsys eval` does not build it to try): the most tokens a needle
        sample's fixed parts take, from the task options alone; a needle length must exceed it. 0: not known."""
        return 0

    def needle_task(self, length: int, depth: float) -> Task | None:
        """Needle in a haystack for `lsys eval`: a task of `length`-token samples, each one document hiding one
        needle after `depth` (0..1) of its filler, scored by `passkey_accuracy`; None for a task without one."""
        return None

    def pairs_task(self, num_pairs: int) -> Task | None:
        """Associative recall with `num_pairs` bindings at this length, scored by `recall_accuracy`; None for a
        task without bindings."""
        return None

    def eval_totals(self, batch: Batch, predictions: torch.Tensor, token_losses: torch.Tensor) -> EvalTotals:
        """Totals of one batch.

        predictions: [B, S] int64, the model's argmax at each position; token_losses: [B, S] float, the
        per-position cross-entropy in nats (any value, even NaN, where `loss_mask` is False).
        """
        shape = batch.labels.shape
        for name, value in (("predictions", predictions), ("token_losses", token_losses)):
            if value.shape != shape:
                raise ValueError(f"{name}: shape {tuple(value.shape)} differs from the batch's "
                                 f"{tuple(shape)}")
        mask = batch.loss_mask.to(predictions.device)
        right = (predictions == batch.labels.to(predictions.device)) & mask
        losses = token_losses.detach().to(torch.float64).masked_fill(~mask.to(token_losses.device), 0.0)
        # Each (row, document) is one sequence: a packed row holds several, each right on its own.
        rows = torch.arange(shape[0], device=mask.device).unsqueeze(1).expand(shape)
        keys = torch.stack([rows, batch.document_ids.to(mask.device)], dim=-1).flatten(0, 1)  # [B*S, 2]
        groups = torch.unique(keys, dim=0, return_inverse=True)[1]
        targets = torch.bincount(groups, weights=mask.flatten().double())
        hits = torch.bincount(groups, weights=right.flatten().double(), minlength=len(targets))
        has_targets = targets > 0
        tokens = float(targets.sum())
        return EvalTotals(
            loss_sum=float(losses.sum()),
            tokens=tokens,
            correct_tokens=float(right.sum()),
            sequences=float(has_targets.sum()),
            correct_sequences=float((has_targets & (hits == targets)).sum()),
            bytes=tokens * self.bytes_per_token,
        )

    def check_index(self, index: int, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
        if index < 0:
            raise ValueError(f"index={index}: sample indices start at 0")


class PackableTask(Task):
    """A synthetic task with a `pack` option: that many of its samples (seq_len / pack tokens each, each its own
    document) share one sequence; sample i holds samples i * pack ... i * pack + pack - 1 of the unpacked task."""

    pack: int = 1

    def check_pack(self, task: str, pack: Any) -> int:
        """Set `pack` from the option's value (checked); returns the length of one sample, seq_len / pack."""
        self.pack = check_int(task, "pack", pack, 1)
        self.packed = self.pack > 1
        if self.seq_len % self.pack:
            raise option_error(task, "pack", self.pack, f"must divide seq_len={self.seq_len} (each sample gets "
                               "seq_len / pack tokens)")
        return self.seq_len // self.pack

    def sample(self, index: int, split: str = "train") -> dict[str, torch.Tensor]:
        self.check_index(index, split)
        return pack_samples([self.one_sample(index * self.pack + j, split) for j in range(self.pack)])

    @abstractmethod
    def one_sample(self, index: int, split: str) -> dict[str, torch.Tensor]:
        """Unpacked sample `index` of `split`, seq_len / pack tokens: `tokens`, `labels`, `loss_mask`."""
