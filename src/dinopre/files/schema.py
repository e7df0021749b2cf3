"""What a valid training checkpoint and a valid backbone export hold, checked once, right after loading.

`torch.load(weights_only=True)` already refuses anything but tensors and plain values, but plain values can still
be wrong: a string where a number belongs, a missing configuration, a center of the wrong shape, a negative step,
or export metadata claiming a 8192-wide ViT for an 85 KB file. Every reader (resume, export, inspect, verify,
`load_dinov2_backbone`) goes through these checks, so such a file is one clear sentence, never a traceback, and
nothing is built or allocated from numbers that the tensors do not back up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dinopre.base.errors import CheckpointError


class SchemaError(CheckpointError):
    """A file whose content is not what its kind promises (the message names the part that is wrong)."""


def _fail(path: Any, what: str) -> SchemaError:
    return SchemaError(f"'{path}' is not a usable dinopre file: {what}.")


# ============ training checkpoints ============


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _number_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) for v in value)


def _finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _str_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(x, str) for x in (*value, *value.values()))


def _number_dict_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, dict) and all(isinstance(k, str) and _is_number(x) for k, x in v.items()) for v in value)


def _evaluation(value: Any) -> bool:
    """One epoch's record: its 1-based epoch (0: an --init-from source scored before the first step), and a k-NN
    accuracy (a number or nothing) when it has one."""
    return (isinstance(value, dict) and all(isinstance(k, str) for k in value)
            and _is_int(value.get("epoch")) and value["epoch"] >= 0
            and (value.get("knn") is None or _finite_number(value["knn"])))


def _data(value: Any) -> bool:
    """The training images' fingerprint (`DataFingerprint.to_state`): version 2, or dinopre 0.1's single hash."""
    if not isinstance(value, dict):
        return False
    if "version" not in value:  # dinopre 0.1: one hash, when it had one
        return "fingerprint" not in value or isinstance(value["fingerprint"], str)
    return (value["version"] == 2 and _is_int(value.get("count")) and value["count"] >= 0
            and all(isinstance(value.get(k), str) for k in ("names", "sizes", "mtimes"))
            and isinstance(value.get("roots"), list) and all(isinstance(r, str) for r in value["roots"]))


def _rank_share(value: Any) -> bool:
    return (isinstance(value, dict) and _tensor_dict(value.get("rng")) and "torch" in value["rng"]
            and _tensor_dict(value.get("loss_sums")))


# (key, check, what it must be); optional keys (written by later versions) may be absent.
_TRAINING_KEYS: tuple[tuple[str, Callable[[Any], bool], str, bool], ...] = (
    ("format_version", lambda v: _is_int(v) and v >= 1, "an integer format_version of 1 or more", True),
    ("config", lambda v: isinstance(v, dict), "its configuration", True),
    ("epoch", lambda v: _is_int(v) and v >= 0, "a completed-epoch count of 0 or more", True),
    ("step_in_epoch", lambda v: _is_int(v) and v >= 0, "a step_in_epoch of 0 or more", True),
    ("global_step", lambda v: _is_int(v) and v >= 0, "a global_step of 0 or more", True),
    ("student", _tensor_dict, "the student's weights", True),
    ("teacher", _tensor_dict, "the teacher's weights", True),
    ("loss", _tensor_dict, "the loss centers", True),
    ("loss_sums", _tensor_dict, "the epoch's loss sums", True),
    ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
     and isinstance(v.get("param_groups"), list) and all(isinstance(g, dict) for g in v["param_groups"]),
     "the optimizer state", True),
    ("rng", lambda v: _tensor_dict(v) and "torch" in v, "the random generator states", True),
    ("best_loss", lambda v: _is_number(v) and not math.isnan(v), "a number as best_loss", True),
    ("best_epoch", lambda v: _is_int(v) and v >= 0, "an integer best_epoch of 0 or more", True),
    ("epoch_losses", _number_list, "a list of epoch losses", True),
    ("epoch_parts", _number_dict_list, "a list of epoch loss parts (names and numbers)", True),
    ("data", _data, "the fingerprint of its training images (a file count, hashes and folders)", False),
    ("evaluations", lambda v: isinstance(v, list) and all(_evaluation(x) for x in v),
     "a list of evaluations, each with its epoch and a k-NN accuracy that is a number or nothing", False),
    ("recipe", _str_dict, "the recipe's reasons", False),
    ("best_knn", lambda v: v is None or _finite_number(v), "a number (or nothing) as best_knn", False),
    ("dinopre_version", lambda v: isinstance(v, str), "a version string", False),
    ("world_size", lambda v: _is_int(v) and v >= 1, "a process count of 1 or more", False),
    ("trackers", _str_dict, "a mapping of tracker names to run ids", False),
    ("ranks", lambda v: isinstance(v, list) and all(_rank_share(x) for x in v),
     "a list of each process's generator states and loss sums", False),
)


def check_training_state(state: dict[str, Any], path: Any) -> None:
    """Check the structure of a training checkpoint (types, non-negative counters, the shapes that resuming copies
    into place); the model weights' shapes are checked by the strict `load_state_dict` of a resume.

    Raises:
        SchemaError: the first part that is missing or wrong.
    """
    for key, check, what, required in _TRAINING_KEYS:
        if key not in state:
            if required:
                raise _fail(path, f"it has no {key} ({what})")
            continue
        if not check(state[key]):
            raise _fail(path, f"its {key} is not {what}")
    _check_progress(state, path)
    _check_generator(state["rng"], path, "its generator state")
    centers = state["loss"]
    if "center" not in centers:
        raise _fail(path, "it has no loss center")
    for name, center in centers.items():
        if center.ndim != 2 or center.shape[0] != 1 or not center.is_floating_point():
            raise _fail(path, f"its loss center '{name}' has the shape {tuple(center.shape)} or type {center.dtype} "
                              "instead of (1, K) floating-point numbers")
    _check_sums(state["loss_sums"], path, "its loss sums")
    if "ranks" in state:
        _check_ranks(state["ranks"], state.get("world_size", 1), path)


def _check_progress(state: dict[str, Any], path: Any) -> None:
    """The counters and the per-epoch histories tell one story (a completed epoch took at least one step)."""
    if state["step_in_epoch"] > state["global_step"]:
        raise _fail(path, f"its step_in_epoch {state['step_in_epoch']} exceeds its global_step {state['global_step']}")
    if state["epoch"] > state["global_step"]:
        raise _fail(path, f"its {state['epoch']} completed epochs took fewer steps ({state['global_step']})")
    if state["best_epoch"] > state["epoch"]:
        raise _fail(path, f"its best_epoch {state['best_epoch']} is after its last completed epoch {state['epoch']}")
    for key in ("epoch_losses", "epoch_parts"):
        if len(state[key]) != state["epoch"]:
            raise _fail(path, f"its {key} has {len(state[key])} entries for {state['epoch']} completed epochs")


def _check_generator(rng: dict[str, torch.Tensor], path: Any, what: str) -> None:
    torch_state = rng["torch"]
    if torch_state.dtype != torch.uint8 or torch_state.shape != torch.get_rng_state().shape:
        raise _fail(path, f"{what} has the wrong shape {tuple(torch_state.shape)} or type")
    cuda = rng.get("cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.ndim != 1):
        raise _fail(path, f"{what} for CUDA has the wrong shape {tuple(cuda.shape)} or type")


def _check_sums(sums: dict[str, torch.Tensor], path: Any, what: str) -> None:
    if any(t.numel() != 1 or not t.is_floating_point() for t in sums.values()):
        raise _fail(path, f"{what} are not single floating-point numbers")


def _check_ranks(ranks: list[dict[str, Any]], world_size: Any, path: Any) -> None:
    """Each process's share: one per process that wrote the file (only several write them), each checked as the
    main process's states are."""
    if len(ranks) < 2 or len(ranks) != world_size:
        raise _fail(path, f"it holds {len(ranks)} processes' shares for a world_size of {world_size}")
    for index, share in enumerate(ranks):
        _check_generator(share["rng"], path, f"the generator state of its process {index}")
        _check_sums(share["loss_sums"], path, f"the loss sums of its process {index}")


def check_loss_sums(sums: dict[str, torch.Tensor], names: tuple[str, ...] | list[str], path: Any, *,
                    in_epoch: bool) -> None:
    """Check that a checkpoint's partial loss sums are the ones the model that continues it adds up (there are
    some once an epoch is under way, and there may be none at its start).

    Raises:
        SchemaError: other names, or none in an epoch under way.
    """
    if in_epoch and not sums:
        raise _fail(path, "its epoch in progress has no loss sums")
    if sums and sorted(sums) != sorted(names):
        raise _fail(path, f"its loss sums are of {', '.join(sorted(sums))}, not of {', '.join(sorted(names))} as "
                          "its configuration computes")


def check_centers(centers: dict[str, torch.Tensor], path: Any, out_dim: int, patch_out_dim: int | None) -> None:
    """Check that a checkpoint's loss centers have the prototype counts of the configuration that continues them.

    Raises:
        SchemaError: a center of another width.
    """
    expected = {"center": out_dim, **({"patch_center": patch_out_dim} if patch_out_dim is not None else {})}
    for name, width in expected.items():
        center = centers.get(name)
        if center is None or tuple(center.shape) != (1, width):
            shape = None if center is None else tuple(center.shape)
            raise _fail(path, f"its loss center '{name}' has the shape {shape}, not (1, {width}) as its configuration "
                              "says")


# ============ backbone exports ============

# The largest architecture an export may describe (as dinopre.config.settings.UPPER_BOUNDS for training).
_BACKBONE_BOUNDS = {"image_size": 4096, "patch_size": 4096, "in_channels": 16, "embed_dim": 8192, "depth": 256,
                    "num_heads": 8192}


def check_backbone_metadata(metadata: Any, path: Any) -> dict[str, Any]:
    """Check an export's `metadata['backbone']` describes a ViT that can be built.

    Returns:
        The backbone description.

    Raises:
        SchemaError: missing, of the wrong type, out of range, or inconsistent numbers.
    """
    if not isinstance(metadata, dict) or not isinstance(metadata.get("backbone"), dict):
        raise _fail(path, "it has no backbone metadata (metadata['backbone'])")
    b = metadata["backbone"]
    for key, bound in _BACKBONE_BOUNDS.items():
        value = b.get(key)
        if not _is_int(value) or not 1 <= value <= bound:
            raise _fail(path, f"its backbone {key} is {value!r}, not an integer from 1 to {bound}")
    ratio = b.get("mlp_ratio")
    if not _is_number(ratio) or not math.isfinite(ratio) or not 0 < ratio <= 64 or int(b["embed_dim"] * ratio) < 1:
        raise _fail(path, f"its backbone mlp_ratio is {ratio!r}, not a number that gives the MLP at least one unit")
    if b["image_size"] % b["patch_size"]:
        raise _fail(path, f"its patch_size {b['patch_size']} does not divide its image_size {b['image_size']}")
    if b["embed_dim"] % b["num_heads"]:
        raise _fail(path, f"its embed_dim {b['embed_dim']} is not divisible by its num_heads {b['num_heads']}")
    return b


def expected_backbone_shapes(b: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state dict a backbone of this description has (dinopre's names), computed without building it."""
    d, c, p = b["embed_dim"], b["in_channels"], b["patch_size"]
    hidden, tokens = int(d * b["mlp_ratio"]), 1 + (b["image_size"] // p) ** 2
    shapes: dict[str, tuple[int, ...]] = {"cls_token": (1, 1, d), "pos_embed": (1, tokens, d),
                                          "patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,),
                                          "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(b["depth"]):
        block = f"blocks.{i}."
        shapes.update({
            block + "norm1.weight": (d,), block + "norm1.bias": (d,),
            block + "attn.qkv.weight": (3 * d, d), block + "attn.qkv.bias": (3 * d,),
            block + "attn.proj.weight": (d, d), block + "attn.proj.bias": (d,),
            block + "norm2.weight": (d,), block + "norm2.bias": (d,),
            block + "mlp.fc1.weight": (hidden, d), block + "mlp.fc1.bias": (hidden,),
            block + "mlp.fc2.weight": (d, hidden), block + "mlp.fc2.bias": (d,),
        })
    return shapes


def check_backbone_tensors(b: dict[str, Any], tensors: Any, path: Any) -> None:
    """Check an export's tensors are exactly the ones its metadata describes, name by name and shape by shape.

    Raises:
        SchemaError: missing, unexpected or misshapen tensors (the first few named).
    """
    if not _tensor_dict(tensors):
        raise _fail(path, "its weights are not a mapping of names to tensors")
    expected = expected_backbone_shapes(b)
    missing = [k for k in expected if k not in tensors]  # in the model's order: cls_token, pos_embed, ...
    extra = sorted(k for k in tensors if k not in expected)
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    if extra:
        problems.append(f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}")
    if wrong:
        key = wrong[0]
        problems.append(f"{key} has the shape {tuple(tensors[key].shape)} instead of {expected[key]}"
                        + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if problems:
        raise _fail(path, "its weights do not match the ViT its metadata describes: " + "; ".join(problems))
    if any(not tensors[k].is_floating_point() for k in expected):
        raise _fail(path, "some of its weights are not floating-point tensors")
