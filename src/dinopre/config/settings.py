"""The run configuration's settings, each declared once: its type, default, recipe reference value, bounds, check
and help live on its field (`dinopre.config.fields.setting_field`).

The flow is one way: dataclass defaults (the DINO reference recipe) -> preset (`face`,
`hands`) -> `--demo` -> `--config FILE` (TOML or JSON) -> command-line flags -> `validate()`. The result is a
`PretrainConfig` that never changes afterwards; it is printed at start, saved as `params.json` and embedded in
every checkpoint as a plain dict.

Field names are the seed tool's flag names with underscores (`--vit-embed-dim` -> `vit_embed_dim`) and are unique
across sections, so a config file may be flat or use the section tables `[model]`, `[data]`, `[optim]`,
`[method]`, `[run]`. The order of the fields is that of params.json and of the recipe's notes: append, never
reorder. Nothing in `dinopre.config` imports torch, so `dinopre --help` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dinopre.config.fields import DEVICES_HELP, SettingInfo, info_of, setting_field

ALGORITHMS = ("dino", "ibot")
MASK_SHAPES = ("block", "rand")  # iBOT: BEiT-style rectangles or scattered patches (dinopre.data.masking)
PRECISIONS = ("auto", "bf16", "fp32")
# Where the views are rendered. "device" (batched, on the training device) is the default on a CPU too: on the 2-core
# C1 workload it measured 36-38 img/s against 34 img/s for per-image rendering in the workers, and the face demo
# 13 s against 18 s, because rendering in workers competes with the training threads for the same cores.
AUGMENT_PLACES = ("device", "workers")
CENTERINGS = ("ema", "sinkhorn")  # how the teacher's targets are balanced (dinopre.model.losses)
RECIPES = ("auto", "reference")  # where unset settings come from (dinopre.config.recipe)
TEACHER_VIEWS = ("rgb", "gray", "pattern")  # how the teacher sees its views (dinopre.model.method)
LOGGERS = ("tensorboard", "wandb", "mlflow")  # experiment trackers beside metrics.jsonl (dinopre.train.trackers)
# With several processes: "global" gathers the features of every process (the run is the same on 1 and N processes),
# "process" keeps each process's own (as DINOv2, and dinopre before: runs started so continue so).
REGULARISER_SCOPES = ("global", "process")
# "sample": drop path's masks come from each sample's own generator, like its views, whatever the processes;
# "process": from each process's generator (dinopre before: runs started so continue so).
DROP_PATH_SCOPES = ("sample", "process")
BEST_BY = ("knn", "loss")

# Sanity bounds shared by several settings (see `setting_field`'s `maximum`).
_PIXELS, _EPOCHS, _TEMPERATURE, _WEIGHT = 4096, 1_000_000, 100.0, 1000.0
# Two settings checked under one sentence each.
_WEIGHT_DECAY_SAYS = "--weight-decay and --weight-decay-end must be 0 or more."
_LOSS_WEIGHTS_SAYS = "Loss weights must be 0 or more."


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and projection head. Defaults are ViT-S/16 with the DINO head (dino vision_transformer.py)."""

    image_size: int = setting_field(224, check="positive_integer", maximum=_PIXELS,
                                    help="Side of the global views and of the exported backbone's input, in pixels.")
    patch_size: int = setting_field(16, check="positive_integer", maximum=_PIXELS, help="ViT patch side in pixels.")
    vit_embed_dim: int = setting_field(384, check="positive_integer", maximum=8192, help="Token width (384 = ViT-S).")
    vit_depth: int = setting_field(12, check="positive_integer", maximum=256, help="Transformer blocks.")
    vit_num_heads: int = setting_field(6, check="positive_integer", maximum=8192, help="Attention heads.")
    vit_mlp_ratio: float = setting_field(4.0, maximum=64, help="MLP width as a multiple of the token width.")
    # None: the recipe decides (its `reference` under `--recipe reference`, derived under `auto`); also below.
    drop_path_rate: float | None = setting_field(None, reference=0.1, check="below_one",
                                                 help="Stochastic depth of the student's last block.")
    out_dim: int | None = setting_field(
        None, reference=65536, check="positive_integer", maximum=2**20,
        help="Prototypes K of the head. Smaller (4096-16384) learns faster on small data.")
    head_hidden_dim: int | None = setting_field(None, reference=2048, check="positive_integer", maximum=65536,
                                                help="Hidden width of the projection head MLP.")
    head_bottleneck_dim: int | None = setting_field(None, reference=256, check="positive_integer", maximum=65536)
    norm_last_layer: bool = setting_field(
        True, help="Freeze the prototype norms (stable; turn off only for ViT-S if training is slow to improve).")
    shared_head: bool = setting_field(
        True, help="iBOT: one head for CLS and patch tokens (the iBOT ViT-S recipe) or a separate patch head.")
    patch_out_dim: int | None = setting_field(None, check="positive_integer", maximum=2**20,
                                              help="iBOT: prototypes of a separate patch head \\[default: --out-dim].")
    # Patch filters with zero mean per colour channel: a token ignores a patch's mean colour (dinopre.model.method).
    zero_mean_patches: bool | None = setting_field(
        None, reference=False,
        help="Keep each patch filter at zero mean per colour channel, so tokens see structure, not a patch's mean "
             "colour (auto: on).")
    # Whose random numbers drop path draws; None: "sample" for a new run (dinopre.config.recipe), the run's own on
    # resume (dinopre.train.resume). File only: it is set for you.
    drop_path_scope: str | None = setting_field(None, choices=DROP_PATH_SCOPES,
                                                says="{name} must be one of {choices}, got '{value}'.")
    # Continued pretraining (dinopre.train.init_from): the backbone file the run started from, stored absolute, and
    # its sha256, which a resume does not need the file to know. The sha256, `init_heads` and `init_zero_mean` (the
    # source's patch filters are zero-mean already, as a dinopre `auto` run leaves them) are file only: set for you.
    init_from: str | None = setting_field(
        None, help="Start the student and teacher backbones from this checkpoint instead of random weights: an "
                   "official DINO or DINOv2 file, a timm or Hugging Face ViT, a dinopre export or training "
                   "checkpoint (anything dinopre convert takes). The model's shape comes from it; the heads start "
                   "fresh (or from its DINO head, when it has one that fits). Under --recipe auto the heads train "
                   "first with the backbone frozen, then the backbone joins with layer-wise lr decay.")
    init_from_sha256: str | None = setting_field(None)
    init_heads: bool = setting_field(False)
    init_zero_mean: bool = setting_field(False)


@dataclass(frozen=True)
class DataConfig:
    """Training images and the multi-crop augmentation (dino main_dino.py DataAugmentationDINO)."""

    train_dir: tuple[str, ...] = setting_field(
        (), help="Folder of images, searched recursively (.png .jpg .jpeg .bmp .tif .tiff), or tar shards: a folder "
                 "of .tar files, one .tar, or a quoted brace pattern such as 'data/face-{000000..000999}.tar' "
                 "(`dinopre pack` writes them). Repeat for several.")
    demo: bool = setting_field(
        False, help="Train a tiny model on built-in synthetic crops (under a minute on a laptop CPU); with "
                    "--train-dir, the same quick recipe runs on your folder.")
    demo_images: int = setting_field(512, check="positive", maximum=1_000_000,
                                     says="{name} must be positive, got {value}.")
    strict_data: bool = setting_field(
        False, help="Stop at the first image that cannot be decoded (or unreadable folder) instead of skipping it "
                    "and listing it in bad_files.json.")
    # Blank crops (one flat colour, dinopre.data.blank) are left out at scan time unless this is set.
    keep_blank: bool = setting_field(
        False, help="Train on blank crops too (images of one flat colour, such as the black crops the pipeline's "
                    "extractor writes when it finds no face or hand) instead of leaving them out and listing them in "
                    "blank_files.json.")
    num_local_crops: int = setting_field(
        8, check="non_negative", maximum=64,
        help="Small views per image seen by the student only; more helps quality, costs time.")
    local_crop_size: int = setting_field(96, maximum=_PIXELS,
                                         help="Side of the local views in pixels (a multiple of --patch-size).")
    global_crop_scale: tuple[float, float] | None = setting_field(
        None, reference=(0.4, 1.0), check="area_shares",
        help="Share of the image area a global view covers (e.g. 0.4 1.0).")
    local_crop_scale: tuple[float, float] | None = setting_field(
        None, reference=(0.05, 0.4), check="area_shares",
        help="Share of the image area a local view covers (e.g. 0.05 0.4).")
    flip_prob: float = setting_field(
        0.5, check="probability",
        help="Probability of a horizontal flip per view (0 keeps left and right apart).")
    jitter_prob: float = setting_field(0.8, check="probability")
    brightness: float = setting_field(0.4, check="non_negative")
    contrast: float = setting_field(0.4, check="non_negative")
    saturation: float = setting_field(0.2, check="non_negative")
    hue: float = setting_field(0.1, check="half_turn")
    grayscale_prob: float = setting_field(0.2, check="probability")
    blur_sigma: tuple[float, float] = setting_field(
        (0.1, 2.0), check="increasing_pair",
        says="{name} must be two positive numbers MIN MAX with MIN <= MAX, got {listed}.")
    num_workers: int | None = setting_field(
        None, check="non_negative", maximum=1024,
        help="Data-loading processes \\[default: CPUs - 1, at most 8]. Raise it if data wait is high.",
        resume_help="Data-loading processes.")
    augment_on: str = setting_field(
        "device", choices=AUGMENT_PLACES,
        help="Where the crops and colour augmentations run: device (whole batches on the training device, GPU or "
             "CPU; workers only decode) or workers (image by image in the data workers; the same views up to "
             "rounding, but about 14x more CPU per image) \\[default: device].",
        resume_help="Render the views on the device or in the workers (a change makes the continuation differ from "
                    "the uninterrupted run by float rounding).")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its per-step schedules (dino main_dino.py defaults)."""

    epochs: int = setting_field(100, check="positive_integer", maximum=_EPOCHS, help="Passes over the data.",
                                resume_help="Train up to this many epochs in all (more than are done).")
    batch_size: int = setting_field(64, check="positive_integer", maximum=2**20,
                                    help="Images per step (each gives 2 + local views).")
    # None: 5e-4 x batch / 256 under `reference` (the linear scaling rule, `peak_learning_rate`), derived by `auto`.
    learning_rate: float | None = setting_field(
        None, reference=None, check="positive", maximum=10.0,
        help="Peak lr after warmup \\[default: 5e-4 x batch / 256]. Raise it if the loss stalls early.")
    min_lr: float = setting_field(1e-6, check="non_negative", maximum=10.0, help="lr at the end of the cosine decay.")
    warmup_epochs: float | None = setting_field(None, reference=10.0, check="non_negative", maximum=_EPOCHS,
                                                help="Epochs of linear lr warmup from 0 (fractions allowed).")
    weight_decay: float = setting_field(0.04, check="non_negative", maximum=100.0, says=_WEIGHT_DECAY_SAYS,
                                        help="Weight decay at the start (cosine to the end value).")
    weight_decay_end: float = setting_field(0.4, check="non_negative", maximum=100.0, says=_WEIGHT_DECAY_SAYS,
                                            help="Weight decay at the end.")
    clip_grad_norm: float = setting_field(
        3.0, check="off_or_positive", maximum=1e6,
        help="Clip each parameter's gradient norm to this (0 disables). Lower it if the loss spikes.")
    freeze_last_layer_epochs: float | None = setting_field(
        None, reference=1.0, check="non_negative", maximum=_EPOCHS,
        help="Epochs during which the prototype layer is frozen (stabilises the start).")
    # Continued pretraining (dinopre.train.init_from): under `reference` neither, under `auto` both with --init-from.
    head_warmup_epochs: float | None = setting_field(
        None, reference=0.0, check="non_negative", maximum=_EPOCHS,
        help="Epochs at the start during which only the heads train and the backbone stays frozen, so that random "
             "heads cannot wreck the features of an --init-from backbone (auto: a fifth of the run with "
             "--init-from, else 0).")
    layer_decay: float | None = setting_field(
        None, reference=1.0, check="positive", maximum=1.0, says="{flag} must be in (0, 1], got {value}.",
        help="Layer-wise lr decay: block i of n learns at --learning-rate x decay^(n + 1 - i) and the patch "
             "embedding at decay^(n + 1), so the early layers of an --init-from backbone move least (auto: 0.75 "
             "with --init-from, else 1: off).")


@dataclass(frozen=True)
class MethodConfig:
    """Self-distillation settings: temperatures, centering and the teacher EMA."""

    algorithm: str = setting_field("dino", choices=ALGORITHMS, help="Self-supervision method.")
    student_temp: float = setting_field(0.1, check="positive", maximum=_TEMPERATURE,
                                        help="Student softmax temperature.")
    # auto (unset) | reference: where unset settings come from (dinopre.config.recipe)
    recipe: str | None = setting_field(
        None, choices=RECIPES,
        help="Where the settings you leave unset come from: auto derives them from the number of images, the batch, "
             "the number of steps and the model width (printed at start, saved in params.json); reference uses "
             "DINO's and iBOT's published values, tuned for ImageNet and 10^5 steps \\[default: auto].")
    teacher_temp: float | None = setting_field(
        None, reference=0.04, check="positive", maximum=_TEMPERATURE,
        help="Teacher temperature after warmup; above 0.07 is unstable, lower it if the loss does not decrease.")
    warmup_teacher_temp: float | None = setting_field(None, reference=0.04, check="positive", maximum=_TEMPERATURE,
                                                      help="Teacher temperature at the start.")
    warmup_teacher_temp_epochs: float | None = setting_field(
        None, reference=0.0, check="non_negative", maximum=_EPOCHS, says="{flag} must be 0 or more.",
        help="Epochs of linear teacher temperature warmup.")
    center_momentum: float = setting_field(0.9, check="unit_interval", help="EMA momentum of the teacher center.")
    centering: str | None = setting_field(  # ema (DINO) | sinkhorn (DINOv2's Sinkhorn-Knopp)
        None, reference="ema", choices=CENTERINGS,
        help="How the teacher's targets are balanced: ema (DINO: subtract a running mean) or sinkhorn (DINOv2's "
             "Sinkhorn-Knopp: every prototype gets an equal share of each batch, which rules out collapse) "
             "\\[default: ema].")
    koleo_weight: float | None = setting_field(  # DINOv2 uses 0.1
        None, reference=0.0, check="off_or_positive", maximum=_WEIGHT,
        help="Weight of DINOv2's KoLeo term, which spreads the student's features apart (0.1 in DINOv2; 0 is off) "
             "\\[default: the recipe's: 0.1 under auto, 0 under reference].")
    teacher_view: str | None = setting_field(  # rgb | gray | pattern: how the teacher sees its views
        None, reference="rgb", choices=TEACHER_VIEWS,
        help="How the teacher sees its views: rgb (as rendered, DINO), gray (so its targets, and the features the "
             "student learns, cannot depend on colour: skin tone, lighting, clothing) or pattern (gray, standardised "
             "per view: nor on brightness and contrast) \\[default: the recipe's].")
    contrast_weight: float | None = setting_field(  # a training-only contrastive head between the global views
        None, reference=0.0, check="off_or_positive", maximum=_WEIGHT,
        help="Weight of a contrastive loss (SimCLR's InfoNCE) between the student's two global views, through a "
             "training-only head that is never exported; 0 is off \\[default: the recipe's].")
    contrast_temperature: float = setting_field(0.2, check="positive", maximum=_TEMPERATURE,
                                                says="{name} must be positive, got {value}.")
    drloc_weight: float | None = setting_field(  # a training-only head that locates pairs of patch tokens (Drloc)
        None, reference=0.0, check="off_or_positive", maximum=_WEIGHT,
        help="Weight of a relative-localisation loss (Drloc, Liu et al. 2021): a training-only head, never exported, "
             "predicts how far apart two of the student's patch tokens lie; 0 is off \\[default: 0 under both "
             "recipes: no gain measured at the original tool's budget].")
    teacher_momentum_base: float | None = setting_field(
        None, reference=0.996, check="unit_interval",
        help="Teacher EMA momentum at the start (cosine to the final value); raise it (0.999) for small batches.")
    teacher_momentum_final: float = setting_field(1.0, check="unit_interval", help="Teacher EMA momentum at the end.")
    # iBOT only (bytedance/ibot ViT-S recipe)
    patch_loss_weight: float = setting_field(
        1.0, check="non_negative", maximum=1e6, says=_LOSS_WEIGHTS_SAYS,
        help="iBOT: weight of the masked-patch loss against the CLS loss (1 = equal).")
    cls_loss_weight: float = setting_field(1.0, check="non_negative", maximum=1e6, says=_LOSS_WEIGHTS_SAYS)
    patch_mask_ratio: tuple[float, float] = setting_field(
        (0.1, 0.5), check="mask_ratio",
        help="iBOT: share of a masked view's patches that are masked, drawn per view in [MIN, MAX] (e.g. 0.1 0.5; "
             "the same number twice for a fixed share).")
    mask_probability: float = setting_field(
        0.5, check="unit_interval", help="iBOT: share of global views that are masked at all (0.5: half stay whole).")
    mask_shape: str = setting_field("block", choices=MASK_SHAPES, says="{flag} must be block or rand, got '{value}'.",
                                    help="iBOT: block (BEiT-style rectangles) or rand (scattered patches).")
    teacher_patch_temp: float = setting_field(0.07, check="positive", maximum=_TEMPERATURE,
                                              help="iBOT: teacher temperature of the patch loss after its warmup.")
    warmup_teacher_patch_temp: float = setting_field(0.04, check="positive", maximum=_TEMPERATURE)
    warmup_teacher_patch_temp_epochs: float = setting_field(30.0, check="non_negative", maximum=_EPOCHS,
                                                            says="{flag} must be 0 or more.")
    # Which batch KoLeo and the contrastive loss see; None: "global" for a new run (dinopre.config.recipe), the run's
    # own on resume (dinopre.train.resume). File only: it is set for you.
    regulariser_scope: str | None = setting_field(None, choices=REGULARISER_SCOPES,
                                                  says="{name} must be one of {choices}, got '{value}'.")


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes, and what it writes."""

    output_dir: str = setting_field(
        "work_dirs/dino", help="Run directory for checkpoints and logs \\[default: work_dirs/dino_PRESET].")
    seed: int = setting_field(0, check="non_negative", maximum=2**63 - 1,
                              help="Seed; the same seed and data give the same run.")
    device: str = setting_field("auto", check="device", help=f"{DEVICES_HELP} \\[default: auto].",
                                resume_help=f"{DEVICES_HELP}.")
    precision: str = setting_field(
        "auto", choices=PRECISIONS, help="auto = bf16 autocast on CUDA, fp32 on CPU. Use fp32 if you see NaN losses.")
    log_interval: int = setting_field(
        10, check="positive_integer", says="{flag} must be a positive number of steps, got {value}.",
        help="Steps between log lines and metrics records.", resume_help="Steps between log lines.")
    checkpoint_every: int = setting_field(
        0, check="non_negative",
        says="{flag} must be 0 (epoch ends only) or a positive number of steps, got {value}.",
        help="Also write checkpoint_last.pt every N steps inside an epoch (0: at epoch ends only). Use it when an "
             "epoch takes long and the machine may be preempted.",
        resume_help="Write checkpoint_last.pt every N steps too.")
    compile: bool = setting_field(
        False, help="torch.compile the backbones: faster steps on a GPU after a compilation of a minute or two at "
                    "start; losses equal the eager ones up to float rounding.")
    export_backbone: str | None = setting_field(
        None, help="Write the teacher backbone here at the end, in the format load_dinov2_backbone reads.")
    stream: str | None = setting_field(
        None, help="Name of the pipeline stream the backbone is for (e.g. face, hand_left), recorded in the export's "
                   "metadata \\[default: the preset].")
    logger: tuple[str, ...] = setting_field(  # experiment trackers (LOGGERS), beside metrics.jsonl
        (), choices=LOGGERS,
        help="Also log to tensorboard, wandb or mlflow (repeatable; metrics.jsonl is always written). Each needs its "
             'package: pip install "dinopre\\[tensorboard]" (or \\[wandb], \\[mlflow]).')
    # None: DINOPRE_RENDEZVOUS_TIMEOUT, else 300 (dinopre.base.rendezvous)
    rendezvous_timeout: float | None = setting_field(
        None, check="positive", maximum=7 * 86400, says="{flag} must be a positive number of seconds, got {value}.",
        help="With torchrun or srun: how long to wait for every process to join before giving up, in seconds "
             "\\[default: DINOPRE_RENDEZVOUS_TIMEOUT, else 300].",
        resume_help="With torchrun or srun: seconds to wait for every process to join \\[default: 300].")


@dataclass(frozen=True)
class EvalConfig:
    """Measuring the features while training (train.evaluation): a labelled k-NN probe and label-free signals."""

    eval_dir: str | None = setting_field(
        None, help="Labelled images to measure the features on: one sub-folder per class (or train/ and test/ "
                   "holding those). Every --eval-every epochs a weighted 20-NN of the teacher's features is scored "
                   "and logged; the loss alone does not tell a useful run from a useless one.")
    eval_every: int = setting_field(
        1, check="positive_integer", maximum=_EPOCHS, says="{flag} must be a positive number of epochs, got {value}.",
        help="Epochs between two k-NN evaluations (the last epoch is always evaluated) \\[default: 1].",
        resume_help="Epochs between two k-NN evaluations (with --eval-dir).")
    best_by: str | None = setting_field(  # knn | loss; unset: knn with an eval_dir, else loss
        None, choices=BEST_BY,
        help="What makes checkpoint_best.pt: the highest k-NN accuracy or the lowest loss \\[default: knn with "
             "--eval-dir, else loss].")
    knn_k: int = setting_field(20, check="positive_integer", maximum=100_000,
                               says="{name} must be a positive number of neighbours, got {value}.")
    knn_temperature: float = setting_field(0.07, check="positive", maximum=_TEMPERATURE,
                                           says="{name} must be positive, got {value}.")
    eval_test_share: float = setting_field(
        0.25, check="open_unit_interval",
        says="{name} is the share of each class held out for testing, in (0, 1); got {value}.")
    monitor_images: int = setting_field(1024, check="non_negative", maximum=1_000_000,
                                        says="{name} must be 0 (off) or more, got {value}.")


@dataclass(frozen=True)
class PretrainConfig:
    """The whole, resolved configuration of one run."""

    preset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The settings the user gave (a flag or a config file), not the preset or --demo: an --init-from source
    # replaces the others' shape (dinopre.train.init_from). Never saved.
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @property
    def resolved_best_by(self) -> str:
        """What chooses checkpoint_best.pt: `best_by`, else k-NN accuracy with an --eval-dir, else the loss."""
        return self.eval.best_by or ("knn" if self.eval.eval_dir else "loss")

    @property
    def resolved_patch_out_dim(self) -> int:
        """Prototypes of the iBOT patch head: `out_dim` when the head is shared."""
        return self.model.patch_out_dim or self.model.out_dim

    @property
    def peak_learning_rate(self) -> float:
        """The lr reached at the end of warmup (`learning_rate`, or DINO's 5e-4 x batch / 256 when unset)."""
        if self.optim.learning_rate is not None:
            return self.optim.learning_rate
        return 5e-4 * self.optim.batch_size / 256


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "method": MethodConfig,
    "run": RunConfig,
    "eval": EvalConfig,
}
FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}

# ============ tables derived from the declarations ============

SETTING_INFO: dict[str, SettingInfo] = {
    f.name: info_of(f) for cls in SECTIONS.values() for f in dataclasses.fields(cls)
}
# The settings a recipe decides when they are left unset, and their value under `--recipe reference`: DINO's
# (dino main_dino.py) and iBOT's published defaults. `auto` derives them from the run (dinopre.config.recipe).
RECIPE_SETTINGS = frozenset(name for name, info in SETTING_INFO.items() if info.is_recipe_setting)
REFERENCE_VALUES: dict[str, Any] = {name: info.reference for name, info in SETTING_INFO.items()
                                    if info.is_recipe_setting and info.reference is not None}
# The largest value each setting may take (see `setting_field`'s `maximum`).
UPPER_BOUNDS: dict[str, float] = {name: info.maximum for name, info in SETTING_INFO.items()
                                  if info.maximum is not None}
# The help of the command-line options, by setting: `dinopre train`'s (and `preview`'s) and `dinopre resume`'s.
HELP: dict[str, str] = {name: info.help for name, info in SETTING_INFO.items() if info.help is not None}
RESUME_HELP: dict[str, str] = {name: info.resume_help for name, info in SETTING_INFO.items()
                               if info.resume_help is not None}


def setting(config: PretrainConfig, name: str) -> Any:
    """The value of a setting by its field name (e.g. `out_dim`)."""
    return getattr(getattr(config, FIELD_SECTION[name]), name)


def with_settings(config: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
    """A copy of `config` with some settings replaced, by field name (not validated)."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        sections.setdefault(FIELD_SECTION[name], {})[name] = value
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)
                                          for section, changes in sections.items()})


def config_to_dict(config: PretrainConfig) -> dict[str, Any]:
    """The configuration as nested plain values (tuples become lists), safe for JSON and checkpoints."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    out: dict[str, Any] = {"preset": config.preset}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {f.name: plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out
