"""The legacy scripts in tools/: flags mapped with their original meaning, real runs as a user starts them, errors.

The scripts are run in a subprocess exactly as a user would (`python tools/pretrain_dino_face.py ...` from the
repository root, no PYTHONPATH). The flag mapping is checked in process, without training, by importing
`tools/_legacy_cli.py` from its path (tools/ is not a package).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dinopre.config.loading import build_config
from dinopre.config.presets import PRESETS
from dinopre.config.settings import FIELD_SECTION

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
sys.path.insert(0, str(TOOLS))  # the tools import their sibling _checkout.py
FACE_SCRIPT = "tools/pretrain_dino_face.py"
HANDS_SCRIPT = "tools/pretrain_dino_hands.py"

# Every flag of the original scripts (the two new ones, --overwrite and --quiet, are listed apart).
ORIGINAL_FLAGS = (
    "--train-dir --output-dir --algorithm --epochs --batch-size --num-workers --learning-rate --weight-decay "
    "--warmup-epochs --teacher-momentum-base --teacher-momentum-final --clip-grad-norm --out-dim --head-hidden-dim "
    "--patch-out-dim --patch-mask-ratio --patch-loss-weight --student-temp --teacher-temp --center-momentum --seed "
    "--device --resume --export-backbone --log-interval --image-size --patch-size --vit-embed-dim --vit-depth "
    "--vit-num-heads --vit-mlp-ratio --num-local-crops --local-crop-size --global-crop-scale --local-crop-scale "
    "--stream"
).split()
NEW_FLAGS = ("--overwrite", "--quiet")

# A model small enough that one epoch over 24 images takes a few seconds on a CPU.
TINY_FLAGS = (
    "--image-size 32 --patch-size 8 --vit-embed-dim 32 --vit-depth 1 --vit-num-heads 2 --out-dim 64 "
    "--head-hidden-dim 64 --local-crop-size 16 --num-local-crops 2 --batch-size 8 --num-workers 0 --device cpu"
).split()


def _load_tool(name: str) -> ModuleType:
    """Import tools/NAME.py from its path, as the scripts do (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look classes up by module name
    spec.loader.exec_module(module)
    return module


legacy = _load_tool("_legacy_cli")
pretrain_utils = _load_tool("pretrain_utils")


def _user_env() -> dict[str, str]:
    """The environment of a user's shell: no PYTHONPATH, plain output."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NO_COLOR"] = "1"
    return env


def run_script(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run a legacy script from the repository root the way a user types it."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=_user_env(),
                          capture_output=True, text=True, timeout=300)


def parse(preset: str, *argv: str) -> dict[str, Any]:
    """The settings a legacy command line hands to `train_with_settings`."""
    return legacy.settings_from_args(preset, legacy.build_parser(preset).parse_args(list(argv)))


def config_value(config: Any, name: str) -> Any:
    return getattr(getattr(config, FIELD_SECTION[name]), name)


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """24 small synthetic crops per kind (32 px JPEGs and 48 px PNGs in a subfolder: recursive scan)."""
    from dinopre.data.demo import write_synthetic_folder

    root = tmp_path_factory.mktemp("rois")
    folders = {}
    for kind in ("face", "hands"):
        write_synthetic_folder(root / kind, kind, 12, size=32)
        write_synthetic_folder(root / kind / "more", kind, 12, size=48, start=12, image_format="png")
        folders[kind] = root / kind
    return folders


# ============ the flags reach the configuration with their meaning (no training) ============

# (flag and values, setting, value in the settings dict and in the resolved configuration)
FLAG_TABLE: list[tuple[list[str], str, Any]] = [
    (["--output-dir", "runs/x"], "output_dir", "runs/x"),
    (["--algorithm", "ibot"], "algorithm", "ibot"),
    (["--epochs", "3"], "epochs", 3),
    (["--batch-size", "16"], "batch_size", 16),
    (["--num-workers", "2"], "num_workers", 2),
    (["--learning-rate", "1e-3"], "learning_rate", 1e-3),
    (["--weight-decay", "0.05"], "weight_decay", 0.05),
    (["--warmup-epochs", "2"], "warmup_epochs", 2),
    (["--teacher-momentum-base", "0.999"], "teacher_momentum_base", 0.999),
    (["--teacher-momentum-final", "0.9999"], "teacher_momentum_final", 0.9999),
    (["--clip-grad-norm", "1.5"], "clip_grad_norm", 1.5),
    (["--out-dim", "4096"], "out_dim", 4096),
    (["--head-hidden-dim", "512"], "head_hidden_dim", 512),
    (["--patch-out-dim", "8192"], "patch_out_dim", 8192),  # a separate patch head, as in the original tool
    (["--patch-mask-ratio", "0.3"], "patch_mask_ratio", (0.3, 0.3)),
    (["--patch-loss-weight", "0.5"], "patch_loss_weight", 0.5),
    (["--student-temp", "0.2"], "student_temp", 0.2),
    (["--teacher-temp", "0.03"], "teacher_temp", 0.03),
    (["--center-momentum", "0.8"], "center_momentum", 0.8),
    (["--seed", "7"], "seed", 7),
    (["--device", "cpu"], "device", "cpu"),
    (["--export-backbone", "bb.pt"], "export_backbone", "bb.pt"),
    (["--log-interval", "5"], "log_interval", 5),
    (["--image-size", "96"], "image_size", 96),
    (["--patch-size", "8"], "patch_size", 8),
    (["--vit-embed-dim", "192"], "vit_embed_dim", 192),
    (["--vit-depth", "4"], "vit_depth", 4),
    (["--vit-num-heads", "4"], "vit_num_heads", 4),
    (["--vit-mlp-ratio", "2.5"], "vit_mlp_ratio", 2.5),
    (["--num-local-crops", "4"], "num_local_crops", 4),
    (["--local-crop-size", "32"], "local_crop_size", 32),
    (["--global-crop-scale", "0.3", "0.9"], "global_crop_scale", (0.3, 0.9)),
    (["--local-crop-scale", "0.1", "0.3"], "local_crop_scale", (0.1, 0.3)),
    (["--stream", "hand_left"], "stream", "hand_left"),
]


@pytest.mark.parametrize("preset", ["face", "hands"])
@pytest.mark.parametrize(("argv", "name", "expected"), FLAG_TABLE, ids=[row[0][0] for row in FLAG_TABLE])
def test_each_flag_sets_its_setting_and_nothing_else(preset: str, argv: list[str], name: str, expected: Any) -> None:
    settings = parse(preset, "--train-dir", "a", *argv)
    separate = {"shared_head": False} if name == "patch_out_dim" else {}  # the original always had its own
    assert settings == {"train_dir": ["a"], name: expected, **separate}
    config = build_config(preset, cli_settings=settings)  # validates the mapped value the way a run would
    assert config_value(config, name) == expected
    assert config.preset == preset


def test_the_table_covers_every_mapped_flag_and_each_is_a_dinopre_train_setting() -> None:
    assert {row[1] for row in FLAG_TABLE} | {"train_dir"} == set(legacy.LEGACY_SETTINGS)
    assert set(legacy.LEGACY_SETTINGS) <= set(FIELD_SECTION)


def test_the_parser_has_exactly_the_original_flags_plus_overwrite_and_quiet() -> None:
    parser = legacy.build_parser("face")
    flags = {s for action in parser._actions for s in action.option_strings} - {"-h", "--help"}
    assert flags == set(ORIGINAL_FLAGS) | set(NEW_FLAGS)


def test_train_dir_takes_several_values_and_repeats() -> None:
    assert parse("face", "--train-dir", "a", "b", "--train-dir", "c")["train_dir"] == ["a", "b", "c"]
    config = build_config("hands", cli_settings=parse("hands", "--train-dir", "a", "--train-dir", "b"))
    assert config.data.train_dir == ("a", "b")


def test_unset_flags_are_absent_so_the_preset_decides() -> None:
    assert parse("hands", "--train-dir", "a") == {"train_dir": ["a"]}
    config = build_config("hands", cli_settings=parse("hands", "--train-dir", "a"))
    assert config.data.flip_prob == 0.0 and config.data.global_crop_scale == PRESETS["hands"]["global_crop_scale"]
    assert config.run.output_dir == "work_dirs/dino_hands"
    assert config.model.out_dim is None  # left to the recipe, like every setting the user did not give


def test_a_single_patch_mask_ratio_is_a_fixed_share() -> None:
    config = build_config("face", cli_settings=parse("face", "--train-dir", "a", "--algorithm", "ibot",
                                                     "--patch-mask-ratio", "0.3"))
    assert config.method.patch_mask_ratio == (0.3, 0.3)


@pytest.mark.parametrize(("argv", "shared"), [
    (["--patch-out-dim", "4096"], False),  # the original tool always had its own patch head
    (["--out-dim", "1024", "--patch-out-dim", "4096"], False),
    (["--out-dim", "4096", "--patch-out-dim", "4096"], None),  # the same size: dinopre's shared head is kept
])
def test_a_different_patch_out_dim_gives_a_separate_patch_head(argv: list[str], shared: bool | None) -> None:
    from dinopre.config.recipe import resolve

    settings = parse("face", "--train-dir", "a", "--algorithm", "ibot", *argv)
    assert settings.get("shared_head") is shared
    config = resolve(build_config("face", cli_settings=settings), 2000).config
    assert config.model.shared_head is (shared is None)
    assert config.resolved_patch_out_dim == int(argv[-1])


def test_main_passes_preset_settings_and_run_options(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    def fake_train(preset: str, settings: dict[str, Any], **options: Any) -> int:
        calls.append((preset, settings, options))
        return 0

    monkeypatch.setattr(legacy, "train_with_settings", fake_train)
    assert legacy.main("hands", ["--train-dir", "a", "--epochs", "2"]) == 0
    assert legacy.main("face", ["--train-dir", "a", "--resume", "run/checkpoint_last.pt", "--overwrite",
                                "--quiet"]) == 0
    assert calls[0] == ("hands", {"train_dir": ["a"], "epochs": 2},
                        {"overwrite": False, "quiet": False, "resume_from": None})
    assert calls[1] == ("face", {"train_dir": ["a"]},
                        {"overwrite": True, "quiet": True, "resume_from": "run/checkpoint_last.pt"})


def test_help_shows_the_preset_defaults() -> None:
    hands_help = " ".join(legacy.build_parser("hands").format_help().split())
    assert "[hands default: 0.5 1.0]" in hands_help
    assert "[hands default: derived from the data by the auto recipe; the reference recipe's is 8192]" in hands_help
    face_help = " ".join(legacy.build_parser("face").format_help().split())
    assert "the reference recipe's is 0.4 1.0]" in face_help


# ============ the scripts as a user runs them ============


@pytest.mark.parametrize("script", [FACE_SCRIPT, HANDS_SCRIPT])
def test_help_lists_every_original_flag(script: str) -> None:
    result = run_script(script, "--help")
    assert result.returncode == 0, result.stderr
    for flag in (*ORIGINAL_FLAGS, *NEW_FLAGS):
        assert flag in result.stdout, flag
    assert "new; not in the original scripts" in result.stdout


def test_the_scripts_run_without_dinopre_installed() -> None:
    # Hide the installed (editable) package first, then start the script as `python tools/...` would.
    src = str((REPO / "src").resolve())
    code = (
        "import importlib.util, os, runpy, sys\n"
        f"sys.path[:] = [p for p in sys.path if os.path.realpath(p or '.') != {src!r}]\n"
        "assert importlib.util.find_spec('dinopre') is None, 'dinopre is still importable'\n"
        f"sys.argv = [{FACE_SCRIPT!r}, '--help']\n"
        f"runpy.run_path({FACE_SCRIPT!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_user_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--train-dir" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--train-dir", "{face}", "--epochs", "0"], "Error: --epochs must be a positive integer, got 0."),
    ([], "Error: No training data: pass --train-dir DIR"),
    (["--train-dir", "{face}/missing"], "does not exist; check the --train-dir path."),
    (["--train-dir", "{face}", "--epochs", "many"], "Error: argument --epochs: invalid int value: 'many'"),
    (["--train-dir", "{face}", "--algorithm", "mae"], "Error: argument --algorithm: invalid choice: 'mae'"),
    (["--train-dir", "{face}", "--config", "c.toml"], "Error: unrecognized arguments: --config c.toml"),
])
def test_bad_input_exits_2_with_one_error_line(image_folders: dict[str, Path], args: list[str],
                                               message: str) -> None:
    result = run_script(FACE_SCRIPT, *(a.format(face=image_folders["face"]) for a in args))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert message in lines[0]


@pytest.fixture(scope="module")
def face_run(image_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One finished 1-epoch face run with an export, shared by the tests that inspect or resume it."""
    root = tmp_path_factory.mktemp("face_run")
    args = ["--train-dir", image_folders["face"], *TINY_FLAGS, "--epochs", "1", "--output-dir", root / "run"]
    result = run_script(FACE_SCRIPT, *args, "--export-backbone", root / "export" / "backbone.pt",
                        "--stream", "face_roi")
    return {"result": result, "args": args, "root": root}


@pytest.mark.slow
def test_face_script_trains_checkpoints_and_exports(face_run: dict[str, Any]) -> None:
    import torch

    result, root = face_run["result"], face_run["root"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    run = root / "run"
    assert (run / "checkpoint_last.pt").is_file() and (run / "checkpoint_best.pt").is_file()
    # The seed documentation promises the optimizer state, the global step, the heads and the teacher weights.
    state = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "global_step", "student", "teacher", "epoch"} <= set(state)
    assert state["epoch"] == 1 and state["global_step"] == 3  # 24 images // batch 8
    assert any(key.startswith("head.") for key in state["teacher"])
    export = root / "export" / "backbone.pt"
    sidecar = export.with_suffix(".json")
    assert export.is_file() and sidecar.is_file()
    metadata = json.loads(sidecar.read_text())
    assert metadata["preset"] == "face" and metadata["stream"] == "face_roi" and metadata["algorithm"] == "dino"
    assert metadata["format"] == "slt" and metadata["model_name"] == "slt_vitsmall_patch16"
    assert metadata["backbone"]["image_size"] == 32 and metadata["backbone"]["embed_dim"] == 32
    saved = torch.load(export, map_location="cpu", weights_only=True)
    assert saved["metadata"] == metadata and "pos_embed" in saved["model"]


@pytest.mark.slow
def test_resume_continues_a_finished_run_for_more_epochs(face_run: dict[str, Any], tmp_path: Path) -> None:
    import torch

    assert face_run["result"].returncode == 0, face_run["result"].stderr
    run = tmp_path / "run"
    shutil.copytree(face_run["root"] / "run", run)  # continue a copy: the shared run stays as the other test saw it
    args = [str(a) for a in face_run["args"]]
    args[args.index("--epochs") + 1] = "2"
    args[args.index("--output-dir") + 1] = str(run)
    result = run_script(FACE_SCRIPT, *args, "--resume", run / "checkpoint_last.pt", "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # --quiet
    state = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 6
    assert len(state["epoch_losses"]) == 2


@pytest.mark.slow
def test_a_new_run_over_an_old_one_needs_overwrite(face_run: dict[str, Any], tmp_path: Path) -> None:
    assert face_run["result"].returncode == 0, face_run["result"].stderr
    run = tmp_path / "run"
    shutil.copytree(face_run["root"] / "run", run)
    args = [str(a) for a in face_run["args"]]
    args[args.index("--output-dir") + 1] = str(run)
    refused = run_script(FACE_SCRIPT, *args, "--quiet")
    assert refused.returncode == 2 and "--overwrite" in refused.stderr and "Traceback" not in refused.stderr
    assert run_script(FACE_SCRIPT, *args, "--quiet", "--overwrite").returncode == 0


@pytest.mark.slow
def test_hands_script_trains_ibot_with_a_separate_patch_head(image_folders: dict[str, Path], tmp_path: Path) -> None:
    import torch

    export = tmp_path / "hands.pt"
    result = run_script(HANDS_SCRIPT, "--train-dir", image_folders["hands"], *TINY_FLAGS, "--epochs", "1",
                        "--algorithm", "ibot", "--patch-mask-ratio", "0.3", "--patch-out-dim", "32",
                        "--output-dir", tmp_path / "run", "--export-backbone", export, "--quiet")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file() and (tmp_path / "run" / "checkpoint_best.pt").is_file()
    metadata = json.loads(export.with_suffix(".json").read_text())
    assert metadata["preset"] == "hands" and metadata["stream"] == "hands" and metadata["algorithm"] == "ibot"
    state = torch.load(tmp_path / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    config = state["config"]
    assert config["method"]["patch_mask_ratio"] == [0.3, 0.3] and config["model"]["shared_head"] is False
    assert config["model"]["patch_out_dim"] == 32 and config["data"]["flip_prob"] == 0.0  # hands preset kept
    assert any(key.startswith("patch_head.") for key in state["student"])


# ============ tools/pretrain_utils.py ============


def test_pretrain_utils_loader_yields_crop_major_batches(image_folders: dict[str, Path]) -> None:
    transform = pretrain_utils.build_multicrop_transform(image_size=32, local_crop_size=16, num_local_crops=3,
                                                         global_crop_scale=(0.5, 1.0))
    assert transform.sizes == [32, 32, 16, 16, 16]
    loader = pretrain_utils.build_dataloader([image_folders["face"]], batch_size=8, transform=transform, seed=3,
                                             epochs=2)
    assert len(loader) == 2 * (24 // 8)
    batch = next(iter(loader))
    assert isinstance(batch, pretrain_utils.CropBatch)
    assert batch.global_crops.shape == (2 * 8, 3, 32, 32)
    assert batch.local_crops is not None and batch.local_crops.shape == (3 * 8, 3, 16, 16)
    assert batch.indices.shape == (8,) and batch.masks is None
    # Crop-major: rows [view0 x B, view1 x B, ...]; row B + i is the second global view of the batch's image i.
    dataset = pretrain_utils.build_dataset(image_folders["face"], transform, seed=3)
    global_views, local_views, _, _, _ = dataset[(0, int(batch.indices[1]))]
    assert global_views[1].equal(batch.global_crops[8 + 1]) and local_views[2].equal(batch.local_crops[2 * 8 + 1])


def test_pretrain_utils_in_order_loader_and_reexports(image_folders: dict[str, Path]) -> None:
    transform = pretrain_utils.build_multicrop_transform(image_size=32, local_crop_size=16, num_local_crops=0)
    loader = pretrain_utils.build_dataloader(str(image_folders["hands"]), batch_size=10, transform=transform,
                                             shuffle=False)
    batches = list(loader)
    assert [b.indices.tolist() for b in batches] == [list(range(10)), list(range(10, 20))]  # last 4 dropped
    assert batches[0].local_crops is None
    assert {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"} == set(pretrain_utils.SUPPORTED_EXTENSIONS)
    assert "torchvision" not in sys.modules  # the seed documentation promises no torchvision


def test_pretrain_utils_refuses_a_dataset_smaller_than_a_batch(image_folders: dict[str, Path]) -> None:
    from dinopre.base.errors import DataError

    with pytest.raises(DataError, match="fewer than --batch-size 64"):
        pretrain_utils.build_dataloader([image_folders["face"]], batch_size=64)


def test_default_transform_matches_the_face_preset() -> None:
    from dinopre.config.settings import DataConfig

    transform = pretrain_utils.build_multicrop_transform()
    face = PRESETS["face"]
    assert transform.sizes == [face["image_size"]] * 2 + [face["local_crop_size"]] * face["num_local_crops"]
    assert transform.blur_sigma == face["blur_sigma"]
    assert transform.flip_prob == next(f.default for f in dataclasses.fields(DataConfig) if f.name == "flip_prob")
