"""Static shell-completion scripts: they match what Typer generates, and completion through them really works."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from typer.testing import CliRunner

from dinopre.cli import app

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPLETIONS_DIR = REPO_ROOT / "completions"
SUBCOMMANDS = ("train", "resume", "export", "inspect-checkpoint", "verify-backbone", "attention", "preview", "plot")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dinopre_completions_generate", COMPLETIONS_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _load_generator()


def _complete(shell: str, words: list[str], **extra_env: str) -> list[str]:
    """Run Typer's completion protocol in-process the way the installed script does; `words[-1]` is being typed."""
    if shell == "bash":  # the bash shim joins COMP_WORDS with IFS=$'\n'
        env = {"COMP_WORDS": "\n".join(words), "COMP_CWORD": str(len(words) - 1)}
    else:  # zsh and fish pass the command line up to the cursor
        env = {"_TYPER_COMPLETE_ARGS": " ".join(words)}
    env |= {generate.COMPLETE_VAR: f"complete_{shell}", **extra_env}
    result = CliRunner().invoke(app, [], prog_name=generate.PROG_NAME, env=env)
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line]


@pytest.mark.parametrize("shell", sorted(generate.FILES))
def test_committed_scripts_are_up_to_date(shell: str) -> None:
    """The committed script equals what `dinopre --show-completion SHELL` prints now."""
    path = COMPLETIONS_DIR / generate.FILES[shell]
    expected = generate.render(shell)
    committed = path.read_text(encoding="utf-8") if path.is_file() else None
    assert committed == expected, (
        f"{path.relative_to(REPO_ROOT)} is stale or missing: run `python completions/generate.py` from the repo root"
    )


@pytest.mark.parametrize("shell", sorted(generate.FILES))
def test_scripts_are_thin_shims(shell: str) -> None:
    """Each script calls back into `dinopre` via _DINOPRE_COMPLETE and embeds no command or option names."""
    text = (COMPLETIONS_DIR / generate.FILES[shell]).read_text(encoding="utf-8")
    assert f"_DINOPRE_COMPLETE=complete_{shell}" in text
    assert "dinopre" in text
    for name in (*SUBCOMMANDS[1:], "--train-dir", "--algorithm", "ibot", "hands"):
        assert name not in text
    if shell == "zsh":
        assert text.startswith("#compdef dinopre\n")


def test_bash_protocol_offers_subcommands_options_and_choices() -> None:
    """`complete_bash` lists every subcommand, completes `--tr`, and offers preset and algorithm choices."""
    assert set(SUBCOMMANDS) <= set(_complete("bash", ["dinopre", ""]))
    assert "--train-dir" in _complete("bash", ["dinopre", "train", "--tr"])
    assert {"face", "hands"} <= set(_complete("bash", ["dinopre", "train", ""]))
    assert {"dino", "ibot"} <= set(_complete("bash", ["dinopre", "train", "face", "--algorithm", ""]))


def test_zsh_and_fish_protocols_offer_subcommands() -> None:
    """`complete_zsh` and `complete_fish` (get-args) answer with the subcommands too."""
    zsh = "\n".join(_complete("zsh", ["dinopre", ""]))
    assert zsh.startswith("_arguments") and all(f'"{name}"' in zsh for name in SUBCOMMANDS)
    fish_lines = _complete("fish", ["dinopre", ""], _TYPER_COMPLETE_FISH_ACTION="get-args")
    fish = {line.split("\t")[0] for line in fish_lines}
    assert set(SUBCOMMANDS) <= fish


def test_every_protocol_offers_eval_and_its_options() -> None:
    """`eval` is a subcommand too. It is not in SUBCOMMANDS because the zsh shim calls the shell's own `eval`, so
    the shims' no-command-names check cannot include that word."""
    assert "eval" in _complete("bash", ["dinopre", ""])
    assert '"eval"' in "\n".join(_complete("zsh", ["dinopre", ""]))
    fish = {line.split("\t")[0] for line in _complete("fish", ["dinopre", ""], _TYPER_COMPLETE_FISH_ACTION="get-args")}
    assert "eval" in fish
    assert {"--eval-dir", "--linear"} <= set(_complete("bash", ["dinopre", "eval", "--"]))
    assert {"teacher", "student"} <= set(_complete("bash", ["dinopre", "eval", "bb.pt", "--weights", ""]))


def test_bash_script_completes_end_to_end() -> None:
    """Sourcing completions/dinopre.bash in real bash and running its function fills COMPREPLY via `dinopre`."""
    bash = shutil.which("bash")
    script_dir = Path(sys.executable).parent
    console = shutil.which("dinopre", path=os.pathsep.join([str(script_dir), os.environ.get("PATH", "")]))
    if bash is None or console is None:
        pytest.skip("needs bash and the `dinopre` console script")
    env = {k: v for k, v in os.environ.items() if not k.startswith("_DINOPRE")}
    env["PATH"] = os.pathsep.join([str(Path(console).parent), env.get("PATH", "")])
    snippet = (
        'source "$1" || exit 3\n'
        'complete -p dinopre >/dev/null || exit 4\n'
        "COMP_WORDS=(dinopre train --tr); COMP_CWORD=2; _dinopre_completion dinopre\n"
        'printf "%s\\n" "${COMPREPLY[@]}"; echo "--"\n'
        "COMP_WORDS=(dinopre ''); COMP_CWORD=1; _dinopre_completion dinopre\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", snippet, "bash", str(COMPLETIONS_DIR / "dinopre.bash")],
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    options, _, commands = proc.stdout.partition("--\n")
    assert "--train-dir" in options.split()
    assert set(SUBCOMMANDS) <= set(commands.split())
