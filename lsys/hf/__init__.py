"""HuggingFace checkpoints: config.json <-> ModelConfig (`config`), tensor names (`names`), the safetensors
files' headers (`checkpoint`) and `load_pretrained` (`load`)."""

from typing import Any


def __getattr__(name: str) -> Any:
    # Imported on first use: `lsys.hf.config` is pure JSON and is read by the config loader without torch.
    if name == "load_pretrained":
        from lsys.hf.load import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lsys.hf' has no attribute {name!r}")
