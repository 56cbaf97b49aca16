"""The run configuration: OmegaConf structured configs over dataclasses, YAML presets, key=value overrides,
and validation that names the key, the value and the fix before any process starts."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kernels.attention import BACKENDS as ATTENTION_BACKENDS
from kernels.attention import CUDA_BACKENDS as CUDA_ATTENTION_BACKENDS
from parallel.config import (
    MIN_SEQ_LEN,
    OFFLOAD_MODES,
    ParallelConfig,
    QuantConfig,
    RecomputeConfig,
    check_model_split,
)

DTYPES = ("float32", "bfloat16", "float64")
DEVICES = ("auto", "cpu", "cuda")
TASKS = ("passkey", "mqar", "text")
OFFLOAD_PLACEMENTS = ("same_node", "resource", "label")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
NONFINITE_POLICIES = ("stop", "skip")
# datetime.timedelta, which the process group's timeout becomes, overflows near 1e14 s; a week is already longer
# than any collective should ever wait.
MAX_COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600.0
CONFIG_REFERENCE = "the configuration reference in README.md"


ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class RopeScalingConfig:
    """RoPE scaling for context extension, with HuggingFace's names and meaning (`rope_scaling` in a checkpoint's
    config.json): `linear` divides every frequency by `factor` (position interpolation); `llama3` divides only the
    low frequencies, ramping between the wavelengths original_max_position_embeddings / low_freq_factor and
    / high_freq_factor; `yarn` blends interpolated and original frequencies between the beta_fast and beta_slow
    rotation counts and scales the tables by `attention_factor` (0: 0.1 ln(factor) + 1, or from mscale and
    mscale_all_dim when both are set). Positions stay global ids under every layout: scaling changes only the
    frequencies."""

    rope_type: str = "default"  # default (no scaling) | linear | llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int = 0  # llama3, yarn: the context length the model was trained at
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 0.0  # yarn; 0: derived from factor
    mscale: float = 0.0  # yarn
    mscale_all_dim: float = 0.0  # yarn
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions


@dataclass
class ModelConfig:
    """Decoder-only transformer: RMSNorm, RoPE on global positions, SwiGLU, grouped-query attention; with the
    switches of the HuggingFace families lsys reads (lsys.hf): Llama 2/3 (tied embeddings in 3.2, RoPE scaling),
    Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head RMSNorm of queries and keys).

    `pretrained`: a local HuggingFace model directory. Its config.json then sets every architecture key (a
    value given here that differs is refused); `rope_theta` and `rope_scaling` may be overridden to extend the
    context. Its weights are loaded into each rank's shards (lsys.hf.load)."""

    pretrained: str = ""
    vocab_size: int = 0  # 0: the task's vocabulary size
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: hidden_size / num_heads
    ffn_hidden_size: int = 0  # 0: 8/3 * hidden rounded up to a multiple of 64 (Llama's rule)
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    # Mistral-style sliding-window attention is not implemented: a window shorter than data.seq_len is refused
    # (0: none). A window at least as long as the sequence is plain causal attention.
    sliding_window: int = 0
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = False
    # The feed-forward this many sequence positions at a time, its [chunk, ffn_hidden_size] intermediates
    # recomputed from the chunk's input in backward: only one chunk's exist at once (0: all at once). For long
    # sequences, e.g. 4096 (lsys.tiling).
    mlp_chunk_tokens: int = 0
    # The block attention kernel (kernels.attention): "auto" picks torch's CPU flash op on CPU, and on CUDA torch's
    # flash op for 16-bit compute, its memory-efficient op for fp32, Triton for packed-document masks. Or name
    # one: aten, flash, efficient, cudnn, triton, reference (float64, small shapes).
    attention_backend: str = "auto"


def ffn_hidden_size(cfg: ModelConfig) -> int:
    if cfg.ffn_hidden_size:
        return cfg.ffn_hidden_size
    return 64 * math.ceil(8 * cfg.hidden_size / 3 / 64)


def head_dim(cfg: ModelConfig) -> int:
    return cfg.head_dim or cfg.hidden_size // cfg.num_heads


@dataclass
class PasskeyConfig:
    key_len: int = 4
    key_vocab: int = 10
    filler_vocab: int = 16
    pack: int = 1  # samples per sequence, each its own document of seq_len / pack tokens
    depth: float | None = None  # the key block after this share (0..1) of the filler; null: random per sample


@dataclass
class MqarConfig:
    num_pairs: int = 8
    num_queries: int = 8
    pack: int = 1  # samples per sequence, each its own document of seq_len / pack tokens


@dataclass
class TextConfig:
    path: str = ""  # prefix of a Megatron indexed dataset (PATH.bin / PATH.idx), made by `lsys prepare-data`
    split: str = "98,2,0"
    cache_dir: str = ""  # "" : beside the dataset


@dataclass
class CurriculumConfig:
    """Sequence-length warmup, as in DeepSpeed's curriculum learning: training starts at `start_len` tokens
    and the length grows geometrically to data.seq_len over `steps` steps. Retrieval tasks learn far faster
    this way: at full length the one relevant token starts with 1/seq_len of the attention. Evaluation always
    uses the full length."""

    start_len: int = 0  # 0: no warmup, always data.seq_len
    steps: int = 0


@dataclass
class DataConfig:
    task: str = "passkey"
    seq_len: int = 256
    seed: int = 1234
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    # Packed sequences (text, or passkey/mqar with pack > 1) hold several documents. document_masks: a query
    # attends only to its own document and a document's last token is not trained to predict the next one's
    # first; restart_positions: RoPE positions restart at 0 with each document. null: on for packed data (restart
    # follows document_masks), off otherwise.
    document_masks: bool | None = None
    restart_positions: bool | None = None
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    mqar: MqarConfig = field(default_factory=MqarConfig)
    text: TextConfig = field(default_factory=TextConfig)


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 0  # sequences per forward on one rank; 0: the whole local batch at once
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    # The loss over the vocabulary this many sequence positions at a time, recomputed in backward: only one
    # chunk's logits exist at once (0: all at once). For long sequences and large vocabularies, e.g. 2048.
    loss_chunk_tokens: int = 0
    seed: int = 0  # model initialisation
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    device: str = "auto"  # auto: cuda when available
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_samples: int = 64
    exit_at_step: int = 0  # stop cleanly (after a checkpoint) at this step, to resume later; 0: run to the end
    # Fault injection, to rehearse restarts: when about to train step `fail_at_step` (once per run directory;
    # 0: never), rank `fail_rank` dies abruptly (no cleanup, like a lost machine), or with fail_target=optimizer
    # the actor holding that rank's offloaded optimizer state is killed.
    fail_at_step: int = 0
    fail_rank: int = 1
    fail_target: str = "rank"  # rank | optimizer
    collective_timeout_s: float = 300.0
    # A step whose loss or gradient norm is not finite never updates the weights and is never checkpointed.
    # stop: the run ends there (exit code 3, the step named); skip: the update is skipped and counted in the
    # metrics, and the run ends after `nonfinite_max_skips` such steps in a row.
    nonfinite: str = "stop"
    nonfinite_max_skips: int = 3
    run_dir: str = "runs/default"


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints; 0: only at the end of the run
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in run_dir/checkpoints


@dataclass
class OptimConfig:
    """Where AdamW's state lives. `offload: cpu` moves each rank's fp32 master weights and Adam moments into a Ray
    actor (DeepSpeed's CPU Adam) on this rank's node, or on nodes with a Ray resource or label; the rank keeps
    only its parameters and gradients. Needs `lsys submit`."""

    offload: str = "none"  # none | cpu
    placement: str = "same_node"  # same_node | resource (nodes with optim.resource) | label (optim.label)
    resource: str = ""  # a custom Ray resource of the nodes that hold the state
    label: str = ""  # key=value: a Ray node label of the nodes that hold the state
    fraction: float = 1.0  # share of each rank's parameters (by elements, in model order) whose state is offloaded


@dataclass
class ClusterConfig:
    """How `lsys submit` runs the job on Ray: one Ray Train worker per rank (ignored by `lsys train`)."""

    num_workers: int = 1  # ranks; the parallel degrees must tile this
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 0: CPU workers (gloo); 1: one GPU per rank (NCCL)
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources, e.g. {node_a: 1}
    placement_strategy: str = "PACK"  # of the workers over nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD
    max_failures: int = 0  # worker-group restarts (from the last complete checkpoint) after a failure; -1: no limit


@dataclass
class LoggingConfig:
    """Where rank 0 also reports a run (lsys.tracking), besides metrics.jsonl: TensorBoard event files under
    train.run_dir/tensorboard, and Weights & Biases when asked (offline by default: a local wandb/ directory)."""

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "lsys"
    wandb_mode: str = "offline"  # offline | online


@dataclass
class LsysConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


def _config_error(exc: OmegaConfBaseException, source: str) -> ValueError:
    key = getattr(exc, "full_key", None) or "?"
    message = str(exc).splitlines()[0]
    if "not in" in message or "Key" in message and "not" in message:
        fix = f"remove it or check the spelling against {CONFIG_REFERENCE} (`lsys train CONFIG --print-config` " \
              "shows every key)"
    else:
        fix = "give a value of the declared type"
    if key == "?":  # OmegaConf names no key when a whole section gets a plain value
        return ValueError(f"{source}: {message}; a section takes indented `key: value` lines, a key one value")
    return ValueError(f"{source}: bad config key {key!r}: {message}; {fix}")


def read_yaml(path: str | Path) -> DictConfig:
    """The mapping in a YAML config file; every way a file can be unusable is a ValueError naming it."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"config file {str(path)!r} does not exist; pass a YAML file like configs/demo.yaml")
    if not p.is_file():
        raise ValueError(f"config file {str(path)!r} is not a file; pass a YAML file like configs/demo.yaml")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"config file {str(path)!r} cannot be read ({exc.strerror}); check its permissions") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                         f"{exc.start}); save it as UTF-8") from None
    try:
        # OmegaConf's YAML loader, which also refuses a key given twice in one mapping.
        loaded = OmegaConf.create(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{where}: YAML error: {problem}; fix the file (configs/demo.yaml shows the format)") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"config file {str(path)!r}: the top level is a {type(loaded).__name__.removesuffix('Config')}"
                         ", not a mapping of sections (model:, data:, train:, ...); see configs/demo.yaml")
    _check_sections(loaded, LsysConfig, "", str(path))
    return loaded


def _check_sections(node: DictConfig, schema: type, prefix: str, source: str) -> None:
    """A section of the schema (model:, data.passkey:, ...) given a plain value: OmegaConf's own merge error
    would name neither the key nor what is expected."""
    for f in dataclasses.fields(schema):
        if not dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            continue
        if f.name not in node:
            continue
        value, key = node._get_node(f.name), f"{prefix}{f.name}"
        if not isinstance(value, DictConfig):
            raise ValueError(f"{source}: {key} must be a section of keys (e.g. `{key.split('.')[-1]}:` followed by "
                             f"indented `key: value` lines), not {OmegaConf.to_container(node)[f.name]!r}")
        _check_sections(value, f.default_factory, f"{key}.", source)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> LsysConfig:
    """Schema defaults <- YAML file <- `key=value` overrides; typed, unknown keys rejected, then validated.
    An error names where the bad value came from: the file, or the override as typed."""
    merged = OmegaConf.structured(LsysConfig)
    if path is not None:
        try:
            merged = OmegaConf.merge(merged, read_yaml(path))
        except OmegaConfBaseException as exc:
            raise _config_error(exc, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value; write it as e.g. train.steps=100")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as exc:
            raise _config_error(exc, f"override {item!r}") from None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"override {item!r}: the value is not valid YAML ({problem}); quote it") from None
    try:
        cfg: LsysConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _config_error(exc, str(path) if path else "overrides") from None
    # The checkpoint's architecture, so the CLI and every rank validate and build what model.pretrained holds.
    from lsys.hf.config import resolve_pretrained  # it imports this module

    cfg = resolve_pretrained(cfg)
    validate(cfg)
    return cfg


def config_from_dict(values: dict[str, Any]) -> LsysConfig:
    """Rebuild a typed config from `to_dict` output (how ranks receive it)."""
    merged = OmegaConf.merge(OmegaConf.structured(LsysConfig), OmegaConf.create(values))
    return OmegaConf.to_object(merged)


def to_dict(cfg: LsysConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg: LsysConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: LsysConfig, run_dir: str | Path) -> Path:
    """Write the resolved config as run_dir/config.yaml (atomically)."""
    path = Path(run_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


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
