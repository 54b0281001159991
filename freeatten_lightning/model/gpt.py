"""The decoder: GPT-2 shape (pre-LayerNorm blocks, GELU MLP, tied embeddings, GPT-2 init) with RoPE.

The attention variant is a config choice (`AttentionSpec`); everything else is the same for every variant,
so comparisons between variants change one thing only.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from freeatten_lightning import ops
from freeatten_lightning.attention import AttentionSpec
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.model.rope import apply_rope, rope_angles


@dataclass
class GPTConfig:
    """Everything that fixes the decoder's parameters and computation."""

    vocab_size: int = 257
    seq_len: int = 256
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0
    bias: bool = True
    rope_base: float = 10000.0
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    attention_backend: str | None = None  # None: the op's dispatcher picks; "reference": the eager math

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "n_layer", "n_head", "d_model"):
            if getattr(self, name) < 1:
                raise FreeattenError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise FreeattenError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}: "
                f"choose n_head dividing d_model (e.g. {_divisor_hint(self.d_model, self.n_head)})"
            )
        if self.head_dim % 2:
            raise FreeattenError(
                f"head dimension d_model/n_head = {self.head_dim} is odd; RoPE needs it even: change "
                "model.n_head or model.d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise FreeattenError(f"model.dropout must be in [0, 1), got {self.dropout}")
        backends = [backend.name for backend in ops.BACKENDS]
        if self.attention_backend is not None and self.attention_backend not in backends:
            raise FreeattenError(
                f"unknown model.attention_backend '{self.attention_backend}': choose one of "
                f"{', '.join(backends)}, or null to let the dispatcher pick"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows rounded up to a multiple of 64 (faster matmuls); the extra logits are dropped."""
        return math.ceil(self.vocab_size / 64) * 64


def _divisor_hint(d_model: int, n_head: int) -> int:
    """The divisor of d_model closest to the requested head count, for the error message."""
    divisors = [h for h in range(1, d_model + 1) if d_model % h == 0]
    return min(divisors, key=lambda h: (abs(h - n_head), h))


class LayerCache:
    """One layer's keys and values (B, H, N, D) of the tokens decoded so far, after RoPE."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new tokens' keys and values; return those of every token so far."""
        if self.keys is not None:
            k, v = torch.cat((self.keys, k), dim=-2), torch.cat((self.values, v), dim=-2)
        self.keys, self.values = k, v
        return k, v


class KVCache:
    """Keys and values of every layer for incremental decoding: `GPT(tokens, cache)` appends to it.

    The next tokens sit at absolute positions len(cache), len(cache) + 1, ...: RoPE rotates them there, and
    the bottom-right causal mask gives each query n_i = absolute position + 1 keys (DESIGN.md section 2).
    """

    def __init__(self, n_layer: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layer)]

    def __len__(self) -> int:
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[-2]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: projections, RoPE, then the configured variant through the fused op.

    The op (`freeatten_lightning.ops`) runs the variant on the fastest backend that supports it (C++ tiles on
    the CPU, Triton on CUDA, SDPA for softmax, the eager reference for the rest) unless a backend is forced.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.spec = config.attention
        self.backend = config.attention_backend
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)
        y = ops.attend_op(q, k, v, self.spec, op=self.backend)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class MLP(nn.Module):
    """The GPT-2 feed-forward block: 4x expansion with tanh-approximated GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, 4 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(4 * config.d_model, config.d_model, bias=config.bias)
        self.proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x), cos, sin, cache)
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """Token ids (B, N) -> next-token logits (B, N, vocab_size). Works at any N: RoPE has no length limit.

    With a `KVCache` the tokens continue the cached ones (incremental decoding); the logits equal those of
    the full forward over all the tokens.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model, bias=config.bias)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer), zero biases."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens, cache))

    def hidden_states(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final-LayerNorm outputs (B, N, d_model): `logits` of slices of them bound the memory of long
        sequences (chunked cross-entropy)."""
        if tokens.dim() != 2:
            raise FreeattenError(f"expected token ids of shape (batch, length), got {tuple(tokens.shape)}")
        start = 0 if cache is None else len(cache)
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_base)
        x = self.dropout(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if cache is None else cache.layers[i])
        return self.ln_final(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., vocab_size) from hidden states (..., d_model); the padding rows dropped."""
        return self.lm_head(hidden)[..., : self.config.vocab_size]

    def new_cache(self) -> KVCache:
        """An empty KV cache for this model's layers."""
        return KVCache(self.config.n_layer)
