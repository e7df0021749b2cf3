"""Makes `import dinopre` work from a plain checkout (no `pip install`, no PYTHONPATH).

benchmarks/ and tools/ are not packages, and each holds this same module: a script run as `python FOLDER/NAME.py`
has its own folder on sys.path, so its first import, `import _checkout`, finds the copy beside it, which puts the
checkout's src/ on sys.path unless dinopre is importable already (an installed dinopre wins).
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def ensure_dinopre_importable() -> None:
    """Put the checkout's src/ on sys.path unless dinopre is importable already.

    Raises:
        ModuleNotFoundError: a dependency of dinopre (torch, typer, ...) is missing; adding src/ cannot help.
    """
    try:
        import dinopre  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "dinopre":
            raise
        sys.path.insert(0, str(SRC))


ensure_dinopre_importable()
