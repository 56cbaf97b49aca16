"""lsys against DeepSpeed's Arctic Long Sequence Training (ALST) pieces, on one HuggingFace Llama checkpoint.

    python bench/alst.py        # 2 and 4 ranks, S=4096 and 8192, 3 rounds, longest S under 0.5 GiB on 2 ranks
    python bench/alst.py --ranks 2 --seq-lens 512 --repeats 1 --cap-gib 0 --output ''   # quick: does it run?

Model: a Llama-shaped `transformers.LlamaConfig` (hidden 256, ffn 688, 4 layers, 8 heads, 4 KV heads, vocab
8192, untied embeddings), float32, random init from a seed, saved once as a HuggingFace directory (config.json +
model.safetensors). Both sides load these weights: lsys with `model.pretrained=DIR`, DeepSpeed's side with
`LlamaForCausalLM.from_pretrained(DIR, attn_implementation="sdpa")`. Data: one sequence (batch 1) of random token
ids over the whole vocabulary, the same on both sides; causal LM loss, the mean over the S-1 next-token targets.

Methods, all on the same gloo ranks (loopback, `launch.local.spawn`, cpu_count / ranks threads per rank), the
whole sequence split over all ranks:
- `lsys-ulysses`, `lsys-ring`: the Trainer (`parallel.cp_ulysses=N` or `parallel.cp_ring=N`), with
  `recompute.mode=full`, `model.mlp_chunk_tokens`, `train.loss_chunk_tokens`; FSDP2 shards parameters, gradients
  and AdamW's state over the N ranks (lsys always does). The task's batches are replaced by the random sequence.
  With `--offload`, also `lsys-ulysses-offload` (`recompute.offload=cpu`).
- `alst`: DeepSpeed's ALST pieces without its engine: `UlyssesSPAttentionHF.register_with_transformers` (sdpa
  core, the CPU flash kernel), the batch sharded by `UlyssesSPDataLoaderAdapter` (its `shift_labels`), HF's full
  activation checkpointing (`gradient_checkpointing_enable`, non-reentrant), `TiledMLP` patched into `LlamaMLP`
  as its docstring shows, `TiledFusedLogitsLoss` over `lm_head` (sum, then the tutorial's token-weighted mean
  over the SP group through a differentiable all-gather). Parameters replicated; gradients averaged over the SP
  group with one all-reduce (what the engine does for SP ranks).
- `alst-zero3`: the same, stepped by DeepSpeed's engine (`deepspeed.initialize` with the ALST mpu, ZeRO-3 over
  the SP ranks, its AdamW and clipping; bucket sizes as HF's "auto" sets them for this hidden size, since the
  5e8-element defaults hold 2 GiB of buckets). It runs on CPU: DeepSpeed picks its CPU accelerator, JIT-builds its
  fused_adam and shm comm ops (a C++ compiler is needed, once), and does its gradient collectives through its
  shared-memory comm op rather than gloo.
Every step on both sides: forward, backward, gradient clipping at norm 1.0 and an AdamW step (foreach), the same
chunk sizes (tokens per MLP tile and per loss tile).

Measured per rank:
- step time: `--repeats` rounds in which the methods take turns (a shared machine's noise falls on all of them),
  each step started after a barrier; per round the slowest rank, then the median (and min-max) over rounds.
- peak: what the method holds between steps ("state": the bytes it allocated while being built and stepped once
  and still holds: parameters, AdamW state, ZeRO buffers, caches) plus the net peak of one whole step on top of
  that (allocations minus frees in time order). Both from `torch.profiler`'s CPU memory events
  (bench/measure.py `allocation_totals`), the same method for every side: the profiler sees every allocation of
  torch's CPU allocator whichever framework made it, where lsys's MemoryTracker sees only lsys's tensors and
  process RSS is blurred by the allocator keeping freed pages, by the loaded libraries and by the other ranks on
  the machine. Gradients are set to None after every step on every side, so they count in the step's peak.
- longest S under `--cap-gib` (on `--cap-ranks`): S doubles from the first `--seq-lens` value while state + step
  peak of the largest rank stays under the cap, up to `--max-seq-len` (">=" when it still fits there); lengths
  not measured above get one measured step each.
- correctness: at S=`--check-len` each method's first-step loss against the single-process HF model's loss on
  the same tokens (fp32, tolerance 1e-5).

What does not run here, and why (also in the JSON's `not_run`):
- ALST's activation-checkpoint offload to CPU lives in ArcticTraining, not in deepspeed, and is not installed; on
  a CPU-only machine the "host" is the same memory anyway, so offload cannot lower the measured peak here (lsys's
  offload row shows what the copies cost).

Prints a table and writes bench/results/alst.json.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.measure import allocation_totals, peak_allocated  # noqa: E402
from bench.report import MIB, write_results  # noqa: E402

GIB = 2**30
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 4, "vocab_size": 8192, "max_position_embeddings": 1 << 20, "rope_theta": 10000.0,
         "tie_word_embeddings": False, "rms_norm_eps": 1e-5}
SEED = 0
TOKEN_SEED = 1
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
TOLERANCE = 1e-5


# -- the shared inputs -------------------------------------------------------------------------------------------

def save_checkpoint(directory: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, torch_dtype="float32"))
    model.save_pretrained(directory, safe_serialization=True)


def tokens_of(seq_len: int) -> torch.Tensor:
    """The sequence both sides train on: [1, S] random ids over the whole vocabulary."""
    gen = torch.Generator().manual_seed(TOKEN_SEED + seq_len)
    return torch.randint(0, MODEL["vocab_size"], (1, seq_len), generator=gen)


def reference_loss(checkpoint: Path, seq_len: int) -> float:
    """The single-process HF model's loss on `tokens_of(seq_len)` (transformers shifts the labels itself)."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa", dtype=torch.float32)
    tokens = tokens_of(seq_len)
    with torch.no_grad():
        return model(input_ids=tokens, labels=tokens).loss.item()


# -- lsys ----------------------------------------------------------------------------------------------------------

class LsysMethod:
    def __init__(self, session, checkpoint: Path, run_dir: str, layout: str, nranks: int, seq_len: int,
                 mlp_chunk: int, loss_chunk: int, offload: bool):
        from lsys.config import load_config
        from lsys.data.task import Batch
        from lsys.trainer import Trainer

        overrides = [f"model.pretrained={checkpoint}", f"model.mlp_chunk_tokens={mlp_chunk}",
                     f"parallel.{layout}={nranks}", "parallel.dp=1", "recompute.mode=full",
                     "data.task=passkey", f"data.seq_len={seq_len}", "train.global_batch_size=1",
                     f"train.loss_chunk_tokens={loss_chunk}", "train.device=cpu", "train.param_dtype=float32",
                     "train.compute_dtype=float32", f"train.lr={LR}", f"train.min_lr={LR}", "train.warmup_steps=0",
                     f"train.weight_decay={WEIGHT_DECAY}", f"train.grad_clip={CLIP}", f"train.seed={SEED}",
                     f"train.run_dir={run_dir}"]
        if offload:
            overrides.append("recompute.offload=cpu")
        self.trainer = Trainer(load_config(None, overrides), session)
        tokens = tokens_of(seq_len)
        labels = torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, -1] = False  # the last position has no next token: S-1 targets, as transformers' shifted loss
        batch = Batch(tokens=tokens, labels=labels, loss_mask=mask,
                      positions=torch.arange(seq_len).unsqueeze(0), document_ids=torch.zeros_like(tokens))
        # The passkey task only fixes the config's vocabulary check; every step trains on the random sequence.
        self.trainer.task.batch_of_length = lambda ids, length, split="train": batch
        self.steps = 0

    def step(self) -> float:
        loss = self.trainer.train_step(self.steps)["loss"]
        self.trainer.optimizer.zero_grad(set_to_none=True)  # between steps no method holds gradients
        self.steps += 1
        return loss


# -- DeepSpeed ALST ------------------------------------------------------------------------------------------------

_ALST = {}


def _setup_alst(nranks: int, mlp_chunk: int):
    """Once per process: the Ulysses attention registered with transformers, TiledMLP patched into LlamaMLP."""
    if _ALST:
        return _ALST
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP, UlyssesSPAttentionHF
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group that is already up
    # register_with_transformers reads the model's config (attention heads); a config object does the same job.
    config = LlamaConfig(**MODEL)
    config._attn_implementation = "sdpa"
    holder = type("Loaded", (), {"config": config})()
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=holder, core_attn_implementation="sdpa", sequence_parallel_size=nranks,
        micro_batch_size=1, seq_length_is_variable=True)

    def tiled_mlp_forward(self, x):
        # TiledMLP's docstring example, with a fixed token count per tile (the same as lsys's chunk); every rank
        # holds S/N tokens, so all agree on the number of shards without its all-reduce.
        shards = math.ceil(x.shape[1] / mlp_chunk)
        compute_params = [self.down_proj.weight, self.gate_proj.weight, self.up_proj.weight]

        def mlp_forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

        return TiledMLP.apply(mlp_forward, self, x, shards, compute_params)

    modeling_llama.LlamaMLP.forward = tiled_mlp_forward
    _ALST["mpu"] = mpu
    return _ALST


class AlstMethod:
    def __init__(self, checkpoint: Path, nranks: int, seq_len: int, mlp_chunk: int, loss_chunk: int):
        import deepspeed.comm as ds_dist
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
        from transformers import LlamaForCausalLM

        mpu = _setup_alst(nranks, mlp_chunk)["mpu"]
        self.group = mpu.get_sequence_parallel_group()
        self.world = ds_dist.get_world_size(self.group)
        model = LlamaForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa", dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.train()
        self.model = model
        self.loss_chunk = loss_chunk
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=LR, betas=BETAS, eps=EPS, foreach=True)
        tokens = tokens_of(seq_len)
        batch = {"input_ids": tokens, "position_ids": torch.arange(seq_len).unsqueeze(0), "labels": tokens.clone()}
        adapter = UlyssesSPDataLoaderAdapter([batch], sp_rank=ds_dist.get_rank(self.group), sp_group=self.group,
                                             sp_world_size=self.world, device=torch.device("cpu"))
        self.batch = next(iter(adapter))  # this rank's shard: input_ids, position_ids, shift_labels

    def _loss(self) -> torch.Tensor:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledFusedLogitsLoss

        batch, model = self.batch, self.model
        hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).last_hidden_state
        labels = batch["shift_labels"]
        shards = math.ceil(hidden.shape[1] / self.loss_chunk)

        def loss_fn(head, x, y):
            logits = head(x).float()
            return torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1),
                                                     ignore_index=-100, reduction="sum")

        local_sum = TiledFusedLogitsLoss.apply(loss_fn, model.lm_head, hidden, labels, None, shards,
                                               [model.lm_head.weight], "sum")
        # The tutorial's token-weighted mean over the SP group (differentiable all-gather).
        good = (labels != -100).sum().to(local_sum.dtype)
        sums = torch.distributed.nn.functional.all_gather(local_sum, group=self.group)
        counts = torch.distributed.nn.functional.all_gather(good, group=self.group)
        return sum(sums) / sum(counts)

    def step(self) -> float:
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        loss = self._loss()
        loss.backward()
        # Every SP rank holds the whole model: average its gradients over the group, as DeepSpeed's engine does.
        grads = [p.grad for p in self.model.parameters()]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat, group=self.group)
        flat /= self.world
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)
        del flat
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class AlstZero3Method(AlstMethod):
    """The same model, loss and tiling, stepped by DeepSpeed's engine: ZeRO-3 over the SP ranks (the mpu from
    register_with_transformers), its AdamW and gradient clipping, as the ALST tutorial runs it."""

    def __init__(self, checkpoint: Path, nranks: int, seq_len: int, mlp_chunk: int, loss_chunk: int):
        import deepspeed

        super().__init__(checkpoint, nranks, seq_len, mlp_chunk, loss_chunk)
        del self.optimizer
        hidden = MODEL["hidden_size"]
        # The bucket sizes HF's "auto" gives ZeRO-3 for this hidden size; DeepSpeed's defaults (5e8 elements)
        # would allocate 2 GiB of fp32 buckets for a 7M-parameter model.
        zero = {"stage": 3, "reduce_bucket_size": hidden * hidden, "stage3_prefetch_bucket_size": int(0.9 * hidden**2),
                "stage3_param_persistence_threshold": 10 * hidden}
        config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": zero,
                  "sequence_parallel_size": nranks, "gradient_clipping": CLIP,
                  "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                            "weight_decay": WEIGHT_DECAY}}}
        self.engine, *_ = deepspeed.initialize(model=self.model, model_parameters=self.model.parameters(),
                                               config=config, mpu=_ALST["mpu"])

    def step(self) -> float:
        loss = self._loss()
        self.engine.backward(loss)
        self.engine.step()
        return loss.item()


# -- one rank ------------------------------------------------------------------------------------------------------

def _build(name: str, session, checkpoint: Path, run_dir: str, nranks: int, seq_len: int, chunks: tuple[int, int]):
    if name == "alst":
        return AlstMethod(checkpoint, nranks, seq_len, *chunks)
    if name == "alst-zero3":
        return AlstZero3Method(checkpoint, nranks, seq_len, *chunks)
    layout = "cp_ring" if name == "lsys-ring" else "cp_ulysses"
    return LsysMethod(session, checkpoint, run_dir, layout, nranks, seq_len, *chunks,
                      offload=name.endswith("offload"))


def _built(name: str, *args) -> tuple[object, int]:
    """The method, built and stepped once (AdamW's state exists from then on), and the bytes it holds after: what
    it allocated while being built and stepped and still holds (parameters, optimizer state, its buffers)."""
    holder = []

    def build():
        holder.append(_build(name, *args))
        holder[0].step()

    _, held = allocation_totals(build)
    return holder[0], held


def _timed_step(method) -> tuple[float, float]:
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    loss = method.step()
    return time.perf_counter() - start, loss


def _rank(checkpoint: str, names: list[str], seq_lens: list[int], repeats: int, cap_bytes: int, max_len: int,
          check_len: int, chunks: tuple[int, int]) -> dict:
    import torch.distributed as dist

    from lsys.session import distributed_session

    checkpoint = Path(checkpoint)
    nranks = dist.get_world_size()
    out: dict = {"check": {}, "lengths": {}, "cap": {}}
    with tempfile.TemporaryDirectory(prefix="alst-bench-") as run_dir, distributed_session("cpu", 1800.0) as session:
        for name in names:  # correctness: the first step's loss, before any update
            out["check"][name] = _build(name, session, checkpoint, run_dir, nranks, check_len, chunks).step()
        for seq_len in seq_lens:
            methods, row = {}, {}
            for name in names:
                methods[name], held = _built(name, session, checkpoint, run_dir, nranks, seq_len, chunks)
                row[name] = {"state_bytes": held, "peak_step_bytes": peak_allocated(methods[name].step),
                             "times_s": []}
            for round_index in range(repeats):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    row[name]["times_s"].append(_timed_step(methods[name])[0])
            out["lengths"][seq_len] = row
            del methods
        if cap_bytes:
            for name in names:
                measured = {s: row[name]["state_bytes"] + row[name]["peak_step_bytes"]
                            for s, row in out["lengths"].items()}
                out["cap"][name] = _longest(name, session, checkpoint, run_dir, nranks, seq_lens[0], cap_bytes,
                                            max_len, chunks, measured)
    return out


def _longest(name, session, checkpoint, run_dir, nranks, start, cap_bytes, max_len, chunks, measured) -> dict:
    """S doubling from `start` while every rank's state + step peak stays under the cap (all ranks agree); the
    lengths already measured are not run again. Stops at `max_len` (then the longest is at least that)."""
    import torch.distributed as dist

    fits, seq_len, tried = 0, start, []
    while seq_len <= max_len:
        if seq_len in measured:
            total = measured[seq_len]
        else:
            method, held = _built(name, session, checkpoint, run_dir, nranks, seq_len, chunks)
            total = held + peak_allocated(method.step)
            del method
        worst = torch.tensor([total], dtype=torch.int64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        tried.append({"seq_len": seq_len, "bytes": int(worst.item())})
        if worst.item() > cap_bytes:
            return {"longest_seq_len": fits, "tried": tried, "bounded": False}
        fits, seq_len = seq_len, seq_len * 2
    return {"longest_seq_len": fits, "tried": tried, "bounded": True}


# -- summary -------------------------------------------------------------------------------------------------------

def summarize(per_rank: list[dict], names: list[str], reference: float) -> dict:
    check = {name: {"loss": per_rank[0]["check"][name],
                    "abs_error": abs(per_rank[0]["check"][name] - reference),
                    "ok": all(abs(r["check"][name] - reference) <= TOLERANCE for r in per_rank)} for name in names}
    lengths = {}
    for seq_len in per_rank[0]["lengths"]:
        rows = {}
        for name in names:
            ranks = [r["lengths"][seq_len][name] for r in per_rank]
            rounds = [max(ts) for ts in zip(*(r["times_s"] for r in ranks), strict=True)]
            rows[name] = {"time_s": statistics.median(rounds), "round_times_s": rounds,
                          "state_bytes": max(r["state_bytes"] for r in ranks),
                          "peak_step_bytes": max(r["peak_step_bytes"] for r in ranks),
                          "peak_bytes": max(r["state_bytes"] + r["peak_step_bytes"] for r in ranks),
                          "peak_bytes_per_rank": [r["state_bytes"] + r["peak_step_bytes"] for r in ranks]}
        lengths[str(seq_len)] = rows
    return {"check": check, "lengths": lengths, "cap": per_rank[0]["cap"]}


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"Llama h{MODEL['hidden_size']} L{MODEL['num_hidden_layers']} V{MODEL['vocab_size']} fp32, "
                        f"B=1, fwd+bwd+clip+AdamW per step, gloo ranks; peak = state + step allocations, "
                        f"worst rank; {results['setup']['repeats']} rounds")
    for column in ("ranks", "S", "method", "step s", "min-max s", "peak MiB/rank", "state MiB", "vs alst time",
                   "vs alst peak"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for ranks, run in results["runs"].items():
        for seq_len, rows in run["lengths"].items():
            base = rows.get("alst")
            for name, row in rows.items():
                ratio_t = f"{row['time_s'] / base['time_s']:.2f}" if base else "-"
                ratio_m = f"{row['peak_bytes'] / base['peak_bytes']:.2f}" if base else "-"
                table.add_row(ranks, seq_len, name, f"{row['time_s']:.2f}",
                              f"{min(row['round_times_s']):.2f}-{max(row['round_times_s']):.2f}",
                              f"{row['peak_bytes'] / MIB:.0f}", f"{row['state_bytes'] / MIB:.1f}", ratio_t, ratio_m)
    console.print(table)
    cap = Table(title=f"longest S (doubling) with state + step peak <= {results['setup']['cap_gib']} GiB on every rank")
    for column in ("ranks", "method", "longest S", "tried (S: MiB)"):
        cap.add_column(column, justify="left" if column in ("method", "tried (S: MiB)") else "right")
    for ranks, run in results["runs"].items():
        for name, found in run["cap"].items():
            cap.add_row(ranks, name, (">= " if found["bounded"] else "") + str(found["longest_seq_len"]),
                        ", ".join(f"{t['seq_len']}: {t['bytes'] / MIB:.0f}" for t in found["tried"]))
    if any(run["cap"] for run in results["runs"].values()):
        console.print(cap)
    checks = Table(title=f"first-step loss at S={results['setup']['check_len']} against one-process HF "
                         f"({results['reference_loss']:.6f}), tolerance {TOLERANCE}")
    for column in ("ranks", "method", "loss", "abs error", "ok"):
        checks.add_column(column)
    for ranks, run in results["runs"].items():
        for name, check in run["check"].items():
            checks.add_row(ranks, name, f"{check['loss']:.6f}", f"{check['abs_error']:.1e}", str(check["ok"]))
    console.print(checks)
    for name, reason in results["not_run"].items():
        console.print(f"not run, {name}: {reason}", markup=False)


def main(argv: list[str] | None = None) -> None:
    from launch.local import spawn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cap-gib", type=float, default=0.5,
                        help="memory cap per rank for the longest-S search (0: skip the search)")
    parser.add_argument("--max-seq-len", type=int, default=16384, help="where the longest-S search stops")
    parser.add_argument("--cap-ranks", type=int, nargs="+", default=[2], help="rank counts that run the search")
    parser.add_argument("--check-len", type=int, default=256)
    parser.add_argument("--mlp-chunk", type=int, default=1024, help="tokens per MLP tile, both sides")
    parser.add_argument("--loss-chunk", type=int, default=1024, help="tokens per logits/loss tile, both sides")
    parser.add_argument("--offload", action="store_true", help="add lsys-ulysses-offload (recompute.offload=cpu)")
    parser.add_argument("--no-engine", action="store_true", help="skip alst-zero3 (DeepSpeed's engine)")
    parser.add_argument("--output", type=str, default=str(ROOT / "bench/results/alst.json"), help="'' for none")
    args = parser.parse_args(argv)
    names = (["lsys-ulysses", "lsys-ring", "alst"] + ([] if args.no_engine else ["alst-zero3"])
             + (["lsys-ulysses-offload"] if args.offload else []))
    results = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
               "model": MODEL, "runs": {}}
    from importlib import metadata

    results["versions"] = {p: metadata.version(p) for p in ("deepspeed", "transformers")}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="alst-ckpt-") as tmp:
        checkpoint = Path(tmp) / "llama"
        save_checkpoint(checkpoint)
        results["reference_loss"] = reference_loss(checkpoint, args.check_len)
        for nranks in args.ranks:
            chunks = (args.mlp_chunk, args.loss_chunk)
            cap = int(args.cap_gib * GIB) if nranks in args.cap_ranks else 0
            per_rank = spawn(_rank, nranks, (str(checkpoint), names, args.seq_lens, args.repeats, cap,
                                             args.max_seq_len, args.check_len, chunks),
                             init_backend="gloo", timeout_s=3600)
            results["runs"][str(nranks)] = summarize(per_rank, names, results["reference_loss"])
    results["setup"] = {"ranks": args.ranks, "seq_lens": args.seq_lens, "repeats": args.repeats,
                        "cap_gib": args.cap_gib, "cap_ranks": args.cap_ranks, "max_seq_len": args.max_seq_len,
                        "check_len": args.check_len, "mlp_chunk_tokens": args.mlp_chunk,
                        "loss_chunk_tokens": args.loss_chunk, "methods": names,
                        "memory": "torch.profiler CPU memory events, net running peak over one step (bench/measure.py)"
                                  " + parameters and AdamW state held before it",
                        "wall_s": time.perf_counter() - started}
    results["not_run"] = {
        "alst_checkpoint_offload": "in ArcticTraining, not in deepspeed (not installed); on CPU the host is the same "
                                   "memory, so it cannot lower the measured peak",
    }
    print_table(results)
    write_results(results, Path(args.output) if args.output else None)


if __name__ == "__main__":
    main()
