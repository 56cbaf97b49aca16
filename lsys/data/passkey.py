"""Passkey retrieval: a short key hidden at a random depth in filler, asked for at the very end.

    BOS, filler..., KEY, d1..dk, filler..., QUERY, KEY, d1..dk

Digit j of the key is drawn from its own set of `key_vocab` symbols (like a key written "A7 B3 C9 D1"), and
filler never uses a digit symbol. So every answer digit has exactly one source in the context, found by
content alone: the token predicting d(j+1) looks for the one symbol of set j+1. A small transformer learns
this retrieval in a few hundred steps on CPU (with a sequence-length warmup), where the classic format with
one shared digit set needs an induction circuit that forms far later.
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

PAD, BOS, KEY, QUERY = 0, 1, 2, 3
FIRST_DIGIT = 4
# Filler on each side of the key block at the minimum length: enough that depth still varies.
MIN_FILLER = 4

DEFAULTS = {"key_len": 4, "key_vocab": 10, "filler_vocab": 16, "pack": 1, "depth": None}


class PasskeyTask(PackableTask):
    """Vocabulary: 0 PAD, 1 BOS, 2 KEY ("the pass key is"), 3 QUERY ("what is the pass key?"), then
    `key_len` sets of `key_vocab` digit tokens (set j for digit j), then `filler_vocab` filler tokens.

    The key is `key_len` digits, digit j uniform over set j; the key block starts after a uniformly drawn
    number of filler tokens (0 to all of them), the rest of the filler follows it. Trained and evaluated
    targets are exactly the answer: at the final KEY (target d1) and at answer digits d1..d(k-1) (targets
    d2..dk). The metric `passkey_accuracy` counts a sequence right only when all k digits are.

    `pack` > 1 packs that many samples into one sequence (see PackableTask). `depth` (0 to 1) puts the key
    block after that share of the filler instead of a random one: the needle-in-a-haystack grid of `lsys eval`.
    The random depth is still drawn, so a sample's key and filler are the same at every depth.
    """

    metric_name = "passkey_accuracy"

    def __init__(self, seq_len: int, seed: int, **options: Any) -> None:
        super().__init__(seq_len, seed, options)
        opts = take_options("passkey", options, DEFAULTS)
        self.key_len = check_int("passkey", "key_len", opts["key_len"], 1)
        self.key_vocab = check_int("passkey", "key_vocab", opts["key_vocab"], 1)
        self.filler_vocab = check_int("passkey", "filler_vocab", opts["filler_vocab"], 1)
        piece = self.check_pack("passkey", opts["pack"])
        self.depth = _check_depth(opts["depth"])
        minimum = self.min_seq_len(self.key_len)
        if piece < minimum:
            raise ValueError(f"seq_len={seq_len}: passkey with key_len={self.key_len} and pack={self.pack} needs "
                             f"at least {minimum} tokens per sample; raise seq_len or lower key_len or pack")
        self.first_filler = FIRST_DIGIT + self.key_len * self.key_vocab
        self.vocab_size = self.first_filler + self.filler_vocab
        self.num_filler = piece - (2 * self.key_len + 4)
        # The answer always ends the sample, so the targets sit at fixed positions.
        self._loss_mask = torch.zeros(piece, dtype=torch.bool)
        self._loss_mask[piece - self.key_len - 1 : piece - 1] = True

    def needle_task(self, length: int, depth: float) -> PasskeyTask:
        """This task at `length` tokens, unpacked, with the key block at `depth` (0: first, 1: last)."""
        return PasskeyTask(length, self.seed, **{**self.options, "pack": 1, "depth": depth})

    @staticmethod
    def min_seq_len(key_len: int) -> int:
        # BOS + KEY block + QUERY + KEY + answer, plus some filler
        return 2 * key_len + 4 + MIN_FILLER

    def one_sample(self, index: int, split: str) -> dict[str, torch.Tensor]:
        gen = sample_generator(self.seed, split, index)
        digits = torch.randint(0, self.key_vocab, (self.key_len,), generator=gen)
        key = FIRST_DIGIT + torch.arange(self.key_len) * self.key_vocab + digits
        filler = torch.randint(self.first_filler, self.vocab_size, (self.num_filler,), generator=gen)
        depth = int(torch.randint(0, self.num_filler + 1, (1,), generator=gen))
        if self.depth is not None:
            depth = round(self.depth * self.num_filler)
        key_block = torch.cat([torch.tensor([KEY]), key])
        tokens = torch.cat([
            torch.tensor([BOS]), filler[:depth], key_block, filler[depth:], torch.tensor([QUERY]), key_block,
        ])
        labels = next_token_labels(tokens, PAD)
        return {"tokens": tokens, "labels": labels, "loss_mask": self._loss_mask.clone()}


def _check_depth(depth: Any) -> float | None:
    if depth is None:
        return None
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise option_error("passkey", "depth", depth, "use a share of the filler from 0 to 1, or null for a random "
                           "depth per sample")
    return float(depth)
