"""Shared test set-up: one embedded-corpus cache for the whole run, FineWeb-like GPT-2 shards, and the
`freeatten` command run in-process."""

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FREEATTEN_CACHE", str(REPO / ".ci-cache" / "freeatten"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is fastest, and two spin badly on a shared, loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The embedded corpus's byte-level shards, built once per cache."""
    from freeatten_lightning.data import ensure_embedded_shards

    return ensure_embedded_shards()


@pytest.fixture(scope="session")
def fineweb_like_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small stand-in for llm.c's FineWeb-10B shards: the same file names and format, GPT-2 token ids, no
    meta.json (llm.c writes none). Random ids: enough to start the paper's recipe, not to learn anything."""
    import numpy as np

    from freeatten_lightning.data.shards import write_shard

    folder = tmp_path_factory.mktemp("fineweb10B")
    rng = np.random.default_rng(0)
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 50257, size=40_000))
    write_shard(folder / "fineweb_train_000001.bin", rng.integers(0, 50257, size=200_000))
    return folder


@pytest.fixture
def freeatten(capsys: pytest.CaptureFixture) -> Callable[[list[str]], tuple[int, str, str]]:
    """Run `freeatten <args>` in-process; returns (exit code, stdout, stderr)."""
    from freeatten_lightning.cli import main

    def run(args: list[str]) -> tuple[int, str, str]:
        try:
            main(args)
            code = 0
        except SystemExit as exit_:
            code = exit_.code or 0
        out, err = capsys.readouterr()
        return code, out, err

    return run
