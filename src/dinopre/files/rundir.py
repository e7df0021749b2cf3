"""The run directory and its files (README "The run directory").

`checkpoint_last.pt` (every epoch and every `--checkpoint-every` steps), `checkpoint_best.pt` (lowest epoch mean
loss), `params.json` (resolved config + environment), `metrics.jsonl` (one JSON object per log step and per
epoch), `artifacts.json` (every checkpoint and export written, with its sha256), `bad_files.json` (files that could
not be decoded) and `blank_files.json` (blank crops left out, `dinopre.data.blank`). Every write is atomic.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from dinopre.base.errors import RunDirError
from dinopre.base.hints import resume_command
from dinopre.data.blank import BLANK_FILES, DECODED, is_blank_reason
from dinopre.files.checkpoint import TMP_MARK, atomic_save, atomic_write_text, sha256_file
from dinopre.files.outputs import write_error

CHECKPOINT_LAST, CHECKPOINT_BEST = "checkpoint_last.pt", "checkpoint_best.pt"
PARAMS, METRICS, ARTIFACTS, BAD_FILES = "params.json", "metrics.jsonl", "artifacts.json", "bad_files.json"
LOCK = ".dinopre.lock"  # held (flock) by the one process that writes the folder


class RunDirectory:
    """The files of one run.

    Args:
        path: the folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.artifacts: dict[str, Any] = {}
        self._lock: Any = None  # the open lock file while this process holds the folder
        self._scanned_blanks: Iterable[tuple[str, str]] = ()  # the blank crops the scan left out
        self._decoded_blanks: dict[str, str] = {}  # blank images met when decoded, as last written
        self._blanks_written = 0  # records in blank_files.json

    # ---- one live writer per folder

    def lock(self) -> None:
        """Hold the folder for this process: an OS lock (flock) on `.dinopre.lock`, which the kernel releases when
        the process ends however it ends (kill -9 included), so nothing stale is ever left to clean up.

        Raises:
            RunDirError: another live process holds the folder (named with its host and process id).
        """
        if not self.try_lock():
            holder = self._holder()
            raise RunDirError(f"'{self.path}' is in use by a live run ({holder}); wait for it to end or stop it "
                              "first, or choose another --output-dir.")

    def try_lock(self) -> bool:
        """Take the folder's lock if no live process holds it; False when one does."""
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK, "a+", encoding="utf-8")
        except OSError as exc:
            raise write_error(self.path / LOCK, exc, "the run's lock file") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        except OSError:  # a file system without locks: one writer cannot be enforced, training still works
            pass
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        handle.flush()
        self._lock = handle
        return True

    def unlock(self) -> None:
        """Let the folder go (the lock also goes with the process)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _holder(self) -> str:
        try:
            info = json.loads((self.path / LOCK).read_text(encoding="utf-8"))
            return f"process {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    @property
    def last(self) -> Path:
        return self.path / CHECKPOINT_LAST

    @property
    def best(self) -> Path:
        return self.path / CHECKPOINT_BEST

    def prepare(self, *, overwrite: bool, resuming: bool) -> None:
        """Create the folder and hold it (`lock`); refuse to start a new run over one that has checkpoints unless
        `overwrite`. The caller releases the folder with `unlock` when the run ends.

        Raises:
            RunDirError: a live run holds the folder, checkpoints exist (new run without overwrite), or the folder
                cannot be written.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"Cannot write to output folder '{self.path}': {exc.strerror or exc}; "
                              "choose another --output-dir.") from None
        self.lock()  # before anything in the folder is changed: a live run's files are its own
        existing = [p.name for p in (self.last, self.best) if p.exists()]
        if existing and not (overwrite or resuming):
            self.unlock()
            raise RunDirError(
                f"'{self.path}' already holds a run ({existing[0]}); continue it with `{resume_command(self.path)}`, "
                "start over with --overwrite, or choose another --output-dir."
            )
        for stale in self.path.glob(f".*{TMP_MARK}*"):  # left by a process killed in the middle of a write
            stale.unlink(missing_ok=True)
        if resuming:
            self.load_artifacts()
        else:  # a new run: logs of a run that died before its first checkpoint (or was overwritten) go
            for name in (METRICS, ARTIFACTS, BAD_FILES, BLANK_FILES, CHECKPOINT_LAST, CHECKPOINT_BEST):
                (self.path / name).unlink(missing_ok=True)

    def load_artifacts(self) -> None:
        """Read artifacts.json (a missing or damaged one starts empty)."""
        try:
            self.artifacts = json.loads((self.path / ARTIFACTS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self.artifacts = {}  # a missing or damaged index is rebuilt from the files written from now on

    def read_bad_files(self) -> dict[str, str]:
        """Files a previous part of this run could not use, {path: reason}: those that could not be decoded and the
        blank images met when decoded."""
        bad = _read_records(self.path / BAD_FILES)
        self._decoded_blanks = {path: reason for path, reason in _read_records(self.path / BLANK_FILES).items()
                                if reason == DECODED}
        return {**bad, **self._decoded_blanks}

    def write_bad_files(self, bad: dict[str, str]) -> Path:
        """bad_files.json: every file skipped so far that could not be decoded, with the reason; blank images met
        when decoded go to blank_files.json instead, beside those the scan left out."""
        broken = {path: reason for path, reason in bad.items() if not is_blank_reason(reason)}
        blanks = {path: reason for path, reason in bad.items() if is_blank_reason(reason)}
        if broken or (self.path / BAD_FILES).exists():
            records = [{"file": path, "reason": reason} for path, reason in sorted(broken.items())]
            atomic_write_text(json.dumps(records, indent=2) + "\n", self.path / BAD_FILES)
        if blanks != self._decoded_blanks:
            self._decoded_blanks = blanks
            self._write_blanks()
        return self.path / BAD_FILES

    def write_blank_files(self, scanned: Iterable[tuple[str, str]]) -> Path | None:
        """blank_files.json: the blank crops the scan left out (`scanned`, iterable again at each write) and those
        met when decoded, with the reason; None (and no file) when there are none."""
        self._scanned_blanks = scanned
        return self._write_blanks()

    def _write_blanks(self) -> Path | None:
        records = iter(itertools.chain(self._scanned_blanks, sorted(self._decoded_blanks.items())))
        first = next(records, None)
        if first is None:
            return None
        self._blanks_written = 1

        def rest() -> Iterator[str]:
            for record in records:
                self._blanks_written += 1
                yield ",\n  " + _record(*record)

        lines = itertools.chain(["[\n  " + _record(*first)], rest(), ["\n]\n"])
        atomic_write_text(lines, self.path / BLANK_FILES)  # streamed: a third of 10^7 crops may be listed
        return self.path / BLANK_FILES

    def blank_report(self) -> tuple[int, Path | None]:
        """How many blank crops blank_files.json lists, and its path (None when there are none)."""
        return self._blanks_written, self.path / BLANK_FILES if self._blanks_written else None

    def read_params(self) -> dict[str, Any] | None:
        """params.json as the folder holds it: None when there is none, {} when it is not a JSON object."""
        try:
            params = json.loads((self.path / PARAMS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}
        return params if isinstance(params, dict) else {}

    def write_params(self, params: dict[str, Any]) -> None:
        atomic_write_text(json.dumps(params, indent=2) + "\n", self.path / PARAMS)

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one JSON line to metrics.jsonl."""
        try:
            with open(self.path / METRICS, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise write_error(self.path / METRICS, exc, "the metrics log") from None

    def truncate_metrics(self, global_step: int) -> None:
        """Drop records after `global_step` (written by a run that was interrupted after its last checkpoint)."""
        path = self.path / METRICS
        if not path.exists():
            return
        kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                if _record_step(line) <= global_step]
        atomic_write_text("".join(line + "\n" for line in kept), path)

    def save_checkpoint(self, state: dict[str, Any], *, best: bool) -> Path:
        """Write checkpoint_last.pt (and first checkpoint_best.pt when `best`) and record them.

        The best file is written first: a crash between the two leaves checkpoint_last.pt one save behind, and
        resuming from it redoes the same steps and writes both again, so best and last always agree.
        """
        details = {"epoch": state["epoch"], "step": state["global_step"]}
        if best:
            sha = atomic_save(state, self.best)
            self.record(self.best, "checkpoint", sha256=sha, **details)
            self._copy_atomic(self.best, self.last)
        else:
            sha = atomic_save(state, self.last)
        self.record(self.last, "checkpoint", sha256=sha, **details)
        return self.last

    @staticmethod
    def _copy_atomic(source: Path, target: Path) -> None:
        tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}")
        try:
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            tmp.replace(target)
        except OSError as exc:
            raise RunDirError(f"{str(write_error(target, exc, 'the checkpoint')).rstrip('.')} (the previous "
                              "checkpoint is intact).") from None
        finally:
            tmp.unlink(missing_ok=True)

    def record(self, path: Path, kind: str, sha256: str | None = None, **details: Any) -> None:
        """Add or update the artifacts.json entry of a file written for this run (size and sha256, computed
        from the file unless the writer already knows it)."""
        try:
            name = str(Path(path).resolve().relative_to(self.path.resolve()))
        except ValueError:
            name = str(Path(path).resolve())
        self.artifacts[name] = {"kind": kind, **details, "bytes": Path(path).stat().st_size,
                                "sha256": sha256 or sha256_file(path),
                                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_text(json.dumps(self.artifacts, indent=2) + "\n", self.path / ARTIFACTS)


def _record(path: str, reason: str) -> str:
    return json.dumps({"file": path, "reason": reason})


def _read_records(path: Path) -> dict[str, str]:
    """{file: reason} of a bad_files.json or blank_files.json (empty when missing or damaged)."""
    try:
        return {r["file"]: r["reason"] for r in json.loads(path.read_text(encoding="utf-8"))}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _record_step(line: str) -> float:
    """The global step of a metrics line; infinity for a line cut short by a crash (so it is dropped)."""
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return float("inf")


class NullRunDirectory(RunDirectory):
    """The run directory as the processes other than the main one see it: they write nothing (one writer per run),
    but name the same files in their messages."""

    def prepare(self, *, overwrite: bool, resuming: bool) -> None:
        pass

    def unlock(self) -> None:
        pass

    def read_bad_files(self) -> dict[str, str]:
        return {}

    def write_bad_files(self, bad: dict[str, str]) -> Path:
        return self.path / BAD_FILES

    def write_blank_files(self, scanned: Iterable[tuple[str, str]]) -> Path | None:
        return None

    def read_params(self) -> dict[str, Any] | None:
        return None

    def write_params(self, params: dict[str, Any]) -> None:
        pass

    def append_metrics(self, record: dict[str, Any]) -> None:
        pass

    def truncate_metrics(self, global_step: int) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any], *, best: bool) -> Path:
        return self.last

    def record(self, path: Path, kind: str, sha256: str | None = None, **details: Any) -> None:
        pass
