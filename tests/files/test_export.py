"""Backbone exports: the pipeline's own ViT loads them exactly, timm names, the spec loader, verify and inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from consumer import ConsumerViT
from typer.testing import CliRunner

import dinopre
from dinopre.base.errors import RunDirError
from dinopre.base.events import NullReporter
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.files.checkpoint import CheckpointError, sha256_file
from dinopre.files.export import (
    backbone_state,
    export_checkpoint,
    inspect_file,
    load_backbone_file,
    parse_spec,
    verify_backbone,
)
from dinopre.model.vit import VisionTransformer
from dinopre.train.engine import fit

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, face_folder: Path) -> Path:
    """A run directory of a 1-epoch tiny DINO run (checkpoint_last.pt, artifacts.json)."""
    from conftest import TINY

    out = tmp_path_factory.mktemp("export") / "run"
    config = build_config("face", cli_settings={**TINY, "epochs": 1, "train_dir": [str(face_folder)],
                                                "output_dir": str(out), "stream": "face_left"})
    fit(config, NullReporter())
    return out


def _teacher(run_dir: Path, weights: str = "teacher") -> VisionTransformer:
    state = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    config = state["config"]["model"]
    model = VisionTransformer(image_size=config["image_size"], patch_size=config["patch_size"],
                              embed_dim=config["vit_embed_dim"], depth=config["vit_depth"],
                              num_heads=config["vit_num_heads"], mlp_ratio=config["vit_mlp_ratio"])
    model.load_state_dict(backbone_state(state, weights))
    return model.eval()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_pipelines_vit_loads_the_export_exactly_and_gives_the_teachers_features(trained: Path,
                                                                                    tmp_path: Path) -> None:
    path, *_ = export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "backbone.pt")
    exported = torch.load(path, weights_only=True)  # what the pipeline does (PyTorch >= 2.6 default)
    consumer = ConsumerViT(**exported["metadata"]["backbone"])
    missing, unexpected = consumer.load_state_dict(exported["model"], strict=False)
    assert missing == [] and unexpected == []
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _relative_error(consumer.eval()(images), _teacher(trained)(images)) < 1e-4
    assert exported["metadata"]["stream"] == "face_left" and exported["metadata"]["weights"] == "teacher"


def test_train_export_backbone_writes_the_same_format(face_folder: Path, tmp_path: Path) -> None:
    """`train --export-backbone` at the end of a run writes what `dinopre export` writes from its checkpoint."""
    from conftest import TINY

    run_dir = tmp_path / "run"
    fit(build_config("face", cli_settings={**TINY, "epochs": 1, "train_dir": [str(face_folder)],
                                           "output_dir": str(run_dir), "export_backbone": str(run_dir / "end.pt")}),
        NullReporter())
    exported, *_ = export_checkpoint(run_dir / "checkpoint_last.pt", tmp_path / "later.pt")
    at_end, later = torch.load(run_dir / "end.pt", weights_only=True), torch.load(exported, weights_only=True)
    assert at_end["model"].keys() == later["model"].keys()
    assert all(torch.equal(at_end["model"][k], later["model"][k]) for k in at_end["model"])
    assert at_end["metadata"]["backbone"] == later["metadata"]["backbone"]
    assert dinopre.load_dinov2_backbone(f"file::{run_dir / 'end.pt'}:slt_vitsmall_patch16") is not None


def test_export_refuses_to_overwrite_and_records_artifacts(trained: Path) -> None:
    target = trained / "bb.pt"
    path, sidecar, _ = export_checkpoint(trained / "checkpoint_last.pt", target)
    with pytest.raises(RunDirError, match="already exists; pass --force"):
        export_checkpoint(trained / "checkpoint_last.pt", target)
    export_checkpoint(trained / "checkpoint_last.pt", target, weights="student", force=True)
    artifacts = json.loads((trained / "artifacts.json").read_text())
    assert artifacts["bb.pt"]["sha256"] == sha256_file(target) and artifacts["bb.pt"]["kind"] == "export-slt"
    assert json.loads(sidecar.read_text())["weights"] == "student"


def test_timm_export_uses_official_names(trained: Path, tmp_path: Path) -> None:
    path, *_ = export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "timm.pt", fmt="timm")
    state = torch.load(path, weights_only=True)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
            "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "norm.weight"} <= set(state)
    assert not any("in_proj" in k or "mask_token" in k or "metadata" in k for k in state)
    model, metadata = load_backbone_file(path)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), _teacher(trained)(images))
    assert metadata["format"] == "timm"


def test_student_and_teacher_exports_differ(trained: Path, tmp_path: Path) -> None:
    teacher, _ = load_backbone_file(export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "t.pt")[0])
    student, _ = load_backbone_file(export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "s.pt",
                                                      weights="student")[0])
    assert not torch.equal(teacher.pos_embed, student.pos_embed)


@pytest.mark.parametrize(("spec", "path", "model"), [
    ("file::a/b.pt", "a/b.pt", "slt_vitsmall_patch16"),
    ("file::a/b.pt:slt_vitsmall_patch16", "a/b.pt", "slt_vitsmall_patch16"),
    ("file::a/b.pt:dinopre_vit", "a/b.pt", "dinopre_vit"),
    ("file::C:/runs/b.pt", "C:/runs/b.pt", "slt_vitsmall_patch16"),
])
def test_spec_parsing(spec: str, path: str, model: str) -> None:
    assert parse_spec(spec) == (Path(path), model)


@pytest.mark.parametrize(("spec", "message"), [
    ("backbone.pt", "must look like 'file::PATH'"),
    ("file::", "must look like"),
    ("file::b.pt:vit_giant", "Unknown backbone model 'vit_giant'"),
    ("file::{tmp}/missing.pt", "does not exist"),
    ("file::{tmp}/garbage.pt", "not a readable checkpoint"),
    ("file::{ckpt}", "is a training checkpoint, not a backbone"),
])
def test_spec_loader_errors(trained: Path, tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage")
    spec = spec.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(trained / "checkpoint_last.pt"))
    with pytest.raises(CheckpointError, match=message):
        dinopre.load_dinov2_backbone(spec)


def test_spec_loader_refuses_mismatched_keys(trained: Path, tmp_path: Path) -> None:
    path, *_ = export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "b.pt")
    exported = torch.load(path, weights_only=True)
    exported["model"]["blocks.0.attn.in_proj_weightX"] = exported["model"].pop("blocks.0.attn.in_proj_weight")
    torch.save(exported, path)
    with pytest.raises(CheckpointError, match="match the ViT its metadata describes"):
        dinopre.load_dinov2_backbone(f"file::{path}:slt_vitsmall_patch16")


def test_verify_passes_and_catches_another_runs_weights(trained: Path, tmp_path: Path, face_folder: Path) -> None:
    path, *_ = export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "b.pt")
    report = verify_backbone(path, checkpoint=trained / "checkpoint_last.pt", image_size=48)
    assert report.ok and [row[0] for row in report.rows] == [
        "loads strictly", "forward at 32 px", "forward at 48 px", "same features as the checkpoint"]
    from conftest import TINY

    other = tmp_path / "other"
    fit(build_config("face", cli_settings={**TINY, "epochs": 1, "seed": 5, "train_dir": [str(face_folder)],
                                           "output_dir": str(other)}), NullReporter())
    mismatch = verify_backbone(path, checkpoint=other / "checkpoint_last.pt")
    assert not mismatch.ok and not mismatch.rows[-1][1]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"")
    assert not verify_backbone(garbage).ok


def test_inspect_describes_both_kinds(trained: Path, tmp_path: Path) -> None:
    info = inspect_file(trained / "checkpoint_last.pt")
    assert info["kind"] == "training checkpoint" and info["epoch"] == 1 and info["algorithm"] == "dino"
    assert info["sha256"] == sha256_file(trained / "checkpoint_last.pt") and info["loss_history"]["epochs"] == 1
    assert info["parameters"]["student backbone"] == info["parameters"]["teacher backbone"] > 0
    # the teacher's label-free signals at the last epoch, as metrics.jsonl has them
    assert info["features"]["epoch"] == 1 and info["features"]["collapse"] is None
    assert info["features"]["rankme"] >= 1 and 0 < info["features"]["feature_spread"] <= 1.5
    assert info["best_by"] == "loss" and "knn_history" not in info  # no --eval-dir
    path, *_ = export_checkpoint(trained / "checkpoint_last.pt", tmp_path / "b.pt")
    exported = inspect_file(path)
    assert exported["kind"] == "backbone export" and exported["format"] == "slt" and exported["stream"] == "face_left"


def test_cli_export_verify_inspect(trained: Path, tmp_path: Path) -> None:
    target = tmp_path / "cli.pt"
    result = runner.invoke(app, ["export", str(trained / "checkpoint_last.pt"), str(target)], prog_name="dinopre")
    assert result.exit_code == 0 and "load_dinov2_backbone" in result.output
    again = runner.invoke(app, ["export", str(trained / "checkpoint_last.pt"), str(target)], prog_name="dinopre")
    assert again.exit_code == 2 and "--force" in again.output
    verify = runner.invoke(app, ["verify-backbone", str(target), "--checkpoint", str(trained / "checkpoint_last.pt")])
    assert verify.exit_code == 0 and "PASS same features" in verify.output
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"junk")
    failed = runner.invoke(app, ["verify-backbone", str(garbage)])
    assert failed.exit_code == 1 and "FAIL loads strictly" in failed.output and "Traceback" not in failed.output
    as_json = runner.invoke(app, ["inspect-checkpoint", str(trained / "checkpoint_last.pt"), "--json"])
    assert json.loads(as_json.output)["kind"] == "training checkpoint"
    assert "rankme" in json.loads(as_json.output)["features"]
    checkpoint_table = runner.invoke(app, ["inspect-checkpoint", str(trained / "checkpoint_last.pt")])
    assert "features" in checkpoint_table.output and "rankme" in checkpoint_table.output
    table = runner.invoke(app, ["inspect-checkpoint", str(target)])
    assert table.exit_code == 0 and "backbone export" in table.output
