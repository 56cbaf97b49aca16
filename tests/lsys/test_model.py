import pytest
import torch

from lsys.config import ModelConfig, RopeScalingConfig
from lsys.model import Transformer, build_model, count_parameters, ffn_hidden_size
from lsys.rope import apply_rope, inverse_frequencies, rope_tables


def tiny(**overrides) -> ModelConfig:
    values = {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2}
    values.update(overrides)
    return ModelConfig(**values)


def test_shapes_and_parameter_count_with_gqa():
    cfg = tiny()
    model = build_model(cfg, torch.device("cpu"), torch.float32, seed=0)
    tokens = torch.randint(0, 50, (3, 10))
    logits = model(tokens, torch.arange(10).expand(3, 10))
    assert logits.shape == (3, 10, 50)
    head_dim, ffn = 8, ffn_hidden_size(cfg)
    attn = 32 * 4 * head_dim + 2 * 32 * 2 * head_dim + 4 * head_dim * 32
    per_block = attn + 3 * 32 * ffn + 2 * 32
    assert count_parameters(model) == 2 * 50 * 32 + 2 * per_block + 32
    assert model.blocks[0].attn.wk.weight.shape == (2 * head_dim, 32)


def test_initialisation_is_deterministic_and_seeded():
    a = build_model(tiny(), torch.device("cpu"), torch.float32, seed=3).state_dict()
    b = build_model(tiny(), torch.device("cpu"), torch.float32, seed=3).state_dict()
    c = build_model(tiny(), torch.device("cpu"), torch.float32, seed=4).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert not torch.equal(a["embed.weight"], c["embed.weight"])


def test_causal_prefix_does_not_see_the_future():
    model = build_model(tiny(), torch.device("cpu"), torch.float64, seed=0)
    tokens = torch.randint(0, 50, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    full = model(tokens, positions)
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    torch.testing.assert_close(model(changed, positions)[:, :8], full[:, :8])


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = build_model(tiny(num_kv_heads=2), torch.device("cpu"), torch.float64, seed=0)
    mha = build_model(tiny(num_kv_heads=4), torch.device("cpu"), torch.float64, seed=0)
    state = gqa.state_dict()
    for i in range(2):
        for name in ("wk", "wv"):
            w = state[f"blocks.{i}.attn.{name}.weight"].view(2, 8, 32)
            state[f"blocks.{i}.attn.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 50, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    torch.testing.assert_close(gqa(tokens, positions), mha(tokens, positions))


def test_rope_depends_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    inv_freq, _ = inverse_frequencies(16, 10000.0, RopeScalingConfig())

    def score(pq: int, pk: int) -> torch.Tensor:
        cq, sq = rope_tables(torch.tensor([[pq]]), inv_freq, dtype=torch.float64)
        ck, sk = rope_tables(torch.tensor([[pk]]), inv_freq, dtype=torch.float64)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(105, 102))


def test_attn_fn_is_replaceable():
    model = build_model(tiny(), torch.device("cpu"), torch.float32, seed=0)
    calls = []

    def spy(q, k, v, causal, document_ids=None):
        calls.append((q.shape, k.shape, causal))
        return torch.zeros_like(q)

    for block in model.blocks:
        block.attn.attn_fn = spy
    model(torch.randint(0, 50, (1, 6)), torch.arange(6)[None])
    assert calls == [((1, 6, 4, 8), (1, 6, 2, 8), True)] * 2


def test_parallel_plan_names_this_models_own_modules():
    # The parallel layer reaches the model only through its plan: every module and path in it must exist.
    with torch.device("meta"):
        model = Transformer(tiny())
    plan = model.parallel_plan()
    assert plan.block_modules() == list(model.blocks)
    for path in plan.tensor_parallel:
        model.get_submodule(path)
    for block in plan.blocks:
        owned = list(block.block.modules())
        for module in (block.attention, block.feed_forward, block.final_projection, *block.norms):
            assert any(module is m for m in owned)
        assert callable(block.attention.attn_fn)
        for path in block.tensor_parallel:
            block.block.get_submodule(path)


def test_meta_build_needs_a_vocabulary():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(tiny(vocab_size=0))


@pytest.mark.parametrize("chunk", [1, 5, 12, 40])
def test_chunked_loss_equals_the_whole_and_stores_no_logits(chunk):
    model = build_model(tiny(), torch.device("cpu"), torch.float64, seed=0)
    tokens, labels = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    whole = model(tokens, positions, labels=labels)
    whole.sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunked = model(tokens, positions, labels=labels, loss_chunk_tokens=chunk)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=0)
    for got, expected in zip((p.grad for p in model.parameters()), want, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)
    logits = torch.nn.functional.cross_entropy(model(tokens, positions).flatten(0, 1), labels.flatten(),
                                               reduction="none").view(2, 12)
    torch.testing.assert_close(whole, logits, rtol=1e-12, atol=0)


class _LongestLogits(torch.utils._python_dispatch.TorchDispatchMode):
    """The most positions of any [B, s, V] output of an op while it was on."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size, self.positions = vocab_size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[-1] == self.vocab_size:
                self.positions = max(self.positions, t.shape[1])
        return out


@pytest.mark.parametrize("chunk", [5, 12])
def test_evaluation_losses_and_predictions_a_chunk_at_a_time(chunk):
    model = build_model(tiny(), torch.device("cpu"), torch.float64, seed=0)
    tokens, labels = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        logits = model(tokens, positions)
        with _LongestLogits(50) as longest:
            losses, predictions = model(tokens, positions, labels=labels, loss_chunk_tokens=chunk, predictions=True)
    wanted = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(losses, wanted.view(2, 12), rtol=1e-12, atol=0)
    assert torch.equal(predictions, logits.argmax(-1))
    assert longest.positions == min(chunk, 12)  # one chunk's logits [B, chunk, V], never [B, S, V] when chunked


def test_tied_embeddings_stay_one_parameter_after_building():
    # Materialising from the meta device gives each module its own new parameter: the tie must be restored.
    model = build_model(tiny(tie_embeddings=True), torch.device("cpu"), torch.float32, seed=0)
    assert model.lm_head.weight is model.embed.weight
    assert count_parameters(model) == count_parameters(build_model(tiny(), torch.device("cpu"), torch.float32, 0)) \
        - 50 * 32


def _weights(shape) -> torch.Tensor:
    # Distinct per-token loss weights, so a gradient that reached the wrong token would show.
    return torch.linspace(0.5, 1.5, shape[0] * shape[1], dtype=torch.float64).view(shape)


def _losses_and_grads(model, *inputs, **options):
    model.zero_grad()
    losses = model(*inputs, **options)
    (losses * _weights(losses.shape)).sum().backward()
    return losses.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_chunk_tokens", [0, 5])
def test_document_masks_equal_each_document_alone(loss_chunk_tokens):
    # Packed rows (documents of 5 + 7 and 3 + 4 + 5 tokens, positions restarting with each) give every token
    # the loss, and every parameter the gradient, that running each document as its own sequence gives.
    model = build_model(tiny(), torch.device("cpu"), torch.float64, seed=0)
    lengths = [[5, 7], [3, 4, 5]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    positions = torch.cat([torch.cat([torch.arange(n) for n in r]) for r in lengths]).view(2, 12)
    tokens, labels = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    packed, packed_grads = _losses_and_grads(model, tokens, positions, labels, loss_chunk_tokens,
                                             document_ids=document_ids)

    # The same weighted loss, summed over the documents run one at a time.
    model.zero_grad()
    alone = torch.zeros_like(packed)
    weights = _weights(packed.shape)
    for row, row_lengths in enumerate(lengths):
        start = 0
        for n in row_lengths:
            span = slice(start, start + n)
            losses = model(tokens[row:row + 1, span], torch.arange(n)[None], labels[row:row + 1, span],
                           loss_chunk_tokens)
            (losses * weights[row:row + 1, span]).sum().backward()
            alone[row, span] = losses.detach()[0]
            start += n
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    for got, want in zip(packed_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # Without document ids the same rows are one causal sequence each: the later documents see the earlier.
    plain, _ = _losses_and_grads(model, tokens, positions, labels, loss_chunk_tokens)
    torch.testing.assert_close(plain[:, :3], packed[:, :3])
    assert not torch.allclose(plain[:, 5:], packed[:, 5:])
