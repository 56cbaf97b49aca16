"""A HuggingFace checkpoint's safetensors files, read from their headers only: which file holds each tensor, its
shape and dtype, and whether they are exactly the tensors of the model lsys builds for its config.json.

The check runs before any tensor's data is read (the CLI runs it before any rank starts, every rank again before
loading), so a checkpoint that does not fit fails with one line naming the file, the tensor and the shapes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from lsys.config import ModelConfig
from lsys.hf.names import hf_name, lsys_name

INDEX_FILE = "model.safetensors.index.json"
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Rotary tables some older Llama checkpoints saved as buffers; lsys computes them from config.json.
_IGNORED_SUFFIX = ".rotary_emb.inv_freq"
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    name: str  # the HuggingFace name in the file
    shape: tuple[int, ...]
    dtype: str  # safetensors' dtype tag (BF16, F32, ...)


def safetensors_files(directory: str | Path) -> list[Path]:
    """The files of the checkpoint: those `model.safetensors.index.json` names, else every `*.safetensors`."""
    root = Path(directory)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{index}: not a safetensors index with a weight_map ({exc!r}); restore the file or "
                             "remove it to read every *.safetensors") from None
        files = [root / name for name in names]
        for file in files:
            if not file.is_file():
                raise ValueError(f"{index}: names {file.name}, which is not in {root}; restore the file")
        return files
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.pretrained={str(directory)!r}: no *.safetensors file (nor {INDEX_FILE}); give a "
                         "HuggingFace model directory saved with safetensors (save_pretrained's default)")
    return files


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, from its JSON header (8 bytes of little-endian length, then JSON)."""
    try:
        with file.open("rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            if length > _MAX_HEADER:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
        return {name: StoredTensor(file, name, tuple(info["shape"]), info["dtype"])
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e}); restore it from the model's source") from None


def stored_tensors(directory: str | Path) -> dict[str, StoredTensor]:
    """Every tensor of the checkpoint by HuggingFace name (headers only)."""
    found: dict[str, StoredTensor] = {}
    for file in safetensors_files(directory):
        for name, tensor in read_header(file).items():
            if name in found:
                raise ValueError(f"{file}: tensor {name} is also in {found[name].file.name}; keep one copy")
            found[name] = tensor
    return found


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """lsys parameter name -> full shape, of the model `cfg` builds (on the meta device: no memory). A tied head
    is the embedding's parameter and is not listed."""
    from lsys.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def match_checkpoint(cfg: ModelConfig, directory: str | Path) -> dict[str, StoredTensor]:
    """lsys parameter name -> where its values are stored, after checking from the headers that the checkpoint
    holds exactly the model's tensors: every parameter present with its shape and a float dtype, and no decoder
    tensor left over. With tied embeddings a stored `lm_head.weight` is ignored (transformers ties it to the
    embedding too); without, it is required."""
    root = Path(directory)
    stored = stored_tensors(root)
    wanted = expected_shapes(cfg)
    found: dict[str, StoredTensor] = {}
    for name, shape in wanted.items():
        tensor = stored.get(hf_name(name))
        if tensor is None:
            raise ValueError(f"{root}: no tensor {hf_name(name)} (lsys {name}, shape {list(shape)}) in "
                             f"{', '.join(sorted({t.file.name for t in stored.values()}))}; the checkpoint does not "
                             "match its config.json: restore the missing file or the config")
        if tensor.shape != shape:
            raise ValueError(f"{tensor.file}: tensor {tensor.name} has shape {list(tensor.shape)}, the model of "
                             f"{root / 'config.json'} needs {list(shape)}; the config and the weights disagree")
        if tensor.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{tensor.file}: tensor {tensor.name} is {tensor.dtype}; lsys loads floating-point "
                             f"weights ({', '.join(FLOAT_DTYPES)}); quantized checkpoints are not supported")
        found[name] = tensor
    used = {t.name for t in found.values()}
    for tensor in stored.values():
        if tensor.name in used or tensor.name.endswith(_IGNORED_SUFFIX):
            continue
        if cfg.tie_embeddings and lsys_name(tensor.name) == "lm_head.weight":
            continue
        raise ValueError(f"{tensor.file}: tensor {tensor.name} (shape {list(tensor.shape)}) has no place in the "
                         f"model of {root / 'config.json'}; the config and the weights disagree (another model "
                         "family or size)")
    return found
