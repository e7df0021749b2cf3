"""The benchmark harness: its analytic FLOP count matches PyTorch's counter, and a run reports every measure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dinopre.config.loading import build_config
from dinopre.model.heads import DINOHead
from dinopre.model.vit import VisionTransformer

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
sys.path.insert(0, str(_BENCH.parent))  # bench.py imports its sibling _checkout.py
_spec = importlib.util.spec_from_file_location("bench", _BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SMALL = {"train_dir": ["d"], "vit_embed_dim": 96, "vit_depth": 2, "vit_num_heads": 3, "out_dim": 512,
         "head_hidden_dim": 128, "head_bottleneck_dim": 32}


def _counted(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


@pytest.mark.parametrize("size", [112, 48])
def test_vit_flops_match_pytorchs_count_plus_attention(size: int) -> None:
    """Matmuls and the patch convolution as PyTorch counts them, plus QK^T and AV (4 n^2 D per block), which its
    counter does not see inside the CPU attention kernel."""
    config = build_config("face", cli_settings=SMALL)
    model = VisionTransformer(image_size=112, patch_size=16, embed_dim=96, depth=2, num_heads=3)
    tokens = (size // 16) ** 2 + 1
    attention = 2 * 4 * tokens**2 * 96
    assert bench.vit_flops(config, size) == _counted(model, torch.randn(1, 3, size, size)) + attention


def test_head_flops_match_pytorchs_count() -> None:
    config = build_config("face", cli_settings=SMALL)
    head = DINOHead(96, 512, hidden_dim=128, bottleneck_dim=32)
    assert bench.head_flops(config, 10, 512) == _counted(head, torch.randn(10, 96))


def test_training_flops_count_student_three_times_and_teacher_once() -> None:
    config = build_config("face", cli_settings=SMALL)
    views = 2 + config.data.num_local_crops
    student = 2 * bench.vit_flops(config, 112) + config.data.num_local_crops * bench.vit_flops(config, 48)
    student += bench.head_flops(config, views, 512)
    teacher = 2 * bench.vit_flops(config, 112) + bench.head_flops(config, 2, 512)
    assert bench.flops_per_image(config) == 3 * student + teacher
    ibot = build_config("face", cli_settings={**SMALL, "algorithm": "ibot"})
    assert bench.flops_per_image(ibot) > bench.flops_per_image(config)  # the patch head's work is counted


@pytest.mark.slow
@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_a_tiny_workload_reports_every_measure(tmp_path: Path, augment_on: str) -> None:
    """C1 shrunk to a toy size: images/s, data-wait share, the phase breakdown, memory and FLOPs are reported."""
    out = tmp_path / "c1.json"
    assert bench.main(["C1", "--steps", "2", "--warmup", "1", "--breakdown-steps", "1", "--images", "64",
                       "--data-root", str(tmp_path / "data"), "--device", "cpu", "--set", "vit_depth=1",
                       "--set", "vit_embed_dim=48", "--set", "batch_size=8", "--set", "num_workers=0",
                       "--set", "out_dim=256", "--set", f"augment_on={augment_on}", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["workload"] == "C1" and result["settings"]["vit_depth"] == 1 and result["steps"] == 2
    assert result["augment_on"] == augment_on
    breakdown = result["step_breakdown_ms"]
    assert set(breakdown) == {"data", "augment", "forward", "backward", "optimizer", "teacher"}
    assert (breakdown["augment"] > 0) == (augment_on == "device")  # the renderer's time is its own phase
    assert 0 <= result["data_wait_share"] <= 1 and result["images_per_sec"] > 0
    assert result["mfu"] is None and result["gflop_per_image"] > 0 and result["peak_memory_gib"] > 0


def test_activation_estimate_counts_what_the_gpu_path_saves(monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/activation_memory.py counts saved activations; the GPU path (fused norms) keeps less of them."""
    import sys

    from dinopre.model import vit

    monkeypatch.syspath_prepend(str(_BENCH.parent))
    spec = importlib.util.spec_from_file_location("activation_memory", _BENCH.parent / "activation_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "activation_memory", module)
    monkeypatch.setitem(module.WORKLOADS, "C1", {**module.WORKLOADS["C1"], "vit_depth": 2})
    monkeypatch.setattr(vit, "NORM_RECOMPUTE_DEVICES", frozenset())
    plain, params = module.saved_bytes("C1", 2)
    monkeypatch.setattr(vit, "NORM_RECOMPUTE_DEVICES", frozenset({"cpu"}))
    fused, _ = module.saved_bytes("C1", 2)
    tokens = 2 * 2 * 50 + 4 * 2 * 10  # 2 global views of 7x7 + 1 tokens, 4 local views of 3x3 + 1, batch 2
    casts = (192 * 576 + 192 * 768) * 2  # autocast's bf16 copies of the qkv and fc1 weights the plain path keeps
    assert plain - fused == 2 * (2 * tokens * 192 * 2 + casts)  # per block: two bf16 norm outputs and the casts
    assert params > 0


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_data_only_reports_what_the_workers_deliver(tmp_path: Path, augment_on: str) -> None:
    """--data-only times the loader without a model, and the device rendering apart from it."""
    out = tmp_path / "data.json"
    assert bench.main(["C1", "--data-only", "--steps", "2", "--warmup", "1", "--images", "64", "--data-root",
                       str(tmp_path / "data"), "--device", "cpu", "--set", "batch_size=8", "--set", "num_workers=0",
                       "--set", f"augment_on={augment_on}", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "data only" and result["augment_on"] == augment_on
    assert result["images_per_sec_loader"] > 0 and result["images_per_sec_per_worker"] > 0
    assert (result["render_ms_per_batch"] > 0) == (augment_on == "device")
