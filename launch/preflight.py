"""Checks of a run against this machine, made by the CLI before any rank starts: what config validation cannot see
(files, directories, memory). Each failure is a ValueError naming the key, the path and the fix; nothing is
created or changed by a check, so a refused run leaves the user's files as they were."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import psutil

from lsys.config import LsysConfig
from lsys.metrics import format_bytes


def _writable(directory: Path, key: str, value: str) -> None:
    """Create and remove a probe file: permission bits alone say nothing for root, or on a read-only mount."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".lsys-probe-", dir=directory)
    except OSError as exc:
        raise ValueError(f"{key}={value!r}: cannot write in {directory} ({exc.strerror}); choose a directory you "
                         "can write to") from None
    os.close(fd)
    os.unlink(probe)


def _writable_ancestor(path: Path, key: str, value: str) -> None:
    """`path`, or its nearest existing ancestor (where it would be made), is a directory this user can write."""
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}={value!r}: {existing} is not a directory; choose another {key}")
    _writable(existing, key, value)


def check_run_dir(run_dir: str, key: str = "train.run_dir") -> None:
    """The run directory and its checkpoints/ are directories (or can be made) that this user can write."""
    path = Path(run_dir)
    for target in (path, path / "checkpoints", path / "metrics.jsonl"):
        if target.is_symlink() and not target.exists():
            raise ValueError(f"{key}={run_dir!r}: {target} is a dangling symbolic link; remove it or choose another "
                             f"{key}")
    for target in (path, path / "checkpoints"):
        if target.exists() and not target.is_dir():
            raise ValueError(f"{key}={run_dir!r}: {target} exists and is not a directory; choose another {key}")
    if (path / "metrics.jsonl").is_dir():
        raise ValueError(f"{key}={run_dir!r}: {path / 'metrics.jsonl'} is a directory; remove it or choose another "
                         f"{key}")
    _writable_ancestor(path, key, run_dir)
    if (path / "checkpoints").is_dir():
        _writable(path / "checkpoints", key, run_dir)


def check_output_dir(directory: str, key: str) -> None:
    """A directory for results (`lsys eval --out`): one, or one that can be made, that this user can write."""
    path = Path(directory)
    if path.is_symlink() and not path.exists():
        raise ValueError(f"{key}={directory!r}: {path} is a dangling symbolic link; remove it or choose another {key}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"{key}={directory!r}: {path} exists and is not a directory; choose another {key}")
    _writable_ancestor(path, key, directory)


def check_memory(cfg: LsysConfig, world_size: int, local_ranks: int, vocab_size: int) -> None:
    """CPU ranks share this machine's memory: refuse a run whose model states and stored activations alone (the
    analytic estimate, a lower bound of what a step holds) exceed it, instead of letting the ranks die of it."""
    from lsys.memory.analytic import analytic_estimate

    estimate = analytic_estimate(cfg, world_size, vocab_size)
    per_rank = estimate.total + estimate.host  # on CPU ranks the host is this same memory
    total = psutil.virtual_memory().total
    if per_rank * local_ranks > total:
        m = cfg.model
        raise ValueError(
            f"model.hidden_size={m.hidden_size}, model.num_layers={m.num_layers}, data.seq_len={cfg.data.seq_len}, "
            f"train.global_batch_size={cfg.train.global_batch_size}: {local_ranks} rank(s) x "
            f"{format_bytes(per_rank)} (model states and stored activations, a lower bound) exceed this machine's "
            f"{format_bytes(total)}; lower these sizes, or plan the run with `lsys plan`")


def check_run(cfg: LsysConfig, world_size: int, local_ranks: int) -> None:
    """Everything a training run (`lsys train`, `lsys submit` to the embedded cluster) needs from this machine,
    before any rank starts: its run directory, its data, a checkpoint it can resume, memory."""
    check_run_dir(cfg.train.run_dir)
    vocab = check_inputs(cfg, world_size, local_ranks)
    if cfg.checkpoint.resume:
        check_resume(cfg, world_size, vocab)


def check_evaluation(cfg: LsysConfig, world_size: int, local_ranks: int) -> None:
    """What `lsys eval` needs: its data, memory, and something trained to evaluate (a checkpoint it can load,
    or model.pretrained)."""
    from lsys.checkpoint import checkpoint_root
    from lsys.checkpoint_verify import checkpoints_by_step

    vocab = check_inputs(cfg, world_size, local_ranks)
    found = cfg.checkpoint.resume and checkpoints_by_step(checkpoint_root(cfg.train.run_dir))
    if found:
        check_resume(cfg, world_size, vocab)
    elif not cfg.model.pretrained:
        raise ValueError(f"train.run_dir={cfg.train.run_dir!r}: no checkpoint to evaluate, and no model.pretrained; "
                         "point train.run_dir at a trained run, or set model.pretrained to a HuggingFace model "
                         "directory")


def check_inputs(cfg: LsysConfig, world_size: int, local_ranks: int) -> int:
    """The packages, data, pretrained weights, GPUs and memory of a run on this machine (what `lsys profile` needs
    too: it uses no run directory); returns the model's vocabulary size."""
    from lsys.packages import require_for_run

    require_for_run(cfg)
    vocab = _vocabulary(cfg)
    if cfg.model.pretrained:
        from lsys.hf.checkpoint import match_checkpoint

        match_checkpoint(cfg.model, cfg.model.pretrained)  # from the safetensors headers; no tensor is read
    check_gpus(cfg, local_ranks)
    if _device(cfg) == "cpu":
        check_memory(cfg, world_size, local_ranks, vocab)
    return vocab


def check_gpus(cfg: LsysConfig, local_ranks: int) -> None:
    """Each local rank on CUDA takes a GPU of its own (local_rank % device_count, lsys.session.pick_device): more
    ranks than visible GPUs would put two on one GPU, which NCCL refuses only after every rank has started."""
    import torch

    if cfg.train.device == "cpu":
        return
    if not torch.cuda.is_available():
        if cfg.train.device == "cuda":
            raise ValueError("train.device='cuda' but no CUDA device is visible; use train.device=cpu or auto")
        return
    visible = torch.cuda.device_count()
    if local_ranks > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        which = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise ValueError(f"train.device={cfg.train.device!r}: {local_ranks} local ranks but {visible} visible "
                         f"GPU(s){which}; start at most {visible} ranks on this machine, or set train.device=cpu")


def check_resume(cfg: LsysConfig, world_size: int, vocab_size: int) -> None:
    """Checkpoints in the run directory, none of which this run could resume from (another model shape, all
    damaged): refused now, not after the ranks have built the model. Which one is resumed, and what is skipped,
    the trainer says itself."""
    from dataclasses import replace

    from lsys.checkpoint_verify import model_shape, preflight_resume, run_layout

    preflight_resume(cfg.train.run_dir, model_shape(replace(cfg.model, vocab_size=vocab_size)),
                     layout=run_layout(cfg, world_size))


def _device(cfg: LsysConfig) -> str:
    if cfg.train.device != "auto":
        return cfg.train.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _vocabulary(cfg: LsysConfig) -> int:
    """The model's vocabulary: model.vocab_size, checked against the task's, else the task's. A text dataset is
    checked here (without megatron-core) and its vocabulary read from its metadata (`Task.vocabulary`)."""
    from lsys.data import model_vocabulary, task_vocabulary

    return model_vocabulary(cfg, task_vocabulary(cfg))
