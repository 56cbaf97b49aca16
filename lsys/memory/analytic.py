"""The analytic estimate of one rank's memory: Megatron's per-layer activation formula with the context-parallel
term, plus the model states. Closed form, instant, and what the traced estimate is checked against.

Per transformer layer, 16-bit activations, s tokens per sequence, b sequences, h hidden, a heads, t tensor-parallel
degree (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", tensor + sequence
parallelism):
    no recomputation          s b h (34/t + 5 a s / (h t))
    selective recomputation   34 s b h / t
    full recomputation        2 s b h / t      (only the block input, split by sequence parallelism)
Of the 34, the MLP's are 19 (its input 2, the activation's input 8, the second projection's input 8, the dropout
mask 1). A feed-forward tiled along the sequence (model.mlp_chunk_tokens, lsys.tiling) stores only its input and
recomputes the rest in backward a chunk at a time, so its 19 become 2: 17 s b h / t per layer without full
recomputation (full recomputation stores the block input alone either way); one chunk's intermediates are
temporaries.
Context parallelism leaves each rank s/cp tokens: s -> s/cp (Megatron's own estimator leaves this out). The 5as/h
term is the attention score matrix, which flash attention (every kernel here) never stores, so it is dropped.
int8 stored activations (Mesa) halve the 16-bit figure of the recomputation modes that store activations; fp32
compute doubles it. The loss keeps the fp32 log-probabilities over the vocabulary: 4 s b V / cp bytes, or one
chunk's with train.loss_chunk_tokens.
Model states: parameters and gradients in train.param_dtype, AdamW's two moments in the same dtype (none for the
offloaded fraction), sharded over the replicas (dp x cp, FSDP2) and the tensor-parallel ranks.
Host memory per rank (`host`), counted apart from the device total: with recompute.offload every layer's stored
activations (the device keeps two layers': the one backward reads and the one brought back ahead of it); with
parallel.fsdp_offload the parameters, gradients and moments; with optim.offload the offloaded fraction's fp32
master weights and moments (DeepSpeed's CPU Adam, 12 bytes per parameter, in actors on the rank's node) and the
few host buffers the rank's gradients leave through (lsys.optim.GRADIENT_BUFFERS of a bucket each).

What the formula does not know (docs/memory.md measures it): temporaries (gathered FSDP2 parameters, the output
head's logits and their fp32 copy, backward workspaces, communication buffers) and this model's own layer
(SwiGLU feed-forward, grouped-query attention, fp32 norm statistics) instead of the GPT layer the 34 counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lsys.config import LsysConfig, ffn_hidden_size, head_dim
from lsys.optim import BUCKET_ELEMENTS, GRADIENT_BUFFERS

BYTES = {"float32": 4, "bfloat16": 2, "float64": 8}
PER_LAYER_16BIT = {"none": 34.0, "selective": 34.0, "full": 2.0}  # x s b h / t, scores term dropped
TILED_MLP_SAVING = 17.0  # x s b h / t: the MLP's 19 less its input's 2


@dataclass
class AnalyticEstimate:
    """Device bytes per rank by category (`total`), and the host bytes per rank (`host`)."""

    params: int
    grads: int
    optimizer: int
    activations: int  # every layer's stored activations kept on the device
    output: int  # the loss's fp32 log-probabilities (one chunk's when the loss is chunked)
    activations_per_layer: int
    host: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.output

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def parameter_count(cfg: LsysConfig, vocab_size: int) -> int:
    m = cfg.model
    width = head_dim(m)
    attention = m.hidden_size * width * (2 * m.num_heads + 2 * m.num_kv_heads)
    if m.attention_bias:
        attention += width * (m.num_heads + 2 * m.num_kv_heads)
    if m.qk_norm:
        attention += 2 * width
    layer = attention + 3 * m.hidden_size * ffn_hidden_size(m) + 2 * m.hidden_size
    heads = 1 if m.tie_embeddings else 2
    return m.num_layers * layer + heads * vocab_size * m.hidden_size + m.hidden_size


def analytic_estimate(cfg: LsysConfig, world_size: int, vocab_size: int) -> AnalyticEstimate:
    """One rank's memory for `cfg` (at data.seq_len) on `world_size` ranks, from the formulas above."""
    p, t = cfg.parallel, cfg.train
    dp = p.resolved_dp(world_size)
    shards = dp * p.cp * p.tp
    held = parameter_count(cfg, vocab_size) / shards
    param_bytes = BYTES[t.param_dtype]
    kept_state = 1.0 - (cfg.optim.fraction if cfg.optim.offload != "none" else 0.0)
    s = cfg.data.seq_len / p.cp
    b = t.micro_batch_size or t.global_batch_size // dp
    h = cfg.model.hidden_size
    per_layer_16bit = PER_LAYER_16BIT[cfg.recompute.mode]
    if cfg.model.mlp_chunk_tokens and cfg.recompute.mode != "full":
        per_layer_16bit -= TILED_MLP_SAVING
    per_layer = per_layer_16bit * s * b * h / p.tp
    per_layer *= BYTES[t.compute_dtype] / 2
    if cfg.quant.activations == "int8" and cfg.recompute.mode != "full":
        per_layer /= BYTES[t.compute_dtype]
    layers = cfg.model.num_layers
    state = {"params": held * param_bytes, "grads": held * param_bytes,
             "optimizer": 2 * held * param_bytes * kept_state}
    offloaded = held * (1.0 - kept_state)
    # The gradients' host buffers: a few of the largest bucket's size (larger when one parameter shard is).
    host = 12 * offloaded + GRADIENT_BUFFERS * min(offloaded, BUCKET_ELEMENTS) * param_bytes
    if p.fsdp_offload != "none":
        host += sum(state.values())
        state = dict.fromkeys(state, 0.0)
    device_layers = layers
    if cfg.recompute.offload != "none":
        host += per_layer * layers
        device_layers = min(layers, 2)
    return AnalyticEstimate(
        **{name: round(value) for name, value in state.items()},
        activations=round(per_layer * device_layers),
        output=round(4 * min(s, t.loss_chunk_tokens or s) * b * vocab_size),
        activations_per_layer=round(per_layer),
        host=round(host),
    )
