"""`load_pretrained(path)`: a HuggingFace checkpoint as one process's lsys Transformer (no process group), through
the same path the ranks of a run load it with (meta device, then `lsys.weights.materialize`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lsys.hf.config import CONFIG_FILE, model_config_from_hf, read_config_json
from lsys.model import Transformer
from lsys.weights import materialize


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Transformer:
    """The model of `path`'s config.json with its safetensors weights, in `dtype`; `forward(tokens, positions)`
    gives logits [B, S, V]."""
    cfg = model_config_from_hf(read_config_json(path), str(Path(path) / CONFIG_FILE), pretrained=str(path))
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    return materialize(model, torch.device(device), seed=0, pretrained=str(path))
