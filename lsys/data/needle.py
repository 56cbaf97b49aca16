"""Needle in a haystack in real text (RULER's single needle, EasyContext's pass key prompt): a sentence holding a
five-digit key, hidden after a chosen share of held-out text, asked for at the end, all tokenized with the
dataset's own tokenizer.

    text... The pass key is 48213. Remember it. text... What is the pass key? The pass key is 48213.

Only the answer's tokens are scored, and a sample counts as right when all of them are (`passkey_accuracy`). The
answer is tokenized once and used in both places, so the model is asked to copy ids it has seen, whatever the
tokenizer would merge across the pieces' boundaries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lsys.data.task import Task, next_token_labels, sample_generator

if TYPE_CHECKING:
    from lsys.data.text import TextTask

PREFIX = " The pass key is"
ANSWER = " {key}."
REMEMBER = " Remember it."
QUESTION = " What is the pass key?"
KEYS = (10_000, 100_000)  # five-digit keys, drawn from [low, high)


def needle_tokens(tokenizer: Any) -> int:
    """The most tokens a sample's fixed parts take in `tokenizer`, over every key: the needle sentence, the
    question and the answer. A needle length must exceed it (the haystack needs a token)."""
    prefix, remember, question = (len(ids) for ids in tokenizer.encode_batch([PREFIX, REMEMBER, QUESTION]))
    answer = max(len(ids) for ids in tokenizer.encode_batch([ANSWER.format(key=k) for k in range(*KEYS)]))
    return 2 * prefix + remember + question + 2 * answer


class TextNeedleTask(Task):
    """Samples of `length` tokens: one document (no document masks, positions 0..length-1) of the text task's
    validation samples with their end-of-document tokens dropped, the needle inserted after `depth` (0..1) of
    them."""

    metric_name = "passkey_accuracy"

    def __init__(self, text: TextTask, length: int, depth: float) -> None:
        super().__init__(length, text.seed, {})
        self.text = text
        self.depth = depth
        self.vocab_size = text.vocab_size
        self.tokenizer = text.tokenizer()
        self.pad_id = text.eod_id  # never a target: the last label is outside the loss mask

    def pieces(self, key: int) -> tuple[list[int], list[int], list[int]]:
        """-> the needle's ids, the question's, the answer's."""
        prefix, answer, remember, question = self.tokenizer.encode_batch(
            [PREFIX, ANSWER.format(key=key), REMEMBER, QUESTION])
        return prefix + answer + remember, question + prefix, answer

    def sample(self, index: int, split: str = "valid") -> dict[str, torch.Tensor]:
        self.check_index(index, split)
        gen = sample_generator(self.seed, split, index)
        key = int(torch.randint(*KEYS, (1,), generator=gen))
        needle, question, answer = self.pieces(key)
        room = self.seq_len - len(needle) - len(question) - len(answer)
        if room < 1:
            raise ValueError(f"needle length {self.seq_len}: the needle sentence, question and answer take "
                             f"{self.seq_len - room} tokens of this tokenizer; evaluate longer lengths")
        haystack = self._haystack(index, split, room)
        at = round(self.depth * room)
        tokens = torch.cat([haystack[:at], torch.tensor(needle), haystack[at:], torch.tensor(question + answer)])
        loss_mask = torch.zeros(self.seq_len, dtype=torch.bool)
        loss_mask[self.seq_len - len(answer) - 1 : self.seq_len - 1] = True  # targets: the answer's ids
        return {"tokens": tokens, "labels": next_token_labels(tokens, self.pad_id), "loss_mask": loss_mask}

    def _haystack(self, index: int, split: str, room: int) -> torch.Tensor:
        # -> [room] int64: consecutive samples of `split` from index * (samples one needle sample needs) on
        per_sample = max(1, room // self.text.seq_len + 1)
        parts, have, j = [], 0, 0
        while have < room:
            tokens = self.text.sample(index * per_sample + j, split)["tokens"]
            tokens = tokens[tokens != self.text.eod_id]
            parts.append(tokens)
            have += len(tokens)
            j += 1
        return torch.cat(parts)[:room].to(torch.int64)
