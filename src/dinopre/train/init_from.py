"""Continued pretraining: a run whose backbones start from a trained checkpoint (`dinopre train --init-from SOURCE`).

Practitioners with a few thousand crops start from public weights (official DINO ViT-S/16 is exactly the
pipeline's `slt_vitsmall_patch16`) and continue self-supervised training on their own domain (dino#193, dinov2#204).
What this module decides before anything is built:
- the source is read as `dinopre convert` reads it (`files.sources.read_source`: recognised by content, LayerScale
  folded, tensors checked against each other before anything is allocated beyond the file), then mapped to the
  pipeline's function (`files.convert.pipeline_tensors`: ImageNet normalisation, the run's image size), so the run
  trains exactly what the pipeline will load;
- the model's shape comes from the source. A shape setting the user gave (flag or config file) that differs is
  refused; one the preset or `--demo` chose is replaced. Image sizes are not shape: unless given, the global and
  local crop sizes move to the nearest multiple of the source's patch (112 and 48 px become 112 and 42 for patch
  14), and the position embedding is resampled once (bicubic) for the global size;
- a DINO head that the source carries (official training checkpoints) is loaded when its shape can be the run's,
  which makes the recipe's head warm-up short; otherwise the heads start fresh.
The recipe then derives the head warm-up, the layer decay and the lr (`config.recipe`). Only a new run reads the
source: a resume finds the weights in its checkpoint and the source's sha256 in its configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinopre.base.errors import CheckpointError, ConfigError
from dinopre.config.settings import PretrainConfig, setting, with_settings
from dinopre.files.convert import pipeline_tensors
from dinopre.files.sources import Source, read_source
from dinopre.model.method import StudentTeacher, zero_mean_filters

# The run's shape settings and the source's backbone keys they come from.
SHAPE = {"vit_embed_dim": "embed_dim", "vit_depth": "depth", "vit_num_heads": "num_heads", "patch_size": "patch_size",
         "vit_mlp_ratio": "mlp_ratio"}
SIZES = ("image_size", "local_crop_size")


@dataclass(frozen=True)
class InitPlan:
    """How a new run starts from its source.

    Attributes:
        config: the configuration with the source's shape, the adapted crop sizes, the source's absolute path and
            sha256, and (when its DINO head is loaded) the head's shape.
        reasons: why each setting taken from the source has its value, as the recipe's reasons are kept.
        source: the source as read.
        tensors: its backbone in dinopre's names at the run's image size, for ImageNet-normalised inputs.
        heads: its DINO head in dinopre's names (`head.mlp.0.weight`, ...), or empty when the heads start fresh.
        notes: what the user should know about the start, one sentence each.
    """

    config: PretrainConfig
    reasons: dict[str, str]
    source: Source
    tensors: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def plan_init(config: PretrainConfig) -> InitPlan:
    """Read `config.model.init_from` and fit the configuration to it.

    Args:
        config: a new run's validated configuration; `config.given` names the settings the user set.

    Raises:
        CheckpointError: the source is not a checkpoint dinopre can read, or changed since its sha256 was recorded.
        ConfigError: a shape setting the user gave differs from the source's, or a given crop size is not a
            multiple of its patch.
    """
    path = Path(config.model.init_from or "").expanduser()
    if not path.is_file():
        raise CheckpointError(f"--init-from '{path}' is not a file; pass a checkpoint dinopre convert takes (an "
                              "official DINO or DINOv2 file, a timm or Hugging Face ViT, a dinopre export).")
    source = read_source(path)
    recorded = config.model.init_from_sha256
    if recorded and recorded != source.sha256:
        raise CheckpointError(f"--init-from '{path}' is not the file this configuration recorded (sha256 "
                              f"{recorded[:12]}..., now {source.sha256[:12]}...); restore that file or drop "
                              "init_from_sha256 from the configuration.")
    values, reasons = _shape_settings(config, source)
    values.update(_crop_sizes(config, source.backbone["patch_size"], reasons))
    heads, head_values, head_note = _heads(config, source)
    values.update(head_values)
    reasons.update({name: "the shape of --init-from's DINO head" for name in head_values})
    values.update(init_from=str(path.resolve()), init_from_sha256=source.sha256, init_heads=bool(heads))
    tensors, _, converted = pipeline_tensors(source, values.get("image_size", config.model.image_size))
    values["init_zero_mean"] = zero_mean_filters(tensors["patch_embed.proj.weight"])
    planned = with_settings(config, values)
    b = source.backbone
    start = (f"Starts from '{path}' ({source.description}, sha256 {source.sha256[:12]}...): ViT {b['embed_dim']} wide, "
             f"{b['depth']} blocks, {b['num_heads']} heads, patch {b['patch_size']}, trained at {b['image_size']} px.")
    notes = (start, *source.notes, *converted, head_note)
    return InitPlan(planned, reasons, source, tensors, heads, tuple(n for n in notes if n))


def _shape_settings(config: PretrainConfig, source: Source) -> tuple[dict[str, Any], dict[str, str]]:
    """The source's shape as settings; a differing one that the user gave is refused, all of them in one sentence.

    Raises:
        ConfigError: given shape settings that differ from the source's, or a source without 3 input channels.
    """
    b = source.backbone
    if b.get("in_channels", 3) != 3:
        raise ConfigError(f"--init-from '{source.path}' takes {b['in_channels']} input channels; dinopre trains on "
                          "RGB crops (3).")
    values = {name: type(setting(config, name))(b[key]) for name, key in SHAPE.items()}
    clashes = [f"--{name.replace('_', '-')} {setting(config, name)} (the source's is {values[name]:g})"
               for name in SHAPE if name in config.given and setting(config, name) != values[name]]
    if clashes:
        raise ConfigError(f"--init-from '{source.path}' fixes the model's shape, which differs from "
                          f"{', '.join(clashes)}; drop those flags (the shape comes from the source).")
    reasons = {name: "the shape of --init-from" for name in SHAPE if setting(config, name) != values[name]}
    return values, reasons


def _crop_sizes(config: PretrainConfig, patch: int, reasons: dict[str, str]) -> dict[str, int]:
    """The global and local crop sizes as multiples of the source's patch: a given one must be, another moves to
    the nearest multiple (at least one patch).

    Raises:
        ConfigError: a given crop size is not a multiple of the source's patch.
    """
    values = {}
    for name in SIZES:
        size = setting(config, name)
        nearest = max(1, round(size / patch)) * patch
        if size % patch == 0:
            continue
        flag = f"--{name.replace('_', '-')}"
        if name in config.given:
            raise ConfigError(f"{flag} {size} is not a multiple of --init-from's patch size {patch}; use {nearest}.")
        values[name] = nearest
        reasons[name] = f"the nearest multiple of --init-from's patch {patch} to {size} px"
    return values


def _heads(config: PretrainConfig, source: Source) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """The source's DINO head, its shape as settings, and a note; no head when the source has none or the user gave
    head settings that differ from it."""
    if not source.heads:
        return {}, {}, "The heads start fresh (the source carries no DINO head)."
    shape = {"out_dim": source.heads["head.last_layer.weight_v"].shape[0],
             "head_hidden_dim": source.heads["head.mlp.0.weight"].shape[0],
             "head_bottleneck_dim": source.heads["head.mlp.4.weight"].shape[0]}
    differing = [name for name, value in shape.items() if name in config.given and setting(config, name) != value]
    if differing:
        shown = ", ".join(f"--{n.replace('_', '-')} {setting(config, n)}" for n in differing)
        return {}, {}, f"The heads start fresh: the source's DINO head does not have {shown}."
    if config.method.algorithm == "ibot" and not config.model.shared_head:
        note = "Loaded the source's DINO head for the CLS tokens; iBOT's separate patch head starts fresh."
    else:
        note = "Loaded the source's DINO head, so the head warm-up is short."
    return source.heads, shape, note


def load_init(method: StudentTeacher, plan: InitPlan) -> None:
    """Put the source's backbone (and DINO head) into the student and the teacher of a new run.

    Raises:
        CheckpointError: the tensors do not fit the model built from the planned configuration (a bug if ever).
    """
    state = dict(plan.tensors)
    token = plan.source.mask_token
    if method.student["backbone"].mask_token is not None and token is not None:
        state["mask_token"] = token.detach().float().reshape(method.student["backbone"].mask_token.shape)
    try:
        method.start_from(state, {k.removeprefix("head."): v for k, v in plan.heads.items()})
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"--init-from '{plan.source.path}' does not fit the model it planned ({exc}).") from None
