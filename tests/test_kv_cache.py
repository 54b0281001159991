"""KV-cache decoding: cached logits equal the full forward's for every attention variant, past the training
length too, and greedy generation with the cache equals greedy decoding by full forwards."""

import pytest
import torch

from freeatten_lightning.attention import VARIANTS, AttentionSpec
from freeatten_lightning.evaluation.generate import generate, next_token
from freeatten_lightning.model.gpt import GPT, GPTConfig

TRAIN_LENGTH = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_model(attention: str, dtype: torch.dtype = torch.float64, p: float = 15.0) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=257, seq_len=TRAIN_LENGTH, n_layer=2, n_head=2, d_model=32, attention=AttentionSpec(attention, p)
    )
    model = GPT(config).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init, so the attention rows are far from uniform
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8.0)
    return model


@pytest.mark.parametrize("attention", list(VARIANTS))
@pytest.mark.parametrize("pieces", [[5, 1, 1, 30, 1, 1, 14], [1] * 53])
def test_cached_logits_equal_the_full_forward(attention: str, pieces: list[int]) -> None:
    """Prefill then pieces of any size, to 3.3x the training length; fp64 so any real mismatch shows."""
    model = tiny_model(attention)
    tokens = torch.randint(0, 257, (2, sum(pieces)))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        cached, start = [], 0
        for size in pieces:
            cached.append(model(tokens[:, start : start + size], cache))
            start += size
            assert len(cache) == start
    torch.testing.assert_close(torch.cat(cached, dim=1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attention", ["softmax", "lssa", "lssar"])
def test_cached_logits_in_float32(attention: str) -> None:
    model = tiny_model(attention, torch.float32)
    tokens = torch.randint(0, 257, (1, 4 * TRAIN_LENGTH))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        prefix = model(tokens[:, :TRAIN_LENGTH], cache)
        steps = [model(tokens[:, i : i + 1], cache) for i in range(TRAIN_LENGTH, tokens.shape[1])]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, rtol=1e-4, atol=1e-4)


def test_lssar_decoding_uses_the_statistics_of_every_cached_key() -> None:
    """A step that saw only a window of recent keys would differ: the row mean is over all n_i keys."""
    model = tiny_model("lssar", p=3.0)
    tokens = torch.randint(0, 257, (1, 40))
    with torch.no_grad():
        cache = model.new_cache()
        model(tokens[:, :39], cache)
        last = model(tokens[:, 39:], cache)[:, -1]
        windowed = model.new_cache()
        model(tokens[:, 20:39], windowed)
        shifted = model(tokens[:, 39:], windowed)[:, -1]
        full = model(tokens)[:, -1]
    torch.testing.assert_close(last, full, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(shifted, full, atol=1e-6)


def test_hidden_states_and_logits_compose_to_forward() -> None:
    model = tiny_model("lssar")
    tokens = torch.randint(0, 257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model.logits(model.hidden_states(tokens)), model(tokens))


@pytest.mark.parametrize("attention", ["softmax", "lssar", "sigmoid"])
def test_greedy_generation_equals_decoding_by_full_forwards(attention: str) -> None:
    model = tiny_model(attention)
    prompt = torch.randint(0, 257, (2, 10))
    new = generate(model, prompt, 3 * TRAIN_LENGTH)
    sequence = prompt
    with torch.no_grad():
        for _ in range(3 * TRAIN_LENGTH):
            sequence = torch.cat([sequence, model(sequence)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, sequence[:, prompt.shape[1] :])
    assert model.training is False


def test_sampling_is_seeded_and_respects_top_k() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(200, 1)
    picks = next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {1, 2}
    again = next_token(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picks, again)
    assert torch.equal(next_token(logits), torch.ones(200, dtype=torch.long))
