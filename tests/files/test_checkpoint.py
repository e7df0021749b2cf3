"""State files: atomic writes, safe loads that refuse code, the slt export's keys and metadata."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from dinopre.base.errors import RunDirError
from dinopre.config.loading import build_config
from dinopre.config.settings import config_to_dict
from dinopre.files.checkpoint import (
    CheckpointError,
    atomic_save,
    backbone_metadata,
    load_file,
    sha256_file,
    slt_state_dict,
)
from dinopre.files.export import write_backbone
from dinopre.files.state import load_training_checkpoint
from dinopre.model.vit import VisionTransformer


def test_atomic_save_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "state.pt"
    atomic_save({"kind": "x", "w": torch.arange(3)}, path)
    assert torch.equal(load_file(path)["w"], torch.arange(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.pt"
    atomic_save({"version": 1}, path)
    before = sha256_file(path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunDirError, match="the disk is full.*previous version of the file is intact"):
        atomic_save({"version": 2}, path)
    assert sha256_file(path) == before
    assert os.listdir(tmp_path) == ["state.pt"]


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_file_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"kind": "dinopre-training-checkpoint", "x": _Payload(str(marker))}, evil)
    with pytest.raises(CheckpointError, match="refused without running them"):
        load_file(evil)
    plain_pickle = tmp_path / "evil.pkl"
    with open(plain_pickle, "wb") as handle:
        pickle.dump({"x": _Payload(str(marker))}, handle)
    with pytest.raises(CheckpointError, match="nothing in it was run"):
        load_file(plain_pickle)
    assert not marker.exists()


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"),
    (b"this is not a checkpoint at all", "not a readable checkpoint"),
    (b"x", "not a readable checkpoint"),
])
def test_garbage_files_give_clear_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_file(path)


def test_truncated_checkpoint_gives_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.randn(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_file(path)


def test_other_kinds_of_file_are_not_training_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a dinopre training checkpoint"):
        load_training_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "missing.pt")


def test_slt_export_has_the_consumers_keys_and_metadata(tmp_path: Path) -> None:
    config = build_config("face", cli_settings={"train_dir": ["d"], "vit_depth": 2, "vit_embed_dim": 48,
                                                 "vit_num_heads": 3})
    backbone = VisionTransformer(image_size=112, patch_size=16, embed_dim=48, depth=2, num_heads=3,
                                 use_mask_token=True)
    path = tmp_path / "backbone.pt"
    metadata = backbone_metadata(config_to_dict(config), epoch=3, weights="teacher")
    _, sidecar = write_backbone(backbone.state_dict(), metadata, path)
    exported = torch.load(path, weights_only=True)
    keys = set(exported["model"])
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "blocks.1.attn.in_proj_weight",
            "blocks.1.attn.in_proj_bias", "blocks.0.attn.out_proj.weight", "blocks.0.mlp.0.weight",
            "blocks.0.mlp.3.bias", "blocks.0.norm1.weight", "blocks.0.norm2.bias"} <= keys
    assert "mask_token" not in keys and not any("qkv" in k or "fc1" in k for k in keys)
    assert exported["model"]["blocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert exported["model"]["pos_embed"].shape == (1, 1 + 7 * 7, 48)
    assert exported["metadata"]["backbone"] == {
        "image_size": 112, "patch_size": 16, "in_channels": 3, "embed_dim": 48, "depth": 2, "num_heads": 3,
        "mlp_ratio": 4.0, "dropout": 0.0, "attention_dropout": 0.0, "stochastic_dropout": 0.0,
    }
    assert json.loads(sidecar.read_text()) == exported["metadata"]
    assert sidecar == tmp_path / "backbone.json"


def test_slt_state_dict_values_are_the_backbones_own() -> None:
    backbone = VisionTransformer(image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    state = slt_state_dict(backbone.state_dict())
    assert torch.equal(state["blocks.0.attn.in_proj_weight"], backbone.blocks[0].attn.qkv.weight)
    assert torch.equal(state["blocks.0.mlp.3.weight"], backbone.blocks[0].mlp.fc2.weight)
    assert len(state) == len(backbone.state_dict())
