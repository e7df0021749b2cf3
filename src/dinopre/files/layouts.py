"""Public ViT state-dict layouts: which one a set of tensor names is, and how its names map onto dinopre's.

Everything here works on names and shapes only; nothing is read from disk and no tensor is allocated until the
whole source has been checked, so a file whose tensors disagree is one sentence before any work is done.

The layouts (all pre-norm ViTs with a CLS token, learned absolute position embeddings and a GELU MLP):
- official DINO `vision_transformer.py` and timm `VisionTransformer`: `cls_token`, `pos_embed`,
  `patch_embed.proj`, `blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}`, `norm` (dinopre's own
  names); timm adds a classifier `head`, and LayerScale `blocks.i.ls1.gamma` / `ls2.gamma` in some models;
- DINOv2 (`dinov2/models/vision_transformer.py`): the same plus LayerScale and a `mask_token`, blocks optionally
  grouped in chunks (`blocks.c.i.`);
- Hugging Face transformers `ViTModel` and `Dinov2Model`: `embeddings.*`, separate query/key/value projections
  under `encoder.layer.i.attention.attention`, and `layernorm_before` / `layernorm_after` (ViT) or `norm1` /
  `norm2` with `layer_scale1.lambda1` (DINOv2).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from dinopre.files.schema import SchemaError, expected_backbone_shapes

DINO, DINOV2, TIMM, HF_VIT, HF_DINOV2 = "dino", "dinov2", "timm", "hf-vit", "hf-dinov2"

DESCRIPTIONS = {
    DINO: "official DINO ViT backbone",
    DINOV2: "DINOv2 ViT checkpoint",
    TIMM: "timm ViT state dict",
    HF_VIT: "Hugging Face ViTModel",
    HF_DINOV2: "Hugging Face Dinov2Model",
}

# Head width of every ViT these layouts ship (ViT-Ti/S/B/L and DINOv2's g): the number of attention heads is not
# stored in the weights, so it is the embedding width / 64 unless the source says otherwise.
HEAD_DIM = 64

# Parts of other ViT variants that dinopre's plain ViT cannot compute exactly: (name pattern, what it is).
_UNREPRESENTABLE = (
    (re.compile(r"(^|\.)(register_tokens|reg_token|storage_tokens)$"), "register tokens"),
    (re.compile(r"rope|(^|\.)freqs"), "rotary position embeddings (RoPE, as in DINOv3)"),
    (re.compile(r"\.mlp\.(w12|w3|weights_in|weights_out|fc1_g|fc1_x)\."), "a SwiGLU MLP"),
    (re.compile(r"\.attn\.(q_norm|k_norm)\.|\.attention\.attention\.(q_norm|k_norm)"), "query/key normalisation"),
    (re.compile(r"relative_position"), "relative position biases"),
    (re.compile(r"(^|\.)norm_pre\."), "a LayerNorm before the blocks"),
    (re.compile(r"(^|\.)fc_norm\."), "average pooling of the patch tokens (fc_norm) instead of the CLS token"),
)

# Tensors a source may carry that are not part of the backbone's CLS features: dropped, and said so.
_CLASSIFIERS = re.compile(r"^(head\.(weight|bias)|pooler\..*|classifier\..*)$")

_HF_BLOCK = {
    "attention.attention.query.": "attn.q.", "attention.attention.key.": "attn.k.",
    "attention.attention.value.": "attn.v.", "attention.output.dense.": "attn.proj.",
    "layernorm_before.": "norm1.", "layernorm_after.": "norm2.", "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.", "norm1.": "norm1.", "norm2.": "norm2.", "mlp.fc1.": "mlp.fc1.",
    "mlp.fc2.": "mlp.fc2.", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.mask_token": "mask_token", "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias", "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


class SourceError(SchemaError):
    """A checkpoint that `dinopre convert` cannot turn into the same function (the message says what it saw)."""


def strip_prefix(names: Iterable[str], prefixes: Iterable[str]) -> dict[str, str]:
    """Map each name to itself without the first of `prefixes` that every backbone name starts with (wrappers such
    as DDP's `module.` or a task model's `vit.`), repeatedly; names that do not all share one are kept whole."""
    mapping = {name: name for name in names}
    changed = True
    while changed and mapping:
        changed = False
        for prefix in prefixes:
            # A task model's classifier sits beside its backbone (`vit.*` and `classifier.*`): it does not count.
            wrapped = [short for short in mapping.values() if not _CLASSIFIERS.match(short)]
            if wrapped and all(short.startswith(prefix) for short in wrapped):
                mapping = {name: short.removeprefix(prefix) for name, short in mapping.items()}
                changed = True
    return mapping


def refuse_unrepresentable(names: Iterable[str], path: Any, what: str) -> None:
    """Refuse a variant that dinopre's plain ViT cannot compute exactly, naming the first tensor that shows it.

    Raises:
        SourceError: register tokens, RoPE, SwiGLU, qk-norm, relative position biases, a pre-norm or fc_norm.
    """
    for name in names:
        for pattern, variant in _UNREPRESENTABLE:
            if pattern.search(name):
                raise SourceError(f"'{path}' ({what}) uses {variant} (it holds '{name}'), which dinopre's plain ViT "
                                  "cannot represent exactly, so it is not converted.")


def recognise(names: Iterable[str]) -> str | None:
    """The layout a state dict's (prefix-stripped) names follow, or None."""
    names = set(names)
    if any(n.startswith("encoder.layer.") for n in names) and any(n.startswith("embeddings.") for n in names):
        dinov2 = any(".layer_scale1." in n or re.match(r"encoder\.layer\.\d+\.norm1\.", n) for n in names)
        return HF_DINOV2 if dinov2 else HF_VIT
    if {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= names and any(n.startswith("blocks.") for n in names):
        if "mask_token" in names:
            return DINOV2
        return TIMM if any(_CLASSIFIERS.match(n) or ".ls1." in n for n in names) else DINO
    return None


def rename(names: Iterable[str], layout: str) -> tuple[dict[str, str], list[str]]:
    """dinopre's name for each tensor of a source in `layout`, and the classifier tensors that are left out.

    Names beyond dinopre's backbone: `blocks.i.attn.{q,k,v}.*` (separate projections, fused later),
    `blocks.i.ls{1,2}.gamma` (LayerScale, folded later) and `mask_token`.

    Returns:
        {source name: dinopre name} for every backbone tensor, and the dropped names.
    """
    mapping, dropped = {}, []
    for name in names:
        if _CLASSIFIERS.match(name):
            dropped.append(name)
            continue
        mapping[name] = _hf_name(name) if layout in (HF_VIT, HF_DINOV2) else _vit_name(name)
    return mapping, sorted(dropped)


def _vit_name(name: str) -> str:
    # DINOv2 with block chunks: chunk c holds blocks under their global index, `blocks.c.i.` -> `blocks.i.`.
    return re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", name)


def _hf_name(name: str) -> str:
    if name in _HF_TOP:
        return _HF_TOP[name]
    match = re.match(r"encoder\.layer\.(\d+)\.(.*)$", name)
    if match:
        for theirs, ours in _HF_BLOCK.items():
            if match.group(2).startswith(theirs):
                return f"blocks.{match.group(1)}.{ours}{match.group(2)[len(theirs):]}"
    return name  # unknown: reported as a tensor dinopre has no place for


def infer_backbone(shapes: Mapping[str, tuple[int, ...]], path: Any, what: str,
                   num_heads: int | None = None) -> dict[str, Any]:
    """The ViT description (metadata['backbone']) that a source's tensors imply, from their shapes alone.

    Args:
        shapes: dinopre name -> shape, as `rename` gives.
        path: the file, for messages.
        what: the layout's description, for messages.
        num_heads: the head count when the source states it (else embedding width / 64).

    Raises:
        SourceError: a missing part, non-square patches, a position embedding that is not a square grid plus one,
            or blocks that are not numbered 0..depth-1.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in shapes:
            raise SourceError(f"'{path}' ({what}) has no {key}, so the ViT it describes is not known.")
    cls, patch, pos, fc1 = (shapes[k] for k in ("cls_token", "patch_embed.proj.weight", "pos_embed",
                                                 "blocks.0.mlp.fc1.weight"))
    if len(cls) != 3 or cls[:2] != (1, 1):
        raise SourceError(f"'{path}' ({what}): its cls_token has the shape {cls}, not (1, 1, width).")
    width = cls[2]
    if len(patch) != 4 or patch[0] != width:
        raise SourceError(f"'{path}' ({what}): its patch embedding has the shape {patch}, not ({width}, channels, "
                          "patch, patch).")
    if patch[2] != patch[3]:
        raise SourceError(f"'{path}' ({what}) has non-square {patch[2]} x {patch[3]} patches, which dinopre's ViT "
                          "cannot represent.")
    grid = math.isqrt(max(pos[1] - 1, 0)) if len(pos) == 3 else 0
    if len(pos) != 3 or pos[0] != 1 or pos[2] != width or grid < 1 or grid * grid != pos[1] - 1:
        raise SourceError(f"'{path}' ({what}): its position embedding has the shape {pos}, which is not a square "
                          f"grid of patches plus one CLS position of width {width}.")
    if num_heads is not None and width % num_heads:
        raise SourceError(f"'{path}' ({what}) says it has {num_heads} attention heads, which do not divide its width "
                          f"{width}.")
    return {"image_size": grid * patch[2], "patch_size": patch[2], "in_channels": patch[1], "embed_dim": width,
            "depth": _depth(shapes, path, what), "num_heads": num_heads or _heads(width, path, what),
            "mlp_ratio": _mlp_ratio(width, fc1, path, what), "dropout": 0.0, "attention_dropout": 0.0,
            "stochastic_dropout": 0.0}


def _depth(shapes: Mapping[str, Any], path: Any, what: str) -> int:
    indices = {int(m.group(1)) for name in shapes if (m := re.match(r"blocks\.(\d+)\.", name))}
    depth = max(indices) + 1
    if indices != set(range(depth)):
        missing = min(set(range(depth)) - indices)
        raise SourceError(f"'{path}' ({what}) has blocks up to {depth - 1} but no block {missing}.")
    return depth


def _heads(width: int, path: Any, what: str) -> int:
    if width % HEAD_DIM:
        raise SourceError(f"'{path}' ({what}) does not store its number of attention heads, and its width {width} "
                          f"is not a multiple of the usual head width {HEAD_DIM}, so it cannot be inferred.")
    return width // HEAD_DIM


def _mlp_ratio(width: int, fc1: tuple[int, ...], path: Any, what: str) -> float:
    hidden = fc1[0] if len(fc1) == 2 else 0
    ratio = hidden / width
    if hidden < 1 or int(width * ratio) != hidden:
        raise SourceError(f"'{path}' ({what}): its first MLP layer has the shape {fc1}, which dinopre's ViT of width "
                          f"{width} cannot hold.")
    return ratio


def expected_source_shapes(b: Mapping[str, Any], names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The shape each dinopre-named source tensor must have for the ViT `b`: the backbone's own tensors, plus the
    separate q/k/v projections, LayerScale gammas and mask token where the source has them."""
    shapes = expected_backbone_shapes(b)
    d = b["embed_dim"]
    for i in range(b["depth"]):
        for part in "qkv":
            shapes.update({f"blocks.{i}.attn.{part}.weight": (d, d), f"blocks.{i}.attn.{part}.bias": (d,)})
        shapes.update({f"blocks.{i}.ls1.gamma": (d,), f"blocks.{i}.ls2.gamma": (d,)})
    shapes["mask_token"] = (1, d)
    names = set(names)
    fused = {k for k in shapes if re.search(r"\.attn\.qkv\.", k)}
    if any(re.search(r"\.attn\.[qkv]\.", n) for n in names):
        shapes = {k: v for k, v in shapes.items() if k not in fused}
    else:
        shapes = {k: v for k, v in shapes.items() if not re.search(r"\.attn\.[qkv]\.", k)}
    return shapes


def check_source_shapes(b: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], path: Any, what: str) -> None:
    """Check every tensor against the ViT the source implies, before anything is fused, folded or allocated.

    Raises:
        SourceError: a tensor of the wrong shape (e.g. a qkv of the wrong width), a missing one, or one that
            dinopre's ViT has no place for.
    """
    expected = expected_source_shapes(b, shapes)
    optional = {k for k in expected if re.search(r"\.ls[12]\.gamma$|^mask_token$|\.bias$", k)}
    extra = sorted(k for k in shapes if k not in expected)
    if extra:
        raise SourceError(f"'{path}' ({what}) holds tensors dinopre's ViT has no place for: {', '.join(extra[:3])}"
                          f"{' ...' if len(extra) > 3 else ''}; converting without them would change its function.")
    missing = [k for k in expected if k not in shapes and k not in optional]
    if missing:
        raise SourceError(f"'{path}' ({what}) lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}.")
    for name, shape in shapes.items():
        if tuple(shape) != expected[name]:
            raise SourceError(f"'{path}' ({what}): {name} has the shape {tuple(shape)}, not {expected[name]} as its "
                              f"other tensors imply (a ViT of width {b['embed_dim']}, depth {b['depth']}, patch "
                              f"{b['patch_size']}); its tensors disagree.")
