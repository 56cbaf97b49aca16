"""Which checkpoint a run may resume from: manifests, verification, selection. Pure file work, no process group.

A checkpoint directory `step_XXXXXXXX/` is usable only if its `manifest.json` (written last, atomically, by
lsys.checkpoint) parses, names the same step, lists every file with the size and sha256 it was written with, and
every listed file still has them; its DCP `.metadata` must also load through the restricted unpickler below and
name only shards the manifest lists. It must further be of the model shape the config builds (and, with
optim.offload=cpu, of the same world size and offload mode, since that state is per rank). Selection walks the
checkpoints newest step first and takes the first usable one; every one passed over gets a one-line reason.

`.metadata` is a pickle. It is never loaded with full pickle: `load_dcp_metadata` allows only the globals a
torch.distributed.checkpoint metadata file holds (its dataclasses, torch.Size, dtypes, layouts, paths) and
refuses any other with a ValueError naming the file and the global.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from lsys.config import LsysConfig, ModelConfig, ffn_hidden_size, head_dim

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
               "tie_embeddings", "head_dim", "attention_bias", "qk_norm")
# Run-control keys that differ between a stopped run and its continuation by design: not worth a message.
_QUIET_KEYS = ("train.exit_at_step",)


class Unusable(Exception):
    """A checkpoint that must not be loaded; str() is the one-line reason."""


# -- what a checkpoint records ---------------------------------------------------------------------------


def model_shape(model: ModelConfig) -> dict[str, Any]:
    """The model settings that fix parameter shapes. vocab_size 0 (the task's, not yet resolved) becomes None,
    which matches any vocabulary: the trainer passes the resolved config, the CLI may not know it yet."""
    return {"vocab_size": model.vocab_size or None, "hidden_size": model.hidden_size,
            "num_layers": model.num_layers, "num_heads": model.num_heads, "num_kv_heads": model.num_kv_heads,
            "ffn_hidden_size": ffn_hidden_size(model), "tie_embeddings": model.tie_embeddings,
            "head_dim": head_dim(model), "attention_bias": model.attention_bias, "qk_norm": model.qk_norm}


def run_layout(cfg: LsysConfig, world_size: int) -> dict[str, Any]:
    """How the ranks were arranged; only optim.offload=cpu ties a checkpoint to it (its per-rank files)."""
    p = cfg.parallel
    return {"world_size": world_size, "dp": p.resolved_dp(world_size), "cp_ring": p.cp_ring,
            "cp_ulysses": p.cp_ulysses, "tp": p.tp, "offload": cfg.optim.offload}


def checkpoints_by_step(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every renamed (not `.tmp`) checkpoint directory under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in 1 MiB chunks so that shards of any size hash in bounded memory."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename or new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int, shape: dict, layout: dict, config: dict) -> None:
    """Hash every file now in `directory` (but a manifest) and write `manifest.json` there atomically (tmp, fsync,
    rename).
    Call it last, once every rank's files are complete: the manifest is the mark of a complete checkpoint."""
    files = {}
    for path in sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith(MANIFEST)):
        size, sha = file_digest(path)
        files[path.name] = {"size": size, "sha256": sha}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "model_shape": shape, "layout": layout,
                "config": config, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(directory / MANIFEST)
    fsync_dir(directory)


# -- verification ----------------------------------------------------------------------------------------


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest of `directory`; raises Unusable when it is missing, damaged or for another step."""
    path = directory / MANIFEST
    if not path.is_file():
        raise Unusable(f"no {MANIFEST} (an interrupted save, or saved before checkpoints were verified): "
                       "unverifiable")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        ok = (manifest["format"] == MANIFEST_FORMAT and isinstance(manifest["model_shape"], dict)
              and isinstance(manifest["layout"], dict) and isinstance(files, dict)
              and all(isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str) for v in files.values())
              # names of files in this directory only: a manifest must not send the checks elsewhere
              and all("/" not in name and "\\" not in name and name not in (".", "..") for name in files))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Unusable(f"{MANIFEST} is damaged ({type(exc).__name__}: {exc})") from None
    if not ok:
        raise Unusable(f"{MANIFEST} is damaged (unexpected format)")
    match = _STEP_DIR.match(directory.name)
    if match and manifest["step"] != int(match.group(1)):
        raise Unusable(f"{MANIFEST} is for step {manifest['step']}, not {int(match.group(1))}")
    return manifest


def _label(name: str) -> str:
    return f"shard {name}" if name.endswith(".distcp") else name


def check_files(directory: Path, manifest: dict, hashes: bool) -> None:
    """Raises Unusable unless every file the manifest lists exists with its size (and, if `hashes`, sha256)."""
    files = manifest["files"]
    if DCP_METADATA not in files:
        raise Unusable(f"{MANIFEST} lists no {DCP_METADATA}")
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            raise Unusable(f"{_label(name)} missing")
        size = path.stat().st_size
        if size != want["size"]:
            how = "truncated" if size < want["size"] else "grown"
            raise Unusable(f"{_label(name)}: size {size} != {want['size']} ({how})")
        if hashes and file_digest(path)[1] != want["sha256"]:
            raise Unusable(f"{_label(name)}: sha256 mismatch (corrupt)")


def verify_checkpoint(directory: Path, hashes: bool = True) -> dict[str, Any]:
    """Full check of one checkpoint (manifest, sizes, hashes unless `hashes` is False, loadable `.metadata` naming
    only listed shards). Returns the manifest; raises Unusable with the reason."""
    manifest = read_manifest(directory)
    check_files(directory, manifest, hashes=hashes)
    try:
        with (directory / DCP_METADATA).open("rb") as f:
            metadata = load_dcp_metadata(f, directory / DCP_METADATA)
    except ValueError as exc:
        raise Unusable(f"{DCP_METADATA}: {exc}") from None
    for info in (metadata.storage_data or {}).values():
        if info.relative_path not in manifest["files"]:
            raise Unusable(f"{DCP_METADATA} names shard {info.relative_path}, which the manifest does not list")
    return manifest


def shape_difference(saved: dict, current: dict) -> str | None:
    """'hidden_size 64 != 32' (checkpoint != config) for every differing key; None when they match. A None
    value (vocabulary not yet resolved) matches anything."""
    diffs = [f"{k} {saved.get(k)} != {current.get(k)}" for k in _SHAPE_KEYS
             if saved.get(k) is not None and current.get(k) is not None and saved.get(k) != current.get(k)]
    return ", ".join(diffs) or None


def layout_difference(saved: dict, current: dict | None) -> str | None:
    """Why a checkpoint's per-rank optimizer state cannot be restored on `current`; None when it can."""
    if current is None or (saved.get("offload", "none") == "none" and current["offload"] == "none"):
        return None  # DCP reshards model and optimizer state over any layout
    if saved.get("offload") != current["offload"]:
        return f"optim.offload {saved.get('offload')} != {current['offload']}"
    if saved.get("world_size") != current["world_size"]:
        return f"offloaded optimizer state of {saved.get('world_size')} ranks, {current['world_size']} now"
    return None


def _shape_text(shape: dict) -> str:
    return " ".join(f"{k}={shape.get(k)}" for k in _SHAPE_KEYS if shape.get(k) is not None)


# -- selection -------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The checkpoint to resume (None: none exists, start at step 0) and the newer ones passed over."""

    path: Path | None = None
    manifest: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)  # "step_00000006: <reason>", newest first

    @property
    def step(self) -> int:
        return self.manifest["step"] if self.manifest else 0


def select_checkpoint(root: Path, shape: dict, layout: dict | None = None, hashes: bool = True) -> Selection:
    """The newest checkpoint under `root` that verifies and fits `shape` (and `layout`, see layout_difference).

    Raises ValueError, naming every checkpoint and why, when checkpoints exist but none is usable: data safety
    first, the user decides whether to start fresh. Reads (hashes) checkpoints until one verifies.
    """
    selection = Selection()
    other_shapes, other_layout = [], False  # intact checkpoints of another run setup, for the error below
    for _, path in reversed(checkpoints_by_step(root)):
        try:
            manifest = read_manifest(path)
            differs = shape_difference(manifest["model_shape"], shape)
            if differs:
                other_shapes.append(manifest["model_shape"])
                raise Unusable(f"model shape differs: {differs} (checkpoint != config)")
            if reason := layout_difference(manifest["layout"], layout):
                other_layout = True
                raise Unusable(f"layout differs: {reason}")
            selection.manifest = verify_checkpoint(path, hashes)
            selection.path = path
            return selection
        except Unusable as exc:
            selection.skipped.append(f"{path.name}: {exc}")
    if not selection.skipped:
        return selection
    fresh = "set checkpoint.resume=false to start fresh, or use another train.run_dir"
    listed = "; ".join(selection.skipped)
    if other_shapes:
        raise ValueError(f"{root}: no checkpoint fits the configured model ({_shape_text(shape)}); found "
                         f"{_shape_text(other_shapes[0])}: {listed}. Resume with the model settings the checkpoint "
                         f"was saved with, or {fresh}")
    if other_layout:
        raise ValueError(f"{root}: no checkpoint fits this run's layout: {listed}. Resume with the optim.offload "
                         f"and number of ranks they were saved with, or {fresh}")
    raise ValueError(f"{root}: every checkpoint is damaged or unverifiable: {listed}. {fresh.capitalize()}")


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'train.lr 0.001 -> 0.002' for every setting that differs between two config dicts, outside the model
    shape (compared by select_checkpoint) and the run-control keys that differ by design."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(saved), flat(current)
    skip = {*_QUIET_KEYS, *(f"model.{k}" for k in _SHAPE_KEYS)}
    return [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys())
            if k not in skip and a.get(k) != b.get(k)]


def resume_messages(selection: Selection, config: dict | None, doing: str = "resuming") -> list[str]:
    """The lines to print about a selection: one per skipped checkpoint, one for changed settings (`doing` with
    the checkpoint: resuming it, or evaluating it)."""
    lines = [f"lsys: skipping checkpoint {line}" for line in selection.skipped]
    changed = changed_settings(selection.manifest.get("config") or {}, config) if selection.path and config else []
    if changed:
        lines.append(f"lsys: {doing} {selection.path.name} with changed settings: {', '.join(changed)}")
    return lines


def preflight_resume(run_dir: str | Path, shape: dict, config: dict | None = None,
                     layout: dict | None = None) -> list[str]:
    """For the launcher, before any rank starts: the messages resume would print (see resume_messages), or
    ValueError when checkpoints exist and none is usable. Manifests, sizes and metadata only: the trainer hashes
    the checkpoint it loads, and one full read of a large checkpoint per start is enough."""
    return resume_messages(select_checkpoint(Path(run_dir) / "checkpoints", shape, layout, hashes=False), config)


# -- restricted unpickling of DCP metadata ---------------------------------------------------------------

_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # plus every torch.dtype, checked below
    "torch.serialization": {"_get_layout"},  # looks a layout up by name in torch's own table
    "pathlib": {"PosixPath"},  # storage_meta.checkpoint_id
}


class _Refused(ValueError):
    """A global outside the allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], name: str):
        super().__init__(file)
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        allowed = name in _DCP_CLASSES.get(module, ())
        if module == "torch" and not allowed:
            allowed = isinstance(getattr(torch, name, None), torch.dtype)
        if not allowed:
            raise _Refused(f"{self._name}: refused to load global {module}.{name}: DCP metadata holds only "
                             "checkpoint descriptions, so this file is damaged or planted")
        return super().find_class(module, name)


def load_dcp_metadata(stream: IO[bytes], name: str | Path) -> Any:
    """The torch.distributed.checkpoint Metadata pickled in `stream`, loaded with only DCP's own globals allowed.
    Raises ValueError (naming `name`) for any other global, a damaged pickle, or a non-Metadata result."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = _MetadataUnpickler(stream, str(name)).load()
    except _Refused:
        raise
    except Exception as exc:  # a damaged pickle raises anything from EOFError to KeyError
        raise ValueError(f"{name}: not readable DCP metadata ({type(exc).__name__}: {exc})") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{name}: holds {type(metadata).__name__}, not DCP Metadata")
    return metadata
