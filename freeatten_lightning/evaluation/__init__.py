"""Evaluation: loss at growing context lengths (training callback and offline comparison), text generation
with the KV cache, and passkey retrieval."""

from freeatten_lightning.evaluation.callback import LengthExtrapolationEval
from freeatten_lightning.evaluation.lengths import (
    DEFAULT_MULTIPLES,
    LengthResult,
    SlidingWindows,
    evaluate_lengths,
    parse_lengths,
    scaled_lengths,
    scored_token_count,
    token_nll,
)

__all__ = [
    "DEFAULT_MULTIPLES",
    "LengthExtrapolationEval",
    "LengthResult",
    "SlidingWindows",
    "evaluate_lengths",
    "parse_lengths",
    "scaled_lengths",
    "scored_token_count",
    "token_nll",
]
