"""`dinopre plot`: curves of one or several runs from metrics.jsonl; matplotlib stays optional."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from dinopre.cli import app
from dinopre.viz.plot import INSTALL_HINT, read_run

runner = CliRunner()


def _run(folder: Path, steps: int, knn: bool = True) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps({"type": "step", "epoch": 1 + s // 4, "step": s, "loss": 5 - s / 10, "dino": 5 - s / 10,
                         "lr": 1e-3 * s, "momentum": 0.99, "teacher_temp": 0.04, "teacher_entropy": 4.0})
             for s in range(1, steps + 1)]
    lines += [json.dumps({"type": "epoch", "epoch": e, "step": 4 * e, "loss": 4.0, "rankme": 10.0 + e,
                          **({"knn": 30.0 + e} if knn else {})}) for e in range(1, steps // 4 + 1)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "step", "ste')  # a line cut by a crash
    (folder / "params.json").write_text(json.dumps({"config": {"model": {"out_dim": 256}}}))
    return folder


def test_records_are_read_and_a_cut_line_skipped(tmp_path: Path) -> None:
    run = read_run(_run(tmp_path / "a", 8))
    assert len(run.steps) == 8 and len(run.epochs) == 2 and run.out_dim == 256
    assert run.series("knn", "epochs") == ([1, 2], [31.0, 32.0])


def test_several_runs_are_drawn_into_one_picture(tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = runner.invoke(app, ["plot", str(_run(tmp_path / "a", 8)), str(_run(tmp_path / "b", 12, knn=False)),
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as picture:
        assert picture.size[0] > 1000 and picture.size[1] > 600


def test_without_matplotlib_one_sentence_says_what_to_install(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if it were not installed
    result = runner.invoke(app, ["plot", str(_run(tmp_path / "a", 4)), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and INSTALL_HINT.split(":")[0] in result.output
    assert 'pip install "dinopre[plots]"' in result.output and "Traceback" not in result.output


def test_a_folder_without_metrics_is_refused(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 2 and "metrics.jsonl" in result.output


def test_a_diverged_run_with_losses_of_plus_minus_1e308_is_drawn_without_them(tmp_path: Path) -> None:
    run = _run(tmp_path / "a", 8)
    wild = [{"type": "step", "epoch": 3, "step": 9, "loss": 1e308}, {"type": "step", "epoch": 3, "step": 10,
                                                                      "loss": -1e308}]
    with (run / "metrics.jsonl").open("a") as metrics:
        metrics.write("\n" + "\n".join(json.dumps(r) for r in wild) + '\n{"type": "step", "step": 11, "loss": NaN}\n')
    assert read_run(run).series("loss")[0] == list(range(1, 9))
    result = runner.invoke(app, ["plot", str(run), "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert (tmp_path / "c.png").is_file()
