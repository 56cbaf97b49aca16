"""Validation of a run configuration (lsys.config): every value and their combinations, each failure one
ValueError naming the key, the value and the fix, before any process starts. `load_config` runs `validate`;
launchers add the world size (`validate_for_world`) or the Ray cluster (`validate_for_cluster`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any

from kernels.attention import BACKENDS as ATTENTION_BACKENDS
from kernels.attention import CUDA_BACKENDS as CUDA_ATTENTION_BACKENDS
from lsys.config import (
    DEVICES,
    DTYPES,
    MAX_COLLECTIVE_TIMEOUT_S,
    NONFINITE_POLICIES,
    OFFLOAD_PLACEMENTS,
    PLACEMENT_STRATEGIES,
    ROPE_TYPES,
    TASKS,
    ClusterConfig,
    LsysConfig,
    OptimConfig,
    RopeScalingConfig,
    ffn_hidden_size,
)
from parallel.config import MIN_SEQ_LEN, OFFLOAD_MODES, check_model_split


def _require(condition: bool, key: str, value: Any, fix: str) -> None:
    if not condition:
        raise ValueError(f"{key}={value!r}: {fix}")


def _check_finite(section: Any, prefix: str) -> None:
    """Every number in the config is finite: inf or nan (YAML's .inf, .nan) would train to NaN or overflow."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key)
        elif isinstance(value, dict):
            for name, item in value.items():
                _require(not isinstance(item, float) or math.isfinite(item), f"{key}.{name}", item,
                         "must be a finite number")
        else:
            _require(not isinstance(value, float) or math.isfinite(value), key, value, "must be a finite number")


def validate(cfg: LsysConfig, world_size: int | None = None) -> None:
    """Check every value and their combinations; `world_size` adds the checks that need it."""
    m, d, t, c, p = cfg.model, cfg.data, cfg.train, cfg.checkpoint, cfg.parallel
    _check_finite(cfg, "")
    for key in ("hidden_size", "num_layers", "num_heads", "num_kv_heads"):
        _require(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be a positive integer")
    _require(m.vocab_size >= 0, "model.vocab_size", m.vocab_size, "use 0 (the task's vocabulary) or a positive size")
    _require(m.ffn_hidden_size >= 0, "model.ffn_hidden_size", m.ffn_hidden_size, "use 0 (automatic) or a positive size")
    p.validate()
    _require(m.mlp_chunk_tokens >= 0, "model.mlp_chunk_tokens", m.mlp_chunk_tokens,
             "use 0 (the whole sequence at once) or a positive number of positions")
    _require(m.head_dim >= 0, "model.head_dim", m.head_dim, "use 0 (hidden_size / num_heads) or a positive size")
    check_model_split(hidden_size=m.hidden_size, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                      ffn_hidden_size=ffn_hidden_size(m), head_dim=m.head_dim, cp_ulysses=p.cp_ulysses, tp=p.tp)
    _require(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive")
    _validate_rope_scaling(m.rope_scaling)
    _require(m.sliding_window == 0 or m.sliding_window >= d.seq_len, "model.sliding_window", m.sliding_window,
             f"sliding-window attention is not supported, and a window shorter than data.seq_len={d.seq_len} would "
             "change what the model attends to; train at most that many tokens, or use a model without a window")
    _require(m.attention_backend in ATTENTION_BACKENDS, "model.attention_backend", m.attention_backend,
             f"choose one of {', '.join(ATTENTION_BACKENDS)}")
    _require(t.device != "cpu" or m.attention_backend not in CUDA_ATTENTION_BACKENDS, "model.attention_backend",
             m.attention_backend, "train.device=cpu: torch's CUDA attention ops need a GPU; use auto (or aten)")
    _require(m.init_std > 0, "model.init_std", m.init_std, "must be positive")
    _require(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive (RMSNorm divides by sqrt(mean + eps)), "
             "e.g. 1e-5")

    _require(d.task in TASKS, "data.task", d.task, f"choose one of {', '.join(TASKS)}")
    _require(d.seq_len >= MIN_SEQ_LEN, "data.seq_len", d.seq_len, f"must be at least {MIN_SEQ_LEN}")
    if d.curriculum.start_len:
        _require(MIN_SEQ_LEN <= d.curriculum.start_len <= d.seq_len, "data.curriculum.start_len",
                 d.curriculum.start_len, f"use 0 (off) or a length in [{MIN_SEQ_LEN}, data.seq_len={d.seq_len}]")
        _require(d.curriculum.steps > 0, "data.curriculum.steps", d.curriculum.steps,
                 "give the number of steps over which the length grows to data.seq_len")
    _require(d.curriculum.steps >= 0, "data.curriculum.steps", d.curriculum.steps, "must be non-negative")
    _require(d.task != "text" or bool(d.text.path), "data.text.path", d.text.path,
             "set it to a dataset prefix made by `lsys prepare-data INPUT OUT`")
    for task in ("passkey", "mqar"):
        pack = getattr(d, task).pack
        _require(pack >= 1, f"data.{task}.pack", pack, "use 1 (one sample per sequence) or more samples to pack")
        _require(d.task != task or d.seq_len % pack == 0, f"data.{task}.pack", pack,
                 f"must divide data.seq_len={d.seq_len}: each packed sample gets seq_len / pack tokens")
        # The curriculum's lengths are multiples of the parallel granularity, not of pack.
        _require(d.task != task or pack == 1 or not d.curriculum.start_len, f"data.{task}.pack", pack,
                 "packing with a sequence-length curriculum is not supported; set data.curriculum.start_len=0 "
                 "or pack=1")

    _require(t.steps > 0, "train.steps", t.steps, "must be positive")
    _require(t.global_batch_size > 0, "train.global_batch_size", t.global_batch_size, "must be positive")
    _require(t.micro_batch_size >= 0, "train.micro_batch_size", t.micro_batch_size, "use 0 or a positive size")
    _require(t.lr > 0, "train.lr", t.lr, "must be positive")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", t.min_lr, f"must lie in [0, train.lr={t.lr}]")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be non-negative")
    _require(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be non-negative")
    for key in ("beta1", "beta2"):
        _require(0 <= getattr(t, key) < 1, f"train.{key}", getattr(t, key), "must lie in [0, 1)")
    _require(t.eps > 0, "train.eps", t.eps, "must be positive")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "use 0 (off) or a positive norm")
    _require(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", t.loss_chunk_tokens,
             "use 0 (the whole sequence at once) or a positive number of positions")
    _require(t.loss_chunk_tokens == 0 or cfg.parallel.tp == 1, "train.loss_chunk_tokens", t.loss_chunk_tokens,
             f"needs parallel.tp=1 (tp={cfg.parallel.tp} gathers the output head's input over tensor ranks); set it "
             "to 0")
    _require(t.param_dtype in DTYPES, "train.param_dtype", t.param_dtype, f"choose one of {', '.join(DTYPES)}")
    _require(t.compute_dtype in DTYPES, "train.compute_dtype", t.compute_dtype, f"choose one of {', '.join(DTYPES)}")
    _require(t.compute_dtype == t.param_dtype or (t.param_dtype, t.compute_dtype) == ("float32", "bfloat16"),
             "train.compute_dtype", t.compute_dtype,
             f"with train.param_dtype={t.param_dtype!r} compute in the same dtype; mixed precision is "
             "param_dtype=float32 with compute_dtype=bfloat16")
    _require(t.device in DEVICES, "train.device", t.device, f"choose one of {', '.join(DEVICES)}")
    _require(t.log_every > 0, "train.log_every", t.log_every, "must be positive")
    _require(t.eval_every >= 0, "train.eval_every", t.eval_every, "use 0 (only at the end) or a positive interval")
    _require(t.eval_samples >= 0, "train.eval_samples", t.eval_samples, "must be non-negative")
    _require(0 <= t.exit_at_step <= t.steps, "train.exit_at_step", t.exit_at_step,
             f"use 0 (run to the end) or a step in [1, train.steps={t.steps}]")
    _require(0 < t.collective_timeout_s <= MAX_COLLECTIVE_TIMEOUT_S, "train.collective_timeout_s",
             t.collective_timeout_s, f"must lie in (0, {MAX_COLLECTIVE_TIMEOUT_S:.0f}] seconds (a week)")
    _require(t.nonfinite in NONFINITE_POLICIES, "train.nonfinite", t.nonfinite,
             f"choose one of {', '.join(NONFINITE_POLICIES)}")
    _require(t.nonfinite_max_skips >= 1, "train.nonfinite_max_skips", t.nonfinite_max_skips,
             "stop after at least one skipped step")
    _require(bool(t.run_dir), "train.run_dir", t.run_dir, "set a directory for metrics and checkpoints")
    _require(0 <= t.fail_at_step <= t.steps, "train.fail_at_step", t.fail_at_step,
             f"use 0 (no injected failure) or a step in [1, train.steps={t.steps}]")
    _require(t.fail_rank >= 0, "train.fail_rank", t.fail_rank, "must be a rank number (0 or more)")
    _require(t.fail_target in ("rank", "optimizer"), "train.fail_target", t.fail_target, "choose rank or optimizer")
    _require(t.fail_target == "rank" or cfg.optim.offload != "none", "train.fail_target", t.fail_target,
             "killing the optimizer's actor needs optim.offload=cpu")

    _require(c.every >= 0, "checkpoint.every", c.every, "use 0 (only at the end) or a positive interval")
    _require(c.keep_last >= 1, "checkpoint.keep_last", c.keep_last, "keep at least one checkpoint")

    _validate_optim(cfg.optim)
    _validate_cluster(cfg.cluster)
    _require(cfg.logging.wandb_mode in ("offline", "online"), "logging.wandb_mode", cfg.logging.wandb_mode,
             "choose offline (a local wandb/ directory, no network) or online")
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb=true: the wandb package is not installed; `pip install wandb` or set "
                         "logging.wandb=false")
    cfg.recompute.validate()
    cfg.quant.validate()
    _require(p.tp == 1 or not m.tie_embeddings, "model.tie_embeddings", m.tie_embeddings,
             "tensor parallelism shards the embedding and the output head separately; set it to false")
    multiple = p.seq_multiple
    below = d.seq_len // multiple * multiple
    _require(d.seq_len % multiple == 0, "data.seq_len", d.seq_len,
             f"must be divisible by {multiple} to be sharded over parallel.cp_ring={p.cp_ring} x "
             f"cp_ulysses={p.cp_ulysses} x tp={p.tp} with cp_layout={p.cp_layout}; pick a multiple of {multiple}, "
             f"e.g. {below + multiple}" + (f" or {below}" if below >= MIN_SEQ_LEN else ""))
    if world_size is not None:
        validate_for_world(cfg, world_size)


def _validate_rope_scaling(r: RopeScalingConfig) -> None:
    key = "model.rope_scaling"
    _require(r.rope_type in ROPE_TYPES, f"{key}.rope_type", r.rope_type, f"choose one of {', '.join(ROPE_TYPES)}")
    if r.rope_type == "default":
        return
    _require(r.factor >= 1, f"{key}.factor", r.factor, "must be at least 1 (how many times longer the context is)")
    if r.rope_type in ("llama3", "yarn"):
        _require(r.original_max_position_embeddings > 0, f"{key}.original_max_position_embeddings",
                 r.original_max_position_embeddings, f"rope_type={r.rope_type} needs the context length the "
                 "model was pretrained at, e.g. 8192")
    if r.rope_type == "llama3":
        _require(r.low_freq_factor > 0, f"{key}.low_freq_factor", r.low_freq_factor, "must be positive")
        _require(r.high_freq_factor > r.low_freq_factor, f"{key}.high_freq_factor", r.high_freq_factor,
                 f"must be above low_freq_factor={r.low_freq_factor}")
    if r.rope_type == "yarn":
        _require(r.beta_fast > 0, f"{key}.beta_fast", r.beta_fast, "must be positive")
        _require(r.beta_slow > 0, f"{key}.beta_slow", r.beta_slow, "must be positive")
        _require(r.attention_factor >= 0, f"{key}.attention_factor", r.attention_factor,
                 "use 0 (derived from factor) or a positive scale")


def _validate_optim(o: OptimConfig) -> None:
    _require(o.offload in OFFLOAD_MODES, "optim.offload", o.offload, f"choose one of {', '.join(OFFLOAD_MODES)}")
    _require(o.placement in OFFLOAD_PLACEMENTS, "optim.placement", o.placement,
             f"choose one of {', '.join(OFFLOAD_PLACEMENTS)}")
    _require(o.placement != "resource" or bool(o.resource), "optim.resource", o.resource,
             "optim.placement=resource needs the name of a custom Ray resource the state's nodes have")
    _require(o.placement != "label" or o.label.count("=") == 1, "optim.label", o.label,
             "optim.placement=label needs a node label as key=value")
    _require(0 < o.fraction <= 1, "optim.fraction", o.fraction, "must lie in (0, 1]")


def _validate_cluster(k: ClusterConfig) -> None:
    _require(k.num_workers >= 1, "cluster.num_workers", k.num_workers, "run at least one worker")
    _require(k.cpus_per_worker >= 0, "cluster.cpus_per_worker", k.cpus_per_worker, "must be non-negative")
    _require(k.gpus_per_worker >= 0, "cluster.gpus_per_worker", k.gpus_per_worker, "must be non-negative")
    for name, amount in k.resources_per_worker.items():
        _require(name not in ("CPU", "GPU") and amount > 0, f"cluster.resources_per_worker.{name}", amount,
                 "give custom resources a positive amount; CPUs and GPUs have their own keys")
    _require(k.placement_strategy in PLACEMENT_STRATEGIES, "cluster.placement_strategy", k.placement_strategy,
             f"choose one of {', '.join(PLACEMENT_STRATEGIES)}")
    _require(k.max_failures >= -1, "cluster.max_failures", k.max_failures, "use -1 (no limit), 0 or a count")


def validate_for_cluster(cfg: LsysConfig) -> None:
    """Checks for a Ray job (`lsys submit`): the cluster section and the rest of the config agree."""
    k, device = cfg.cluster, cfg.train.device
    _require(not (device == "cpu" and k.gpus_per_worker), "cluster.gpus_per_worker", k.gpus_per_worker,
             "train.device=cpu trains on CPU: set it to 0, or train.device=auto to use the GPUs")
    _require(not (device == "cuda" and not k.gpus_per_worker), "cluster.gpus_per_worker", k.gpus_per_worker,
             "train.device=cuda needs a GPU per worker on Ray: set it to 1")
    validate_for_world(cfg, k.num_workers)


def validate_for_world(cfg: LsysConfig, world_size: int) -> None:
    """Checks that depend on the number of ranks: degrees tile the world, batches split evenly."""
    t = cfg.train
    dp = cfg.parallel.resolved_dp(world_size)
    _require(t.global_batch_size % dp == 0, "train.global_batch_size", t.global_batch_size,
             f"must be divisible by the data-parallel degree {dp}")
    local = t.global_batch_size // dp
    if t.micro_batch_size:
        _require(local % t.micro_batch_size == 0, "train.micro_batch_size", t.micro_batch_size,
                 f"must divide the per-rank batch {local} (global_batch_size / dp)")
