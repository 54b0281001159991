"""`freeatten convert-ckpt`: a DeepSpeed ZeRO checkpoint folder -> one fp32 Lightning checkpoint file.

DeepSpeed saves `last.ckpt` as a folder of per-rank shards that only the same strategy at the same world size
can load. The converted file holds the full fp32 weights plus the run's hyperparameters, so
`freeatten validate --ckpt_path <file>` and any evaluation load it on one device, without DeepSpeed. Optimizer
state is not kept: resume training from the folder itself.

    freeatten convert-ckpt runs/gpt2/checkpoints/last.ckpt            # -> runs/gpt2/last-fp32.ckpt
"""

import argparse
from pathlib import Path

import torch

from freeatten_lightning.errors import FreeattenError


def is_deepspeed_checkpoint(path: Path) -> bool:
    """A DeepSpeed checkpoint folder: a `latest` file naming a tag folder of shards."""
    return path.is_dir() and (path / "latest").is_file()


def default_output(checkpoint: Path) -> Path:
    """<run>/checkpoints/<name>.ckpt -> <run>/<name>-fp32.ckpt: outside the checkpoint folder, where
    `--ckpt_path last` would otherwise pick it up as the newest `last*` checkpoint."""
    folder = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return folder / f"{checkpoint.name.removesuffix('.ckpt')}-fp32.ckpt"


def convert_zero_checkpoint(checkpoint: Path, output: Path) -> dict:
    """Consolidate the ZeRO shards of `checkpoint` into `output` (fp32); returns the saved checkpoint dict."""
    checkpoint = Path(checkpoint)
    if not is_deepspeed_checkpoint(checkpoint):
        hint = (
            "it is a single file already: load it directly with --ckpt_path"
            if checkpoint.is_file()
            else "pass the folder DeepSpeed saved, e.g. runs/<name>/checkpoints/last.ckpt"
        )
        raise FreeattenError(f"{checkpoint} is not a DeepSpeed checkpoint folder (no 'latest' file inside): {hint}")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    saved = convert_zero_checkpoint_to_fp32_state_dict(str(checkpoint), str(output))
    if "hyper_parameters" not in saved:
        raise FreeattenError(f"{checkpoint} holds no Lightning hyperparameters: was it saved by `freeatten fit`?")
    return saved


def convert_main(argv: list[str]) -> int:
    """Entry point of `freeatten convert-ckpt`."""
    parser = argparse.ArgumentParser(
        prog="freeatten convert-ckpt",
        description="Turn a DeepSpeed ZeRO checkpoint folder into one fp32 file that `freeatten validate "
        "--ckpt_path` and evaluation load without DeepSpeed.",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="the DeepSpeed checkpoint folder, e.g. runs/x/checkpoints/last.ckpt"
    )
    parser.add_argument("output", type=Path, nargs="?", help="the fp32 file (default: <run folder>/<name>-fp32.ckpt)")
    options = parser.parse_args(argv)
    output = options.output or default_output(options.checkpoint)
    saved = convert_zero_checkpoint(options.checkpoint, output)
    weights = saved["state_dict"]
    count = sum(tensor.numel() for tensor in weights.values() if isinstance(tensor, torch.Tensor))
    step = saved.get("global_step", "?")
    print(f"Wrote {output}: {len(weights)} tensors, {count:,} values (fp32), step {step}")
    print(f"  evaluate with: freeatten validate --ckpt_path {output}")
    return 0
