"""The decoder and its presets."""

from freeatten_lightning.model.gpt import GPT, GPTConfig
from freeatten_lightning.model.presets import PRESETS, ModelShape, preset_shape

__all__ = ["GPT", "GPTConfig", "PRESETS", "ModelShape", "preset_shape"]
