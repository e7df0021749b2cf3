"""`dinopre convert`: each public layout, built here as a tiny random state dict, converts to a file whose CLS
features equal the layout's own forward pass (written below from the ViT and LayerScale definitions, not from any
repository's code), through the pipeline's loader (tests/consumer.py) and dinopre's own ViT; plus the folding,
resampling, metadata and every refusal."""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from consumer import ConsumerViT
from torch import nn
from typer.testing import CliRunner

from dinopre.base.errors import CheckpointError, ConfigError, RunDirError
from dinopre.cli import app
from dinopre.files.checkpoint import sha256_file
from dinopre.files.convert import convert_source, fold_normalization
from dinopre.files.export import inspect_file, load_backbone_file
from dinopre.files.sources import IMAGENET, read_source

runner = CliRunner()

WIDTH, DEPTH, HIDDEN, PATCH, GRID = 128, 2, 256, 4, 4  # 2 heads of the usual width 64, 16 px inputs
IMAGE = PATCH * GRID


# ============ tiny random sources in each layout ============


def _random(generator: torch.Generator, *shape: int, scale: float = 0.1, around: float = 0.0) -> torch.Tensor:
    return around + scale * torch.randn(*shape, generator=generator)


def _vit_state(seed: int, *, layerscale: bool = False, mask_token: bool = False, classifier: bool = False,
               width: int = WIDTH) -> dict[str, torch.Tensor]:
    """Official DINO / timm / DINOv2 names: fused qkv (rows q|k|v), `ls1.gamma`, `mask_token`, a classifier `head`."""
    g = torch.Generator().manual_seed(seed)
    state = {"cls_token": _random(g, 1, 1, width, scale=0.5), "pos_embed": _random(g, 1, 1 + GRID * GRID, width,
                                                                                    scale=0.5),
             "patch_embed.proj.weight": _random(g, width, 3, PATCH, PATCH), "patch_embed.proj.bias": _random(g, width)}
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": _random(g, width, scale=0.3, around=1.0), b + "norm1.bias": _random(g, width),
            b + "attn.qkv.weight": _random(g, 3 * width, width), b + "attn.qkv.bias": _random(g, 3 * width),
            b + "attn.proj.weight": _random(g, width, width), b + "attn.proj.bias": _random(g, width),
            b + "norm2.weight": _random(g, width, scale=0.3, around=1.0), b + "norm2.bias": _random(g, width),
            b + "mlp.fc1.weight": _random(g, HIDDEN, width), b + "mlp.fc1.bias": _random(g, HIDDEN),
            b + "mlp.fc2.weight": _random(g, width, HIDDEN), b + "mlp.fc2.bias": _random(g, width)})
        if layerscale:
            state.update({b + "ls1.gamma": _random(g, width, scale=0.5, around=0.8),
                          b + "ls2.gamma": _random(g, width, scale=0.5, around=0.8)})
    state.update({"norm.weight": _random(g, width, scale=0.3, around=1.0), "norm.bias": _random(g, width)})
    if mask_token:
        state["mask_token"] = _random(g, 1, width)
    if classifier:
        state.update({"head.weight": _random(g, 10, width), "head.bias": _random(g, 10)})
    return state


def _hf_state(seed: int, *, dinov2: bool, width: int = WIDTH) -> dict[str, torch.Tensor]:
    """Hugging Face transformers names: `embeddings.*`, separate query/key/value, `encoder.layer.i.*`."""
    g = torch.Generator().manual_seed(seed)
    state = {"embeddings.cls_token": _random(g, 1, 1, width, scale=0.5),
             "embeddings.position_embeddings": _random(g, 1, 1 + GRID * GRID, width, scale=0.5),
             "embeddings.patch_embeddings.projection.weight": _random(g, width, 3, PATCH, PATCH),
             "embeddings.patch_embeddings.projection.bias": _random(g, width)}
    norm1, norm2, fc1, fc2 = (("norm1", "norm2", "mlp.fc1", "mlp.fc2") if dinov2 else
                              ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"))
    for i in range(DEPTH):
        b = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            state.update({f"{b}attention.attention.{part}.weight": _random(g, width, width),
                          f"{b}attention.attention.{part}.bias": _random(g, width)})
        state.update({
            f"{b}{norm1}.weight": _random(g, width, scale=0.3, around=1.0), f"{b}{norm1}.bias": _random(g, width),
            f"{b}attention.output.dense.weight": _random(g, width, width),
            f"{b}attention.output.dense.bias": _random(g, width),
            f"{b}{norm2}.weight": _random(g, width, scale=0.3, around=1.0), f"{b}{norm2}.bias": _random(g, width),
            f"{b}{fc1}.weight": _random(g, HIDDEN, width), f"{b}{fc1}.bias": _random(g, HIDDEN),
            f"{b}{fc2}.weight": _random(g, width, HIDDEN), f"{b}{fc2}.bias": _random(g, width)})
        if dinov2:
            state.update({f"{b}layer_scale1.lambda1": _random(g, width, scale=0.5, around=0.8),
                          f"{b}layer_scale2.lambda1": _random(g, width, scale=0.5, around=0.8)})
    state.update({"layernorm.weight": _random(g, width, scale=0.3, around=1.0), "layernorm.bias": _random(g, width)})
    if dinov2:
        state["embeddings.mask_token"] = _random(g, 1, width)
    else:
        state.update({"pooler.dense.weight": _random(g, width, width), "pooler.dense.bias": _random(g, width)})
    return state


# ============ each layout's own forward pass, from the definitions ============


def _vit_blocks(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Read a DINO / timm / DINOv2 block: the fused qkv rows are q, then k, then v."""
    blocks = []
    for i in range(DEPTH):
        b, width = f"blocks.{i}.", state["cls_token"].shape[-1]
        qkv_w, qkv_b = state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"]
        blocks.append({"n1": (state[b + "norm1.weight"], state[b + "norm1.bias"]),
                       "q": (qkv_w[:width], qkv_b[:width]), "k": (qkv_w[width:2 * width], qkv_b[width:2 * width]),
                       "v": (qkv_w[2 * width:], qkv_b[2 * width:]),
                       "proj": (state[b + "attn.proj.weight"], state[b + "attn.proj.bias"]),
                       "g1": state.get(b + "ls1.gamma", torch.ones(width)),
                       "n2": (state[b + "norm2.weight"], state[b + "norm2.bias"]),
                       "fc1": (state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"]),
                       "fc2": (state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"]),
                       "g2": state.get(b + "ls2.gamma", torch.ones(width))})
    return blocks


def _vit_parts(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"cls": state["cls_token"], "pos": state["pos_embed"],
            "patch": (state["patch_embed.proj.weight"], state["patch_embed.proj.bias"]),
            "blocks": _vit_blocks(state), "norm": (state["norm.weight"], state["norm.bias"])}


def _hf_parts(state: dict[str, torch.Tensor], *, dinov2: bool) -> dict[str, Any]:
    """Read a Hugging Face ViTModel / Dinov2Model: separate projections, LayerScale as `layer_scale*.lambda1`."""
    width = state["embeddings.cls_token"].shape[-1]
    norm1, norm2, fc1, fc2 = (("norm1", "norm2", "mlp.fc1", "mlp.fc2") if dinov2 else
                              ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"))

    def pair(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return state[name + ".weight"], state[name + ".bias"]

    blocks = []
    for i in range(DEPTH):
        b = f"encoder.layer.{i}."
        blocks.append({"n1": pair(b + norm1), "q": pair(b + "attention.attention.query"),
                       "k": pair(b + "attention.attention.key"), "v": pair(b + "attention.attention.value"),
                       "proj": pair(b + "attention.output.dense"),
                       "g1": state.get(b + "layer_scale1.lambda1", torch.ones(width)), "n2": pair(b + norm2),
                       "fc1": pair(b + fc1), "fc2": pair(b + fc2),
                       "g2": state.get(b + "layer_scale2.lambda1", torch.ones(width))})
    return {"cls": state["embeddings.cls_token"], "pos": state["embeddings.position_embeddings"],
            "patch": pair("embeddings.patch_embeddings.projection"), "blocks": blocks, "norm": pair("layernorm")}


def _attention(h: torch.Tensor, block: dict[str, Any], heads: int) -> torch.Tensor:
    """Multi-head self-attention (Vaswani et al. 2017): softmax(q k^T / sqrt(d)) v per head, then the projection."""
    B, N, D = h.shape
    d = D // heads

    def split(weight_bias: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.linear(h, *weight_bias).reshape(B, N, heads, d).transpose(1, 2)  # (B, heads, N, d)

    q, k, v = split(block["q"]), split(block["k"]), split(block["v"])
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(B, N, D), *block["proj"])


def _reference(images: torch.Tensor, parts: dict[str, Any], *, heads: int, eps: float,
               normalization: dict[str, list[float]]) -> torch.Tensor:
    """A pre-norm ViT's final-normed CLS token (Dosovitskiy et al. 2021) with LayerScale (Touvron et al. 2021:
    x + gamma * f(norm(x))), on RGB images in [0, 1] normalised the source's way."""
    mean, std = (torch.tensor(normalization[k])[:, None, None] for k in ("mean", "std"))
    x = (images - mean) / std
    weight = parts["patch"][0]
    tokens = F.conv2d(x, weight, parts["patch"][1], stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    tokens = torch.cat([parts["cls"].expand(len(tokens), -1, -1), tokens], dim=1) + parts["pos"]
    width = tokens.shape[-1]
    for block in parts["blocks"]:
        tokens = tokens + block["g1"] * _attention(F.layer_norm(tokens, (width,), *block["n1"], eps), block, heads)
        hidden = F.gelu(F.linear(F.layer_norm(tokens, (width,), *block["n2"], eps), *block["fc1"]))
        tokens = tokens + block["g2"] * F.linear(hidden, *block["fc2"])
    return F.layer_norm(tokens, (width,), *parts["norm"], eps)[:, 0]


# ============ running a converted file ============


def _images(size: int = IMAGE, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(seed))  # RGB in [0, 1]


def _imagenet(images: torch.Tensor) -> torch.Tensor:
    mean, std = (torch.tensor(IMAGENET[k])[:, None, None] for k in ("mean", "std"))
    return (images - mean) / std


def _with_eps(model: nn.Module, eps: float) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    return model.eval()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@torch.no_grad()
def _errors(output: Path, images: torch.Tensor, expected: torch.Tensor, eps: float) -> tuple[float, float]:
    """Relative errors of the converted file's CLS features, eps-matched, through the pipeline-style consumer and
    through dinopre's own ViT."""
    exported = torch.load(output, weights_only=True)  # as the pipeline loads it
    consumer = ConsumerViT(**exported["metadata"]["backbone"])
    missing, unexpected = consumer.load_state_dict(exported["model"], strict=False)
    assert missing == [] and unexpected == []
    ours = load_backbone_file(output)[0]
    x = _imagenet(images)
    return (_relative_error(_with_eps(consumer, eps)(x), expected),
            _relative_error(_with_eps(ours, eps)(x), expected))


def _convert(source: Path, tmp_path: Path, *args: str) -> tuple[Path, Any]:
    output = tmp_path / f"{source.stem}_converted.pt"
    result = runner.invoke(app, ["convert", str(source), str(output), *args], prog_name="dinopre")
    assert result.exit_code == 0, result.output
    return output, result


# ============ every layout gives the same function ============


LAYOUTS = {
    # name: (state dict, file name (deliberately misleading: recognition is by content), eps, reference parts)
    "dino": (lambda: _vit_state(1), "weights.bin", 1e-6, _vit_parts),
    "dinov2": (lambda: _vit_state(2, layerscale=True, mask_token=True), "dino_deitsmall16_pretrain.pth", 1e-6,
               _vit_parts),
    "timm": (lambda: _vit_state(3, layerscale=True, classifier=True), "dinov2_vits14.pth", 1e-6, _vit_parts),
    "hf-vit": (lambda: _hf_state(4, dinov2=False), "model.pt", 1e-12, lambda s: _hf_parts(s, dinov2=False)),
    "hf-dinov2": (lambda: _hf_state(5, dinov2=True), "pytorch_model.bin", 1e-6, lambda s: _hf_parts(s, dinov2=True)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_converts_to_the_same_function(layout: str, tmp_path: Path) -> None:
    make, name, eps, parts = LAYOUTS[layout]
    state = make()
    source = tmp_path / name
    torch.save(state, source)
    output, result = _convert(source, tmp_path)
    images = _images()
    expected = _reference(images, parts(state), heads=2, eps=eps, normalization=IMAGENET)
    consumer_error, ours_error = _errors(output, images, expected, eps)
    assert consumer_error < 1e-5 and ours_error < 1e-5
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["source"]["layout"] == layout and metadata["layer_norm_eps"] == eps
    assert metadata["backbone"] == {"image_size": IMAGE, "patch_size": PATCH, "in_channels": 3, "embed_dim": WIDTH,
                                    "depth": DEPTH, "num_heads": 2, "mlp_ratio": HIDDEN / WIDTH, "dropout": 0.0,
                                    "attention_dropout": 0.0, "stochastic_dropout": 0.0}
    assert "Wrote" in result.output and "load_dinov2_backbone" in result.output


def test_layerscale_and_classifiers_are_said_in_the_notes(tmp_path: Path) -> None:
    source = tmp_path / "timm.pth"
    torch.save(_vit_state(3, layerscale=True, classifier=True), source)
    _, result = _convert(source, tmp_path)
    assert "Folded LayerScale" in result.output and "Left out head.bias, head.weight" in result.output
    assert "does not record its input normalisation" in result.output


def test_the_pipelines_own_eps_differs_only_by_the_eps(tmp_path: Path) -> None:
    """Through the pipeline's loader (LayerNorm eps 1e-5) the error is the eps difference alone: small, not zero."""
    state = _vit_state(2, layerscale=True, mask_token=True)
    source = tmp_path / "dinov2.pth"
    torch.save(state, source)
    output, _ = _convert(source, tmp_path)
    images = _images()
    expected = _reference(images, _vit_parts(state), heads=2, eps=1e-6, normalization=IMAGENET)
    exported = torch.load(output, weights_only=True)
    consumer = ConsumerViT(**exported["metadata"]["backbone"])
    consumer.load_state_dict(exported["model"])
    with torch.no_grad():
        error = _relative_error(consumer.eval()(_imagenet(images)), expected)
    assert 0 < error < 1e-3


def test_mean_and_std_half_fold_into_the_patch_convolution(tmp_path: Path) -> None:
    state = _vit_state(3, layerscale=True, classifier=True)
    source = tmp_path / "augreg.pth"
    torch.save(state, source)
    output, result = _convert(source, tmp_path, "--source-mean", "0.5", "0.5", "0.5", "--source-std", "0.5", "0.5",
                              "0.5")
    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    images = _images()
    expected = _reference(images, _vit_parts(state), heads=2, eps=1e-6, normalization=half)
    assert max(_errors(output, images, expected, 1e-6)) < 1e-5
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["source"]["normalization"] == half and metadata["normalization"] == IMAGENET
    assert "Folded the source's input normalisation" in result.output
    assert "does not record its input normalisation" not in result.output


def test_fold_normalization_is_exact_for_any_affine_map() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {"patch_embed.proj.weight": torch.randn(8, 3, 4, 4, generator=g), "patch_embed.proj.bias": torch.randn(8)}
    source = {"mean": [0.2, 0.4, 0.6], "std": [0.3, 0.1, 0.7]}
    folded = fold_normalization(tensors, source)
    images = torch.rand(2, 3, 8, 8, generator=g)
    mean, std = (torch.tensor(source[k])[:, None, None] for k in ("mean", "std"))
    theirs = F.conv2d((images - mean) / std, *tensors.values(), stride=4)
    ours = F.conv2d(_imagenet(images), folded["patch_embed.proj.weight"], folded["patch_embed.proj.bias"], stride=4)
    assert _relative_error(ours, theirs) < 1e-6
    assert fold_normalization(tensors, IMAGENET) is tensors


def test_hugging_face_configs_beside_the_file_give_heads_eps_and_normalisation(tmp_path: Path) -> None:
    """A 96-wide ViT with 3 heads of 32: the head count is not in the weights; the config.json beside it says it."""
    state = _hf_state(6, dinov2=False, width=96)
    folder = tmp_path / "dino-vits"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"num_attention_heads": 3, "layer_norm_eps": 1e-6,
                                                    "hidden_act": "gelu"}))
    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": half["mean"],
                                                                 "image_std": half["std"]}))
    output, _ = _convert(folder / "pytorch_model.bin", tmp_path)
    images = _images()
    expected = _reference(images, _hf_parts(state, dinov2=False), heads=3, eps=1e-6, normalization=half)
    assert max(_errors(output, images, expected, 1e-6)) < 1e-5
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["backbone"]["num_heads"] == 3 and metadata["layer_norm_eps"] == 1e-6


def test_a_task_models_prefix_is_stripped_beside_its_classifier(tmp_path: Path) -> None:
    """ViTForImageClassification: the backbone under `vit.`, a `classifier` beside it."""
    state = _hf_state(4, dinov2=False)
    source = tmp_path / "classifier.bin"
    torch.save({**{f"vit.{k}": v for k, v in state.items()}, "classifier.weight": torch.zeros(10, WIDTH),
                "classifier.bias": torch.zeros(10)}, source)
    output, result = _convert(source, tmp_path)
    assert "Left out classifier.bias, classifier.weight, pooler.dense.bias, pooler.dense.weight" in result.output
    images = _images()
    expected = _reference(images, _hf_parts(state, dinov2=False), heads=2, eps=1e-12, normalization=IMAGENET)
    assert max(_errors(output, images, expected, 1e-12)) < 1e-5


def test_dinov2_block_chunks_are_read_by_their_global_index(tmp_path: Path) -> None:
    state = _vit_state(2, layerscale=True, mask_token=True)
    chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in state.items()}
    source = tmp_path / "chunked.pth"
    torch.save({"model": chunked}, source)
    output, _ = _convert(source, tmp_path)
    images = _images()
    expected = _reference(images, _vit_parts(state), heads=2, eps=1e-6, normalization=IMAGENET)
    assert max(_errors(output, images, expected, 1e-6)) < 1e-5


# ============ official DINO training checkpoints ============


def _dino_head(seed: int, prefix: str) -> dict[str, torch.Tensor]:
    """DINO's head (3 linear layers, GELU between, weight-normalised prototypes): 128 -> 32 -> 32 -> 16, K = 64."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"mlp.0.weight": (32, WIDTH), "mlp.0.bias": (32,), "mlp.2.weight": (32, 32), "mlp.2.bias": (32,),
              "mlp.4.weight": (16, 32), "mlp.4.bias": (16,), "last_layer.weight_g": (64, 1),
              "last_layer.weight_v": (64, 16)}
    return {prefix + name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}


def _dino_training_checkpoint(path: Path, **extra: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    teacher, student = _vit_state(7), _vit_state(8)
    torch.save({"teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **_dino_head(0, "head.")},
                "student": {**{f"module.backbone.{k}": v for k, v in student.items()},
                            **_dino_head(1, "module.head.")},
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005),
                "dino_loss": {"center": torch.zeros(1, 64)}, **extra}, path)
    return teacher, student


@pytest.mark.parametrize("weights", ["teacher", "student"])
def test_an_official_dino_training_checkpoint_loads_with_its_namespace(weights: str, tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pth"
    teacher, student = _dino_training_checkpoint(source)
    output, result = _convert(source, tmp_path, "--weights", weights)
    state = teacher if weights == "teacher" else student
    images = _images()
    expected = _reference(images, _vit_parts(state), heads=2, eps=1e-6, normalization=IMAGENET)
    assert max(_errors(output, images, expected, 1e-6)) < 1e-5
    assert "Carries a DINO head" in result.output and "64 prototypes" in result.output
    read = read_source(source, weights=weights)
    assert read.layout == "dino-training" and read.weights == weights
    head = _dino_head(0 if weights == "teacher" else 1, "")
    assert torch.equal(read.heads["head.last_layer.weight_v"], head["last_layer.weight_v"])
    assert json.loads(output.with_suffix(".json").read_text())["weights"] == weights


def test_only_the_namespace_is_allowed_besides_tensors(tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pth"
    _dino_training_checkpoint(source, output_dir=pathlib.PurePosixPath("/runs/dino"))
    result = runner.invoke(app, ["convert", str(source), str(tmp_path / "out.pt")])
    assert result.exit_code == 2 and "holds objects other than tensors and plain values" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out.pt").exists()


class _Payload:
    """Pickles as a call of `Path.touch`: proof that loading ran code if the marker file appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_that_needs_code_is_refused_without_running_it(tmp_path: Path) -> None:
    source, marker = tmp_path / "hostile.pth", tmp_path / "payload_ran"
    torch.save({**_vit_state(1), "payload": _Payload(marker)}, source)
    for command in (["convert", str(source), str(tmp_path / "out.pt")], ["inspect-checkpoint", str(source)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "holds objects other than tensors" in result.output
        assert "Traceback" not in result.output
    assert not marker.exists()


# ============ --image-size, metadata, inspect, outputs ============


def test_image_size_resamples_the_position_embedding_as_dinopre_does_on_the_fly(tmp_path: Path) -> None:
    source = tmp_path / "dinov2.pth"
    torch.save(_vit_state(2, layerscale=True, mask_token=True), source)
    native, _ = _convert(source, tmp_path)
    small = tmp_path / "small.pt"
    result = runner.invoke(app, ["convert", str(source), str(small), "--image-size", "8"])
    assert result.exit_code == 0 and "Resampled the position embedding from 4 x 4 to 2 x 2" in result.output
    exported = torch.load(small, weights_only=True)
    assert exported["metadata"]["backbone"]["image_size"] == 8
    assert exported["model"]["pos_embed"].shape == (1, 5, WIDTH)
    x = _imagenet(_images(8))
    with torch.no_grad():
        assert torch.equal(load_backbone_file(small)[0](x), load_backbone_file(native)[0](x))


def test_the_sidecar_records_source_sha256_eps_and_normalisation(tmp_path: Path) -> None:
    source = tmp_path / "dinov2.pth"
    torch.save(_vit_state(2, layerscale=True, mask_token=True), source)
    output, _ = _convert(source, tmp_path, "--format", "timm")
    metadata = json.loads(output.with_suffix(".json").read_text())
    assert metadata["format"] == "timm" and metadata["kind"] == "dinopre-backbone"
    assert metadata["source"]["sha256"] == sha256_file(source) and metadata["source"]["path"] == str(source)
    assert metadata["source"]["layer_norm_eps"] == 1e-6 and metadata["source"]["normalization"] == IMAGENET
    assert "mask_token" not in torch.load(output, weights_only=True)  # iBOT's token is not part of the backbone
    assert load_backbone_file(output)[1]["source"]["layout"] == "dinov2"


def test_convert_refuses_to_overwrite_without_force_and_never_writes_over_its_source(tmp_path: Path) -> None:
    source = tmp_path / "dino.pth"
    torch.save(_vit_state(1), source)
    output, _ = _convert(source, tmp_path)
    again = runner.invoke(app, ["convert", str(source), str(output)])
    assert again.exit_code == 2 and "already exists; pass --force" in again.output
    assert runner.invoke(app, ["convert", str(source), str(output), "--force"]).exit_code == 0
    with pytest.raises(RunDirError, match="is the file being read"):
        convert_source(source, source, force=True)


def test_dinopre_exports_and_converted_files_convert_again_unchanged(tmp_path: Path) -> None:
    source = tmp_path / "dinov2.pth"
    torch.save(_vit_state(2, layerscale=True, mask_token=True), source)
    first, _ = _convert(source, tmp_path)
    second = tmp_path / "again.pt"
    assert runner.invoke(app, ["convert", str(first), str(second)]).exit_code == 0
    a, b = (torch.load(p, weights_only=True)["model"] for p in (first, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_source(first).layout == "dinopre-export" and read_source(first).layer_norm_eps == 1e-6


def test_inspect_checkpoint_says_what_convert_would_make_of_a_source(tmp_path: Path) -> None:
    source = tmp_path / "checkpoint.pth"
    _dino_training_checkpoint(source)
    info = inspect_file(source)
    assert info["layout"] == "official DINO training checkpoint (dino-training)" and info["backbone"]["width"] == WIDTH
    assert info["dino_head"] == "64 prototypes" and "dinopre convert" in info["convert"]
    assert info["sha256"] == sha256_file(source) and info["layer_norm_eps"] == "1e-06"
    table = runner.invoke(app, ["inspect-checkpoint", str(source)])
    assert table.exit_code == 0 and "official DINO training checkpoint" in table.output
    output, _ = _convert(source, tmp_path)
    converted = inspect_file(output)
    assert converted["kind"] == "backbone export" and "official DINO training checkpoint" in converted["converted_from"]


# ============ refusals: one sentence, exit 2, nothing written ============


def _swiglu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in state.items() if ".mlp." not in k}
    return {**state, "blocks.0.mlp.w12.weight": torch.zeros(2 * HIDDEN, WIDTH),
            "blocks.0.mlp.w3.weight": torch.zeros(WIDTH, HIDDEN)}


REFUSALS = {
    "registers": (lambda: {**_vit_state(2, layerscale=True, mask_token=True),
                           "register_tokens": torch.zeros(1, 4, WIDTH)}, "uses register tokens"),
    "swiglu": (lambda: _swiglu(_vit_state(2, layerscale=True, mask_token=True)), "uses a SwiGLU MLP"),
    "rope": (lambda: {**_vit_state(2, layerscale=True, mask_token=True), "rope_embed.periods": torch.ones(16)},
             "rotary position embeddings"),
    "non-square patches": (lambda: {**_vit_state(1), "patch_embed.proj.weight": torch.zeros(WIDTH, 3, 4, 8)},
                           "non-square 4 x 8 patches"),
    "unknown layout": (lambda: {"weights": torch.zeros(3), "bias": torch.zeros(3)},
                       "is not a backbone export, a training checkpoint or a ViT layout"),
    "qkv of the wrong width": (lambda: {**_vit_state(1), "blocks.1.attn.qkv.weight": torch.zeros(3 * WIDTH + 6,
                                                                                                   WIDTH)},
                               "blocks.1.attn.qkv.weight has the shape (390, 128), not (384, 128)"),
    "pos-embed not a square grid plus one": (lambda: {**_vit_state(1), "pos_embed": torch.zeros(1, 16, WIDTH)},
                                             "which is not a square grid of patches plus one"),
    "heads not inferable": (lambda: _vit_state(1, width=96), "does not store its number of attention heads"),
    "a tensor under two names": (lambda: {**_hf_state(5, dinov2=True),
                                          "encoder.layer.0.layernorm_before.weight": torch.ones(WIDTH)},
                                 "holds the same tensor twice under different names"),
    "unknown tensor": (lambda: {**_vit_state(1), "blocks.0.attn.relative_bias": torch.zeros(3)},
                       "holds tensors dinopre's ViT has no place for: blocks.0.attn.relative_bias"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_sources_that_cannot_be_converted_exactly_are_refused_in_one_sentence(case: str, tmp_path: Path) -> None:
    make, text = REFUSALS[case]
    source, output = tmp_path / "source.pth", tmp_path / "out.pt"
    torch.save(make(), source)
    result = runner.invoke(app, ["convert", str(source), str(output)])
    assert result.exit_code == 2 and text in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not output.exists()
    inspected = runner.invoke(app, ["inspect-checkpoint", str(source)])
    assert inspected.exit_code == 2 and text in inspected.output


def test_bad_flags_are_refused(tmp_path: Path) -> None:
    source = tmp_path / "dino.pth"
    torch.save(_vit_state(1), source)
    with pytest.raises(ConfigError, match="--image-size 10 is not a positive multiple of the source's patch size 4"):
        convert_source(source, tmp_path / "a.pt", image_size=10)
    with pytest.raises(ConfigError, match="--source-std must be positive"):
        convert_source(source, tmp_path / "b.pt", std=[0.5, 0.0, 0.5])
    missing = runner.invoke(app, ["convert", str(tmp_path / "nothing.pth"), str(tmp_path / "c.pt")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


# ============ .safetensors ============


def test_safetensors_sources_are_recognised_by_content(tmp_path: Path) -> None:
    save_file = pytest.importorskip("safetensors.torch").save_file
    state = _hf_state(5, dinov2=True)
    source = tmp_path / "model.pth"  # a safetensors file under a torch name: the header decides
    save_file({k: v.contiguous() for k, v in state.items()}, str(source))
    output, _ = _convert(source, tmp_path)
    images = _images()
    expected = _reference(images, _hf_parts(state, dinov2=True), heads=2, eps=1e-6, normalization=IMAGENET)
    assert max(_errors(output, images, expected, 1e-6)) < 1e-5
    assert read_source(source).layout == "hf-dinov2"


def test_safetensors_without_the_package_gives_the_install_hint(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "model.safetensors"
    header = b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    source.write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    monkeypatch.setitem(__import__("sys").modules, "safetensors.torch", None)
    with pytest.raises(CheckpointError, match=r'pip install "dinopre\[safetensors\]"'):
        read_source(source)
