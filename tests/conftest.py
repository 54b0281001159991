"""Shared test set-up: one embedded-corpus cache for the whole run, and quiet Lightning."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FREEATTEN_CACHE", str(REPO / ".ci-cache" / "freeatten"))


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded corpus's byte-level shards, built once per cache."""
    from freeatten_lightning.data import ensure_embedded_shards

    return ensure_embedded_shards()
