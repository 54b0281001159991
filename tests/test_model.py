"""The decoder: shapes, sizes, causality for every variant, GPT-2 init and tied weights, the attention backend it
runs on (and under torch.compile), config errors."""

import pytest
import torch

from freeatten_lightning import ops
from freeatten_lightning.attention import VARIANTS, AttentionSpec
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.model import GPT, GPTConfig, preset_shape
from freeatten_lightning.model.rope import apply_rope, rope_angles


def tiny_config(attention: str = "lssar", **overrides) -> GPTConfig:
    fields = dict(vocab_size=257, seq_len=32, n_layer=2, n_head=2, d_model=32, attention=AttentionSpec(attention))
    return GPTConfig(**(fields | overrides))


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_logits_shape_and_causality(attention: str) -> None:
    """Logits at position i must not change when tokens after i change."""
    torch.manual_seed(0)
    model = GPT(tiny_config(attention)).eval()
    tokens = torch.randint(0, 257, (2, 24))
    logits = model(tokens)
    assert logits.shape == (2, 24, 257)
    assert torch.isfinite(logits).all()
    changed = tokens.clone()
    changed[:, 15:] = torch.randint(0, 257, (2, 9))
    torch.testing.assert_close(model(changed)[:, :15], logits[:, :15])
    assert not torch.allclose(model(changed)[:, 15:], logits[:, 15:])


def test_runs_beyond_the_training_length() -> None:
    model = GPT(tiny_config(seq_len=16)).eval()
    assert model(torch.randint(0, 257, (1, 16 * 8))).shape == (1, 128, 257)


def test_gpt2_small_has_124m_parameters() -> None:
    """GPT-2 small + RoPE with the padded GPT-2 vocabulary: 124M less the 0.8M learned positions."""
    shape = preset_shape("gpt2-small")
    config = GPTConfig(vocab_size=50257, seq_len=1024, n_layer=shape.n_layer, n_head=shape.n_head, d_model=768)
    with torch.device("meta"):
        model = GPT(config)
    assert config.head_dim == 64 and config.padded_vocab_size == 50304
    assert 123_000_000 < model.num_parameters() < 124_500_000


def test_tied_embeddings_and_gpt2_init() -> None:
    torch.manual_seed(0)
    config = tiny_config(n_layer=8, d_model=256, n_head=4)
    model = GPT(config)
    assert model.lm_head.weight is model.embed.weight
    assert model.embed.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = model.blocks[0].mlp.proj.weight.std().item()
    assert residual == pytest.approx(0.02 / (2 * config.n_layer) ** 0.5, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_rope_preserves_norms_and_encodes_relative_position() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 8, 16), torch.randn(1, 1, 8, 16)
    cos, sin = rope_angles(torch.arange(8), 16)
    rq, rk = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    shifted_cos, shifted_sin = rope_angles(torch.arange(8) + 5, 16)
    sq, sk = apply_rope(q, shifted_cos, shifted_sin), apply_rope(k, shifted_cos, shifted_sin)
    torch.testing.assert_close(sq @ sk.transpose(-1, -2), rq @ rk.transpose(-1, -2), rtol=1e-4, atol=1e-4)


FASTEST_CPU_BACKEND = {"lssa": "cpu", "lssar": "cpu", "softmax": "sdpa"}  # the rest: only the reference runs them


@pytest.fixture
def backends_used(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the backend the op's dispatcher chose, once per attention call."""
    chosen: list[str] = []

    def recording(*args, **kwargs) -> ops.Backend:
        backend = choose_backend(*args, **kwargs)
        chosen.append(backend.name)
        return backend

    choose_backend = ops.choose_backend
    monkeypatch.setattr(ops, "choose_backend", recording)
    return chosen


@pytest.mark.parametrize("attention", list(VARIANTS))
def test_decoder_runs_the_fused_op_by_default_and_the_reference_on_request(
    attention: str, backends_used: list[str]
) -> None:
    """By default every layer runs the fastest backend for its variant; `attention_backend="reference"` the eager
    math. Both give the same logits and gradients, in training and in KV-cache decoding."""
    torch.manual_seed(0)
    fused = GPT(tiny_config(attention))
    reference = GPT(tiny_config(attention, attention_backend="reference"))
    reference.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, 257, (2, 24))
    outputs = []
    for model in (fused, reference):
        backends_used.clear()
        logits = model(tokens)
        logits.square().mean().backward()
        cache = model.new_cache()
        with torch.no_grad():
            model(tokens[:, :20], cache)
            decoded = model(tokens[:, 20:], cache)
        outputs.append((logits, decoded, [p.grad for p in model.parameters()], set(backends_used)))
    (logits, decoded, grads, used), (want_logits, want_decoded, want_grads, reference_used) = outputs
    assert used == {FASTEST_CPU_BACKEND.get(attention, "reference")}
    assert reference_used == {"reference"}
    torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded, want_logits[:, 20:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(want_decoded, want_logits[:, 20:], rtol=1e-4, atol=1e-5)
    for grad, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("attention", ["lssar", "softmax"])
def test_decoder_runs_under_torch_compile(attention: str) -> None:
    """The whole decoder compiles as one graph through the op's custom ops, with the eager logits and gradients."""
    torch.manual_seed(0)
    model = GPT(tiny_config(attention))
    tokens = torch.randint(0, 257, (2, 24))
    eager = model(tokens)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)(tokens)
    compiled.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for p, want in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-3, atol=1e-6)


def test_a_backend_that_cannot_run_the_decoder_says_why() -> None:
    model = GPT(tiny_config("lssar", attention_backend="triton"))
    with pytest.raises(FreeattenError, match="op='triton' cannot run this attention .*device 'cpu' not supported"):
        model(torch.randint(0, 257, (1, 8)))
    with pytest.raises(FreeattenError, match="op='sdpa' cannot run .*variant 'lssar' not supported"):
        GPT(tiny_config("lssar", attention_backend="sdpa"))(torch.randint(0, 257, (1, 8)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "n_head": 4}, "not divisible by model.n_head=4"),
        ({"d_model": 36, "n_head": 4}, "head dimension d_model/n_head = 9 is odd"),
        ({"n_layer": 0}, "model.n_layer must be a positive integer"),
        ({"dropout": 1.5}, "model.dropout must be in"),
        ({"attention_backend": "flash"}, "unknown model.attention_backend 'flash': choose one of cpu, triton, sdpa"),
    ],
)
def test_impossible_shapes_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(FreeattenError, match=message):
        tiny_config(**overrides)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(FreeattenError, match="choose one of nano, micro, gpt2-small"):
        preset_shape("gpt3")
