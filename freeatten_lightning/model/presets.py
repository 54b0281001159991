"""Model sizes by name: `nano` for CPU smoke runs up to `gpt2-small`, the paper's 124M model."""

from dataclasses import dataclass

from freeatten_lightning.errors import FreeattenError


@dataclass(frozen=True)
class ModelShape:
    """Depth and width of the decoder; the head dimension is d_model / n_head."""

    n_layer: int
    n_head: int
    d_model: int


PRESETS: dict[str, ModelShape] = {
    "nano": ModelShape(n_layer=4, n_head=4, d_model=128),
    "micro": ModelShape(n_layer=4, n_head=4, d_model=256),
    "gpt2-small": ModelShape(n_layer=12, n_head=12, d_model=768),
    "gpt2-medium": ModelShape(n_layer=24, n_head=16, d_model=1024),
}


def preset_shape(name: str) -> ModelShape:
    """The shape registered under `name`, or a clear error listing the presets."""
    if name not in PRESETS:
        raise FreeattenError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
