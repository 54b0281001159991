"""The decoder: shapes, sizes, causality for every variant, GPT-2 init and tied weights, config errors."""

import pytest
import torch

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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 30, "n_head": 4}, "not divisible by model.n_head=4"),
        ({"d_model": 36, "n_head": 4}, "head dimension d_model/n_head = 9 is odd"),
        ({"n_layer": 0}, "model.n_layer must be a positive integer"),
        ({"dropout": 1.5}, "model.dropout must be in"),
    ],
)
def test_impossible_shapes_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(FreeattenError, match=message):
        tiny_config(**overrides)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(FreeattenError, match="choose one of nano, micro, gpt2-small"):
        preset_shape("gpt3")
