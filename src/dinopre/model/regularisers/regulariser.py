"""What a regulariser is: a weighted extra term of the student's loss on its global views, with an optional
training-only head."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from dinopre.data.dataset import CropBatch


@dataclass(frozen=True)
class StudentGlobals:
    """What the student computed on the step's global views, for the regularisers to read.

    Attributes:
        cls: (G*B, D) crop-major CLS features of the G global views (masked ones for iBOT).
        patch_tokens: (G*B, N, D) their patch tokens, or None when no regulariser needs them (DINO then runs the
            backbone's cheaper CLS-only path).
        batch: the step's batch.
        patch_size: the backbone's patch side in pixels.
    """

    cls: torch.Tensor
    patch_tokens: torch.Tensor | None
    batch: CropBatch
    patch_size: int

    @property
    def views(self) -> int:
        """G, the number of global views per image."""
        return self.cls.shape[0] // self.batch.batch_size

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the global views' patch grid."""
        height, width = self.batch.global_crops.shape[-2:]
        return height // self.patch_size, width // self.patch_size


class Regulariser(ABC):
    """One extra term of the student's loss, added to the total as `weight * loss(...)`.

    Subclasses set `name` (the key of the term's detached value among the step's losses, logged and shown; the
    registry lists it) and `needs_patch_tokens`, and implement `loss`. A training-only `head` is put in the
    student's ModuleDict under `head_key`, so it trains with the student, gets a teacher copy through the EMA like
    every student module, and is saved in checkpoints; it is never part of the exported backbone.

    Args:
        weight: the term's weight in the total (positive: a regulariser that is off is not built).
        head: the training-only head `loss` runs, or None.
    """

    name: ClassVar[str]
    needs_patch_tokens: ClassVar[bool] = False

    def __init__(self, weight: float, head: nn.Module | None = None) -> None:
        self.weight = weight
        self.head = head

    @property
    def head_key(self) -> str:
        """The head's key in the student's (and the teacher's) ModuleDict, hence in the checkpoints."""
        return f"{self.name}_head"

    @abstractmethod
    def loss(self, student: StudentGlobals) -> torch.Tensor:
        """The unweighted scalar term of this step."""
