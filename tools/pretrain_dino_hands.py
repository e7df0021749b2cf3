#!/usr/bin/env python3
"""Pretrain a hands backbone with DINO or iBOT: the original script's flags, run by `dinopre train hands`.

Kept for existing commands and job files. It is a thin shim onto the same core as the `dinopre` command (see
`_legacy_cli.py` next to it): the `hands` preset supplies every setting not given on the command line.

Usage (from the repository root; no installation or PYTHONPATH needed):

    python tools/pretrain_dino_hands.py --train-dir data/rois/hands --epochs 100 --batch-size 64 \
        --export-backbone work_dirs/dino_hands/backbone.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

# tools/ is not a package: put this script's own folder first so the shared command line resolves to the sibling
# module whatever the working directory (it in turn finds src/dinopre when dinopre is not installed).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _legacy_cli  # noqa: E402

PRESET = "hands"

if __name__ == "__main__":
    sys.exit(_legacy_cli.main(PRESET))
