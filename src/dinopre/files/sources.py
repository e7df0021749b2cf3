"""Reading a public or dinopre checkpoint as a ViT backbone: `read_source(path)` recognises the file by its content
(never its name) and returns the backbone in dinopre's names, with the shape, LayerNorm eps and input normalisation
its function needs, and any DINO head it carries. `dinopre convert`, `inspect-checkpoint` and `train --init-from`
all read sources through it.

Files are loaded as `inspect-checkpoint` loads them: `torch.load(weights_only=True)` (nothing in them is run), with
one class allowed besides tensors and plain values, `argparse.Namespace`, because official DINO training
checkpoints keep their arguments in one (it holds attributes, never code). `.safetensors` files are recognised by
their header and read with the optional `safetensors` package.
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dinopre.base.errors import CheckpointError
from dinopre.files import layouts
from dinopre.files.checkpoint import KIND_BACKBONE, KIND_TRAINING, load_file, sha256_file
from dinopre.files.layouts import SourceError
from dinopre.files.schema import expected_backbone_shapes

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

DINOPRE_TRAINING, DINOPRE_EXPORT = "dinopre-training", "dinopre-export"
DESCRIPTIONS = {
    **layouts.DESCRIPTIONS,
    DINOPRE_TRAINING: "dinopre training checkpoint",
    DINOPRE_EXPORT: "dinopre backbone export",
    **{f"{name}-training": f"training checkpoint holding a {text}" for name, text in layouts.DESCRIPTIONS.items()},
    f"{layouts.DINO}-training": "official DINO training checkpoint",
    f"{layouts.DINOV2}-training": "DINOv2 training checkpoint",
}

# The LayerNorm eps each layout's own model code uses (transformers: its config's default unless a config.json
# beside the file says otherwise).
_EPS = {layouts.DINO: 1e-6, layouts.DINOV2: 1e-6, layouts.TIMM: 1e-6, layouts.HF_VIT: 1e-12,
        layouts.HF_DINOV2: 1e-6}

_HEAD_PARTS = {"mlp.0.weight": ("hidden", "width"), "mlp.0.bias": ("hidden",), "mlp.2.weight": ("hidden", "hidden"),
               "mlp.2.bias": ("hidden",), "mlp.4.weight": ("bottleneck", "hidden"), "mlp.4.bias": ("bottleneck",),
               "last_layer.weight_g": ("prototypes", 1), "last_layer.weight_v": ("prototypes", "bottleneck")}


@dataclass(frozen=True)
class Source:
    """A checkpoint read as a ViT backbone.

    Attributes:
        path: the file.
        layout: the recognised layout (a key of `DESCRIPTIONS`).
        sha256: of the file.
        tensors: the backbone in dinopre's names (no mask token), fp32, LayerScale folded; it still expects the
            source's own input normalisation (`convert.pipeline_tensors` folds that).
        backbone: the ViT the tensors describe, as an export's metadata['backbone'].
        layer_norm_eps: the eps the source's own model code uses.
        normalization: the source's input mean and std (for RGB in [0, 1]).
        heads: a DINO head in dinopre's names (`head.mlp.0.weight`, ..., `head.last_layer.weight_v`), else empty.
        mask_token: the source's (1, D) mask token, if any.
        weights: `teacher` or `student` for training checkpoints, else None.
        notes: what was folded, dropped or assumed, one sentence each.
    """

    path: Path
    layout: str
    sha256: str
    tensors: dict[str, torch.Tensor]
    backbone: dict[str, Any]
    layer_norm_eps: float
    normalization: dict[str, list[float]]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    mask_token: torch.Tensor | None = None
    weights: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def description(self) -> str:
        """The layout in words, e.g. 'DINOv2 ViT checkpoint'."""
        return DESCRIPTIONS[self.layout]


def read_source(path: str | Path, *, weights: str = "teacher", mean: list[float] | None = None,
                std: list[float] | None = None) -> Source:
    """Recognise a checkpoint by its content and read its backbone.

    Args:
        path: a dinopre export or training checkpoint, an official DINO backbone or training checkpoint, a DINOv2
            checkpoint, a timm ViT state dict, or a Hugging Face ViTModel / Dinov2Model (.pth, .pt, .bin or
            .safetensors).
        weights: of a training checkpoint, `teacher` or `student`.
        mean, std: the source's input normalisation, when it is not what its layout implies (a state dict does
            not record it; e.g. 0.5 for many timm ViTs).

    Raises:
        CheckpointError: not a readable checkpoint, code in the pickle, an unknown layout, a variant dinopre's ViT
            cannot represent exactly, or tensors that disagree; one sentence each.
    """
    path = Path(path)
    obj = load_source_file(path)
    if obj.get("kind") == KIND_TRAINING:
        source = _read_dinopre_training(path, weights)
    elif is_dinopre_export(obj, path):
        source = _read_dinopre_export(path)
    else:
        source = _read_public(obj, path, weights)
    if mean is not None or std is not None:
        normalization = {"mean": [float(v) for v in mean or source.normalization["mean"]],
                         "std": [float(v) for v in std or source.normalization["std"]]}
        notes = tuple(n for n in source.notes if "normalisation" not in n)  # the assumption no longer holds
        source = replace(source, normalization=normalization, notes=notes)
    return source


def load_source_file(path: Path) -> dict[str, Any]:
    """Load a torch or safetensors file safely onto the CPU (see the module's docstring).

    Raises:
        CheckpointError: missing, empty, unreadable, or holding objects other than tensors, plain values and an
            argparse.Namespace.
    """
    path = Path(path)
    if path.is_file() and _is_safetensors(path):
        return _load_safetensors(path)
    return load_file(path, allowed=(argparse.Namespace,))


def _is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header's JSON."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 2 <= struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file as load_safetensors
    except ImportError:
        raise CheckpointError(f"'{path}' is a .safetensors file, which needs the safetensors package: pip install "
                              '"dinopre[safetensors]".') from None
    try:
        return dict(load_safetensors(str(path), device="cpu"))
    except Exception:  # the reader raises its own error types for damaged headers and truncated data
        raise CheckpointError(f"'{path}' is not a readable safetensors file (truncated or corrupt).") from None


def is_dinopre_export(obj: dict[str, Any], path: Path) -> bool:
    """Whether a loaded file is a dinopre backbone export: `slt` ({"model", "metadata"}) or a `timm` state dict
    whose JSON sidecar says so."""
    if "model" in obj and "metadata" in obj:
        return True
    sidecar = path.with_suffix(".json")
    return "cls_token" in obj and _json_beside(sidecar).get("kind") == KIND_BACKBONE


def _json_beside(path: Path) -> dict[str, Any]:
    """A small JSON object next to a source (a sidecar or a Hugging Face config), or {} when absent or unreadable."""
    try:
        if not path.is_file() or path.stat().st_size > 1 << 20:
            return {}
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_dinopre_training(path: Path, weights: str) -> Source:
    from dinopre.files.checkpoint import backbone_metadata
    from dinopre.files.export import backbone_state
    from dinopre.files.state import load_training_checkpoint

    state = load_training_checkpoint(path)
    network = state.teacher if weights == "teacher" else state.student
    metadata = backbone_metadata(state.config, epoch=state.epoch, weights=weights)
    tensors = {k: v.float() for k, v in backbone_state({weights: network}, weights).items()}
    heads = {k: v.float() for k, v in network.items() if k.startswith("head.")}
    return Source(path, DINOPRE_TRAINING, sha256_file(path), tensors, metadata["backbone"], 1e-5,
                  metadata["normalization"], heads, network.get("backbone.mask_token"), weights)


def _read_dinopre_export(path: Path) -> Source:
    from dinopre.files.export import load_backbone_file

    model, metadata = load_backbone_file(path)  # the export's own schema checks and strict load
    tensors = {k: v.detach().float() for k, v in model.state_dict().items()}
    return Source(path, DINOPRE_EXPORT, sha256_file(path), tensors, dict(metadata["backbone"]),
                  float(metadata.get("layer_norm_eps", 1e-5)), metadata.get("normalization") or IMAGENET)


def _read_public(obj: dict[str, Any], path: Path, weights: str) -> Source:
    state, wrapper, head_state = _unwrap(obj, weights)
    if state is None:
        raise _unknown(obj, path)
    mapping = layouts.strip_prefix(state, ("module.", "backbone.", "vit.", "dinov2."))
    stripped = {short: state[name] for name, short in mapping.items()}
    layout = layouts.recognise(stripped)
    if layout is None:
        raise _unknown(stripped, path)
    what = DESCRIPTIONS[layout] if wrapper is None else DESCRIPTIONS[f"{layout}-training"]
    config = _json_beside(path.parent / "config.json")  # Hugging Face and timm downloads come with one
    named, backbone, dropped = _checked_backbone(stripped, layout, config, path, what)
    tensors, notes = assemble(named, backbone)
    if dropped:
        notes.append(f"Left out {', '.join(dropped)} (a classifier or pooler, not part of the CLS features).")
    eps, normalization, more = _function_settings(layout, path, config)
    heads, head_note = _dino_head(head_state, backbone["embed_dim"])
    notes += more + ([head_note] if head_note else [])
    layout_name = layout if wrapper is None else f"{layout}-training"
    return Source(path, layout_name, sha256_file(path), tensors, backbone, eps, normalization, heads,
                  named.get("mask_token"), weights if wrapper else None, tuple(notes))


def _checked_backbone(state: dict[str, torch.Tensor], layout: str, config: dict[str, Any], path: Path,
                      what: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The source's tensors under dinopre's names, the ViT they describe, and the classifier names left out; every
    name, shape and value is checked before anything is computed from them.

    Raises:
        SourceError: a variant that cannot be represented exactly, or tensors that disagree.
    """
    layouts.refuse_unrepresentable(state, path, what)
    renames, dropped = layouts.rename(state, layout)
    if len(set(renames.values())) < len(renames):
        twice = sorted(theirs for theirs, ours in renames.items() if list(renames.values()).count(ours) > 1)
        raise SourceError(f"'{path}' ({what}) holds the same tensor twice under different names: "
                          f"{', '.join(twice[:4])}.")
    shapes = {ours: tuple(state[theirs].shape) for theirs, ours in renames.items()}
    hint = config.get("num_attention_heads") if layout in (layouts.HF_VIT, layouts.HF_DINOV2) else None
    backbone = layouts.infer_backbone(shapes, path, what, hint if _positive_int(hint) else None)
    layouts.check_source_shapes(backbone, shapes, path, what)
    _check_floating(state, path, what)
    return {ours: state[theirs] for theirs, ours in renames.items()}, backbone, dropped


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _unwrap(obj: dict[str, Any], weights: str) -> tuple[dict[str, Any] | None, str | None, dict[str, Any]]:
    """The backbone state dict inside a file, what wrapped it, and the DINO head's tensors (without prefix).

    A training checkpoint (official DINO: {"teacher": {"backbone.*", "head.*"}, "student": {"module.backbone.*",
    ...}, "args": Namespace, ...}; DINOv2's teacher checkpoints likewise with `dino_head.*`) gives the `weights`
    network's backbone; {"state_dict": ...} and {"model": ...} wrappers are opened; a plain state dict is itself.
    """
    teacher = obj.get("teacher")
    if _tensor_dict(teacher) and any(k.removeprefix("module.").startswith("backbone.") for k in teacher):
        if not _tensor_dict(obj.get(weights)):
            raise CheckpointError(f"This training checkpoint has no {weights} weights; pass --weights teacher.")
        network = {k.removeprefix("module."): v for k, v in obj[weights].items()}
        backbone = {k.removeprefix("backbone."): v for k, v in network.items() if k.startswith("backbone.")}
        heads = {re.sub(r"^(dino_head|head)\.", "", k): v for k, v in network.items()
                 if k.startswith(("head.", "dino_head."))}
        return backbone, "training", heads
    for key in ("state_dict", "model", "module"):
        if _tensor_dict(obj.get(key)):
            return obj[key], None, {}
    if _tensor_dict(obj):
        return obj, None, {}
    return None, None, {}


def _unknown(obj: dict[str, Any], path: Path) -> CheckpointError:
    names = ", ".join(str(k) for k in list(obj)[:4]) + (" ..." if len(obj) > 4 else "")
    return SourceError(f"'{path}' is not a backbone export, a training checkpoint or a ViT layout that dinopre "
                       "convert knows (official DINO or DINOv2, timm, Hugging Face ViTModel or Dinov2Model); its "
                       f"first entries are: {names or 'none'}.")


def _check_floating(state: dict[str, torch.Tensor], path: Path, what: str) -> None:
    for name, tensor in state.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise SourceError(f"'{path}' ({what}): {name} is not a finite floating-point tensor.")


def assemble(named: dict[str, torch.Tensor], backbone: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """dinopre's backbone tensors from checked, renamed source tensors: separate q/k/v projections fused (rows
    q|k|v), LayerScale folded exactly into the linear layer before it (`g * (W x + b) = (g W) x + g b`), missing
    biases filled with zeros (a layer without bias adds zero).

    Returns:
        The tensors (fp32, exactly the names and shapes of `expected_backbone_shapes`) and notes on what changed.
    """
    d, notes = backbone["embed_dim"], []
    tensors = {k: v.detach().to("cpu", torch.float32) for k, v in named.items() if k != "mask_token"}
    fused = ls = False
    for i in range(backbone["depth"]):
        block = f"blocks.{i}."
        if block + "attn.q.weight" in tensors:
            fused = True
            for part in ("weight", "bias"):
                pieces = [tensors.pop(f"{block}attn.{x}.{part}", None) for x in "qkv"]
                if any(p is not None for p in pieces):
                    tensors[f"{block}attn.qkv.{part}"] = torch.cat(
                        [p if p is not None else torch.zeros(d) for p in pieces])
        for gamma, layer in (("ls1.gamma", "attn.proj"), ("ls2.gamma", "mlp.fc2")):
            scale = tensors.pop(block + gamma, None)
            if scale is None:
                continue
            ls = True
            weight = tensors[f"{block}{layer}.weight"]
            bias = tensors.get(f"{block}{layer}.bias", torch.zeros(weight.shape[0]))
            tensors[f"{block}{layer}.weight"] = scale[:, None] * weight
            tensors[f"{block}{layer}.bias"] = scale * bias
    expected = expected_backbone_shapes(backbone)
    filled = [k for k in expected if k not in tensors]
    for name in filled:  # only biases can be missing here (check_source_shapes)
        tensors[name] = torch.zeros(expected[name])
    if fused:
        notes.append("Fused the separate query, key and value projections into one qkv layer (rows q|k|v).")
    if ls:
        notes.append("Folded LayerScale exactly into the layer before it: gamma * (W x + b) = (gamma W) x + gamma b.")
    if filled:
        notes.append(f"Filled {len(filled)} missing biases with zeros (a layer without bias).")
    return tensors, notes


def _function_settings(layout: str, path: Path, config: dict[str, Any]) -> tuple[float, dict[str, list[float]],
                                                                                  list[str]]:
    """The LayerNorm eps and input normalisation of a public layout (a Hugging Face or timm config beside the file
    wins over the layout's default), and a note when the normalisation is an assumption."""
    eps, normalization, notes = _EPS[layout], IMAGENET, []
    hf = layout in (layouts.HF_VIT, layouts.HF_DINOV2)
    if hf and isinstance(config.get("layer_norm_eps"), float) and 0 < config["layer_norm_eps"] < 1:
        eps = config["layer_norm_eps"]
    if hf and config.get("hidden_act", "gelu") != "gelu":
        raise SourceError(f"'{path}' ({DESCRIPTIONS[layout]}): its config.json sets hidden_act "
                          f"{config['hidden_act']!r}; dinopre's ViT uses the exact GELU.")
    given = _json_beside(path.parent / "preprocessor_config.json") if hf else config.get("pretrained_cfg") or {}
    mean, std = given.get("image_mean", given.get("mean")), given.get("image_std", given.get("std"))
    if _three_numbers(mean) and _three_numbers(std) and all(s > 0 for s in std):
        normalization = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
        notes.append(f"Input normalisation mean {normalization['mean']} std {normalization['std']} from the "
                     f"{'preprocessor_config' if hf else 'config'}.json beside it.")
    elif layout == layouts.TIMM:
        notes.append("A timm state dict does not record its input normalisation: ImageNet's is assumed; pass "
                     "--source-mean 0.5 0.5 0.5 --source-std 0.5 0.5 0.5 for a model trained with 0.5 (many timm "
                     "ViTs).")
    return eps, normalization, notes


def _three_numbers(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _dino_head(state: dict[str, torch.Tensor], width: int) -> tuple[dict[str, torch.Tensor], str | None]:
    """A DINO head (3-layer MLP, L2 norm, weight-normalised prototypes) in dinopre's names, if the source's fits."""
    if not state:
        return {}, None
    state = {re.sub(r"last_layer\.parametrizations\.weight\.original0$", "last_layer.weight_g",
                    re.sub(r"last_layer\.parametrizations\.weight\.original1$", "last_layer.weight_v", k)): v
             for k, v in state.items()}
    refused = ("Its DINO head does not have the layout of dinopre's (3 linear layers, weight-normalised "
               "prototypes) and is not carried over.")
    if set(state) != set(_HEAD_PARTS):
        return {}, refused
    sizes: dict[str, int] = {"width": width}
    for name, dims in _HEAD_PARTS.items():
        shape = tuple(state[name].shape)
        if len(shape) != len(dims) or not state[name].is_floating_point():
            return {}, refused
        for dim, size in zip(dims, shape, strict=True):
            if size != (dim if isinstance(dim, int) else sizes.setdefault(dim, size)):
                return {}, refused
    heads = {f"head.{k}": v.detach().float() for k, v in state.items()}
    return heads, (f"Carries a DINO head: {width} -> {sizes['hidden']} -> {sizes['hidden']} -> "
                   f"{sizes['bottleneck']}, {sizes['prototypes']} prototypes.")
