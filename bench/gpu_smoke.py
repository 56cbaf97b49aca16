"""One-GPU training smoke: a ~100M-parameter model at 32K tokens, three recompute settings, a few steps each.

Per setting: the losses (finite, falling?), the median step time after the first, tokens/s, MFU, and the step's
measured peak memory against the peak `lsys plan` predicts for the same config on one rank.

    python bench/gpu_smoke.py                  # CUDA: hidden 768, 12 layers, 32,768 tokens, bf16, 8 steps each
    python bench/gpu_smoke.py --cpu --quick    # the same path with a tiny fp32 model on CPU (the test runs this)

bench/gpu_check.py calls `train_smoke` and prints `smoke_table`. Each setting trains in this process through the
trainer's own step (`Trainer.train_step`, what `lsys train` runs each step) on a one-rank group: no eval and no
checkpoint, which `Trainer.run` always does at the end.

Measured peak: on CUDA the allocator's peak of each step (reset at its start, as the trainer's metrics do), the
largest over the steps after the first. On CPU the allocator keeps no statistics and the trainer's figure is the
process's peak RSS (interpreter and libraries included, never reset), so the steps after the first run under the
planner's own MemoryTracker over the real tensors instead.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lsys.config import head_dim, load_config, save_config  # noqa: E402
from lsys.memory.trace import trace_rank  # noqa: E402
from lsys.memory.tracker import MemoryTracker  # noqa: E402
from lsys.metrics import PeakMemory, format_bytes  # noqa: E402
from lsys.model import count_parameters  # noqa: E402
from lsys.session import distributed_session  # noqa: E402
from lsys.trainer import Trainer  # noqa: E402

SETTINGS = {
    "none": ["recompute.mode=none"],
    "selective+int8": ["recompute.mode=selective", "quant.activations=int8"],
    "full": ["recompute.mode=full"],
}
# Passkey with key_vocab=1: the key is the same in every sample, so the loss falls within a few steps (a smoke
# needs a loss that moves, not retrieval), and a 24-token vocabulary leaves nearly every parameter in the blocks.
# ffn 3072: 104M parameters.
GPU_MODEL = ["model.hidden_size=768", "model.num_layers=12", "model.num_heads=12", "model.num_kv_heads=4",
             "model.ffn_hidden_size=3072", "data.seq_len=32768", "train.steps=8",
             "train.param_dtype=float32", "train.compute_dtype=bfloat16", "train.device=cuda"]
CPU_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
             "data.seq_len=256", "train.steps=3", "train.loss_chunk_tokens=128", "train.device=cpu",
             "train.lr=3e-3", "train.min_lr=3e-4", "train.warmup_steps=1"]
COMMON = ["data.task=passkey", "data.passkey.key_vocab=1", "data.curriculum.start_len=0",
          "train.global_batch_size=1", "train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=2",
          "train.loss_chunk_tokens=2048", "train.eval_samples=0", "checkpoint.resume=false",
          "logging.tensorboard=false"]
# Dense bf16 peak FLOP/s by a substring of torch.cuda.get_device_name(), first match wins (PCIe before SXM).
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
GIB = 1024**3


def peak_flops(device_name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16 if key in device_name), None)


def model_flops_per_token(cfg, params: int) -> float:
    """6 x the parameters that multiply (the input embedding is a lookup, left out) + causal attention's
    6 x layers x seq_len x heads x head_dim (fwd+bwd 12, halved by the mask); recomputation is not counted."""
    m = cfg.model
    return 6.0 * params + 6.0 * m.num_layers * cfg.data.seq_len * m.num_heads * head_dim(m)


def smoke_config(device: str, quick: bool, setting: str, run_dir: Path):
    model = CPU_MODEL if quick else GPU_MODEL
    if device != ("cpu" if quick else "cuda"):  # e.g. the tiny model on a GPU: keep the model, move the device
        model = [*model, f"train.device={device}"]
    return load_config(None, [*COMMON, *model, *SETTINGS[setting], f"train.run_dir={run_dir}"])


def planned_peak(cfg) -> int:
    """The peak `lsys plan` traces for one rank (fake tensors on CPU; needs no process group to exist)."""
    return trace_rank(cfg, 1).peak_bytes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train(cfg, session) -> dict:
    """cfg.train.steps steps of a fresh trainer: per-step records, the measured peak, the parameter counts."""
    device = session.device
    held_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None  # ~0 unless one leaked
    trainer = Trainer(cfg, session)
    params, embedding = count_parameters(trainer.model), trainer.model.embed.weight.numel()
    peaks, tracker, records, step_peaks = PeakMemory(device), None, [], []
    with contextlib.ExitStack() as stack:
        for step in range(cfg.train.steps):
            if step == 1 and device.type == "cpu":  # steady steps only, as planned (Adam's state exists)
                tracker = MemoryTracker(trainer.model, trainer.optimizer)
                trainer.work.probe = tracker
                stack.enter_context(tracker)
            peaks.start_step()
            t0 = time.perf_counter()
            record = trainer.train_step(step)
            _sync(device)  # the optimizer's kernels may still run: time the whole step
            record["wall_s"] = time.perf_counter() - t0
            records.append(record)
            step_peaks.append(peaks.in_step())
    measured = tracker.usage().peak_bytes if tracker is not None else max(step_peaks[1:] or step_peaks)
    del trainer, tracker, stack
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next setting's peak starts from an empty device
    return {"records": records, "measured": measured, "params": params, "embedding": embedding,
            "held_before": held_before}


def train_smoke(device: str, quick: bool, out_dir: Path) -> list[dict]:
    """One row per recompute setting (SETTINGS): a fresh model trained cfg.train.steps steps in this process.

    Row keys: setting, overrides, device, device_name, params, params_counted (in the FLOPs: all but the input
    embedding), seq_len, steps, losses, losses_finite, falling (last < first), step_time_s (median after the
    first), step_times_s, tokens_per_s, model_flops_per_token, peak_flops, mfu (None, with mfu_note, when the
    device's peak is unknown), peak_measured_bytes, peak_measured_by, held_before_bytes (CUDA: allocated before
    the model was built, ~0; None on CPU), peak_planned_bytes, peak_ratio (measured / planned),
    build_and_train_s, run_dir."""
    out_dir = Path(out_dir)
    configs = {s: smoke_config(device, quick, s, out_dir / f"smoke-{s.replace('+', '-')}") for s in SETTINGS}
    planned = {s: planned_peak(cfg) for s, cfg in configs.items()}  # before the session: it joins a fake group
    rows = []
    with distributed_session(device, 300.0) as session:
        dev = session.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        peak = peak_flops(name) if dev.type == "cuda" else None
        for setting, cfg in configs.items():
            save_config(cfg, cfg.train.run_dir)
            started = time.perf_counter()
            run = _train(cfg, session)
            wall = time.perf_counter() - started
            losses = [r["loss"] for r in run["records"]]
            times = [r["wall_s"] for r in run["records"]]
            step_time = statistics.median(times[1:] or times)  # the first step warms kernels and the allocator
            tokens_per_s = cfg.train.global_batch_size * cfg.data.seq_len / step_time
            counted = run["params"] - run["embedding"]
            flops = model_flops_per_token(cfg, counted)
            row = {
                "setting": setting, "overrides": SETTINGS[setting], "device": dev.type, "device_name": name,
                "params": run["params"], "params_counted": counted, "seq_len": cfg.data.seq_len,
                "steps": len(losses), "losses": losses, "losses_finite": all(map(math.isfinite, losses)),
                "falling": losses[-1] < losses[0], "step_time_s": step_time, "step_times_s": times,
                "tokens_per_s": tokens_per_s, "model_flops_per_token": flops, "peak_flops": peak,
                "mfu": tokens_per_s * flops / peak if peak else None,
                "mfu_note": "" if peak else "no peak FLOP/s for CPU" if dev.type == "cpu" else
                            f"no bf16 peak known for {name!r} (bench/gpu_smoke.py PEAK_BF16)",
                "peak_measured_bytes": run["measured"],
                "peak_measured_by": ("CUDA allocator, max_memory_allocated per step (reset at its start), "
                                     "largest after the first step") if dev.type == "cuda" else
                                    "MemoryTracker over the real tensors of the steps after the first",
                "held_before_bytes": run["held_before"], "peak_planned_bytes": planned[setting],
                "peak_ratio": run["measured"] / planned[setting],
                "build_and_train_s": wall, "run_dir": str(cfg.train.run_dir),
            }
            Path(cfg.train.run_dir, "smoke.json").write_text(json.dumps(row, indent=2) + "\n")
            rows.append(row)
    return rows


def smoke_table(rows: list[dict]) -> Table:
    first = rows[0] if rows else {}
    table = Table(title=f"training smoke on {first.get('device_name', '?')}: {first.get('params', 0) / 1e6:.1f}M "
                        f"parameters, {first.get('seq_len', 0):,} tokens, batch 1")
    for column in ("setting", "loss", "falling", "step s", "tok/s", "MFU", "peak", "planned", "ratio"):
        table.add_column(column, justify="left" if column in ("setting", "loss", "falling") else "right")
    for r in rows:
        loss = f"{r['losses'][0]:.3f}→{r['losses'][-1]:.3f}" if r["losses_finite"] else "NOT finite"
        table.add_row(r["setting"], loss, "yes" if r["falling"] else "NO", f"{r['step_time_s']:.3f}",
                      f"{r['tokens_per_s']:,.0f}", "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                      format_bytes(r["peak_measured_bytes"]), format_bytes(r["peak_planned_bytes"]),
                      f"{r['peak_ratio']:.2f}")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="train on CPU (default: CUDA)")
    parser.add_argument("--quick", action="store_true", help="the tiny model: 256 tokens, 3 steps, fp32")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_smoke", help="run directories go here")
    args = parser.parse_args(argv)
    rows = train_smoke("cpu" if args.cpu else "cuda", args.quick, args.out)
    Console().print(smoke_table(rows))
    (args.out / "smoke.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(r["losses_finite"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
