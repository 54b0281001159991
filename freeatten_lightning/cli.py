"""The `freeatten` command: Lightning's CLI (fit / validate / test / predict) plus `freeatten prepare`.

Every setting is a command-line override of the YAML configs under `configs/`, e.g.
`freeatten fit --config configs/experiment/smoke.yaml --model.attention lssar --trainer.max_steps 200`.
Derived values are linked, not repeated: the model's context length and vocabulary come from the data
config, the checkpoint folder from the run folder.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from freeatten_lightning.callbacks import GracefulStop, RunSummary
from freeatten_lightning.cluster import convert_main, submit_main
from freeatten_lightning.data.datamodule import TokenDataModule
from freeatten_lightning.data.prepare import prepare_main
from freeatten_lightning.data.tokenizers import vocab_size_of
from freeatten_lightning.errors import FreeattenError
from freeatten_lightning.evaluation.compare import eval_lengths_main
from freeatten_lightning.evaluation.generate import generate_main
from freeatten_lightning.evaluation.passkey import passkey_main
from freeatten_lightning.language_model import LanguageModel
from freeatten_lightning.reproduce import reproduce_main

EXTRA_COMMANDS = {
    "prepare": prepare_main,
    "eval-lengths": eval_lengths_main,
    "generate": generate_main,
    "passkey": passkey_main,
    "submit": submit_main,
    "convert-ckpt": convert_main,
    "reproduce": reproduce_main,
}
HELP_EPILOG = (
    "Other commands: `freeatten prepare --help` (turn text files into token shards), `freeatten eval-lengths` "
    "(compare checkpoints at growing context lengths), `freeatten generate` (text), `freeatten passkey` "
    "(passkey retrieval), `freeatten submit` (SLURM job), `freeatten convert-ckpt` (DeepSpeed checkpoint -> fp32 "
    "file), `freeatten reproduce` (the paper's comparison at laptop scale)."
)


def checkpoint_dir(run_dir: str) -> str:
    """Checkpoints live in <run dir>/checkpoints, one fixed folder, so `--ckpt_path last` finds them."""
    return str(Path(run_dir) / "checkpoints")


class FreeattenCLI(LightningCLI):
    """LightningCLI with the project's model and data classes, links and always-on callbacks."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            LanguageModel,
            TokenDataModule,
            args=args,
            run=run,
            seed_everything_default=1337,
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={
                "default_root_dir": "runs/default",
                "max_steps": 1000,
                "val_check_interval": 100,
                "check_val_every_n_epoch": None,
                "log_every_n_steps": 10,
                "gradient_clip_val": 1.0,
                "callbacks": [GracefulStop(), RunSummary()],
            },
            parser_kwargs={"parser_mode": "omegaconf", "epilog": HELP_EPILOG},
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 200})
        parser.link_arguments("data.seq_len", "model.seq_len")
        parser.link_arguments("data.tokenizer", "model.vocab_size", compute_fn=vocab_size_of)
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=checkpoint_dir)

    def _parse_ckpt_path(self) -> None:
        """Rebuild the model from a checkpoint's own hyperparameters (so `validate --ckpt_path` needs no
        config), leaving out the values that are linked from the data config."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        model = _without(checkpoint.get("hyper_parameters", {}), LINKED_MODEL_KEYS)
        data = _without(checkpoint.get("datamodule_hyper_parameters", {}), {"_instantiator"})
        if model or data:
            self.config = self.parser.parse_object({subcommand: {"model": model, "data": data}}, self.config)


LINKED_MODEL_KEYS = {"seq_len", "vocab_size", "_instantiator"}


def _without(hparams: dict, keys: set[str]) -> dict:
    return {key: value for key, value in hparams.items() if key not in keys}


def quiet_lightning_notices() -> None:
    """Drop Lightning's advertising and the notices that do not apply to this project's runs."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*`tensorboardX` has been removed as a dependency.*")
    warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `freeatten` console script; user errors end with one line, not a traceback."""
    cli_args = argv
    argv = sys.argv[1:] if argv is None else argv
    quiet_lightning_notices()
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            sys.exit(EXTRA_COMMANDS[argv[0]](argv[1:]))
        cli = FreeattenCLI(args=cli_args)
    except FreeattenError as error:
        if os.environ.get("FREEATTEN_DEBUG"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    stop = next((cb for cb in cli.trainer.callbacks if isinstance(cb, GracefulStop)), None)
    if stop is not None and stop.received is not None:
        sys.exit(128 + stop.received.value)


if __name__ == "__main__":
    main()
