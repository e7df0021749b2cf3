"""Backbone files: export from a checkpoint, the pipeline's `file::PATH[:MODEL]` loader, verification, inspection.

Formats (README "The export format"):
- `slt` (default): {"model": state_dict, "metadata": {...}} with the translation pipeline's key names
  (`nn.MultiheadAttention` in_proj/out_proj, `mlp.0`/`mlp.3`). The pipeline loads it with strict=False, so a
  wrong key would silently stay random; everything here loads strictly.
- `timm`: a plain state dict with the official DINO / timm `vit_small_patch16_224` key names (`attn.qkv`,
  `attn.proj`, `mlp.fc1`/`mlp.fc2`), loadable with `timm.create_model(..., num_classes=0, checkpoint_path=F)`.
  timm builds LayerNorm with eps 1e-6 where this backbone uses 1e-5: on the trained demo checkpoint that moves the
  CLS features by 2.4e-3 relative; `norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)` in
  `timm.create_model` makes them equal (files written by `dinopre convert` record their own eps in the sidecar).
Both get a JSON sidecar with the same stem holding the metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinopre.base.errors import ConfigError
from dinopre.config.settings import EvalConfig, PretrainConfig
from dinopre.files.checkpoint import (
    KIND_BACKBONE,
    KIND_TRAINING,
    SLT_RENAMES,
    CheckpointError,
    atomic_save,
    atomic_write_text,
    backbone_metadata,
    load_file,
    sha256_file,
    slt_state_dict,
)
from dinopre.files.outputs import check_export_paths, check_parent_writable
from dinopre.files.schema import check_backbone_metadata, check_backbone_tensors
from dinopre.files.state import TrainingState, load_training_checkpoint
from dinopre.model.vit import VisionTransformer, count_parameters

MODEL_NAMES = ("slt_vitsmall_patch16", "dinopre_vit")


def backbone_state(state: dict[str, Any], weights: str) -> dict[str, torch.Tensor]:
    """The `teacher` or `student` backbone of a training checkpoint's contents (`TrainingState.to_dict()`), without
    the `backbone.` prefix or mask token."""
    prefix = "backbone."
    return {k.removeprefix(prefix): v for k, v in state[weights].items()
            if k.startswith(prefix) and k != "backbone.mask_token"}


def build_backbone(metadata: dict[str, Any]) -> VisionTransformer:
    """An untrained ViT with the architecture an export's metadata describes."""
    b = metadata["backbone"]
    return VisionTransformer(image_size=b["image_size"], patch_size=b["patch_size"], in_channels=b["in_channels"],
                             embed_dim=b["embed_dim"], depth=b["depth"], num_heads=b["num_heads"],
                             mlp_ratio=b["mlp_ratio"])


def _from_slt(name: str) -> str:
    for ours, theirs in SLT_RENAMES:
        if theirs in name:
            return name.replace(theirs, ours)
    return name


def write_backbone(tensors: dict[str, torch.Tensor], metadata: dict[str, Any], output: str | Path, *,
                   fmt: str = "slt", force: bool = False, inputs: Iterable[Path] = (), what: str = "The export",
                   flag: str = "--force") -> tuple[Path, Path]:
    """The one writer of backbone files (`train --export-backbone` and `dinopre export`): check both paths, write
    the export and its JSON sidecar atomically, then load the export back strictly into a fresh ViT.

    Args:
        tensors: the backbone's state dict with dinopre's names (no `backbone.` prefix; the mask token is dropped).
        metadata: what `backbone_metadata` gives, completed by the caller.
        output: the export's path; the sidecar gets the same stem and `.json`.
        fmt: `slt` (the pipeline's key names) or `timm`.
        force: an existing export (and sidecar) may be replaced.
        inputs: files the command reads, never to be replaced.
        what: how to name the output in messages.
        flag: the option that allows replacing.

    Returns:
        The export path and the sidecar path.

    Raises:
        RunDirError: a path must not or cannot be written.
        CheckpointError: the written file does not load back strictly (a bug, never silently).
    """
    output = Path(output)
    sidecar = check_export_paths(output, force=force, inputs=inputs, what=what, flag=flag)
    check_parent_writable(output, what.lower())
    tensors = {name: tensor for name, tensor in tensors.items() if name != "mask_token"}
    metadata = {**metadata, "format": fmt}
    if fmt == "slt":
        atomic_save({"model": slt_state_dict(tensors), "metadata": metadata}, output)
    else:
        atomic_save({k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}, output)
    atomic_write_text(json.dumps(metadata, indent=2) + "\n", sidecar)
    load_backbone_file(output)  # strict reload: a wrong key fails here, not silently in the pipeline
    return output, sidecar


def export_checkpoint(checkpoint: str | Path, output: str | Path, *, fmt: str = "slt", weights: str = "teacher",
                      force: bool = False) -> tuple[Path, Path, str | None]:
    """Write a checkpoint's backbone as a file the pipeline (slt) or timm loads, plus its JSON sidecar.

    The written file is loaded back strictly into a fresh ViT before this returns. When the checkpoint is in a run
    directory whose run has ended, the export and its sha256 are recorded in its artifacts.json; a live run's
    folder is left to that run.

    Returns:
        The export path, the sidecar path, and a note when the export could not be recorded in the run directory.

    Raises:
        RunDirError: an output path must not be written (exists without `force`, is the checkpoint, ...).
        CheckpointError: the checkpoint is not a readable dinopre training checkpoint.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    check_export_paths(output, force=force, inputs=[checkpoint])  # before the (slow) load
    state = load_training_checkpoint(checkpoint)
    metadata = backbone_metadata(state.config, epoch=state.epoch, weights=weights)
    metadata["source_checkpoint"] = str(checkpoint)
    output, sidecar = write_backbone(backbone_state(state.to_dict(), weights), metadata, output, fmt=fmt,
                                     force=force, inputs=[checkpoint])
    return output, sidecar, _record_in_run_dir(checkpoint.parent, output, sidecar, fmt, state.epoch)


def _record_in_run_dir(folder: Path, output: Path, sidecar: Path, fmt: str, epoch: int) -> str | None:
    """Add an export to the run directory's artifacts.json, unless a live run holds the folder."""
    from dinopre.files.rundir import ARTIFACTS, RunDirectory

    if not (folder / ARTIFACTS).exists():
        return None
    files = RunDirectory(folder)
    if not files.try_lock():
        return (f"The run in '{folder}' is still training, so the export is not recorded in its artifacts.json "
                "(only the run writes its folder).")
    try:
        files.load_artifacts()
        files.record(output, f"export-{fmt}", epoch=epoch)
        files.record(sidecar, "export-metadata", epoch=epoch)
    finally:
        files.unlock()
    return None


def load_backbone_file(path: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """Load an `slt` or `timm` export strictly into a fresh ViT (eval mode).

    Raises:
        CheckpointError: not a backbone export, missing metadata, or keys/shapes that do not match exactly.
    """
    path = Path(path)
    obj = load_file(path)
    if obj.get("kind") == KIND_TRAINING:
        raise CheckpointError(f"'{path}' is a training checkpoint, not a backbone; export it first with "
                              f"`dinopre export {path} backbone.pt`.")
    if "model" in obj and "metadata" in obj:
        metadata, tensors = obj["metadata"], obj["model"]
        if isinstance(tensors, dict):
            tensors = {_from_slt(k) if isinstance(k, str) else k: v for k, v in tensors.items()}
    else:
        sidecar = path.with_suffix(".json")
        if not ("cls_token" in obj and sidecar.is_file()):
            raise CheckpointError(f"'{path}' is not a backbone export (no 'model' and 'metadata' entries, and no "
                                  "timm-style state dict with a .json sidecar).")
        try:
            metadata, tensors = json.loads(sidecar.read_text(encoding="utf-8")), obj
        except (OSError, ValueError, RecursionError):
            raise CheckpointError(f"The metadata sidecar '{sidecar}' of '{path}' is not readable JSON.") from None
    # Numbers and shapes are checked against each other before anything is built: a file cannot make this
    # allocate a ViT its tensors do not back up.
    description = check_backbone_metadata(metadata, path)
    check_backbone_tensors(description, tensors, path)
    model = build_backbone(metadata)
    model.load_state_dict(tensors, strict=True)
    return model.eval(), metadata


def load_any_backbone(path: str | Path, weights: str = "teacher") -> tuple[VisionTransformer, dict[str, Any]]:
    """A backbone from an export (`slt` or `timm`) or from a training checkpoint (its `weights`), in eval mode.

    Raises:
        CheckpointError: neither, or damaged.
    """
    obj = load_file(Path(path))
    if obj.get("kind") != KIND_TRAINING:
        return load_backbone_file(path)
    state = TrainingState.from_dict(obj, path)
    metadata = backbone_metadata(state.config, epoch=state.epoch, weights=weights)
    model = build_backbone(metadata)
    model.load_state_dict(backbone_state(state.to_dict(), weights), strict=True)
    return model.eval(), metadata


def parse_spec(spec: str) -> tuple[Path, str]:
    """Split `file::PATH[:MODEL]` into the path and the model name (default `slt_vitsmall_patch16`).

    Raises:
        CheckpointError: the spec does not start with `file::` or names an unknown model.
    """
    if not isinstance(spec, str) or not spec.startswith("file::") or len(spec) == len("file::"):
        raise CheckpointError(f"Backbone spec {spec!r} must look like 'file::PATH' or 'file::PATH:MODEL'.")
    rest = spec[len("file::"):]
    path, _, model = rest.rpartition(":")
    if not path or "/" in model or "\\" in model or model.endswith((".pt", ".pth")):
        return Path(rest), MODEL_NAMES[0]  # no model part (or a ':' inside the path, e.g. a Windows drive)
    if model not in MODEL_NAMES:
        raise CheckpointError(f"Unknown backbone model {model!r} in {spec!r}; use one of: {', '.join(MODEL_NAMES)}.")
    return Path(path), model


def load_dinov2_backbone(spec: str) -> VisionTransformer:
    """Load an exported backbone from a `file::PATH[:MODEL]` spec, as the translation pipeline does, but strictly.

    Args:
        spec: e.g. "file::work_dirs/dino_face/backbone.pt:slt_vitsmall_patch16".

    Returns:
        A ViT in eval mode whose `forward(x)` gives (B, D) CLS features for (B, 3, H, W) normalised images.

    Raises:
        CheckpointError: a bad spec, a missing file, a file that is not a backbone, or mismatched keys.
    """
    path, _ = parse_spec(spec)
    if not path.is_file():
        raise CheckpointError(f"Backbone file '{path}' (from {spec!r}) does not exist.")
    return load_backbone_file(path)[0]


@dataclass
class VerifyReport:
    """Outcome of `verify_backbone`: one (check, passed, detail) row per check."""

    rows: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(passed for _, passed, _ in self.rows)

    def add(self, check: str, passed: bool, detail: str) -> bool:
        self.rows.append((check, passed, detail))
        return passed


@torch.no_grad()
def verify_backbone(path: str | Path, *, checkpoint: str | Path | None = None,
                    image_size: int | None = None) -> VerifyReport:
    """Check an export: strict load through the spec loader, forward passes at two sizes, and optionally the same
    features as the checkpoint's teacher (relative error < 1e-4 in fp32)."""
    report = VerifyReport()
    try:
        model = load_dinov2_backbone(f"file::{path}")
        metadata = load_backbone_file(path)[1]
    except CheckpointError as exc:
        report.add("loads strictly", False, str(exc))
        return report
    b = metadata["backbone"]
    report.add("loads strictly", True, f"ViT {b['embed_dim']}-d, depth {b['depth']}, {b['num_heads']} heads, "
                                       f"patch {b['patch_size']}, {count_parameters(model) / 1e6:.2f}M parameters")
    native = b["image_size"]
    other = image_size or (native + 2 * b["patch_size"])
    if other < b["patch_size"] or other % b["patch_size"]:
        raise ConfigError(f"--image-size {other} is not a positive multiple of the backbone's patch size "
                          f"{b['patch_size']}; pass e.g. --image-size {native + 2 * b['patch_size']}.")
    generator = torch.Generator().manual_seed(0)
    for size in dict.fromkeys((native, other)):
        images = torch.randn(2, b["in_channels"], size, size, generator=generator)
        features = model(images)
        good = features.shape == (2, b["embed_dim"]) and bool(torch.isfinite(features).all())
        report.add(f"forward at {size} px", good, f"output {tuple(features.shape)}, finite: "
                                                   f"{bool(torch.isfinite(features).all())}")
    if checkpoint is not None:
        _compare_with_checkpoint(report, model, metadata, Path(checkpoint))
    return report


def _compare_with_checkpoint(report: VerifyReport, model: VisionTransformer, metadata: dict[str, Any],
                             checkpoint: Path) -> None:
    try:
        state = load_training_checkpoint(checkpoint)
        reference = build_backbone(metadata)
        reference.load_state_dict(backbone_state(state.to_dict(), metadata.get("weights", "teacher")), strict=True)
    except (CheckpointError, RuntimeError) as exc:
        report.add("same features as the checkpoint", False, str(exc).splitlines()[0])
        return
    size = metadata["backbone"]["image_size"]
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    ours, theirs = model(images), reference.eval()(images)
    error = ((ours - theirs).norm() / theirs.norm().clamp_min(1e-12)).item()
    report.add("same features as the checkpoint", error < 1e-4,
               f"relative error {error:.2e} against the {metadata.get('weights', 'teacher')} of {checkpoint.name}")


def inspect_file(path: str | Path) -> dict[str, Any]:
    """A summary of a dinopre training checkpoint or backbone export, or of a checkpoint `dinopre convert` takes
    (its layout and what it would become).

    Raises:
        CheckpointError: the file is neither (the sentence says what it saw).
    """
    from dinopre.files.convert import describe_source
    from dinopre.files.sources import is_dinopre_export, load_source_file, read_source

    path = Path(path)
    obj = load_source_file(path)
    info: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if obj.get("kind") == KIND_TRAINING:
        return {**info, **_inspect_training(TrainingState.from_dict(obj, path))}
    if not is_dinopre_export(obj, path):
        return {**info, **describe_source(read_source(path))}
    model, metadata = load_backbone_file(path)
    if metadata.get("kind") != KIND_BACKBONE:
        raise CheckpointError(f"'{path}' is not a dinopre file.")
    keys = ("format", "format_version", "dinopre_version", "preset", "stream", "algorithm", "weights", "epoch")
    return {**info, "kind": "backbone export", **{k: metadata.get(k) for k in keys}, **_converted_from(metadata),
            "backbone": metadata["backbone"], "parameters": {"backbone": count_parameters(model)}}


def _converted_from(metadata: dict[str, Any]) -> dict[str, Any]:
    """Where a file written by `dinopre convert` came from (nothing for an export of a dinopre run)."""
    source = metadata.get("source")
    if not isinstance(source, dict):
        return {}
    return {"converted_from": f"{source.get('description')} '{source.get('path')}' (sha256 "
                              f"{str(source.get('sha256'))[:12]}...)",
            "layer_norm_eps": f"{metadata.get('layer_norm_eps', 1e-5):g}"}


def _inspect_training(state: TrainingState) -> dict[str, Any]:
    config = state.config
    counts: dict[str, int] = {}
    for side, weights in (("student", state.student), ("teacher", state.teacher)):
        for name, tensor in weights.items():
            part = f"{side} {name.split('.')[0].replace('_', ' ')}"
            counts[part] = counts.get(part, 0) + tensor.numel()
    losses = [float(x) for x in state.epoch_losses]
    history = {"epochs": len(losses)}
    if losses:
        history.update(first=losses[0], last=losses[-1], min=min(losses), max=max(losses))
    m, d, o = config["model"], config["data"], config["optim"]
    return {
        "kind": "training checkpoint",
        "format_version": state.format_version,
        "dinopre_version": state.dinopre_version,
        "algorithm": config["method"]["algorithm"],
        "preset": config["preset"],
        "epoch": state.epoch,
        "epochs_planned": o["epochs"],
        "step_in_epoch": state.step_in_epoch,
        "global_step": state.global_step,
        "best_loss": state.best_loss if math.isfinite(state.best_loss) else None,
        "best_epoch": state.best_epoch,
        "world_size": state.world_size,  # training processes that wrote it (any number may resume)
        "trackers": dict(state.trackers),  # --logger runs a resume continues
        "config": {
            "model": f"ViT {m['vit_embed_dim']}-d depth {m['vit_depth']} heads {m['vit_num_heads']} patch "
                     f"{m['patch_size']} at {m['image_size']} px, K={m['out_dim']}",
            "data": f"{'demo' if d['demo'] and not d['train_dir'] else ', '.join(d['train_dir'])}; 2 x "
                    f"{m['image_size']} + {d['num_local_crops']} x {d['local_crop_size']} px crops",
            "optim": f"{o['epochs']} epochs, batch {o['batch_size']}, lr {o['learning_rate'] or 'auto'}",
        },
        "parameters": counts,
        "loss_history": history,
        **_inspect_evaluations(state.evaluations, config),
    }


def _inspect_evaluations(evaluations: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The last epoch's feature signals and the k-NN history of a training checkpoint (none before version 0.2)."""
    records = [r for r in evaluations if isinstance(r, dict)]
    if not records:
        return {}
    last = records[-1]
    shown = ("knn", "rankme", "feature_spread", "teacher_entropy", "entropy_max", "prototypes_used",
             "top_prototype_share", "collapse")
    out: dict[str, Any] = {"features": {"epoch": last.get("epoch"), **{k: last[k] for k in shown if k in last}}}
    knn = [(r["epoch"], r["knn"]) for r in records if r.get("knn") is not None]
    if knn:
        best_epoch, best = max(knn, key=lambda pair: pair[1])
        out["knn_history"] = {"evaluations": len(knn), "first": knn[0][1], "last": knn[-1][1], "best": best,
                              "best_epoch": best_epoch}
    # The checkpoint holds the configuration as plain values; the rule that resolves an unset --best-by is the
    # configuration's own, asked of just the two settings it reads (the rest may predate today's validation).
    eval_config = config.get("eval", {})
    asked = PretrainConfig(config["preset"], eval=EvalConfig(eval_dir=eval_config.get("eval_dir"),
                                                             best_by=eval_config.get("best_by")))
    out["best_by"] = asked.resolved_best_by
    return out
