"""What dinopre may write over: the one check every output path goes through, and what a failed write means.

An output (an export, its JSON sidecar) may replace an existing file only when the user said so (`--force`,
`--overwrite`), and never:
- a folder, a device, a FIFO or anything else that is not a regular file (or a link to one);
- one of the command's own inputs (the checkpoint being exported, the config file being read);
- one of a run directory's own files (checkpoints, params.json, metrics.jsonl, artifacts.json, ...), which only
  the run that owns the folder writes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from dinopre.base.errors import RunDirError

# The files of a run directory (dinopre.files.rundir) that nothing but its own run may write.
RUN_FILES = ("checkpoint_last.pt", "checkpoint_best.pt", "params.json", "metrics.jsonl", "artifacts.json",
             "bad_files.json", "views.png")


def sidecar_of(path: Path) -> Path:
    """The JSON sidecar next to an export: the same stem with `.json`."""
    return Path(path).with_suffix(".json")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _is_run_file(path: Path) -> bool:
    folder = path.parent
    return path.name in RUN_FILES and any((folder / name).exists() for name in ("artifacts.json", RUN_FILES[0]))


def check_output(path: Path, *, force: bool, inputs: Iterable[Path] = (), what: str = "The output",
                 flag: str = "--force") -> None:
    """Refuse an output path that must not be written.

    Args:
        path: the file about to be written.
        force: the user allowed replacing an existing regular file.
        inputs: files the command reads, which it must never replace.
        what: how to name the output in a message, e.g. "--export-backbone".
        flag: the option that allows replacing, for the message.

    Raises:
        RunDirError: the path is a folder or a special file, an input, a run's own file, or exists without `force`.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise RunDirError(f"{what} '{path}' is the file being read ({source}); write it to another path.")
    if _is_run_file(path):
        raise RunDirError(f"{what} '{path}' is one of the files of the run in '{path.parent}', which only that run "
                          "writes; choose another name.")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RunDirError(f"{what} '{path}' cannot be checked ({exc.strerror or exc}); choose another path.") from None
    if stat.S_ISDIR(info.st_mode):
        raise RunDirError(f"{what} '{path}' is a folder; give a file path such as '{path / 'backbone.pt'}'.")
    if not stat.S_ISREG(info.st_mode):
        raise RunDirError(f"{what} '{path}' exists and is not a regular file (a device, FIFO or socket); choose "
                          "another path.")
    if not force:
        raise RunDirError(f"{what} '{path}' already exists; pass {flag} to replace it or choose another path.")


def check_export_paths(path: Path, *, force: bool, inputs: Iterable[Path] = (), what: str = "The export",
                       flag: str = "--force") -> Path:
    """Check an export and its JSON sidecar (an output like the export) before anything is written.

    Returns:
        The sidecar path.

    Raises:
        RunDirError: either path must not be written (see `check_output`), or they would be the same file.
    """
    path, sidecar = Path(path), sidecar_of(path)
    if path.suffix.lower() == ".json":
        raise RunDirError(f"{what} '{path}' ends in .json, the name of its own metadata sidecar; give it a .pt name.")
    inputs = list(inputs)
    check_output(path, force=force, inputs=inputs, what=what, flag=flag)
    check_output(sidecar, force=force, inputs=inputs, what=f"The metadata sidecar of {what.lower()}", flag=flag)
    return sidecar


def check_parent_writable(path: Path, what: str) -> None:
    """Create the folder of an output and check that a file can be written in it.

    Raises:
        RunDirError: the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.write-test-{os.getpid()}")
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise write_error(path, exc, what) from None


def write_error(path: Path, exc: OSError, what: str = "") -> RunDirError:
    """One sentence for a failed write that says what to do, by the cause.

    Args:
        path: the file that could not be written.
        exc: the error.
        what: what was being written (e.g. "the checkpoint"), for the message.
    """
    target = f"{what} '{path}'" if what else f"'{path}'"
    code = exc.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk is full (or over quota); free space or choose another output folder"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "the folder is not writable; fix its permissions or choose another output folder"
    elif code == errno.EISDIR:
        advice = "a folder has that name; give a file path"
    elif code in (errno.ENOTDIR, errno.ENOENT):
        advice = "part of the path is a file or does not exist; choose another path"
    else:
        advice = f"{exc.strerror or exc}"
    return RunDirError(f"Could not write {target}: {advice}.")
