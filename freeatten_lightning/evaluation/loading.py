"""Checkpoints for the offline commands: the model rebuilt from its own config, an optional inference-time
attention override, its tokenizer and its validation tokens.

Inference-time re-weighting (the paper's "fine-tuning-free" use of LSSAR) may change only the re-weighting
stage, never the scores the model's queries and keys were trained to produce: a checkpoint can be evaluated
with or without re-weighting and with any power p inside its family, {lssa, lssar} or {softmax,
softmax-reweight}. Crossing families (e.g. softmax weights read as QK-normed, length-scaled softplus scores)
computes numbers that mean nothing, so it is refused; `ssa`, `sigmoid` and `relu` checkpoints are evaluated
as trained.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from freeatten_lightning.attention import REWEIGHTED, AttentionSpec
from freeatten_lightning.data.datamodule import TokenDataModule
from freeatten_lightning.data.tokenizers import Tokenizer, load_tokenizer
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.language_model import LanguageModel
from freeatten_lightning.model.gpt import GPT

SCORE_FAMILY = {
    "softmax": "softmax",
    "softmax-reweight": "softmax",
    "lssa": "lssa",
    "lssar": "lssa",
    "ssa": "ssa",
    "sigmoid": "sigmoid",
    "relu": "relu",
}


def override_attention(trained: AttentionSpec, attention: str | None, p: float | None) -> AttentionSpec:
    """The attention to evaluate a checkpoint trained with `trained` (see the module docstring for the rule)."""
    name = attention or trained.name
    if name not in SCORE_FAMILY:
        raise FreeattenError(f"unknown attention {name!r}: choose one of {', '.join(SCORE_FAMILY)}")
    family = [n for n, f in SCORE_FAMILY.items() if f == SCORE_FAMILY[trained.name]]
    if name not in family:
        raise FreeattenError(
            f"a checkpoint trained with {trained.name} attention cannot be evaluated as {name}: inference-time "
            f"re-weighting changes only the re-weighting stage, not the attention scores the model learned; "
            f"choose one of {', '.join(family)}"
        )
    if p is not None and name not in REWEIGHTED:
        raise FreeattenError(
            f"--p sets the re-weighting power, which {name} does not have: add --attention "
            f"{'lssar' if SCORE_FAMILY[name] == 'lssa' else 'softmax-reweight'}, or drop --p"
        )
    if p is None:
        p = trained.p if trained.name in REWEIGHTED else 15.0
    return AttentionSpec(name, p)


@dataclass
class Checkpoint:
    """A checkpoint loaded for evaluation: the decoder (eval mode), its data config and labels."""

    path: Path
    model: GPT
    module: LanguageModel
    data_hparams: dict
    trained: AttentionSpec
    attention: AttentionSpec
    run_name: str

    @property
    def seq_len(self) -> int:
        return self.model.config.seq_len

    @property
    def attention_label(self) -> str:
        """'lssa' as trained, or 'lssa -> lssar (p=15), inference-time' when overridden."""
        if self.attention == self.trained:
            return self.trained.label
        return f"{self.trained.label} -> {self.attention.label}, inference-time"

    @property
    def label(self) -> str:
        return f"{self.run_name}: {self.attention_label}"


def _run_name(path: Path) -> str:
    """runs/lssar/checkpoints/last.ckpt -> 'lssar'; other layouts -> the file name without suffix."""
    return path.parent.parent.name if path.parent.name == "checkpoints" and path.parent.parent.name else path.stem


def load_checkpoint(
    path: str | Path, attention: str | None = None, p: float | None = None, device: str = "cpu"
) -> Checkpoint:
    """Rebuild the model from the checkpoint's own hyperparameters (optionally with another attention)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise FreeattenError(
            f"{path} is a folder (a sharded DeepSpeed checkpoint?): convert it to one file with "
            f"`freeatten convert-ckpt {path}`, or pass a .ckpt file"
        )
    if not path.is_file():
        raise FreeattenError(
            f"checkpoint {path} does not exist: pass a .ckpt file, e.g. runs/smoke/checkpoints/last.ckpt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FreeattenError(f"cannot read checkpoint {path}: {e}; is it a Lightning .ckpt file?") from e
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not hparams or "state_dict" not in checkpoint:
        raise FreeattenError(
            f"{path} has no model hyperparameters or weights: it was not written by `freeatten fit`; pass a "
            "checkpoint of a freeatten run"
        )
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    trained = AttentionSpec(hparams.get("attention", "lssar"), hparams.get("p", 15.0))
    spec = override_attention(trained, attention, p)
    try:
        module = LanguageModel(**{**hparams, "attention": spec.name, "p": spec.p, "compile": False})
    except TypeError as e:
        raise FreeattenError(f"the config in {path} does not fit this version's model ({e}); retrain or upgrade") from e
    module.configure_model()
    try:
        module.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        raise FreeattenError(
            f"the weights in {path} do not match the model its config describes: {str(e).splitlines()[0]}"
        ) from e
    module.to(device).eval()
    data = {k: v for k, v in checkpoint.get("datamodule_hyper_parameters", {}).items() if not k.startswith("_")}
    return Checkpoint(path, module.model, module, data, trained, spec, _run_name(path))


def check_same_data(checkpoints: list[Checkpoint]) -> None:
    """Checkpoints compared on one set of tokens must share the tokenizer and vocabulary."""
    first = checkpoints[0]
    for other in checkpoints[1:]:
        mine = (first.data_hparams.get("tokenizer", "byte"), first.model.config.vocab_size)
        theirs = (other.data_hparams.get("tokenizer", "byte"), other.model.config.vocab_size)
        if mine != theirs:
            raise FreeattenError(
                f"{other.path} was trained with tokenizer {theirs[0]} (vocab {theirs[1]:,}) but {first.path} with "
                f"{mine[0]} (vocab {mine[1]:,}): compare checkpoints trained on the same tokenization"
            )


def validation_tokens(data_hparams: dict, tokens: int | None, data_dir: str | None = None) -> np.ndarray:
    """The first `tokens` + 1 validation tokens (None = all) of the checkpoint's data, or of `data_dir`."""
    hparams = dict(data_hparams)
    if data_dir is not None:
        hparams["data_dir"] = data_dir
    hparams["val_tokens"] = tokens
    hparams["seq_len"] = 1
    data = TokenDataModule(**hparams)
    data.prepare_data()
    data.setup("validate")
    return data.val_tokens_array


def checkpoint_tokenizer(checkpoint: Checkpoint, tokenizer_path: str | None = None) -> Tokenizer:
    """The tokenizer of the checkpoint's data: bytes, or BPE files from --tokenizer-path or its data folder."""
    name = checkpoint.data_hparams.get("tokenizer", "byte")
    path = tokenizer_path
    if path is None and name != "byte" and checkpoint.data_hparams.get("data_dir"):
        folder = Path(checkpoint.data_hparams["data_dir"]).expanduser()
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            path = str(folder)
    tokenizer = load_tokenizer(name, path)
    if tokenizer.vocab_size != checkpoint.model.config.vocab_size:
        raise FreeattenError(
            f"the {name} tokenizer has {tokenizer.vocab_size:,} tokens but the model in {checkpoint.path} has "
            f"{checkpoint.model.config.vocab_size:,}: pass the tokenizer files it was trained with"
        )
    return tokenizer


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FreeattenError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return name


def autocast_context(device: str, precision: str) -> Callable[[], AbstractContextManager]:
    """A factory of the forward's precision context: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext


def add_checkpoint_arguments(parser: argparse.ArgumentParser, several: bool) -> None:
    """--ckpt (repeatable when `several`), the attention override, device and tokenizer options."""
    parser.add_argument(
        "--ckpt",
        action="append" if several else "store",
        required=True,
        metavar="PATH",
        help="checkpoint of a freeatten run (.ckpt)" + ("; repeat to compare several" if several else ""),
    )
    parser.add_argument(
        "--attention",
        choices=list(SCORE_FAMILY),
        help="evaluate with this attention instead of the trained one (inference-time re-weighting: only "
        "within {lssa, lssar} or {softmax, softmax-reweight})",
    )
    parser.add_argument("--p", type=float, help="re-weighting power for lssar / softmax-reweight (e.g. 15 or 3)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if visible)")
    parser.add_argument(
        "--tokenizer-path",
        metavar="DIR",
        help="local BPE files (tokenizer.json or vocab.json + merges.txt) for gpt2/bpe checkpoints",
    )
