"""Loading a ~1B-parameter HuggingFace checkpoint on 4 CPU ranks: each rank fills only its shards.

The script writes a random Llama-shaped checkpoint (hidden 2048, 16 layers, ffn 5632, vocab 32000: 0.95B
parameters, bf16, 3 safetensors files and an index) into a temporary directory, then loads it in bf16 on 4 ranks,
dp 4 (FSDP2) and tp 2 x dp 2, two ways, each in fresh rank processes, rounds alternating which comes first:
`lsys-safetensors`, lsys's loader (`lsys.weights.materialize`: header check, then lazy safetensors slicing), and
`dcp-hf-reader`, torch.distributed.checkpoint's HuggingFace storage reader filling the same parameters (checked
equal to lsys's shards, bit for bit, after its measurement). Per rank: load time, the bytes of its shards, its
resident memory before loading and after (RssAnon: memory of its own; the file's mapped pages are page cache,
shared and reclaimable) and its peak resident set (VmHWM, mapped file pages included). The ratios DCP / lsys are
per round (the two ran back to back on this shared machine), slowest rank, median over rounds.

    python bench/load_pretrained.py [--layers 16] [--repeats 4] [--output bench/results/load_pretrained.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _fill_lsys(model, directory: str) -> None:
    import torch

    from lsys.weights import materialize

    materialize(model, torch.device("cpu"), seed=0, pretrained=directory)


def _fill_dcp_hf_reader(model, directory: str) -> None:
    """The same shards through torch.distributed.checkpoint: a state dict of the model's (DTensor) parameters
    under their HuggingFace names, read by its HuggingFace storage reader. No lsys header check runs first: DCP's
    own metadata pass (every file's header, on every rank) is all it gets."""
    import torch
    import torch.distributed.checkpoint as dcp

    from lsys.hf.names import hf_name

    model.to_empty(device=torch.device("cpu"))
    model.tie_weights()
    state = {hf_name(name): p for name, p in model.named_parameters()}
    dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(directory))


METHODS = {"lsys-safetensors": _fill_lsys, "dcp-hf-reader": _fill_dcp_hf_reader}


def _meta_model(directory: str, parallel: dict):
    import torch

    from lsys.hf.config import model_config_from_hf, read_config_json
    from lsys.model import Transformer
    from parallel.config import ParallelConfig
    from parallel.mesh import build_mesh
    from parallel.parallelize import parallelize

    cfg = model_config_from_hf(read_config_json(directory), pretrained=directory)
    mesh = build_mesh(ParallelConfig(**parallel), "cpu")
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    parallelize(model, ParallelConfig(**parallel), mesh)
    return model


def load_on_rank(directory: str, parallel: dict, method: str) -> dict:
    import torch
    import torch.distributed as dist

    from lsys.hf.checkpoint import match_checkpoint
    from parallel.shards import local_tensor

    model = _meta_model(directory, parallel)
    dist.barrier()
    before = _status_bytes("RssAnon")
    start = time.perf_counter()
    METHODS[method](model, directory)
    seconds = time.perf_counter() - start
    shards = sum({id(s): s.nbytes() for p in model.parameters() for s in [local_tensor(p).untyped_storage()]}.values())
    row = {"rank": dist.get_rank(), "load_s": seconds, "shard_bytes": shards, "anon_before": before,
           "anon_after": _status_bytes("RssAnon"), "peak_rss": _status_bytes("VmHWM")}
    if method == "lsys-safetensors":  # after the measurement: how much of it was the header check DCP does not make
        start = time.perf_counter()
        match_checkpoint(model.cfg, directory)
        row["header_check_s"] = time.perf_counter() - start
    else:  # after the measurement: the same shards, bit for bit, as lsys's loader fills
        reference = _meta_model(directory, parallel)
        _fill_lsys(reference, directory)
        row["differing_tensors"] = sum(not torch.equal(local_tensor(p), local_tensor(reference.get_parameter(n)))
                                       for n, p in model.named_parameters())
    return row


def _print_rows(layout: str, method: str, repeat: int, rows: list[dict]) -> None:
    for r in rows:
        grown = r["anon_after"] - r["anon_before"]
        print(f"{layout:8} {method:17} {repeat:>5} {r['rank']:>4} {r['load_s']:>7.2f} "
              f"{r['shard_bytes'] / 2**20:>11.1f} {grown / 2**20:>10.1f} {r['peak_rss'] / 2**20:>13.1f} "
              f"{r.get('differing_tensors', ''):>13}")


# Per round, the slowest (largest) rank of each method: the load ends when its last rank is done.
_RATIO_MEASURES = {
    "load_s": lambda rows: max(r["load_s"] for r in rows),
    "anon_growth": lambda rows: max(r["anon_after"] - r["anon_before"] for r in rows),
    "peak_rss": lambda rows: max(r["peak_rss"] for r in rows),
}


def _ratios(rounds: list[dict[str, list[dict]]]) -> dict[str, float]:
    """dcp-hf-reader / lsys-safetensors: each round's ratio (the two ran back to back), the median over rounds."""
    return {key: statistics.median(measure(r["dcp-hf-reader"]) / measure(r["lsys-safetensors"]) for r in rounds)
            for key, measure in _RATIO_MEASURES.items()}


def compare(directory: str, layout: str, parallel: dict, repeats: int, results: dict) -> None:
    """Both methods `repeats` times on `layout`, into `results`; a method that fails records why instead."""
    from launch.local import RankFailedError, spawn

    target = {"lsys-safetensors": results["layouts"], "dcp-hf-reader": results["dcp_hf_reader"]["layouts"]}
    rounds, failed = [], set()
    for repeat in range(repeats):
        runs = {}
        # Alternating order: neither method always comes first (page cache, the shared machine's load).
        for method in METHODS if repeat % 2 == 0 else reversed(METHODS):
            if method in failed:
                continue
            try:
                rows = spawn(load_on_rank, 4, (directory, parallel, method), init_backend="gloo", timeout_s=600)
            except RankFailedError as exc:
                reason = f"rank {exc.rank}: {exc.detail.strip().splitlines()[-1]}"
                target[method][layout] = {"error": reason}
                failed.add(method)
                print(f"{layout:8} {method:17} failed, {reason}")
                continue
            runs[method] = rows
            target[method].setdefault(layout, []).extend({**r, "repeat": repeat} for r in rows)
            _print_rows(layout, method, repeat, rows)
        if len(runs) == len(METHODS):
            rounds.append(runs)
    if rounds:
        results["ratios_dcp_over_lsys"][layout] = ratios = _ratios(rounds)
        print(f"{layout:8} dcp-hf-reader / lsys-safetensors (slowest rank, median of {len(rounds)} rounds): "
              + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4, help="rounds of both methods per layout")
    parser.add_argument("--output", default=str(ROOT / "bench/results/load_pretrained.json"))
    args = parser.parse_args()

    config = {**LLAMA_1B, "num_hidden_layers": args.layers}
    # "layouts" holds lsys's loader, the key it had before the comparison; the DCP reader's rows sit beside it.
    results = {"config": config, "layouts": {}, "dcp_hf_reader": {"layouts": {}}, "ratios_dcp_over_lsys": {}}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "llama"
        start = time.perf_counter()
        results["parameters"] = write_checkpoint(directory, config, files=3)
        results["write_s"] = time.perf_counter() - start
        print(f"{results['parameters'] / 1e9:.2f}B parameters written in {results['write_s']:.1f} s")
        print(f"{'layout':8} {'method':17} {'round':>5} {'rank':>4} {'load s':>7} {'shards MiB':>11} "
              f"{'anon+ MiB':>10} {'peak RSS MiB':>13} {'not as lsys':>13}")
        for layout, parallel in {"dp4": {"dp": 4}, "tp2xdp2": {"tp": 2, "dp": 2}}.items():
            compare(str(directory), layout, parallel, args.repeats, results)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
