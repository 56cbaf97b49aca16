"""Every command, fed bad input as a careful new user would: configs, overrides, options, run directories, data,
tokenizers and checkpoints. Each case must end with exit code 2 and ONE line `lsys: invalid input: ...` that names
the culprit, with no traceback, nothing started and nothing of the user's changed (the whole working directory is
compared before and after, byte for byte).

Commands run in this process (`launch.cli.main`): a refused input never gets as far as starting a rank or a Ray
cluster, and in-process calls keep the table fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from launch.cli import main
from lsys.data import prepare_text_dataset
from tests.commands import TINY
from tests.hf.checkpoints import write_checkpoint

TRAIN = ["train", "configs/demo.yaml", *TINY, "parallel.dp=1", "parallel.cp_ring=1"]
RUN = "train.run_dir={w}/run"


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # "{w}" is the case's working directory
    culprit: str  # the line names it ("{w}" allowed)
    setup: Callable[[Path], None] | None = None
    read_only: str = ""  # a directory under {w} that is made a read-only mount (root only)
    fixtures: tuple[str, ...] = field(default=())  # "dataset", "checkpoint": copied into {w} first


def _write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / name
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return setup


def _both(*setups: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        for s in setups:
            s(w)
    return setup


def _truncate(name: str, keep: int) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / name
        path.write_bytes(path.read_bytes()[:keep])
    return setup


def _patch(name: str, offset: int, data: bytes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / name
        raw = bytearray(path.read_bytes())
        raw[offset:offset + len(data)] = data
        path.write_bytes(bytes(raw))
    return setup


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def setup(w: Path) -> None:
        path = w / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda w: (w / name).mkdir(parents=True)


def _rewrite_tensor(name: str, shape: tuple[int, ...] | None) -> Callable[[Path], None]:
    """The tiny checkpoint's tensor `name` given another shape, or removed (None)."""
    def setup(w: Path) -> None:
        from safetensors.torch import load_file, save_file

        file = w / "hf" / HF_FILE
        tensors = load_file(str(file))
        if shape is None:
            del tensors[name]
        else:
            tensors[name] = torch.zeros(shape)
        save_file(tensors, str(file))
    return setup


def _pretrained(name: str, eod: bool = True, **config) -> Callable[[Path], None]:
    """A HuggingFace model directory's config.json (TRAIN's model shape) and tokenizer.json (EOD `</s>` if
    `eod`); `config` overrides config.json's keys."""
    def setup(w: Path) -> None:
        from tokenizers import Tokenizer, models

        (w / name).mkdir(parents=True)
        tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "words": 2}, unk_token="<unk>"))
        if eod:
            tok.add_special_tokens(["</s>"])
        tok.save(str(w / name / "tokenizer.json"))
        values = {"model_type": "llama", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128, **config}
        (w / name / "config.json").write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
    return setup


DATA = ["data.task=text", "data.text.path={w}/data/corpus", "model.vocab_size=0"]
TEXT = [*TRAIN, *DATA, RUN]
DS = ("dataset",)  # the case starts from a copy of a good dataset in {w}/data
HF = ("pretrained",)  # ... of a tiny HuggingFace checkpoint of TRAIN's model in {w}/hf
HF_FILE = "model-00001-of-00001.safetensors"
FIXTURE_DIRS = {"dataset": "data", "checkpoint": "run", "pretrained": "hf"}
PRETRAINED = [*TRAIN, "model.pretrained={w}/hf", RUN]
CK = ("checkpoint",)  # ... of a finished one-step run in {w}/run

CASES = [
    # -- config files --------------------------------------------------------------------------------------------
    Case("config-missing", ["train", "{w}/nope.yaml"], "nope.yaml"),
    Case("eval-nothing-trained", ["eval", "configs/demo.yaml", "parallel.dp=1", "parallel.cp_ring=1",
                                  "train.run_dir={w}/empty"], "no checkpoint to evaluate"),
    Case("config-is-a-directory", ["train", "{w}/cfg"], "cfg", _mkdir("cfg")),
    Case("config-yaml-syntax", ["train", "{w}/c.yaml"], "c.yaml:3", _write("c.yaml", "model:\n  hidden_size: [\n")),
    Case("config-yaml-list", ["train", "{w}/c.yaml"], "c.yaml", _write("c.yaml", "- model\n- data\n")),
    Case("config-yaml-scalar", ["train", "{w}/c.yaml"], "c.yaml", _write("c.yaml", "just words\n")),
    Case("config-duplicate-key", ["train", "{w}/c.yaml"], "duplicate key hidden_size",
         _write("c.yaml", "model:\n  hidden_size: 64\n  hidden_size: 32\n")),
    Case("config-not-utf8", ["train", "{w}/c.yaml"], "c.yaml", _write("c.yaml", b"model:\n  num_layers: 2 # \xff\n")),
    Case("config-unknown-section", ["train", "{w}/c.yaml"], "modle", _write("c.yaml", "modle:\n  num_layers: 2\n")),
    Case("config-unknown-key", ["train", "{w}/c.yaml"], "model.layers", _write("c.yaml", "model:\n  layers: 2\n")),
    Case("config-wrong-type", ["train", "{w}/c.yaml"], "train.steps", _write("c.yaml", "train:\n  steps: many\n")),
    Case("config-section-not-mapping", ["train", "{w}/c.yaml"], "model", _write("c.yaml", "model: 3\n")),
    Case("config-bad-value-in-file", ["train", "{w}/c.yaml", RUN], "model.num_kv_heads",
         _write("c.yaml", "model:\n  num_kv_heads: 3\n")),
    # -- overrides ---------------------------------------------------------------------------------------------
    Case("override-not-key-value", [*TRAIN, "steps"], "'steps'"),
    Case("override-unknown-key", [*TRAIN, "train.stepz=3"], "override 'train.stepz=3'"),
    Case("override-wrong-type", [*TRAIN, "train.steps=abc"], "override 'train.steps=abc'"),
    Case("override-bad-yaml", [*TRAIN, "train.run_dir=["], "override 'train.run_dir=['"),
    Case("override-unknown-section", [*TRAIN, "trian.steps=3"], "trian"),
    Case("lr-inf", [*TRAIN, "train.lr=inf", RUN], "train.lr=inf"),
    Case("lr-nan", [*TRAIN, "train.lr=.nan", RUN], "train.lr=nan"),
    Case("lr-negative", [*TRAIN, "train.lr=-1", RUN], "train.lr"),
    Case("norm-eps-negative", [*TRAIN, "model.norm_eps=-1", RUN], "model.norm_eps"),
    Case("norm-eps-zero", [*TRAIN, "model.norm_eps=0", RUN], "model.norm_eps"),
    Case("timeout-inf", [*TRAIN, "train.collective_timeout_s=inf", RUN], "train.collective_timeout_s"),
    Case("timeout-huge", [*TRAIN, "train.collective_timeout_s=1e300", RUN], "train.collective_timeout_s"),
    Case("kv-heads", [*TRAIN, "model.num_kv_heads=3", RUN], "model.num_kv_heads=3"),
    Case("attention-backend-unknown", [*TRAIN, "model.attention_backend=fast", RUN], "model.attention_backend='fast'"),
    Case("attention-backend-cuda-on-cpu", [*TRAIN, "model.attention_backend=flash", "train.device=cpu", RUN],
         "model.attention_backend='flash'"),
    Case("task-unknown", [*TRAIN, "data.task=poetry", RUN], "data.task"),
    Case("seq-len-short", [*TRAIN, "data.seq_len=4", RUN], "data.seq_len"),
    Case("seq-len-indivisible", [*TRAIN, "parallel.cp_ring=2", "data.seq_len=34", "--nproc", "2", RUN],
         "data.seq_len"),
    Case("dtype-unknown", [*TRAIN, "train.param_dtype=float16", RUN], "train.param_dtype"),
    Case("layout-unknown", [*TRAIN, "parallel.cp_layout=diagonal", RUN], "cp_layout"),
    Case("vocab-below-task", [*TRAIN, "model.vocab_size=5", RUN], "model.vocab_size=5"),
    Case("fsdp-unit-negative", [*TRAIN, "parallel.fsdp_unit_params=-1", RUN], "parallel.fsdp_unit_params"),
    Case("recompute-unknown", [*TRAIN, "recompute.mode=some", RUN], "recompute.mode"),
    Case("quant-unknown", [*TRAIN, "quant.activations=int4", RUN], "quant.activations"),
    Case("nonfinite-unknown", [*TRAIN, "train.nonfinite=ignore", RUN], "train.nonfinite"),
    Case("nonfinite-max-skips", [*TRAIN, "train.nonfinite_max_skips=0", RUN], "train.nonfinite_max_skips"),
    Case("keep-last-zero", [*TRAIN, "checkpoint.keep_last=0", RUN], "checkpoint.keep_last"),
    Case("steps-zero", [*TRAIN, "train.steps=0", RUN], "train.steps"),
    Case("batch-indivisible", [*TRAIN, "parallel.dp=2", "train.global_batch_size=3", "--nproc", "2", RUN],
         "train.global_batch_size"),
    Case("huge-model", [*TRAIN, "model.hidden_size=65536", "model.num_heads=64", "model.num_kv_heads=64", RUN],
         "model"),
    Case("huge-sequence", [*TRAIN, "data.seq_len=400000000", "data.task=mqar", RUN], "data.seq_len"),
    Case("run-dir-empty", [*TRAIN, "train.run_dir="], "train.run_dir"),
    Case("offload-outside-ray", [*TRAIN, "optim.offload=cpu", RUN], "optim.offload"),
    # -- options -----------------------------------------------------------------------------------------------
    Case("nproc-zero", [*TRAIN, "--nproc", "0", RUN], "--nproc=0"),
    Case("nproc-mismatch", ["train", "configs/demo.yaml", "--nproc", "3", RUN], "world size is 3"),
    Case("timeout-negative", [*TRAIN, "--timeout", "-1", RUN], "--timeout"),
    # -- run directories ---------------------------------------------------------------------------------------
    Case("run-dir-is-a-file", [*TRAIN, RUN], "{w}/run", _write("run", "not a directory\n")),
    Case("run-dir-under-a-file", [*TRAIN, "train.run_dir={w}/file/run"], "{w}/file", _write("file", "x\n")),
    Case("checkpoints-is-a-file", [*TRAIN, RUN], "checkpoints", _write("run/checkpoints", "x\n")),
    Case("metrics-is-a-directory", [*TRAIN, RUN], "metrics.jsonl", _mkdir("run/metrics.jsonl")),
    Case("run-dir-read-only", [*TRAIN, "train.run_dir={w}/ro/run"], "{w}/ro", read_only="ro"),
    Case("checkpoints-read-only", [*TRAIN, RUN], "checkpoints", read_only="run/checkpoints"),
    # -- text datasets -----------------------------------------------------------------------------------------
    Case("text-without-path", [*TRAIN, "data.task=text", RUN], "data.text.path"),
    Case("text-missing-dataset", [*TRAIN, "data.task=text", "data.text.path={w}/none", RUN], "{w}/none"),
    Case("text-truncated-bin", TEXT, "corpus.bin", _truncate("data/corpus.bin", 100), fixtures=DS),
    Case("text-truncated-idx", TEXT, "corpus.idx", _truncate("data/corpus.idx", 40), fixtures=DS),
    Case("text-corrupt-idx-header", TEXT, "corpus.idx", _patch("data/corpus.idx", 0, b"XXXX"), fixtures=DS),
    Case("text-missing-metadata", TEXT, "corpus.json", lambda w: (w / "data/corpus.json").unlink(), fixtures=DS),
    Case("text-old-metadata", TEXT, "corpus", _edit_json("data/corpus.json", format_version=1), fixtures=DS),
    Case("text-metadata-not-json", TEXT, "corpus.json", _write("data/corpus.json", "{not json"), fixtures=DS),
    Case("text-cache-dir-is-a-file", [*TEXT, "data.text.cache_dir={w}/cache"], "cache",
         _write("cache", "x\n"), fixtures=DS),
    # -- prepare-data ------------------------------------------------------------------------------------------
    Case("prepare-missing-input", ["prepare-data", "{w}/none.jsonl", "{w}/out/corpus"], "none.jsonl"),
    Case("prepare-bad-jsonl-line", ["prepare-data", "{w}/bad.jsonl", "{w}/data/corpus"], "bad.jsonl:2",
         _write("bad.jsonl", '{"text": "fine"}\n{"text": \n'), fixtures=DS),
    Case("prepare-jsonl-no-text", ["prepare-data", "{w}/bad.jsonl", "{w}/data/corpus"], "bad.jsonl:1",
         _write("bad.jsonl", '{"body": "no text field"}\n'), fixtures=DS),
    Case("prepare-not-utf8", ["prepare-data", "{w}/bad.txt", "{w}/data/corpus"], "bad.txt",
         _write("bad.txt", b"fine paragraph\n\nbroken \xff\xfe bytes\n"), fixtures=DS),
    Case("prepare-empty-input", ["prepare-data", "{w}/empty.txt", "{w}/data/corpus"], "empty.txt",
         _write("empty.txt", "\n\n  \n"), fixtures=DS),
    Case("prepare-tokenizer-missing", ["prepare-data", "{w}/in.txt", "{w}/out/c", "--tokenizer", "{w}/tok.json"],
         "tok.json", _write("in.txt", "words\n")),
    Case("prepare-tokenizer-not-json", ["prepare-data", "{w}/in.txt", "{w}/out/c", "--tokenizer", "{w}/tok.json"],
         "tok.json", _both(_write("in.txt", "words\n"), _write("tok.json", "{ this is not json"))),
    Case("prepare-tokenizer-not-a-tokenizer",
         ["prepare-data", "{w}/in.txt", "{w}/out/c", "--tokenizer", "{w}/tok.json"], "tok.json",
         _both(_write("in.txt", "words\n"), _write("tok.json", '{"hello": "world"}'))),
    Case("prepare-tokenizer-directory", ["prepare-data", "{w}/in.txt", "{w}/out/c", "--tokenizer", "{w}/tok"],
         "tok", _both(_write("in.txt", "words\n"), _mkdir("tok"))),
    Case("prepare-output-under-a-file", ["prepare-data", "{w}/in.txt", "{w}/file/c"], "file",
         _both(_write("in.txt", "words\n"), _write("file", "x\n"))),
    Case("prepare-pretrained-no-tokenizer", ["prepare-data", "{w}/in.txt", "{w}/out/c", "--pretrained", "{w}/pre"],
         "--pretrained {w}/pre", _both(_write("in.txt", "words\n"), _mkdir("pre"))),
    Case("prepare-pretrained-no-eod", ["prepare-data", "{w}/in.txt", "{w}/out/c", "--pretrained", "{w}/pre"],
         "pre/tokenizer.json", _both(_write("in.txt", "words\n"), _pretrained("pre", eod=False))),
    Case("prepare-pretrained-eos-outside", ["prepare-data", "{w}/in.txt", "{w}/out/c", "--pretrained", "{w}/pre"],
         "eos_token_id=999", _both(_write("in.txt", "words\n"), _pretrained("pre", eos_token_id=999))),
    Case("text-pretrained-vocab-below-data", [*TEXT, "model.pretrained={w}/pre"], "model.pretrained={w}/pre",
         _pretrained("pre"), fixtures=DS),
    # -- profile and plan --------------------------------------------------------------------------------------
    Case("profile-steps-zero", ["profile", "configs/demo.yaml", *TINY, "--out", "{w}/p", "--steps", "0"], "--steps"),
    Case("profile-offload", ["profile", "configs/demo.yaml", *TINY, "--out", "{w}/p", "optim.offload=cpu"],
         "optim.offload"),
    Case("profile-bad-config", ["profile", "configs/demo.yaml", "model.num_heads=3", "--out", "{w}/p"],
         "model.hidden_size"),
    Case("profile-out-is-a-file", ["profile", "configs/demo.yaml", *TINY, "--out", "{w}/p"], "--out",
         _write("p", "x\n")),
    Case("plan-budget-negative", ["plan", "configs/demo.yaml", "--budget-gib", "-1"], "--budget-gib"),
    Case("plan-top-zero", ["plan", "configs/demo.yaml", "--top", "0"], "--top"),
    Case("plan-world-indivisible", ["plan", "configs/demo.yaml", "--world-size", "3"], "world size is 3"),
    Case("plan-text-without-vocab", ["plan", "configs/demo.yaml", "data.task=text", "data.text.path=x"],
         "model.vocab_size"),
    Case("plan-out-is-a-file", ["plan", "configs/demo.yaml", "--out", "{w}/p"], "--out", _write("p", "x\n")),
    # -- Ray commands ------------------------------------------------------------------------------------------
    Case("submit-nodes-zero", ["submit", "configs/demo.yaml", RUN, "--nodes", "0"], "--nodes"),
    Case("submit-bad-label", ["submit", "configs/demo.yaml", RUN, "optim.offload=cpu", "optim.placement=label",
                              "optim.label=node1"], "optim.label"),
    Case("submit-gpus-on-cpu", ["submit", "configs/demo.yaml", RUN, "train.device=cpu",
                                "cluster.gpus_per_worker=1"], "cluster.gpus_per_worker"),
    Case("submit-relative-remote", ["submit", "configs/demo.yaml", "train.run_dir=runs/x", "--address",
                                    "http://127.0.0.1:9"], "train.run_dir"),
    Case("submit-too-many-cpus", ["submit", "configs/demo.yaml", RUN, "cluster.cpus_per_worker=64"],
         "cluster.cpus_per_worker"),
    Case("submit-bad-config", ["submit", "{w}/c.yaml"], "c.yaml", _write("c.yaml", "- a\n")),
    Case("jobs-status-unknown", ["jobs", "status", "lsys-nothing-20260101-000000"], "lsys-nothing"),
    Case("jobs-stop-unknown", ["jobs", "stop", "lsys-nothing-20260101-000000"], "lsys-nothing"),
    Case("cluster-start-nodes-zero", ["cluster", "start", "--nodes", "0"], "--nodes"),
    # -- pretrained weights ------------------------------------------------------------------------------------
    Case("pretrained-missing-directory", [*TRAIN, "model.pretrained={w}/none", RUN], "{w}/none"),
    Case("pretrained-no-config-json", PRETRAINED, "config.json", _mkdir("hf")),
    Case("pretrained-unsupported-model-type", PRETRAINED, "model_type='gpt2'",
         _edit_json("hf/config.json", model_type="gpt2"), fixtures=HF),
    Case("pretrained-no-safetensors", PRETRAINED, "no *.safetensors", lambda w: (w / "hf" / HF_FILE).unlink(),
         fixtures=HF),
    Case("pretrained-missing-tensor", PRETRAINED, "model.layers.0.mlp.up_proj.weight",
         _rewrite_tensor("model.layers.0.mlp.up_proj.weight", None), fixtures=HF),
    Case("pretrained-wrong-shape", PRETRAINED, "model.norm.weight has shape [31]",
         _rewrite_tensor("model.norm.weight", (31,)), fixtures=HF),
    # -- export ------------------------------------------------------------------------------------------------
    Case("export-run-dir-missing", ["export", "{w}/none", "{w}/hf"], "{w}/none"),
    Case("export-no-checkpoint", ["export", "{w}/run", "{w}/hf"], "no checkpoint", _mkdir("run/checkpoints")),
    Case("export-step-missing", ["export", "{w}/run", "{w}/hf", "--step", "7"], "--step 7", fixtures=CK),
    Case("export-step-zero", ["export", "{w}/run", "{w}/hf", "--step", "0"], "--step 0", fixtures=CK),
    Case("export-damaged-checkpoint", ["export", "{w}/run", "{w}/hf"], "truncated",
         _truncate("run/checkpoints/step_00000001/__0_0.distcp", 10), fixtures=CK),
    Case("export-dtype-unknown", ["export", "{w}/run", "{w}/hf", "--dtype", "int8"], "--dtype int8", fixtures=CK),
    Case("export-shard-size", ["export", "{w}/run", "{w}/hf", "--max-shard-size", "5 parsecs"], "--max-shard-size",
         fixtures=CK),
    Case("export-out-not-empty", ["export", "{w}/run", "{w}/hf"], "{w}/hf", _write("hf/keep.txt", "x\n"),
         fixtures=CK),
    Case("export-out-under-a-file", ["export", "{w}/run", "{w}/file/hf"], "file", _write("file", "x\n"),
         fixtures=CK),
    # -- eval --out ----------------------------------------------------------------------------------------------
    Case("eval-dir-neither-run-nor-model", ["eval", "{w}/cfg", "--out", "{w}/o"], "neither config.yaml",
         _mkdir("cfg")),
    Case("eval-several-without-out", ["eval", "{w}/run", "{w}/run"], "add --out DIR", fixtures=CK),
    Case("eval-lengths-not-numbers", ["eval", "{w}/run", "--out", "{w}/o", "--lengths", "64,abc"], "--lengths=64,abc",
         fixtures=CK),
    Case("eval-length-too-short-for-the-needle", ["eval", "{w}/run", "--out", "{w}/o", "--lengths", "8"],
         "--lengths: 8 tokens", fixtures=CK),
    Case("eval-length-not-a-ring-multiple", ["eval", "{w}/run", "--nproc", "2", "parallel.cp_ring=2", "--out",
                                             "{w}/o", "--lengths", "30"], "--lengths: 30 tokens", fixtures=CK),
    Case("eval-depth-out-of-range", ["eval", "{w}/run", "--out", "{w}/o", "--depths", "0,1.5"], "--depths=0,1.5",
         fixtures=CK),
    Case("eval-samples-zero", ["eval", "{w}/run", "--out", "{w}/o", "--samples", "0"], "--samples=0", fixtures=CK),
    Case("eval-out-is-a-file", ["eval", "{w}/run", "--out", "{w}/f"], "{w}/f", _write("f", "x\n"), fixtures=CK),
    Case("passkey-depth-out-of-range", [*TRAIN, "data.passkey.depth=2", RUN], "depth=2"),
    # -- checkpoints -------------------------------------------------------------------------------------------
    Case("checkpoint-of-another-shape", [*TRAIN, "model.hidden_size=64", RUN], "hidden_size",
         fixtures=("checkpoint",)),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with its kind and, for files, a hash of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            found[str(path)] = "link"
        elif path.is_file():
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[str(path)] = "dir"
    return found


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A good text dataset, prepared once."""
    root = tmp_path_factory.mktemp("dataset")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i}: " + "lorem ipsum " * 40}) + "\n"
                              for i in range(40)))
    prepare_text_dataset([str(corpus)], str(root / "data" / "corpus"))
    return root / "data"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """The run directory of a finished one-step run of TRAIN's model."""
    run = tmp_path_factory.mktemp("checkpoint") / "run"
    assert main([*TRAIN, "train.steps=1", "train.eval_samples=0", f"train.run_dir={run}"]) == 0
    return run


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny HuggingFace checkpoint (config.json, one safetensors file) of TRAIN's model shape."""
    root = tmp_path_factory.mktemp("pretrained") / "hf"
    write_checkpoint(root, {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 96,
                            "max_position_embeddings": 64}, files=1, index=False)
    return root


@contextlib.contextmanager
def read_only_mount(directory: Path) -> Iterator[None]:
    """`directory` becomes an empty read-only tmpfs (root only; skips the test where mounting is not allowed)."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a read-only filesystem")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(directory)],
                      capture_output=True).returncode:
        pytest.skip("mounting is not permitted here")
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@pytest.fixture
def clean_environment(tmp_path):
    """The Ray commands set client variables for the embedded cluster in this process: put everything back."""
    saved = dict(os.environ)
    os.environ["LSYS_HOME"] = str(tmp_path / "home")
    os.environ.pop("RAY_ADDRESS", None)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_there_are_enough_cases():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case, tmp_path, capsys, request, clean_environment):  # noqa: ARG001
    w = tmp_path / "w"
    w.mkdir(exist_ok=True)
    for name in case.fixtures:
        shutil.copytree(request.getfixturevalue(name), w / FIXTURE_DIRS[name])
    if case.setup is not None:
        case.setup(w)
    with read_only_mount(w / case.read_only) if case.read_only else contextlib.nullcontext():
        _refused(case, w, tmp_path, capsys)


def _refused(case: Case, w: Path, tmp_path: Path, capsys) -> None:
    repo_runs = Path("runs")
    before, repo_before = _snapshot(tmp_path), _snapshot(repo_runs) if repo_runs.exists() else {}
    capsys.readouterr()  # what fixtures printed
    code = main([arg.replace("{w}", str(w)) for arg in case.argv])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("lsys: invalid input: "), captured.err
    assert case.culprit.replace("{w}", str(w)) in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert _snapshot(tmp_path) == before, "a refused command changed files"
    assert (_snapshot(repo_runs) if repo_runs.exists() else {}) == repo_before
    assert not (tmp_path / "home").exists(), "a refused command started something"
