"""Text generation with the KV cache (`freeatten generate`): the prompt is read once, then one token a step."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import Tensor
from tqdm import tqdm

from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.evaluation.lengths import evaluation_mode
from freeatten_lightning.evaluation.loading import (
    add_checkpoint_arguments,
    checkpoint_tokenizer,
    load_checkpoint,
    resolve_device,
)
from freeatten_lightning.model.gpt import GPT


def next_token(logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator=None) -> Tensor:
    """Pick the next token (B,) from logits (B, V): argmax at temperature 0, else sampled from the top k."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)


def generate(
    model: GPT,
    prompt: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """The next `max_new_tokens` tokens (B, max_new_tokens) after the prompts (B, N), decoded with the KV cache.

    The prompt's logits are made for its last position only, so a long prompt never holds (N, vocab) logits.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise FreeattenError(f"the prompt must be token ids of shape (batch, length >= 1), got {tuple(prompt.shape)}")
    out = torch.empty(prompt.shape[0], max_new_tokens, dtype=torch.long, device=prompt.device)
    with evaluation_mode(model):
        cache = model.new_cache()
        logits = model.logits(model.hidden_states(prompt, cache)[:, -1])
        for step in tqdm(range(max_new_tokens), desc="generating", unit="token", leave=False, disable=not progress):
            out[:, step] = next_token(logits, temperature, top_k, generator)
            if step + 1 < max_new_tokens:
                logits = model(out[:, step : step + 1], cache)[:, -1]
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeatten generate",
        description="Continue a prompt with a trained checkpoint (KV-cache decoding); prints the text.",
        epilog='example:\n  freeatten generate --ckpt runs/smoke/checkpoints/last.ckpt --prompt "The list type" -n 200',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_checkpoint_arguments(parser, several=False)
    parser.add_argument("--prompt", default="", help="text to continue (default: start of a new document)")
    parser.add_argument("-n", "--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default %(default)s)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest (default %(default)s)")
    parser.add_argument("--num-samples", type=int, default=1, help="independent continuations (default 1)")
    parser.add_argument("--seed", type=int, default=1337, help="sampling seed (default %(default)s)")
    return parser


def generate_main(argv: list[str] | None = None) -> int:
    """The `freeatten generate` command."""
    args = _parser().parse_args(argv)
    if args.max_new_tokens < 1 or args.num_samples < 1 or args.temperature < 0:
        raise FreeattenError("--max-new-tokens and --num-samples must be >= 1 and --temperature >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise FreeattenError(f"--top-k must be >= 1, got {args.top_k}")
    device = resolve_device(args.device)
    checkpoint = load_checkpoint(args.ckpt, args.attention, args.p, device=device)
    tokenizer = checkpoint_tokenizer(checkpoint, args.tokenizer_path)
    ids = [tokenizer.eot_id, *tokenizer.encode(args.prompt)]
    prompt = torch.tensor([ids] * args.num_samples, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    tokens = generate(
        checkpoint.model,
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        generator=generator,
        progress=True,
    )
    print(f"# {checkpoint.label}, {len(ids) + args.max_new_tokens:,} tokens (trained at {checkpoint.seq_len:,})")
    for n, row in enumerate(tokens.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {n + 1}")
        sys.stdout.write(args.prompt + tokenizer.decode(row) + "\n")
    return 0
