"""The run configuration: OmegaConf structured configs over dataclasses, YAML presets and key=value overrides.
lsys/validation.py checks the values (naming the key, the value and the fix) before any process starts."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from parallel.config import (
    ParallelConfig,
    QuantConfig,
    RecomputeConfig,
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
    from lsys.validation import validate  # it imports this module

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
