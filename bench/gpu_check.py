"""First contact with a GPU in one command: are lsys's CUDA kernels right, how fast are they, does training run?

    python bench/gpu_check.py                 # one H100/H200: writes bench/results/gpu_check.json
    python bench/gpu_check.py --cpu --quick   # tiny shapes on CPU (the test suite runs this)

Needs torch (2.11 or later), triton, numpy, rich, matplotlib, safetensors and omegaconf; not ray, deepspeed or
megatron-core. Sections, each a table and a key of the JSON:
  parity  every block kernel (Triton; torch's flash, memory-efficient and cuDNN ops) against float64: out, lse,
          dq, dk, dv for bf16 and fp32, head dims 64 and 128, S 4K and 32K, causal and not, GQA 32/8;
  ring    a 4-rank zigzag ring emulated on one device with the ring's own block plan and the global lse;
  speed   forward and forward+backward TFLOP/s of each kernel against SDPA's flash and cuDNN backends, S 8K-32K;
  quant   int8 quantize/dequantize: Triton equal to the torch path bit for bit, and GB/s;
  train   a ~100M-parameter model at 32K tokens on one GPU (bench/gpu_smoke.py): loss, tokens/s, MFU, peak
          memory against `lsys plan`'s.
Exits 1 when a parity, ring or quantization check fails or training gives a non-finite loss; the JSON is
written either way.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import gpu_kernels as gk  # noqa: E402
from bench.report import write_results  # noqa: E402

SECTIONS = ("parity", "ring", "speed", "quant", "train")
BACKENDS = ("triton", "flash", "efficient", "cudnn", "aten")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def sizes(device: str, quick: bool) -> dict:
    """The shapes of every section: full size on a GPU, a few hundred tokens with --quick."""
    if not quick:
        return {"parity": {"seq": (4096, 32768), "head_dim": (64, 128), "heads": (32, 8)},
                "ring": {"seq": 16384, "head_dim": 128, "heads": (32, 8), "ring": 4},
                "speed": {"seq": (8192, 16384, 32768), "head_dim": (64, 128), "heads": (32, 8)},
                "quant": (1, 32768, 32, 128)}
    return {"parity": {"seq": (40, 72), "head_dim": (16, 32), "heads": (4, 2)},
            "ring": {"seq": 64, "head_dim": 16, "heads": (4, 2), "ring": 4},
            "speed": {"seq": (256,), "head_dim": (32,), "heads": (4, 2)},
            "quant": (1, 256, 4, 32)}


def _attempt(fn, *args) -> tuple[dict | None, str | None]:
    try:
        return fn(*args), None
    except Exception as error:  # noqa: BLE001 - one failing op is a finding, not the end of the check
        return None, f"{type(error).__name__}: {error}".splitlines()[0][:300]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _checked(device: str, ref: dict, dtype: torch.dtype, run, *args) -> dict:
    """run(*args) against the float64 reference `ref`: its errors and verdict (gk.compare), or the error it
    raised; and the time it took."""
    start = time.perf_counter()
    got, error = _attempt(run, *args)
    _synchronize(device)
    result = gk.compare(got, ref, dtype) if got else {"ok": False, "error": error}
    return {"time_s": time.perf_counter() - start, **result}


def parity(device: str, shape: dict) -> list[dict]:
    rows = []
    heads, kv_heads = shape["heads"]
    for seq in shape["seq"]:
        for head_dim in shape["head_dim"]:
            x = gk.make_inputs(1, seq, heads, kv_heads, head_dim, device, seed=seq + head_dim)
            for causal in (True, False):
                ref = gk.reference(x, causal)
                for backend in BACKENDS:
                    for dtype_name, dtype in DTYPES.items():
                        if gk.runnable(backend, x, dtype, causal) is not None:
                            continue  # not this backend's inputs (the table lists what ran)
                        rows.append({"backend": backend, "dtype": dtype_name, "seq": seq, "head_dim": head_dim,
                                     "heads": f"{heads}/{kv_heads}", "causal": causal,
                                     **_checked(device, ref, dtype, gk.block_call, backend, x, dtype, causal)})
                del ref
    return rows


def ring(device: str, shape: dict) -> list[dict]:
    heads, kv_heads = shape["heads"]
    x = gk.make_inputs(1, shape["seq"], heads, kv_heads, shape["head_dim"], device, seed=7)
    ref = gk.reference(x, True)
    rows = []
    for backend in BACKENDS:
        for dtype_name, dtype in DTYPES.items():
            if gk.runnable(backend, x, dtype, True) is not None:
                continue
            rows.append({"backend": backend, "dtype": dtype_name, "seq": shape["seq"], "head_dim": shape["head_dim"],
                         "heads": f"{heads}/{kv_heads}", "ring": shape["ring"], "causal": True,
                         **_checked(device, ref, dtype, gk.ring_emulation, backend, x, dtype, shape["ring"])})
    return rows


def speed(device: str, shape: dict) -> list[dict]:
    heads, kv_heads = shape["heads"]
    rows = []
    sdpa = ("flash", "cudnn") if device == "cuda" else ("cpu",)
    for seq in shape["seq"]:
        for head_dim in shape["head_dim"]:
            x = gk.make_inputs(1, seq, heads, kv_heads, head_dim, device, seed=1)
            q, k, v, dout = (x[n].to(torch.bfloat16) for n in ("q", "k", "v", "dout"))
            del x
            candidates = [(f"lsys {b}", gk.kernel_runs, b) for b in BACKENDS
                          if gk.runnable(b, {"q": q, "k": k}, torch.bfloat16, True) is None]
            candidates += [(f"sdpa {b}", gk.sdpa_runs, b) for b in sdpa]
            for name, make, which in candidates:
                row = {"kernel": name, "seq": seq, "head_dim": head_dim, "heads": f"{heads}/{kv_heads}",
                       "dtype": "bfloat16", "causal": True}
                for label, backward in (("forward", False), ("forward_backward", True)):
                    run = make(which, q, k, v, dout)[1 if backward else 0]
                    ms, error = _attempt(gk.median_ms, run, device)
                    if error:
                        row[f"{label}_error"] = error
                        continue
                    row[f"{label}_ms"] = ms
                    row[f"{label}_tflops"] = gk.attention_flops(1, heads, seq, head_dim, True, backward) / ms / 1e9
                rows.append(row)
    for row in rows:  # against SDPA's flash backend at the same shape (CPU: its flash-for-CPU)
        base = next((r for r in rows if r["kernel"] == f"sdpa {sdpa[0]}" and r["seq"] == row["seq"]
                     and r["head_dim"] == row["head_dim"]), None)
        for label in ("forward", "forward_backward"):
            if base and f"{label}_ms" in row and f"{label}_ms" in base:
                row[f"{label}_vs_sdpa_{sdpa[0]}"] = base[f"{label}_ms"] / row[f"{label}_ms"]
    return rows


def environment(device: str) -> dict:
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
           "device": device}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    return env


def _table(title: str, rows: list[dict], columns: list[str]) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column, row.get("errors", {}).get(column, ""))
            if isinstance(value, float):
                value = f"{value:.1e}" if abs(value) < 0.01 else f"{value:.3g}"
            cells.append(str(value))
        table.add_row(*cells)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (kernels: aten, Triton if interpreted)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: seconds, not minutes")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default bench/results/gpu_check.json, or gpu_check_cpu.json with --cpu)")
    args = parser.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"lsys: invalid input: --sections {','.join(unknown)}: choose from {','.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("lsys: invalid input: no CUDA device visible; run with --cpu --quick on a machine without one",
              file=sys.stderr)
        return 2
    out = args.out or ROOT / "bench" / "results" / ("gpu_check_cpu.json" if args.cpu else "gpu_check.json")
    shapes = sizes(device, args.quick)
    console = Console(width=max(Console().width, 150))  # wide tables stay readable in a log
    results: dict = {"environment": environment(device), "quick": args.quick, "sections": sections}
    started = time.perf_counter()
    failed = []
    if "parity" in sections:
        results["parity"] = parity(device, shapes["parity"])
        console.print(_table("block kernels vs float64 (relative RMS error; lse: max abs)", results["parity"],
                             ["backend", "dtype", "seq", "head_dim", "causal", "out", "lse", "dq", "dk", "dv",
                              "ok", "error"]))
        failed += [f"parity {r['backend']} {r['dtype']} S={r['seq']}" for r in results["parity"] if not r["ok"]]
    if "ring" in sections:
        results["ring"] = ring(device, shapes["ring"])
        console.print(_table("ring emulated on one device vs float64", results["ring"],
                             ["backend", "dtype", "seq", "ring", "out", "lse", "dq", "dk", "dv", "ok", "error"]))
        failed += [f"ring {r['backend']} {r['dtype']}" for r in results["ring"] if not r["ok"]]
    if "speed" in sections:
        results["speed"] = speed(device, shapes["speed"])
        ratio = "vs_sdpa_flash" if device == "cuda" else "vs_sdpa_cpu"
        console.print(_table("causal bf16 attention speed (TFLOP/s; ratio > 1: faster than SDPA)", results["speed"],
                             ["kernel", "seq", "head_dim", "forward_tflops", f"forward_{ratio}",
                              "forward_backward_tflops", f"forward_backward_{ratio}"]))
    if "quant" in sections:
        triton_ok = device == "cuda"
        results["quant"], error = _attempt(gk.quant_check, shapes["quant"], device, triton_ok)
        if error:
            results["quant"] = {"error": error, "bit_equal": False}
        console.print(results["quant"])
        if results["quant"]["bit_equal"] is False:
            failed.append("quant: Triton and torch codes differ")
    if "train" in sections:
        from bench.gpu_smoke import smoke_table, train_smoke

        try:
            results["train"] = train_smoke(device, args.quick, out.parent / "gpu_check_runs")
            console.print(smoke_table(results["train"]))
            failed += [f"train {r['setting']}: non-finite loss" for r in results["train"] if not r["losses_finite"]]
        except Exception:  # noqa: BLE001 - recorded, and the check fails
            results["train"] = {"error": traceback.format_exc(limit=4)}
            failed.append("train: " + results["train"]["error"].strip().splitlines()[-1])
    results["wall_s"] = time.perf_counter() - started
    results["failed"] = failed
    write_results(results, out)
    console.print(f"{len(failed)} failed in {results['wall_s']:.0f} s" + "".join(f"\n  {f}" for f in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
