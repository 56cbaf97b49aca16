"""Tokenizers for text datasets: UTF-8 bytes (no files, no training, exact bits per byte) or a local
HuggingFace `tokenizer.json` read with the `tokenizers` package (no network), alone or as part of a pretrained
model directory (whose config.json names the end-of-document token)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

BYTE_EOD = 256
BYTE_PAD = 257
BYTE_VOCAB = 258

# Names that mark the end of a document, most common first; the first one that is a special token wins.
EOD_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
# Megatron's own "no pad token" id: it never occurs in data, so no real token is ever masked as padding.
NO_PAD = -1


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes, 256 ends a document, 257 pads; every token but EOD is one byte."""

    kind = "byte"
    path = None
    vocab_size = BYTE_VOCAB
    eod = BYTE_EOD
    pad = BYTE_PAD

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(text.encode("utf-8")) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` loaded with `tokenizers.Tokenizer.from_file`.

    EOD is `eod_token` (a token) or `eod_id` when given, else the first of `EOD_NAMES` that the file declares as
    a special token;
    PAD likewise from `PAD_NAMES`, else -1 (Megatron's convention for "none"; samples never need padding
    because Megatron drops the last partial sequence).
    """

    kind = "huggingface"

    def __init__(self, path: str, eod_token: str | None = None, eod_id: int | None = None) -> None:
        from tokenizers import Tokenizer

        self.path = os.path.abspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError as err:
            raise ValueError(f"tokenizer {path}: no such file; give the path of a tokenizer.json, or none for "
                             "the byte-level tokenizer") from err
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            message = f"tokenizer {path}: cannot be read ({reason}); give a readable tokenizer.json"
            raise ValueError(message) from err
        try:
            self._tokenizer = Tokenizer.from_str(text)
        except Exception as err:  # the Rust side raises a bare Exception for every parse error
            raise ValueError(f"tokenizer {path}: not a HuggingFace tokenizer.json ({err}); give a file saved by "
                             "tokenizers' Tokenizer.save, such as a model's tokenizer.json") from err
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        special = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items() if t.special}
        if eod_id is not None:
            if self._tokenizer.id_to_token(eod_id) is None:
                raise ValueError(f"eos_token_id={eod_id}: not an id of {path} (vocabulary {self.vocab_size}); "
                                 "the model's config.json and tokenizer.json disagree")
            eod = eod_id
        elif eod_token is not None:
            eod = self._tokenizer.token_to_id(eod_token)
            if eod is None:
                raise ValueError(f"eod_token={eod_token!r}: not in the vocabulary of {path}; name a token "
                                 "it has")
        else:
            eod = next((special[name] for name in EOD_NAMES if name in special), None)
            if eod is None:
                raise ValueError(
                    f"tokenizer {path}: no end-of-document token; add one of {', '.join(EOD_NAMES)} as a "
                    f"special token, set eos_token_id in the model's config.json (with --pretrained), or pass "
                    f"eod_token= naming the token that ends a document "
                    f"(special tokens found: {sorted(special) or 'none'})")
        self.eod = eod
        self.pad = next((special[name] for name in PAD_NAMES if name in special), NO_PAD)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def pretrained_eod(directory: str) -> int | None:
    """The end-of-document id a pretrained model directory's config.json names (`eos_token_id`: an id, or a
    list whose first is the end of text), or None when it names none."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"--pretrained {directory}: no config.json; give a HuggingFace model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot be read as JSON ({err}); restore the file") from None
    eos = values.get("eos_token_id") if isinstance(values, dict) else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or eos < 0):
        raise ValueError(f"{path}: eos_token_id={eos!r}: expected a token id or a list of them")
    return eos


def load_tokenizer(path: str | None, eod_token: str | None = None,
                   pretrained: str | None = None) -> ByteTokenizer | HFTokenizer:
    """The byte-level tokenizer for `path=None`, else the `tokenizer.json` at `path`; with `pretrained` (a
    HuggingFace model directory) and no `path`, that directory's tokenizer.json, ending documents with its
    config.json's `eos_token_id` (else a known EOD special token, as for any tokenizer.json).

    Cheap (a fraction of a second even for a 128K vocabulary) and free of side effects, so it doubles as the
    check of a tokenizer before anything starts: a file that is missing, unreadable, not JSON, not a
    tokenizer, or without an end-of-document token raises ValueError naming it.
    """
    if path is None and pretrained:
        if not os.path.isfile(os.path.join(pretrained, "tokenizer.json")):
            raise ValueError(f"--pretrained {pretrained}: no tokenizer.json; give a model directory that has one, "
                             "or --tokenizer")
        eod_id = None if eod_token is not None else pretrained_eod(pretrained)
        return HFTokenizer(os.path.join(pretrained, "tokenizer.json"), eod_token, eod_id)
    if path is None:
        if eod_token is not None:
            raise ValueError(f"eod_token={eod_token!r}: the byte-level tokenizer has a fixed EOD id "
                             f"{BYTE_EOD}; drop eod_token or give a tokenizer.json")
        return ByteTokenizer()
    return HFTokenizer(path, eod_token)
