"""Multi-query associative recall (Zoology-style): bind keys to values, wait, then look several of them up.

    BOS, k1 v1 ... kn vn, filler..., q1 v(q1) ... qm v(qm)

Keys come from their own vocabulary and are distinct within a sequence, so each query has one answer; values
and filler come from vocabularies of their own, so a value or a filler token is never mistaken for a key. The
filler puts the lookups far from the bindings, which is what makes the task a long-context test.
"""

from __future__ import annotations

from typing import Any

import torch

from lsys.data.task import (
    PackableTask,
    check_int,
    next_token_labels,
    option_error,
    sample_generator,
    take_options,
)

PAD, BOS = 0, 1
FIRST_KEY = 2

DEFAULTS = {"num_pairs": 8, "num_queries": None, "key_vocab": 32, "value_vocab": 32, "filler_vocab": 16, "pack": 1}


class MqarTask(PackableTask):
    """Vocabulary: 0 PAD, 1 BOS, `key_vocab` keys, `value_vocab` values, `filler_vocab` filler tokens.

    `num_pairs` key-value pairs open the sequence (keys distinct, values drawn with replacement); the last
    `2 * num_queries` tokens ask `num_queries` distinct keys in random order, each followed by its value.
    Targets are the value after each asked key (`loss_mask` True at the key); `recall_accuracy` is the share
    right.
    `num_queries` defaults to `num_pairs` (every key asked once).

    `pack` > 1 packs that many samples into one sequence (see PackableTask).
    """

    metric_name = "recall_accuracy"

    def __init__(self, seq_len: int, seed: int, **options: Any) -> None:
        super().__init__(seq_len, seed, options)
        opts = take_options("mqar", options, DEFAULTS)
        self.num_pairs = check_int("mqar", "num_pairs", opts["num_pairs"], 1)
        queries = self.num_pairs if opts["num_queries"] is None else opts["num_queries"]
        self.num_queries = check_int("mqar", "num_queries", queries, 1)
        self.key_vocab = check_int("mqar", "key_vocab", opts["key_vocab"], 1)
        self.value_vocab = check_int("mqar", "value_vocab", opts["value_vocab"], 1)
        self.filler_vocab = check_int("mqar", "filler_vocab", opts["filler_vocab"], 1)
        piece = self.check_pack("mqar", opts["pack"])
        if self.num_queries > self.num_pairs:
            raise option_error("mqar", "num_queries", self.num_queries,
                               f"each key is asked at most once, so use at most num_pairs={self.num_pairs}")
        if self.num_pairs > self.key_vocab:
            raise option_error("mqar", "num_pairs", self.num_pairs,
                               f"keys are distinct, so use at most key_vocab={self.key_vocab}")
        minimum = 1 + 2 * self.num_pairs + 2 * self.num_queries
        if piece < minimum:
            raise ValueError(f"seq_len={seq_len}: mqar with num_pairs={self.num_pairs}, "
                             f"num_queries={self.num_queries} and pack={self.pack} needs at least {minimum} tokens "
                             "per sample; raise seq_len or lower num_pairs / num_queries / pack")
        self.first_value = FIRST_KEY + self.key_vocab
        self.first_filler = self.first_value + self.value_vocab
        self.vocab_size = self.first_filler + self.filler_vocab
        self.num_filler = piece - minimum
        self._loss_mask = torch.zeros(piece, dtype=torch.bool)
        self._loss_mask[piece - 2 * self.num_queries :: 2] = True

    def pairs_task(self, num_pairs: int) -> MqarTask:
        """This task with `num_pairs` bindings, every key asked once (unpacked, at this length)."""
        return MqarTask(self.seq_len, self.seed, **{**self.options, "num_pairs": num_pairs, "num_queries": None,
                                                    "pack": 1})

    def one_sample(self, index: int, split: str) -> dict[str, torch.Tensor]:
        gen = sample_generator(self.seed, split, index)
        keys = torch.randperm(self.key_vocab, generator=gen)[: self.num_pairs] + FIRST_KEY
        values = torch.randint(self.first_value, self.first_filler, (self.num_pairs,), generator=gen)
        filler = torch.randint(self.first_filler, self.vocab_size, (self.num_filler,), generator=gen)
        asked = torch.randperm(self.num_pairs, generator=gen)[: self.num_queries]
        # [n, 2] -> interleaved k1 v1 k2 v2 ...
        bindings = torch.stack([keys, values], dim=1).flatten()
        lookups = torch.stack([keys[asked], values[asked]], dim=1).flatten()
        tokens = torch.cat([torch.tensor([BOS]), bindings, filler, lookups])
        labels = next_token_labels(tokens, PAD)
        return {"tokens": tokens, "labels": labels, "loss_mask": self._loss_mask.clone()}
