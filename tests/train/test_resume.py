"""Continuing a run: settings that shape its random numbers and that older checkpoints lack continue as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_old_checkpoints import OLD_CHECKPOINT, SETTINGS

from dinopre.base.errors import ConfigError
from dinopre.config.loading import build_config
from dinopre.files.state import load_training_checkpoint
from dinopre.train.resume import continued_config, load_resume_state, saved_config


def test_a_checkpoint_from_before_the_scopes_continues_per_process(tmp_path: Path) -> None:
    """It drew drop path from each process's generator and computed KoLeo per process: so does its continuation
    (tests/test_old_checkpoints.py checks the weights bit for bit)."""
    state = load_training_checkpoint(OLD_CHECKPOINT)
    assert "regulariser_scope" not in state.config["method"] and "drop_path_scope" not in state.config["model"]
    saved = saved_config(state)
    assert (saved.method.regulariser_scope, saved.model.drop_path_scope) == ("process", "process")
    requested = build_config("face", demo=True, cli_settings={**SETTINGS, "output_dir": str(tmp_path)})
    assert requested.method.regulariser_scope is None  # unset: the checkpoint's
    load_resume_state(OLD_CHECKPOINT, requested)  # no difference to refuse
    continued = continued_config(requested, state)
    assert (continued.method.regulariser_scope, continued.model.drop_path_scope) == ("process", "process")
    other = build_config("face", demo=True, cli_settings={**SETTINGS, "output_dir": str(tmp_path),
                                                          "regulariser_scope": "global"})
    with pytest.raises(ConfigError, match="regulariser_scope: checkpoint 'process', requested 'global'"):
        load_resume_state(OLD_CHECKPOINT, other)
