"""Recipes: what a run uses for every setting the user left unset.

- `reference`: DINO's and iBOT's published values (with the presets' choices), exactly as dinopre always used them.
- `auto` (the default): values derived from the run itself: the number of images, the batch size, the total
  number of steps and the model's width. DINO's reference values were tuned for ImageNet, 10^5 steps and ViT-S or
  larger; with a few thousand crops and a few hundred steps they leave the teacher at its random start (an EMA of
  0.996 has a half-life of 173 steps), the learning rate in its warmup for the whole run and a head seven times the
  size of the backbone (the recipe issue measured k-NN accuracy at random-init level). The rules below were chosen
  by `benchmarks/learn.py` on five probe families; the README's "Learning from small data" has the numbers.

Explicit settings always win: a flag, a config file or the preset's data choices are never changed. Each derived
value comes with a short reason, printed at start and saved in params.json and the checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dinopre.config.presets import reference_value
from dinopre.config.settings import FIELD_SECTION, RECIPE_SETTINGS, PretrainConfig, setting, with_settings
from dinopre.config.validation import validate


@dataclass(frozen=True)
class RunShape:
    """What the auto recipe derives from."""

    num_images: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    embed_dim: int
    depth: int
    image_size: int


def run_shape(config: PretrainConfig, num_images: int) -> RunShape:
    """The shape of a run of `config` on `num_images` images (an epoch drops its last incomplete batch)."""
    steps_per_epoch = max(1, num_images // config.optim.batch_size)
    return RunShape(num_images, config.optim.batch_size, steps_per_epoch, steps_per_epoch * config.optim.epochs,
                    config.model.vit_embed_dim, config.model.vit_depth, config.model.image_size)


def _epochs(steps: int, shape: RunShape) -> float:
    """A number of steps as the (fractional) epochs the schedules take: round(epochs x steps_per_epoch) == steps."""
    return steps / shape.steps_per_epoch


def _count(n: int) -> str:
    return f"{n:,}"


# ============ the auto rules: (value, reason) from the run's shape ============
# Each rule is small and stands alone; `AUTO_RULES` maps every derivable setting to its rule.


def _out_dim(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    # Prototypes: about one per 2 images, a power of two between 256 and 65,536 (lightly-train scales K with the
    # dataset the same way; dino#279: 1k-2k prototypes converge much faster on small custom sets).
    k = 2 ** round(math.log2(max(shape.num_images / 2, 1)))
    k = min(65536, max(256, k))
    return k, f"{_count(shape.num_images)} images"


def _head_hidden_dim(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    width = min(2048, max(256, 4 * shape.embed_dim))
    return width, f"4 x the backbone width {shape.embed_dim}, at most DINO's 2048"


def _head_bottleneck_dim(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    width = min(256, max(64, shape.embed_dim))
    return width, f"the backbone width {shape.embed_dim}, at most DINO's 256"


def _teacher_momentum(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    # The teacher averages the student over a half-life of a tenth of the run, kept between 0.99 (a half-life of
    # 69 steps; faster teachers chase the student's noise: the demo's loss climbs back at 0.96, measured) and
    # DINO's 0.996 (173 steps, reached from 1,730 steps on).
    if config.model.init_from:
        # The fast teacher is for a random start, which must leave its random features quickly. A trained start
        # need not: DINO's slow teacher (a half-life of 173 steps) keeps the targets near the source's features
        # while the student adapts. Measured on the learning benchmark's off-domain families (310 steps): at 0.99
        # hands fell from the source's 21.8 to 19.2, more than the 2 points continued training may cost; at 0.996
        # to 20.8, the mean over shapes, faces and hands the same (22.5 and 22.4; one SD is about 1.8 points).
        return 0.996, "DINO's value: the teacher starts from --init-from's trained weights and need not leave them fast"
    half_life = max(shape.total_steps / 10, 1.0)
    momentum = min(0.996, max(0.99, 1 - math.log(2) / half_life))
    return round(momentum, 6), f"EMA half-life of a tenth of the {_count(shape.total_steps)} steps, within 0.99-0.996"


def _learning_rate(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    if config.model.init_from:
        # A trained backbone needs smaller steps than a random one: DINO's rule at this width, without the 4x that
        # a random start needs in a few hundred steps (layer_decay scales it down further for the early blocks).
        lr = 5e-4 * shape.batch_size / 256 * math.sqrt(384 / shape.embed_dim)
        return lr, f"batch {shape.batch_size}, width {shape.embed_dim}, a quarter of a random start's: --init-from"
    lr = 5e-4 * shape.batch_size / 256 * math.sqrt(384 / shape.embed_dim) * 4
    return lr, f"batch {shape.batch_size}, width {shape.embed_dim}"


def _warmup_epochs(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    steps = min(10 * shape.steps_per_epoch, max(1, round(0.1 * shape.total_steps)))
    return _epochs(steps, shape), f"{_count(steps)} steps: DINO's 10 epochs, at most a tenth of the run"


def _freeze_last_layer_epochs(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    steps = min(shape.steps_per_epoch, round(0.05 * shape.total_steps))
    return _epochs(steps, shape), f"{_count(steps)} steps: DINO's one epoch, at most 5 % of the run"


def _head_warmup_epochs(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    # Random heads at full learning rate wreck a trained backbone (dinov2#204: k-NN 80 % -> 25 % after 10k images):
    # the heads first learn the source's features with the backbone frozen. A DINO head carried over from the
    # source (an official training checkpoint) fits them already and needs only a short settling.
    if not config.model.init_from:
        return 0.0, REFERENCE_REASON
    if config.model.init_heads:
        steps = max(1, round(0.05 * shape.total_steps))
        return _epochs(steps, shape), f"{_count(steps)} steps, a twentieth of the run: the source's DINO head fits"
    steps = max(1, round(0.2 * shape.total_steps))
    return _epochs(steps, shape), f"{_count(steps)} steps, a fifth of the run: fresh heads learn the source first"


def _layer_decay(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    # BEiT (Bao et al. 2022) and iBOT fine-tune ViT-S/B with layer-wise decay 0.65-0.75: the early blocks hold the
    # most general features and move least.
    if not config.model.init_from:
        return 1.0, REFERENCE_REASON
    return 0.75, "BEiT's and iBOT's fine-tuning value: the early blocks of --init-from move least"


def _drop_path_rate(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    if shape.total_steps < 10_000 or shape.depth < 6:
        return 0.0, "short run or shallow model: nothing to regularise yet"
    return 0.1, "DINO's value"


def _zero_mean_patches(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    if config.model.init_from and config.model.init_zero_mean:
        # A source trained under the constraint (a dinopre `auto` run) continues under it: the projection leaves its
        # filters as they are, and dropping it lets colour back into features that were trained without it.
        return True, "--init-from's patch filters are zero-mean already: it was trained under this constraint"
    if config.model.init_from:  # the projection would change the source's function at the first step
        return False, "--init-from: projecting its patch filters would change what it computes"
    # The largest single gain measured by benchmarks/learn.py: a plain ViT's CLS features sort images by colour.
    return True, "tokens see structure, not a patch's mean colour"


def _koleo_weight(shape: RunShape, config: PretrainConfig) -> tuple[Any, str]:
    # DINOv2's weight. Needed with zero-mean patches: their young features are nearly parallel (mean cosine 0.95 at
    # init against 0.34 for a plain ViT) and the teacher goes uniform without a force that spreads them (measured).
    if shape.batch_size < 2:  # KoLeo pushes each image from its nearest neighbour in the batch: one image has none
        return 0.0, "a batch of one image has no neighbour to push away"
    return 0.1, "DINOv2's weight: keeps the young features spread"


AUTO_RULES: dict[str, Callable[[RunShape, PretrainConfig], tuple[Any, str]]] = {
    "out_dim": _out_dim,
    "head_hidden_dim": _head_hidden_dim,
    "head_bottleneck_dim": _head_bottleneck_dim,
    "teacher_momentum_base": _teacher_momentum,
    "learning_rate": _learning_rate,
    "warmup_epochs": _warmup_epochs,
    "freeze_last_layer_epochs": _freeze_last_layer_epochs,
    "drop_path_rate": _drop_path_rate,
    "zero_mean_patches": _zero_mean_patches,
    "koleo_weight": _koleo_weight,
    "head_warmup_epochs": _head_warmup_epochs,
    "layer_decay": _layer_decay,
}


# ============ resolution ============

REFERENCE_REASON = "reference value"
NEW_RUN_SCOPES = {"regulariser_scope": "global", "drop_path_scope": "sample"}


@dataclass(frozen=True)
class ResolvedRecipe:
    """A configuration with every setting decided, and what the recipe decided.

    Attributes:
        config: the configuration the run uses (no unset settings left).
        derived: {setting: reason} for each value the recipe chose; `reference value` for those it took from
            DINO's / iBOT's defaults.
    """

    config: PretrainConfig
    derived: dict[str, str]

    def notes(self) -> list[str]:
        """`out_dim 1024 (2,000 images)` lines, in the order of the configuration."""
        return [f"{name} {_shown(setting(self.config, name))} ({reason})" for name, reason in self.derived.items()
                if reason != REFERENCE_REASON]


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return " ".join(_shown(v) for v in value)
    return str(value)


def resolve(config: PretrainConfig, num_images: int, previous: dict[str, str] | None = None) -> ResolvedRecipe:
    """Fill every unset setting from the configuration's recipe.

    Args:
        config: a configuration from `build_config` (unset recipe settings are None).
        num_images: the training images the run will see.
        previous: the reasons of a resumed run's derived settings, or of the settings a new run took from its
            --init-from source (their values are already in `config`).

    Returns:
        The complete configuration and the derived settings with their reasons.
    """
    # Besides the recipe's own settings, `previous` may give reasons for settings taken from an --init-from source.
    derived = {name: reason for name, reason in (previous or {}).items() if name in FIELD_SECTION}
    shape = run_shape(config, num_images)
    if config.method.recipe is None:
        config = with_settings(config, {"recipe": "auto"})
    # A new run is the same run on 1 and N processes; a resumed one keeps the scopes it was started with.
    config = with_settings(config, {name: value for name, value in NEW_RUN_SCOPES.items()
                                    if setting(config, name) is None})
    values: dict[str, Any] = {}
    for name in sorted(RECIPE_SETTINGS, key=list(FIELD_SECTION).index):
        if setting(config, name) is not None:
            continue
        if name == "out_dim" and config.model.shared_head and config.model.patch_out_dim is not None:
            values[name], derived[name] = config.model.patch_out_dim, "the size of the shared patch head"
        elif config.method.recipe == "auto" and name in AUTO_RULES:
            values[name], derived[name] = AUTO_RULES[name](shape, config)
        elif name != "learning_rate":  # unset under `reference`: the linear scaling rule (peak_learning_rate)
            values[name], derived[name] = reference_value(config.preset, name), REFERENCE_REASON
    resolved = with_settings(config, values)
    validate(resolved)
    return ResolvedRecipe(resolved, derived)
