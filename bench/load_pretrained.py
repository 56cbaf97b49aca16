"""Loading a ~1B-parameter HuggingFace checkpoint on 4 CPU ranks: each rank fills only its shards.

The script writes a random Llama-shaped checkpoint (hidden 2048, 16 layers, ffn 5632, vocab 32000: 1.1B
parameters, bf16, 3 safetensors files and an index) into a temporary directory, then loads it in bf16 on 4 ranks,
dp 4 (FSDP2) and tp 2 x dp 2, through `lsys.weights.materialize` (lazy safetensors slicing). Per rank: load time,
the bytes of its shards, its resident memory before loading and after (RssAnon: memory of its own; the file's
mapped pages are page cache, shared and reclaimable) and its peak resident set (VmHWM, mapped file pages included).

    python bench/load_pretrained.py [--layers 16] [--output bench/results/load_pretrained.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LLAMA_1B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 16,
            "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 5632,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(directory: Path, config: dict, files: int) -> int:
    """Random bf16 tensors of the model's shapes, one file's worth in memory at a time; returns the parameters."""
    import torch
    from safetensors.torch import save_file

    from lsys.hf.checkpoint import INDEX_FILE, expected_shapes
    from lsys.hf.config import model_config_from_hf
    from lsys.hf.names import hf_name

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    shapes = [(hf_name(n), s) for n, s in expected_shapes(model_config_from_hf(config)).items()]
    weight_map = {}
    for i in range(files):
        file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
        part = shapes[i * len(shapes) // files:(i + 1) * len(shapes) // files]
        save_file({n: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02) for n, s in part}, str(directory / file),
                  metadata={"format": "pt"})
        weight_map.update({n: file for n, _ in part})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(torch.Size(s).numel() for _, s in shapes)


def load_on_rank(directory: str, parallel: dict) -> dict:
    import torch
    import torch.distributed as dist

    from lsys.hf.config import model_config_from_hf, read_config_json
    from lsys.model import Transformer
    from lsys.weights import materialize
    from parallel.config import ParallelConfig
    from parallel.mesh import build_mesh
    from parallel.parallelize import parallelize
    from parallel.shards import local_tensor

    cfg = model_config_from_hf(read_config_json(directory), pretrained=directory)
    mesh = build_mesh(ParallelConfig(**parallel), "cpu")
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    parallelize(model, ParallelConfig(**parallel), mesh)
    dist.barrier()
    before = _status_bytes("RssAnon")
    start = time.perf_counter()
    materialize(model, torch.device("cpu"), seed=0, pretrained=directory)
    seconds = time.perf_counter() - start
    shards = sum({id(s): s.nbytes() for p in model.parameters() for s in [local_tensor(p).untyped_storage()]}.values())
    return {"rank": dist.get_rank(), "load_s": seconds, "shard_bytes": shards, "anon_before": before,
            "anon_after": _status_bytes("RssAnon"), "peak_rss": _status_bytes("VmHWM")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--output", default=str(ROOT / "bench/results/load_pretrained.json"))
    args = parser.parse_args()
    from launch.local import spawn

    config = {**LLAMA_1B, "num_hidden_layers": args.layers}
    results = {"config": config, "layouts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "llama"
        start = time.perf_counter()
        results["parameters"] = write_checkpoint(directory, config, files=3)
        results["write_s"] = time.perf_counter() - start
        print(f"{results['parameters'] / 1e9:.2f}B parameters written in {results['write_s']:.1f} s")
        print(f"{'layout':10} {'rank':>4} {'load s':>7} {'shards MiB':>11} {'anon+ MiB':>10} {'peak RSS MiB':>13}")
        for name, parallel in {"dp4": {"dp": 4}, "tp2xdp2": {"tp": 2, "dp": 2}}.items():
            rows = spawn(load_on_rank, 4, (str(directory), parallel), init_backend="gloo", timeout_s=600)
            results["layouts"][name] = rows
            for r in rows:
                grown = r["anon_after"] - r["anon_before"]
                print(f"{name:10} {r['rank']:>4} {r['load_s']:>7.1f} {r['shard_bytes'] / 2**20:>11.1f} "
                      f"{grown / 2**20:>10.1f} {r['peak_rss'] / 2**20:>13.1f}")
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
