"""Regenerate the static shell-completion scripts in completions/ from the `dinopre` Typer app.

Run from the repository root:  python completions/generate.py

Route: the app's own public `--show-completion SHELL` option, invoked in-process through `typer.testing.CliRunner`
with prog name "dinopre" (so the complete var is `_DINOPRE_COMPLETE`) and with
`_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION=1` set while the command is built, which makes the option take an
explicit shell instead of detecting the caller's shell with shellingham. The output is therefore independent of the
user's shell and terminal. It is the text
`--install-completion` writes (`get_completion_script`, stripped) plus the single trailing newline that
`--show-completion` prints: byte-identical to the installed file for fish, and for bash/zsh the installed file plus a
final newline.

Why not `_DINOPRE_COMPLETE=source_<shell>`: Typer 0.29.2 does accept it (Typer keeps Click 7's `source_bash` order;
Click 8's `bash_source` fails with "Shell source not supported."), but it prints the raw, unstripped template: it starts
with a blank line, so `_dinopre` would not begin with `#compdef dinopre`, and for bash it also runs the local `bash` to
check its version. The private `typer._completion_shared.get_completion_script` fallback is not needed.

The scripts are thin shims that call back into `dinopre` with `_DINOPRE_COMPLETE=complete_<shell>`; they hold no
command or option names, so they only change when Typer changes its templates. tests/test_completions.py regenerates
them in memory and fails when the committed files are stale.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMPLETIONS_DIR = Path(__file__).resolve().parent
REPO_ROOT = COMPLETIONS_DIR.parent
PROG_NAME = "dinopre"
COMPLETE_VAR = "_DINOPRE_COMPLETE"
FILES: dict[str, str] = {"bash": "dinopre.bash", "zsh": "_dinopre", "fish": "dinopre.fish"}


@contextmanager
def _shell_detection_disabled() -> Iterator[None]:
    """Make `--show-completion` take a shell name argument (read when Typer builds the command)."""
    key = "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"
    old = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[key]
        else:
            os.environ[key] = old


def render(shell: str) -> str:
    """Return the completion script Typer shows for `shell` ("bash", "zsh" or "fish")."""
    try:
        from dinopre.cli import app
    except ImportError:  # not installed: use the working tree
        sys.path.insert(0, str(REPO_ROOT / "src"))
        from dinopre.cli import app
    from typer.testing import CliRunner

    with _shell_detection_disabled():
        # A stray _DINOPRE_COMPLETE in the caller's environment would turn this call into a completion request.
        result = CliRunner().invoke(app, ["--show-completion", shell], prog_name=PROG_NAME,
                                    env={COMPLETE_VAR: None})
    if result.exit_code != 0 or f"{COMPLETE_VAR}=complete_{shell}" not in result.stdout:
        raise RuntimeError(f"`{PROG_NAME} --show-completion {shell}` failed (exit {result.exit_code}):\n"
                           f"{result.output}")
    return result.stdout


def render_all() -> dict[Path, str]:
    """Return {path in completions/: script text} for bash, zsh and fish."""
    return {COMPLETIONS_DIR / name: render(shell) for shell, name in FILES.items()}


def main() -> None:
    """Write the three scripts next to this file."""
    for path, text in render_all().items():
        path.write_text(text, encoding="utf-8", newline="\n")
        print(f"wrote {path.relative_to(REPO_ROOT)}")  # noqa: T201


if __name__ == "__main__":
    main()
