"""Running on clusters: SLURM submission (`freeatten submit`) and DeepSpeed checkpoint conversion
(`freeatten convert-ckpt`). The sbatch templates live in `recipes/slurm/`."""

from freeatten_lightning.cluster.convert import convert_main, convert_zero_checkpoint
from freeatten_lightning.cluster.layout import Layout, check_layout, resolve_config
from freeatten_lightning.cluster.submit import submit_main

__all__ = ["Layout", "check_layout", "convert_main", "convert_zero_checkpoint", "resolve_config", "submit_main"]
