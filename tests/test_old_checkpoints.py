"""Checkpoints written by earlier versions of dinopre still resume, bit for bit.

`fixtures/checkpoint_v1_ibot_step4.pt` was written by dinopre 0.1.0 as it stood before the package was split into
subpackages (issue 24): `dinopre train face --demo` with a tiny iBOT model and every recipe option that keeps state
on (KoLeo, Sinkhorn-Knopp centering, the contrastive head, the pattern teacher view, zero-mean patch filters),
48 demo images, batch 8 (6 steps per epoch), 2 epochs, `--checkpoint-every 4`, one process, one CPU thread,
stopped after step 6 so that its last checkpoint is the mid-epoch one of step 4. Continued to the end of epoch 2
by that same code, its weights hashed to `FINAL_WEIGHTS` (sha256 over the student's and the teacher's tensors,
sorted by name, as float32 bytes); the uninterrupted run reached the same hash.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from dinopre.config.loading import build_config
from dinopre.train.engine import fit

OLD_CHECKPOINT = Path(__file__).parent / "fixtures" / "checkpoint_v1_ibot_step4.pt"
FINAL_WEIGHTS = "e2d8296ed8c008c527740c589c2006780469389ac6e89e9088d0c7999d6cc8f0"
SETTINGS = dict(image_size=32, patch_size=8, local_crop_size=16, num_local_crops=2, vit_embed_dim=32, vit_depth=2,
                vit_num_heads=2, drop_path_rate=0.1, out_dim=64, head_hidden_dim=64, head_bottleneck_dim=16,
                batch_size=8, epochs=2, warmup_epochs=1, num_workers=0, log_interval=2, demo_images=48,
                checkpoint_every=4, algorithm="ibot", koleo_weight=0.1, centering="sinkhorn", contrast_weight=0.5,
                teacher_view="pattern", zero_mean_patches=True)


class _Silent:
    def emit(self, event: object) -> None:
        pass


def _weights_hash(checkpoint: Path) -> str:
    state = torch.load(checkpoint, weights_only=True)
    digest = hashlib.sha256()
    for part in ("student", "teacher"):
        for name in sorted(state[part]):
            digest.update(name.encode())
            digest.update(state[part][name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_checkpoint_from_before_the_refactor_resumes_bit_for_bit(tmp_path: Path, one_thread: None) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(OLD_CHECKPOINT, run / "checkpoint_last.pt")
    config = build_config("face", demo=True, cli_settings={**SETTINGS, "output_dir": str(run)})
    fit(config, _Silent(), resume_from=run / "checkpoint_last.pt")
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    assert state["global_step"] == 12 and state["epoch"] == 2
    assert _weights_hash(run / "checkpoint_last.pt") == FINAL_WEIGHTS
