"""Presets: what each kind of crop changes from the DINO reference defaults, and the `--demo` settings."""

from __future__ import annotations

from typing import Any

from dinopre.config.settings import REFERENCE_VALUES

# What each preset changes from the DINO reference defaults, and why. Both keep ViT-S/16, the model the
# translation pipeline loads as `slt_vitsmall_patch16`.
PRESETS: dict[str, dict[str, Any]] = {
    "face": {
        # Face ROIs are 64-256 px; 112 px globals give a 7x7 token grid and 48 px locals 3x3, which keeps the
        # student's 8 views cheap while covering eyes, mouth and brows in every global view.
        "image_size": 112,
        "local_crop_size": 48,
        "num_local_crops": 6,
        # dino's blur sigma (0.1-2 px) is meant for 224 px views; halve it to blur a 112 px view as much.
        "blur_sigma": (0.05, 1.0),
        "output_dir": "work_dirs/dino_face",
    },
    "hands": {
        "image_size": 112,
        "local_crop_size": 48,
        "num_local_crops": 6,
        "blur_sigma": (0.05, 1.0),
        # Left and right hands are separate streams and handedness is part of a sign: a mirrored right hand looks
        # like a left hand, so flipping would teach the backbone to ignore it.
        "flip_prob": 0.0,
        # The hand fills a loose ROI and the fingers carry the handshape: crops below half the ROI cut them away.
        "global_crop_scale": (0.5, 1.0),
        "local_crop_scale": (0.1, 0.5),
        "output_dir": "work_dirs/dino_hands",
    },
}

# The presets' reference values where they differ from DINO's.
PRESET_REFERENCE: dict[str, dict[str, Any]] = {
    # Few thousand crops per signer: 8192 prototypes converge much faster than 65536 on small custom data
    # (dino#279, dino#246) and is the iBOT ViT-S recipe's size.
    "face": {"out_dim": 8192},
    "hands": {"out_dim": 8192},
}


def reference_value(preset: str, name: str) -> Any:
    """The value of a recipe setting under `--recipe reference` (None for the lr: the linear scaling rule)."""
    return PRESET_REFERENCE.get(preset, {}).get(name, REFERENCE_VALUES.get(name))


# `--demo`: a tiny model on built-in synthetic crops that finishes in well under a minute on two CPU cores. Only the
# model and the data are set here; the `auto` recipe derives the rest from them, as for any run.
DEMO_OVERRIDES: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "local_crop_size": 16,
    "num_local_crops": 4,
    "vit_embed_dim": 64,
    "vit_depth": 3,
    "vit_num_heads": 4,
    "demo_images": 512,
    # The synthetic crops differ from each other mostly in colour: colour jitter and grayscale would erase what
    # tells them apart and the run collapses to a uniform teacher (measured), so the demo keeps colours.
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "zero_mean_patches": False,  # the same reason: a patch's mean colour is what tells these crops apart
    "blur_sigma": (0.02, 0.3),  # dino's 0.1-2 px scaled to 32 px views
    "epochs": 12,
    "batch_size": 32,
    "log_interval": 8,
}
