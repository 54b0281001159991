"""The LightningModule: a GPT decoder trained with next-token cross-entropy.

A batch is a (B, N + 1) tensor of token ids from the data module: inputs are its first N columns, targets
its last N. Validation logs the token-weighted mean loss and its perplexity.
"""

import time
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from freeatten_lightning.attention import AttentionSpec
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.model import GPT, GPTConfig, preset_shape
from freeatten_lightning.optim import adamw, warmup_cosine

AttentionName = Literal["softmax", "lssa", "lssar", "ssa", "sigmoid", "relu", "softmax-reweight"]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, N, V) against targets (B, N), computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


class LanguageModel(L.LightningModule):
    """GPT with a chosen attention variant, AdamW, warmup + cosine LR, loss / perplexity / tokens-per-second logs.

    Args:
        preset: model size by name (`nano`, `micro`, `gpt2-small`, `gpt2-medium`); n_layer / n_head / d_model
            override single fields of it.
        attention: the attention variant (DESIGN.md section 2).
        p: re-weighting power of `lssar` and `softmax-reweight` (the paper's default is 15).
        attention_backend: force one backend of the fused attention op (`cpu`, `triton`, `sdpa`, `reference`;
            `python -m freeatten_lightning.info` lists them); null lets its dispatcher pick the fastest that fits.
        vocab_size: tokenizer vocabulary; linked from the data config by the CLI.
        seq_len: training context length; linked from the data config by the CLI.
        lr: peak learning rate; warmup_steps linear warmup, then cosine decay to min_lr_ratio * lr at
            trainer.max_steps.
        compile: wrap the decoder in torch.compile.
    """

    def __init__(
        self,
        preset: str = "nano",
        n_layer: int | None = None,
        n_head: int | None = None,
        d_model: int | None = None,
        attention: AttentionName = "lssar",
        p: float = 15.0,
        attention_backend: str | None = None,
        vocab_size: int = 257,
        seq_len: int = 256,
        dropout: float = 0.0,
        bias: bool = True,
        rope_base: float = 10000.0,
        lr: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        shape = preset_shape(preset)
        self.config = GPTConfig(
            vocab_size=vocab_size,
            seq_len=seq_len,
            n_layer=n_layer or shape.n_layer,
            n_head=n_head or shape.n_head,
            d_model=d_model or shape.d_model,
            dropout=dropout,
            bias=bias,
            rope_base=rope_base,
            attention=AttentionSpec(attention, p),
            attention_backend=attention_backend,
        )
        self.model: GPT | None = None
        self.val_loss = MeanMetric()
        self._last_step_end: float | None = None

    def configure_model(self) -> None:
        """Build the decoder here, not in __init__, so sharded strategies (ZeRO-3, FSDP) can build it in place."""
        if self.model is not None:
            return
        self.model = GPT(self.config)
        if self.hparams.compile:
            self.model.compile()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        loss = next_token_loss(self(inputs), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch: torch.Tensor, batch_idx: int) -> None:
        """Log throughput in tokens/s over all ranks, measured between consecutive batch ends."""
        now = time.perf_counter()
        if self._last_step_end is not None:
            tokens = batch[:, :-1].numel() * self.trainer.world_size
            self.log("train/tokens_per_s", tokens / (now - self._last_step_end), prog_bar=True)
        self._last_step_end = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_start(self) -> None:
        self._last_step_end = None

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        losses = next_token_loss(self(inputs), targets, reduction="none")
        self.val_loss.update(losses.mean(), weight=losses.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", loss.exp(), sync_dist=False)
        self.val_loss.reset()

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = adamw(self.model, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = self.trainer.max_steps
        if total is None or total < 0:
            raise FreeattenError("set trainer.max_steps: the cosine learning-rate schedule needs the run length")
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(
                step, warmup_steps=hp.warmup_steps, total_steps=total, min_lr_ratio=hp.min_lr_ratio
            ),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
