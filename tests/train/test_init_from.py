"""Continued pretraining (`train --init-from`): the shape and crop sizes from the source, the source's function at the
start, the head warm-up with a frozen backbone (one process and two), layer-wise lr decay, exact resume through the
switch, the source's own k-NN as epoch 0, heads carried over from an official training checkpoint, and refusals."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Recorder, face_config
from processes import finish, start_ranks
from test_engine import StopAt, _independent_knn
from typer.testing import CliRunner

from dinopre.base.errors import CheckpointError, ConfigError
from dinopre.base.events import CheckpointSaved, Notice
from dinopre.cli import app
from dinopre.config.recipe import resolve
from dinopre.config.settings import with_settings
from dinopre.files.checkpoint import sha256_file
from dinopre.model.heads import DINOHead
from dinopre.model.vit import VisionTransformer
from dinopre.train.engine import fit
from dinopre.train.init_from import plan_init
from dinopre.train.resume import resume_config

pytestmark = pytest.mark.usefixtures("single_thread")

# A run without shape flags: the shape must come from the source. 48 images, batch 8: 6 steps per epoch.
RUN = {"image_size": 32, "local_crop_size": 16, "num_local_crops": 2, "out_dim": 64, "head_hidden_dim": 64,
       "head_bottleneck_dim": 16, "batch_size": 8, "epochs": 2, "warmup_epochs": 1, "num_workers": 0,
       "log_interval": 2}


def _vit(patch: int = 8, image: int = 32, seed: int = 3) -> VisionTransformer:
    torch.manual_seed(seed)
    # 64 wide, so 1 head: a plain state dict does not store the heads, which are inferred as width / 64
    vit = VisionTransformer(image_size=image, patch_size=patch, embed_dim=64, depth=2, num_heads=1, mlp_ratio=4.0)
    with torch.no_grad():  # not the init dinopre would draw: norms and biases away from 1 and 0
        for name, param in vit.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return vit


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official-DINO-style backbone file (a plain state dict) of a ViT 64 wide, 2 blocks, 1 head, patch 8."""
    path = tmp_path_factory.mktemp("source") / "dino_tiny_pretrain.pth"
    torch.save(_vit().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def training_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An official DINO training checkpoint: teacher and student with backbone and DINO head, and its args."""
    vit, head = _vit(), DINOHead(64, 48, hidden_dim=40, bottleneck_dim=8)
    network = {**{f"backbone.{k}": v for k, v in vit.state_dict().items()},
               **{f"head.{k}": v for k, v in head.state_dict().items()}}
    path = tmp_path_factory.mktemp("training") / "checkpoint.pth"
    torch.save({"teacher": network, "student": {f"module.{k}": v for k, v in network.items()}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_tiny", out_dim=48)}, path)
    return path


def _config(face_folder: Path, src: Path, **extra: Any):
    return face_config({**RUN, "init_from": str(src)}, face_folder, **extra)


def _state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _backbone(state: dict, network: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix("backbone."): v for k, v in state[network].items() if k.startswith("backbone.")
            and k != "backbone.mask_token"}


# ============ the plan: shape, crop sizes, heads ============


def test_the_shape_comes_from_the_source_and_only_given_flags_that_differ_are_refused(face_folder: Path,
                                                                                    source: Path) -> None:
    plan = plan_init(_config(face_folder, source))
    m = plan.config.model
    assert (m.vit_embed_dim, m.vit_depth, m.vit_num_heads, m.patch_size) == (64, 2, 1, 8)  # not the preset's ViT-S
    assert plan.reasons["vit_depth"] == "the shape of --init-from"
    assert m.init_from == str(source.resolve()) and m.init_from_sha256 == sha256_file(source)
    assert plan_init(_config(face_folder, source, vit_depth=2)).config.model.vit_depth == 2  # given and equal
    with pytest.raises(ConfigError, match=r"--vit-embed-dim 128 \(the source's is 64\), --vit-depth 3 \(the source's "
                                          r"is 2\); drop those flags"):
        plan_init(_config(face_folder, source, vit_depth=3, vit_embed_dim=128, vit_num_heads=1))


def test_crop_sizes_move_to_multiples_of_a_patch_14_source(face_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(_vit(patch=14, image=56).state_dict(), path)
    settings = {k: v for k, v in RUN.items() if k not in ("image_size", "local_crop_size")}
    plan = plan_init(face_config({**settings, "init_from": str(path)}, face_folder))
    assert (plan.config.model.image_size, plan.config.data.local_crop_size) == (112, 42)  # the preset's 112 and 48
    assert plan.reasons["local_crop_size"] == "the nearest multiple of --init-from's patch 14 to 48 px"
    assert "image_size" not in plan.reasons  # 112 is a multiple of 14 already
    assert plan.tensors["pos_embed"].shape == (1, 1 + 8 * 8, 64)  # resampled from 4 x 4 to 8 x 8 patches
    with pytest.raises(ConfigError, match="--local-crop-size 48 is not a multiple of --init-from's patch size 14; "
                                          "use 42"):
        plan_init(face_config({**settings, "init_from": str(path), "local_crop_size": 48}, face_folder))
    # Sizes given for the source's patch are not checked against the preset's patch 16 before it is known.
    given = plan_init(face_config({**settings, "init_from": str(path), "image_size": 56, "local_crop_size": 28},
                                  face_folder))
    assert (given.config.model.image_size, given.config.data.local_crop_size, given.config.model.patch_size) == \
        (56, 28, 14)


def test_auto_derives_a_head_warmup_layer_decay_and_a_smaller_lr_and_reference_none(face_folder: Path,
                                                                                    source: Path) -> None:
    scratch = resolve(face_config({**RUN, "vit_embed_dim": 64, "vit_depth": 2, "vit_num_heads": 1}, face_folder), 48)
    plan = plan_init(_config(face_folder, source))
    auto = resolve(plan.config, 48, plan.reasons)
    o = auto.config.optim
    assert o.head_warmup_epochs * 6 == pytest.approx(2)  # a fifth of the 12 steps
    assert o.layer_decay == 0.75 and auto.config.model.zero_mean_patches is False
    assert o.learning_rate == pytest.approx(scratch.config.optim.learning_rate / 4)
    # the teacher starts trained, so it moves at DINO's pace, not at a random start's
    assert (auto.config.method.teacher_momentum_base, scratch.config.method.teacher_momentum_base) == (0.996, 0.99)
    assert (scratch.config.optim.head_warmup_epochs, scratch.config.optim.layer_decay) == (0.0, 1.0)
    assert not any(n.startswith(("head_warmup", "layer_decay")) for n in scratch.notes())  # nothing new to read
    reference = resolve(plan_init(_config(face_folder, source, recipe="reference")).config, 48).config.optim
    assert (reference.head_warmup_epochs, reference.layer_decay) == (0.0, 1.0)


def test_an_official_training_checkpoints_dino_head_is_loaded_and_the_warmup_short(face_folder: Path,
                                                                                  training_source: Path,
                                                                                  tmp_path: Path) -> None:
    settings = {k: v for k, v in RUN.items() if not k.startswith(("out_dim", "head_"))}
    settings["output_dir"] = str(tmp_path / "run")
    config = face_config({**settings, "init_from": str(training_source)}, face_folder)
    plan = plan_init(config)
    m = plan.config.model
    assert (m.out_dim, m.head_hidden_dim, m.head_bottleneck_dim, m.init_heads) == (48, 40, 8, True)
    assert any("Loaded the source's DINO head" in note for note in plan.notes)
    assert resolve(plan.config, 48, plan.reasons).config.optim.head_warmup_epochs * 6 == pytest.approx(1)  # 5 %
    # A head setting the user gave that the source's head does not have: the heads start fresh.
    fresh = plan_init(face_config({**settings, "init_from": str(training_source), "out_dim": 64}, face_folder))
    assert not fresh.heads and not fresh.config.model.init_heads
    result = fit(config, Recorder())
    assert result.epoch_losses  # it trains with the carried-over head


def test_a_source_that_changed_since_the_configuration_recorded_it_is_refused(face_folder: Path, source: Path,
                                                                              tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not the file this configuration recorded"):
        plan_init(_config(face_folder, source, init_from_sha256="0" * 64))
    with pytest.raises(CheckpointError, match="is not a file"):
        plan_init(_config(face_folder, tmp_path / "missing.pth"))


# ============ training: the start, the warm-up, the switch ============


def test_a_source_trained_with_zero_mean_filters_keeps_the_constraint_bit_for_bit(face_folder: Path,
                                                                                 tmp_path: Path) -> None:
    # A dinopre `auto` run leaves its patch filters at zero mean per channel; continuing it without the constraint
    # would let colour back into its features, and with it nothing may move before training starts.
    vit = _vit(seed=5)
    with torch.no_grad():
        weight = vit.patch_embed.proj.weight
        weight.sub_(weight.mean(dim=(2, 3), keepdim=True))
    path = tmp_path / "zero_mean.pth"
    torch.save(vit.state_dict(), path)
    plan = plan_init(_config(face_folder, path))
    resolved = resolve(plan.config, 48, plan.reasons)
    assert resolved.config.model.zero_mean_patches is True
    assert "zero-mean already" in resolved.derived["zero_mean_patches"]
    out = tmp_path / "run"
    fit(with_settings(plan.config, {"epochs": 1, "head_warmup_epochs": 1, "output_dir": str(out)}), Recorder())
    state = _state(out / "checkpoint_last.pt")
    for network in ("student", "teacher"):  # the warm-up leaves the filters as they were, not re-centred
        assert torch.equal(_backbone(state, network)["patch_embed.proj.weight"], vit.patch_embed.proj.weight)
    reference = resolve(plan_init(_config(face_folder, path, recipe="reference")).config, 48).config.model
    assert reference.zero_mean_patches is False


def test_the_run_starts_with_the_sources_function_and_scores_it_as_epoch_0(face_folder: Path, source: Path,
                                                                           labelled_folder: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    recorder = Recorder()
    fit(_config(face_folder, source, epochs=1, eval_dir=str(labelled_folder), output_dir=str(out)), recorder)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["type"] == "epoch")
    assert (first["epoch"], first["step"], first["source"]) == (0, 0, True)
    # The source's own k-NN, computed independently of dinopre from the file's tensors.
    vit = _vit()
    assert first["knn"] == pytest.approx(_independent_knn(vit.eval(), labelled_folder), abs=1e-6)
    assert any(isinstance(e, Notice) and "own k-NN on --eval-dir" in e.message for e in recorder.events)
    saved = [e.global_step for e in recorder.events if isinstance(e, CheckpointSaved)]
    assert saved[0] == 0  # checkpoint_best.pt held the source before the first step
    params = json.loads((out / "params.json").read_text())
    assert params["config"]["model"]["init_from_sha256"] == sha256_file(source)
    assert _state(out / "checkpoint_last.pt")["config"]["model"]["init_from_sha256"] == sha256_file(source)


def test_the_backbone_stays_the_source_bit_for_bit_while_the_heads_warm_up(face_folder: Path, source: Path,
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    fit(_config(face_folder, source, epochs=1, head_warmup_epochs=1, output_dir=str(out)), Recorder())
    state, original = _state(out / "checkpoint_last.pt"), torch.load(source, weights_only=True)
    for network in ("student", "teacher"):
        backbone = _backbone(state, network)
        assert all(torch.equal(backbone[k], original[k]) for k in original), network
    assert not torch.equal(state["student"]["head.mlp.0.weight"], state["teacher"]["head.mlp.0.weight"])
    # AdamW never saw the backbone: its moments start at the step it joins.
    groups = state["optimizer"]["param_groups"]
    backbone_ids = {i for g in groups if g["backbone"] for i in g["params"]}
    assert backbone_ids and not backbone_ids & set(state["optimizer"]["state"])


def test_resume_is_bit_for_bit_through_the_switch_and_needs_no_source(face_folder: Path, source: Path,
                                                                      labelled_folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "source.pth"
    copy.write_bytes(source.read_bytes())

    def config(out: Path):  # the switch after step 6 of 18; checkpoints every 4 steps
        # with --eval-dir: the source's score (epoch 0) travels in the checkpoint and must not block the resume
        return _config(face_folder, copy, epochs=3, head_warmup_epochs=1, checkpoint_every=4, output_dir=str(out),
                       eval_dir=str(labelled_folder))

    fit(config(tmp_path / "straight"), Recorder())
    with pytest.raises(KeyboardInterrupt):
        fit(config(tmp_path / "stopped"), StopAt(CheckpointSaved, 4))
    copy.unlink()  # a resume reads the weights from its checkpoint, never the source
    resumed_config, checkpoint = resume_config(tmp_path / "stopped", {})  # what `dinopre resume` runs
    fit(resumed_config, Recorder(), resume_from=checkpoint)
    straight, resumed = _state(tmp_path / "straight" / "checkpoint_last.pt"), \
        _state(tmp_path / "stopped" / "checkpoint_last.pt")
    for network in ("student", "teacher"):
        assert all(torch.equal(straight[network][k], resumed[network][k]) for k in straight[network]), network
    assert [r["epoch"] for r in resumed["evaluations"]] == [0, 1, 2, 3]
    assert [r["knn"] for r in resumed["evaluations"]] == [r["knn"] for r in straight["evaluations"]]
    original = torch.load(source, weights_only=True)
    assert not torch.equal(_backbone(straight, "student")["blocks.0.attn.qkv.weight"],
                           original["blocks.0.attn.qkv.weight"])  # after the switch the backbone trains


def test_layer_decay_scales_each_layers_lr_and_the_warmup_holds_the_backbone(face_folder: Path,
                                                                            source: Path) -> None:
    from dinopre.model.optim import apply_schedules
    from dinopre.train.build import build_run

    parts = build_run(_config(face_folder, source, epochs=1, layer_decay=0.5, head_warmup_epochs=0.5))
    apply_schedules(parts.optimizer, 1.0, 0.1, backbone_scale=0.5)
    by_layer = {g.get("layer"): g["lr"] for g in parts.optimizer.param_groups}
    # 2 blocks: embeddings at 0.5^3, block 0 at 0.5^2, block 1 at 0.5, the final norm at 1; times the scale
    assert by_layer == {None: 1.0, 0: 0.0625, 1: 0.125, 2: 0.25, 3: 0.5}
    assert [parts.schedules.at(s)["backbone_scale"] for s in range(6)] == [0.0, 0.0, 0.0, 1 / 6, 2 / 6, 3 / 6]


def test_runs_without_init_from_keep_the_two_optimizer_groups(face_folder: Path) -> None:
    from dinopre.train.build import build_run

    parts = build_run(face_config(RUN | {"vit_embed_dim": 64, "vit_depth": 2, "vit_num_heads": 1, "epochs": 1},
                                  face_folder))
    assert [g["name"] for g in parts.optimizer.param_groups] == ["decay", "no_decay"]
    assert "backbone_scale" not in parts.schedules.at(0)


def test_two_processes_freeze_the_backbone_too(face_folder: Path, source: Path, tmp_path: Path) -> None:
    """DDP does not allow requires_grad to change after it wraps the model: the warm-up drops the gradients."""
    out = tmp_path / "two"
    args = ["train", "face", "--train-dir", str(face_folder), "--init-from", str(source), "--output-dir", str(out),
            "--epochs", "1", "--head-warmup-epochs", "1", "--quiet",
            *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items() if k not in ("epochs", "head_bottleneck_dim")]]
    for rank, (code, err) in enumerate(finish(start_ranks([args, args]))):
        assert code == 0, f"rank {rank}: {err[-2000:]}"
    state, original = _state(out / "checkpoint_last.pt"), torch.load(source, weights_only=True)
    assert state["world_size"] == 2
    for network in ("student", "teacher"):
        assert all(torch.equal(_backbone(state, network)[k], original[k]) for k in original), network


# ============ the command line ============

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, list(args), prog_name="dinopre")


def test_init_from_with_resume_and_on_resume_is_refused_with_the_reason(source: Path, tmp_path: Path) -> None:
    done = _cli("train", "face", "--demo", "--init-from", str(source), "--resume", str(tmp_path))
    assert done.exit_code == 2 and "--init-from starts a new run" in done.output and "Traceback" not in done.output
    done = _cli("resume", str(tmp_path), "--init-from", str(source))
    assert done.exit_code == 2 and "needs no source file" in done.output


@pytest.mark.parametrize(("write", "says"), [
    (lambda p: p.write_text("not a checkpoint"), "not a readable"),
    (lambda p: torch.save({**_vit().state_dict(), "blocks.0.attn.qkv.weight": torch.zeros(150, 64)}, p), "qkv"),
    (lambda p: torch.save({"weights": [1, 2]}, p), "not a backbone export"),
])
def test_a_bad_source_is_one_sentence_and_exit_2(face_folder: Path, tmp_path: Path, write: Any, says: str) -> None:
    path = tmp_path / "bad.pth"
    write(path)
    done = _cli("train", "face", "--train-dir", str(face_folder), "--init-from", str(path), "--output-dir",
                str(tmp_path / "run"))
    assert done.exit_code == 2 and says in done.output and "Traceback" not in done.output
    assert not (tmp_path / "run").exists()  # refused before anything was written
