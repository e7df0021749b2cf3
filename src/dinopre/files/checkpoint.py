"""State files: atomic checkpoint writes, safe loads, and the backbone export the translation pipeline loads.

Checkpoints hold tensors and plain values only (no pickled classes), so they load with
`torch.load(weights_only=True)`, and a file crafted to run code on load is refused (a pickle can run code).
Writes go to a temporary file in the same folder, are fsynced, then renamed over the target: a kill at any moment
leaves the previous file intact.

Export format `slt` (what the translation pipeline's loader reads): {"model": state_dict, "metadata": {"backbone":
{...}, ...}} with the consumer's key names (`nn.MultiheadAttention` `in_proj_*` / `out_proj`, `mlp.0` / `mlp.3`),
plus a JSON sidecar with the same stem holding the metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dinopre import __version__
from dinopre.base.errors import CheckpointError, RunDirError
from dinopre.files.outputs import write_error

FORMAT_VERSION = 1
KIND_TRAINING = "dinopre-training-checkpoint"
KIND_BACKBONE = "dinopre-backbone"
SLT_MODEL_NAME = "slt_vitsmall_patch16"


TMP_MARK = ".tmp-"  # temporary files are named .NAME.tmp-PID next to their target


class _HashingWriter:
    """A binary file that also hashes what goes through it, so a checkpoint is not read back for its sha256.

    torch.save turns an error of this writer into a RuntimeError; the OSError is kept in `error`, so a full disk is
    reported as one, wherever in the file the write failed.
    """

    def __init__(self, handle: Any) -> None:
        self.handle, self.digest = handle, hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_save(obj: Any, path: Path) -> str:
    """Write `obj` with torch.save so that `path` is either the old file or the complete new one.

    Returns:
        The sha256 of the written file.

    Raises:
        RunDirError: the folder is not writable or the disk is full; the previous file is left intact.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    writer: _HashingWriter | None = None
    try:
        with open(tmp, "wb") as handle:
            writer = _HashingWriter(handle)
            torch.save(obj, writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise _kept(write_error(path, exc)) from None
    except RuntimeError:
        if writer is None or writer.error is None:
            raise
        raise _kept(write_error(path, writer.error)) from None
    finally:
        tmp.unlink(missing_ok=True)  # also after a KeyboardInterrupt in the middle of the write
    return writer.digest.hexdigest()


def atomic_write_text(text: str | Iterable[str], path: Path) -> None:
    """Write a text file atomically (same guarantees as `atomic_save`); `text` may come in pieces, so a long list
    is never one string in memory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines([text] if isinstance(text, str) else text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise _kept(write_error(path, exc)) from None
    finally:
        tmp.unlink(missing_ok=True)


def _kept(error: RunDirError) -> RunDirError:
    return RunDirError(f"{str(error).rstrip('.')} (any previous version of the file is intact).")


def _fsync_dir(folder: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed (POSIX); not possible on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_file(path: str | Path, *, allowed: tuple[type, ...] = ()) -> dict[str, Any]:
    """Load a dinopre file safely (weights_only=True) onto the CPU.

    Args:
        path: the file.
        allowed: classes the unpickler may build besides tensors and plain values (for this call only), e.g.
            `argparse.Namespace` for the arguments official DINO training checkpoints keep.

    Raises:
        CheckpointError: missing, empty, truncated, not a torch file, or holding objects other than tensors and
            plain values (which could run code when unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"'{path}' does not exist or is not a file; give the path of a .pt file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"'{path}' is empty (0 bytes); it is not a usable checkpoint.")
    try:
        with warnings.catch_warnings(), _safe_globals(allowed):  # torch warns about unusual pickle protocols
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # the weights_only unpickler met a class or function to call
            raise CheckpointError(f"'{path}' holds objects other than tensors and plain values and was refused "
                                  "without running them; only load files you trust.") from None
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated, corrupt or not written by "
                              "torch.save); nothing in it was run.") from None
    except Exception:  # the unpickler fails in many ways on garbage: EOF, IndexError, RuntimeError...
        raise CheckpointError(f"'{path}' is not a readable checkpoint (truncated, corrupt or not written by "
                              "torch.save); nothing in it was run.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"'{path}' is not a dinopre file (it holds a {type(obj).__name__}).")
    return obj


def _safe_globals(allowed: tuple[type, ...]) -> Any:
    """A context in which the weights_only unpickler also accepts `allowed` (torch >= 2.5), or nothing extra."""
    if not allowed:
        return contextlib.nullcontext()
    if not hasattr(torch.serialization, "safe_globals"):
        raise CheckpointError(f"Reading {', '.join(c.__name__ for c in allowed)} from a checkpoint safely needs "
                              "PyTorch 2.5 or newer; upgrade torch.")
    return torch.serialization.safe_globals(list(allowed))


# (our / timm name part, the pipeline's `nn.MultiheadAttention` / `nn.Sequential` name part)
SLT_RENAMES = (
    (".attn.qkv.weight", ".attn.in_proj_weight"),
    (".attn.qkv.bias", ".attn.in_proj_bias"),
    (".attn.proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.0."),
    (".mlp.fc2.", ".mlp.3."),
)


def _slt_key(name: str) -> str | None:
    """Map one of our backbone parameter names to the consumer's name (None: not exported)."""
    if name == "mask_token":
        return None  # iBOT's student-only token is not part of the backbone the pipeline runs
    for ours, theirs in SLT_RENAMES:
        if ours in name:
            return name.replace(ours, theirs)
    return name


def slt_state_dict(backbone_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone state dict with the consumer's key names, as contiguous fp32 CPU tensors."""
    out = {}
    for name, tensor in backbone_state.items():
        key = _slt_key(name)
        if key is not None:
            out[key] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def backbone_metadata(config: dict[str, Any], *, epoch: int, weights: str) -> dict[str, Any]:
    """Metadata of an export: what the consumer needs to build its ViT, and where the weights came from."""
    model = config["model"]
    return {
        "backbone": {
            "image_size": model["image_size"],
            "patch_size": model["patch_size"],
            "in_channels": 3,
            "embed_dim": model["vit_embed_dim"],
            "depth": model["vit_depth"],
            "num_heads": model["vit_num_heads"],
            "mlp_ratio": model["vit_mlp_ratio"],
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "stochastic_dropout": 0.0,
        },
        "kind": KIND_BACKBONE,
        "format": "slt",
        "format_version": FORMAT_VERSION,
        "model_name": SLT_MODEL_NAME,
        "dinopre_version": __version__,
        "preset": config["preset"],
        "stream": config["run"].get("stream") or config["preset"],
        "algorithm": config["method"]["algorithm"],
        "weights": weights,
        "epoch": epoch,
        "layer_norm_eps": 1e-5,
        "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    }
