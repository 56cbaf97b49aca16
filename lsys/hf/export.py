"""A run's checkpoint -> a HuggingFace model directory that transformers' `from_pretrained` loads.

What the directory holds: `config.json` (lsys.hf.config.hf_config; based on the pretrained checkpoint's own when
the run had model.pretrained, with the RoPE settings it was trained with), the weights as
`model-0000i-of-0000n.safetensors` files of at most `max_shard_size` bytes each (a larger tensor gets a file of
its own) with `model.safetensors.index.json`, `generation_config.json`, and the tokenizer files: the pretrained
directory's, or the tokenizer.json a text run's dataset was prepared with.

Everything is checked before anything is written (`plan_export`), so a refusal leaves no trace. Writing streams:
one output file's tensors are read from the DCP checkpoint (in this process, without a process group, whatever
layout saved it), cast, written and freed before the next; the model is never whole in memory. The directory is
assembled as `OUT.tmp` beside OUT and renamed at the end, so OUT is either absent or complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lsys.checkpoint import checkpoint_root, read_model_tensors, step_dir
from lsys.checkpoint_verify import (
    DCP_METADATA,
    MANIFEST,
    Unusable,
    checkpoints_by_step,
    load_dcp_metadata,
    model_shape,
    shape_difference,
    verify_checkpoint,
)
from lsys.config import LsysConfig, config_from_dict
from lsys.hf.checkpoint import INDEX_FILE, expected_shapes
from lsys.hf.config import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_SIZE,
    EXPORT_DTYPES,
    hf_config,
    read_config_json,
    resolve_pretrained,
)
from lsys.hf.names import hf_name

GENERATION_FILE = "generation_config.json"
# What a HuggingFace model directory may hold of its tokenizer; whichever exist are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class ExportedTensor:
    """One exported tensor: its lsys name (the checkpoint holds it as `model.<name>`), HuggingFace name, shape
    and the dtype the checkpoint stores it in."""

    name: str
    hf_name: str
    shape: torch.Size
    stored: torch.dtype


Shards = tuple[tuple[ExportedTensor, ...], ...]


@dataclass(frozen=True)
class ExportPlan:
    """Everything `write_export` does, decided and checked beforehand."""

    checkpoint: Path
    step: int
    out: Path
    dtype: str
    config: dict[str, Any]
    generation_config: dict[str, Any]  # written unless `copies` brings the pretrained one
    shards: Shards  # one tuple per safetensors file
    copies: dict[str, Path]  # file name in the output -> the file copied there

    @property
    def tmp(self) -> Path:
        return staging_dir(self.out)


def staging_dir(out: Path) -> Path:
    """Where the directory is assembled before it is renamed to `out`: beside it, so the rename is atomic."""
    return out.with_name(out.name + ".tmp")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes (decimal units, as transformers reads them)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text), re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]) if match else 0
    if size < 1:
        raise ValueError(f"--max-shard-size={text!r}: give a positive size such as 5GB, 500MB or 2GiB")
    return size


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


# -- checking ------------------------------------------------------------------------------------------------


def _checkpoint(run_dir: str | Path, step: int | None) -> tuple[Path, dict[str, Any]]:
    """(path, manifest) of the verified checkpoint to export: `step`'s, or the newest that verifies."""
    run = Path(run_dir)
    if not run.is_dir():
        what = "is not a directory" if run.exists() else "does not exist"
        raise ValueError(f"run directory {run_dir}: {what}; give the train.run_dir of a run with checkpoints")
    root = checkpoint_root(run)
    found = checkpoints_by_step(root)
    if not found:
        raise ValueError(f"{root}: no checkpoint; a run writes them every checkpoint.every steps and at its end")
    if step is not None:
        if step not in dict(found):
            raise ValueError(f"--step {step}: {root} has no checkpoint of that step; it has steps "
                             f"{', '.join(str(s) for s, _ in found)}")
        try:
            return step_dir(root, step), verify_checkpoint(step_dir(root, step))
        except Unusable as exc:
            raise ValueError(f"{step_dir(root, step)}: {exc}; export another --step") from None
    reasons = []
    for _, path in reversed(found):
        try:
            return path, verify_checkpoint(path)
        except Unusable as exc:
            reasons.append(f"{path.name}: {exc}")
    raise ValueError(f"{root}: no checkpoint verifies ({'; '.join(reasons)}); nothing can be exported")


def _run_config(path: Path, manifest: dict[str, Any]) -> LsysConfig:
    """The config the checkpoint was trained with, its model resolved as the trainer resolved it."""
    try:
        cfg = config_from_dict(manifest["config"])
    except (OmegaConfBaseException, TypeError, ValueError) as exc:
        raise ValueError(f"{path / MANIFEST}: its config cannot be read by this version of lsys "
                         f"({str(exc).splitlines()[0]})") from None
    cfg = resolve_pretrained(cfg)
    saved = manifest["model_shape"]
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=saved.get("vocab_size") or 0))
    if differs := shape_difference(saved, model_shape(cfg.model)):
        raise ValueError(f"{path}: the checkpoint's model differs from its config's ({differs}); was "
                         f"{cfg.model.pretrained}/{CONFIG_FILE} changed after training?")
    return cfg


def checkpoint_entries(path: Path) -> dict[str, Any]:
    """What the checkpoint holds, by key (`model.<name>`, optimizer state, progress), from its `.metadata`."""
    with (path / DCP_METADATA).open("rb") as f:
        return load_dcp_metadata(f, path / DCP_METADATA).state_dict_metadata


def _tensors(path: Path, stored: dict[str, Any], cfg: LsysConfig) -> list[ExportedTensor]:
    """The model's parameters in its own order (a tied head once, as the embedding), as the checkpoint holds
    them; the optimizer's state is not exported."""
    tensors = []
    for name, shape in expected_shapes(cfg.model).items():  # shared parameters once: no lm_head when tied
        entry = stored.get(f"model.{name}")
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != shape:
            found = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "nothing"
            raise ValueError(f"{path}: holds {found} for parameter {name}, the model needs {shape}; "
                             "the checkpoint does not match its manifest's model")
        tensors.append(ExportedTensor(name, hf_name(name), entry.size, entry.properties.dtype))
    return tensors


def _untie_if_trained_apart(path: Path, stored: dict[str, Any], cfg: LsysConfig) -> LsysConfig:
    """`cfg` with tie_embeddings off when the checkpoint's output head differs from its embedding. Runs of lsys
    before it re-tied the head after materialising from the meta device (`nn.Module.to_empty` does not keep the
    sharing) trained a separate head; exporting either tensor for both would not be the model that was trained."""
    if not cfg.model.tie_embeddings:
        return cfg
    names = ("embed.weight", "lm_head.weight")
    if not all(isinstance(stored.get(f"model.{n}"), TensorStorageMetadata) for n in names):
        return cfg
    specs = {n: (stored[f"model.{n}"].size, stored[f"model.{n}"].properties.dtype) for n in names}
    loaded = read_model_tensors(path, specs)
    if torch.equal(*loaded.values()):
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tie_embeddings=False))


def _shards(tensors: list[ExportedTensor], dtype: torch.dtype, max_bytes: int) -> Shards:
    # transformers' rule: a file is closed when the next tensor would take it over the limit.
    shards: list[list[ExportedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.shape.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += nbytes
    return tuple(tuple(shard) for shard in shards)


def tokenizer_files(cfg: LsysConfig) -> dict[str, Path]:
    """The pretrained directory's tokenizer files, or the tokenizer.json a text run's dataset was made with."""
    if cfg.model.pretrained:
        directory = Path(cfg.model.pretrained)
        return {name: directory / name for name in TOKENIZER_FILES if (directory / name).is_file()}
    if cfg.data.task == "text":
        from lsys.data.verify import check_text_dataset

        metadata = check_text_dataset(cfg.data.text.path)
        source = metadata.get("tokenizer_path")
        if metadata["tokenizer"] == "huggingface":
            if not source or not Path(source).is_file():
                raise ValueError(f"{cfg.data.text.path}.json: its tokenizer {source} is gone; restore it to "
                                 "export the run's tokenizer with the model")
            return {"tokenizer.json": Path(source)}
    return {}


def _generation_file(cfg: LsysConfig) -> dict[str, Path]:
    """The pretrained directory's generation_config.json, to copy as it is, if it has a readable one."""
    path = Path(cfg.model.pretrained) / GENERATION_FILE
    if not cfg.model.pretrained or not path.is_file():
        return {}
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read as JSON ({exc}); restore the file") from None
    return {GENERATION_FILE: path}


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not empty; export into a new directory")
    tmp = staging_dir(out)
    if tmp.exists():
        raise ValueError(f"{tmp}: exists (left by an interrupted export?); remove it, or export elsewhere")
    parent = out.parent.resolve()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{out}: {parent} is a file, not a directory; choose another output directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: {parent} is not writable; choose another output directory")


def plan_export(run_dir: str | Path, out_dir: str | Path, step: int | None = None, dtype: str | None = None,
                max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> ExportPlan:
    """Check everything an export needs and decide what it writes; a ValueError names what is wrong.

    `dtype` None: the pretrained config's `torch_dtype` (or `dtype`), else the run's train.param_dtype."""
    if step is not None and step < 1:
        raise ValueError(f"--step {step}: give the step of a checkpoint (1 or more)")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    out = Path(out_dir)
    _check_out(out)
    path, manifest = _checkpoint(run_dir, step)
    cfg = _run_config(path, manifest)
    base = read_config_json(cfg.model.pretrained) if cfg.model.pretrained else None
    if dtype is None:
        named = (base or {}).get("torch_dtype") or (base or {}).get("dtype")
        dtype = named if named in EXPORT_DTYPES else cfg.train.param_dtype
    stored = checkpoint_entries(path)
    cfg = _untie_if_trained_apart(path, stored, cfg)
    config = hf_config(cfg.model, base, cfg.data.seq_len, dtype)
    tensors = _tensors(path, stored, cfg)
    # Without a pretrained generation config, transformers' own rule: the token ids of config.json.
    generation = {key: config[key] for key in _TOKEN_IDS if config.get(key) is not None}
    return ExportPlan(checkpoint=path, step=manifest["step"], out=out, dtype=dtype, config=config,
                      generation_config=generation, shards=_shards(tensors, getattr(torch, dtype), max_bytes),
                      copies={**tokenizer_files(cfg), **_generation_file(cfg)})


# -- writing -------------------------------------------------------------------------------------------------


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_export(plan: ExportPlan) -> dict[str, Any]:
    """Write the directory `plan` describes (into OUT.tmp, renamed to OUT when complete); returns a summary."""
    tmp, target = plan.tmp, getattr(torch, plan.dtype)
    umask = os.umask(0)
    os.umask(umask)
    tmp.mkdir(parents=True)
    try:
        weight_map, total = {}, 0
        for index, shard in enumerate(plan.shards, start=1):
            name = shard_name(index, len(plan.shards))
            loaded = read_model_tensors(plan.checkpoint, {t.name: (t.shape, t.stored) for t in shard})
            tensors = {t.hf_name: loaded.pop(t.name).to(target).contiguous() for t in shard}
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            (tmp / name).chmod(0o666 & ~umask)  # safetensors creates files 0600; the rest follow the umask
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(tensors, name))
            del loaded, tensors  # before the next file's tensors are read
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _write_json(tmp / INDEX_FILE, index)
        _write_json(tmp / CONFIG_FILE, plan.config)
        if GENERATION_FILE not in plan.copies:
            _write_json(tmp / GENERATION_FILE, plan.generation_config)
        for name, source in plan.copies.items():
            shutil.copyfile(source, tmp / name)
        tmp.replace(plan.out)  # an empty OUT is replaced too
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(plan.out), "checkpoint": str(plan.checkpoint), "step": plan.step, "dtype": plan.dtype,
            "files": len(plan.shards), "total_bytes": total, "copied": sorted(plan.copies)}
