"""Shared fixtures: an isolated terminal, tiny configurations, folders of synthetic images, one-thread torch."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Typer/rich read these when first imported: fix width and colour before any test imports the app.
os.environ.setdefault("TERMINAL_WIDTH", "120")
os.environ["_TYPER_FORCE_DISABLE_TERMINAL"] = "1"
os.environ["NO_COLOR"] = "1"
os.environ["COLUMNS"] = "120"
# Scans cache their file index; tests (and the processes they start) must never touch the user's cache.
os.environ["DINOPRE_CACHE_DIR"] = tempfile.mkdtemp(prefix="dinopre-test-cache-")

# A model small enough that a training step takes milliseconds on a CPU.
TINY: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "local_crop_size": 16,
    "num_local_crops": 2,
    "vit_embed_dim": 32,
    "vit_depth": 2,
    "vit_num_heads": 2,
    "drop_path_rate": 0.1,
    "out_dim": 64,
    "head_hidden_dim": 64,
    "head_bottleneck_dim": 16,
    "batch_size": 8,
    "epochs": 2,
    "warmup_epochs": 1,
    "num_workers": 0,
    "log_interval": 2,
}


@pytest.fixture
def tiny_settings(tmp_path: Path) -> dict[str, Any]:
    """Command-line style settings for a tiny run writing into a temporary folder."""
    return {**TINY, "output_dir": str(tmp_path / "run")}


@pytest.fixture(scope="session")
def face_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 48 synthetic face-like JPEG crops in two subfolders (tests recursive scanning)."""
    from dinopre.data.demo import write_synthetic_folder

    root = tmp_path_factory.mktemp("faces")
    write_synthetic_folder(root / "signer_a", "face", 24, size=48)
    write_synthetic_folder(root / "signer_b", "face", 24, size=48, start=24, image_format="png")
    return root


@pytest.fixture(scope="session")
def labelled_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-class probe (synthetic faces and hands, 32 px) with train/ and test/ folds."""
    from dinopre.data.demo import write_synthetic_folder

    root = tmp_path_factory.mktemp("probe")
    for fold, start, count in (("train", 0, 12), ("test", 500, 6)):
        for kind in ("face", "hands"):
            write_synthetic_folder(root / fold / kind, kind, count, size=32, start=start)
    return root


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP wake-up latency on a loaded 2-core machine (restored after).

    A module asks for it with `pytestmark = pytest.mark.usefixtures("single_thread")`.
    """
    import torch  # here, not at the top: conftest is imported by every test, torch-free ones included

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
