"""freeatten-lightning: GPT-style language models with length-scaled softplus attention (LSSA / LSSAR)."""

__version__ = "0.1.0"
