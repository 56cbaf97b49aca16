"""The plain decoder-only transformer. It knows nothing of ranks: parallelism is applied afterwards by
`parallel.parallelize`, which swaps each attention's `attn_fn` and wraps modules.

What the parallel layer needs to know of it, `Transformer.parallel_plan()` tells it (parallel.plan): the
blocks, each one's attention (whose `attn_fn(q, k, v, causal=..., document_ids=...)` is replaceable),
feed-forward, norms and final projection, and how tensor parallelism splits each module. Positions are explicit
per token (global, or restarted with each packed document), so a rank holding a shard of the sequence rotates
its queries and keys exactly as the full sequence would; document ids travel with them the same way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kernels.attention import attention as local_attention
from lsys.config import ModelConfig, ffn_hidden_size, head_dim
from lsys.norm import rms_norm
from lsys.rope import apply_rope, inverse_frequencies, rope_tables
from lsys.tiling import sequence_tiled
from parallel.plan import BlockPlan, ParallelPlan, Split, TensorSplit

AttnFn = Callable[..., Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)  # in at least fp32, keeping only x and a statistic per row


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = head_dim(cfg)
        bias = cfg.attention_bias
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=bias)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=bias)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        # Qwen3: each query and key head is RMS-normalised over head_dim before RoPE.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.attn_fn: AttnFn = functools.partial(local_attention, backend=cfg.attention_backend)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, document_ids: Tensor | None) -> Tensor:
        # x: [B, S, hidden], document_ids: [B, S] int64 or None -> [B, S, hidden]
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.attn_fn(q, k, v, causal=True, document_ids=document_ids)
        return self.wo(out.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.chunk_tokens = cfg.mlp_chunk_tokens
        self.w_gate = nn.Linear(cfg.hidden_size, hidden, bias=False)
        self.w_up = nn.Linear(cfg.hidden_size, hidden, bias=False)
        self.w_down = nn.Linear(hidden, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [B, S, hidden] -> [B, S, hidden]; tiled: [B, chunk, ffn_hidden] intermediates one chunk at a time
        return sequence_tiled(self._swiglu, x, self.chunk_tokens, [p for p in self.parameters() if p.requires_grad])

    def _swiglu(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, document_ids: Tensor | None) -> Tensor:
        # x: [B, S, hidden], document_ids: [B, S] int64 or None -> [B, S, hidden]
        x = x + self.attn(self.attn_norm(x), cos, sin, document_ids)
        return x + self.ffn(self.ffn_norm(x))

    def parallel_plan(self) -> BlockPlan:
        colwise, rowwise = TensorSplit(Split.COLWISE), TensorSplit(Split.ROWWISE)
        sequence = TensorSplit(Split.SEQUENCE)
        # A tiled feed-forward runs its down projection a chunk at a time: a reduce-scatter of each chunk would
        # deal every rank a slice of every chunk, so its partial sums are reduce-scattered once, on the way out.
        tiled = self.ffn.chunk_tokens > 0
        # Column-parallel q/k/v split whole query and KV heads, so grouped-query attention stays local.
        splits = {
            "attn_norm": sequence,
            # x, and the local full-sequence inputs: the RoPE tables cos, sin and the document ids (or None)
            "attn": TensorSplit(Split.GATHER_INPUT, inputs=4),
            "attn.wq": colwise, "attn.wk": colwise, "attn.wv": colwise, "attn.wo": rowwise,
            "ffn_norm": sequence,
            "ffn": TensorSplit(Split.GATHER_INPUT, reduce_output=tiled),
            "ffn.w_gate": colwise, "ffn.w_up": colwise,
            "ffn.w_down": TensorSplit(Split.ROWWISE_PARTIAL) if tiled else rowwise,
        }
        head_norms = self.attn.q_norm is not None
        if head_norms:
            splits.update({"attn.q_norm": TensorSplit(Split.HEADS), "attn.k_norm": TensorSplit(Split.HEADS)})
        return BlockPlan(
            block=self, attention=self.attn, feed_forward=self.ffn, norms=(self.attn_norm, self.ffn_norm),
            final_projection=self.ffn.w_down,
            # The per-head norms' backward reads the q/k projections' outputs; RoPE's reads only its tables.
            projections_read_in_backward=head_norms,
            tensor_parallel=splits,
        )


def logit_losses(logits: Tensor, labels: Tensor) -> Tensor:
    # logits: [B, s, V], labels: [B, s] -> per-token cross-entropy [B, s], at least fp32
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: softmax in fp32
    return F.cross_entropy(wide.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


def _cross_entropy(head: nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    # hidden: [B, s, hidden], labels: [B, s] -> per-token losses [B, s]
    return logit_losses(head(hidden), labels)


def token_losses(head: nn.Module, hidden: Tensor, labels: Tensor, chunk_tokens: int) -> Tensor:
    """Per-token cross-entropy of the output head over `hidden` [B, S, hidden] -> [B, S].

    Whole, the logits and the loss's fp32 copies of them are [B, S, V] several times over: at long context
    and a large vocabulary the largest tensors of a step. With `chunk_tokens` the sequence is cut into chunks
    of that many positions; each chunk's logits and loss are recomputed in backward (activation
    checkpointing), so only one chunk's [B, chunk, V] exists at a time and nothing of it is stored."""
    if chunk_tokens <= 0 or chunk_tokens >= hidden.shape[1]:
        return _cross_entropy(head, hidden, labels)
    pieces = [checkpoint(_cross_entropy, head, h, y, use_reentrant=False)
              for h, y in zip(hidden.split(chunk_tokens, dim=1), labels.split(chunk_tokens, dim=1), strict=True)]
    return torch.cat(pieces, dim=1)


def losses_and_predictions(head: nn.Module, hidden: Tensor, labels: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """For evaluation (no backward): per-token cross-entropy [B, S] (at least fp32) and the argmax predictions
    [B, S] int64 of the output head over `hidden` [B, S, hidden]; with `chunk_tokens`, as `token_losses` makes
    them, only one chunk's [B, chunk, V] logits exist at a time."""
    losses, predictions = [], []
    for h, y in zip(hidden.split(chunk_tokens or hidden.shape[1], dim=1),
                    labels.split(chunk_tokens or labels.shape[1], dim=1), strict=True):
        logits = head(h)  # [B, chunk, V]
        losses.append(logit_losses(logits, y))
        predictions.append(logits.argmax(-1))
        del logits
    return torch.cat(losses, dim=1), torch.cat(predictions, dim=1)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size={cfg.vocab_size}: resolve it (e.g. from the task) before building")
        self.cfg = cfg
        # Constants of the config, not state: a plain attribute (on CPU, [head_dim/2]) rather than a buffer, so
        # building on the meta device and materialising the shards leaves it intact and checkpoints never hold it.
        with torch.device("cpu"):  # also when the model is built under torch.device("meta")
            self.inv_freq, self.rope_scale = inverse_frequencies(head_dim(cfg), cfg.rope_theta, cfg.rope_scaling)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With model.tie_embeddings the head is the embedding's parameter. Again after `to_empty`: moving off the
        meta device gives every module its own new parameter, which would untie them. The embedding keeps its
        own (FSDP2 manages a shared parameter through the first module that holds it, the embedding)."""
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens: Tensor, positions: Tensor, labels: Tensor | None = None,
                loss_chunk_tokens: int = 0, document_ids: Tensor | None = None,
                predictions: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """tokens, positions: [B, S] (S may be this rank's shard; positions are explicit per token) -> logits
        [B, S, V]; with `labels` [B, S]: per-token cross-entropy [B, S] (at least fp32), the vocabulary's logits
        made `loss_chunk_tokens` sequence positions at a time when that is set (see `token_losses`); with
        `predictions` too (evaluation, no backward): (those losses, argmax predictions [B, S] int64).
        `document_ids` [B, S] int64: each query attends only to keys of its own document (None: no masks)."""
        table_dtype = torch.promote_types(self.embed.weight.dtype, torch.float32)
        cos, sin = rope_tables(positions, self.inv_freq, self.rope_scale, table_dtype)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin, document_ids)
        if labels is None:
            return self.lm_head(self.norm(x))
        if predictions:
            return losses_and_predictions(self.lm_head, self.norm(x), labels, loss_chunk_tokens)
        return token_losses(self.lm_head, self.norm(x), labels, loss_chunk_tokens)

    def parallel_plan(self) -> ParallelPlan:
        """What `parallel.parallelize` needs to know of this model (see parallel.plan)."""
        return ParallelPlan(
            blocks=tuple(block.parallel_plan() for block in self.blocks),
            tensor_parallel={"embed": TensorSplit(Split.VOCAB_EMBEDDING), "norm": TensorSplit(Split.SEQUENCE),
                             "lm_head": TensorSplit(Split.VOCAB_HEAD)},
            attention_backend=self.cfg.attention_backend,
        )

    def initial_values(self, seed: int) -> Iterator[tuple[str, Tensor]]:
        """Deterministic initialisation from `seed`: (parameter name, its full float32 values), one parameter at
        a time in `named_parameters()` order, the same whatever the layout or device (drawn on CPU), so a rank
        keeps only its own part of each before the next is drawn.

        Normal(0, init_std) everywhere, output projections scaled by 1/sqrt(2 * num_layers) (GPT-2) so the
        residual stream does not grow with depth; norms start at one, biases at zero.
        """
        generator = torch.Generator().manual_seed(seed)
        std = self.cfg.init_std
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                yield name, torch.ones(param.shape)
            elif name.endswith(".bias"):
                yield name, torch.zeros(param.shape)
            else:
                deep = name.endswith(("wo.weight", "w_down.weight"))
                scale = std / math.sqrt(2 * self.cfg.num_layers) if deep else std
                yield name, torch.empty(param.shape, dtype=torch.float32).normal_(0.0, scale, generator=generator)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> Transformer:
    """The whole model on one process, randomly initialised (tests, notebooks). Ranks of a parallel run build
    on the meta device instead and fill only their shards (lsys.weights)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.tie_weights()
    with torch.no_grad():
        for name, values in model.initial_values(seed):
            model.get_parameter(name).copy_(values)
    return model.to(dtype)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
