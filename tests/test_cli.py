"""The command line: sub-commands wire up their stage, and errors are one clear line with exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.cli import main


def test_data_labels_prints_the_import_summary(
    capsys: pytest.CaptureFixture[str], usiigaci: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "ds"
    assert main(["data", "labels", str(usiigaci), str(out_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "train     40 images" in out and "val        5 images" in out
    assert "instances/image" in out and "area (px)" in out and "separate parts" in out
    assert (out_dir / "data.yaml").is_file() and (out_dir / "summary.json").is_file()
    # A second import into the same folder is refused, with the way out named.
    assert main(["data", "labels", str(usiigaci), str(out_dir), "--quiet"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_train_refuses_a_bad_override_with_its_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["train", "--data", str(tmp_path / "data.yaml"), "--set", "epochs=-3", "--run", str(tmp_path / "r")])
    assert code == 2
    assert "epochs: Input should be greater than or equal to 1" in capsys.readouterr().err


def test_train_refuses_a_missing_dataset(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "--data", str(tmp_path / "none.yaml"), "--run", str(tmp_path / "r")]) == 2
    assert "none.yaml: no such dataset file" in capsys.readouterr().err


def test_resume_needs_a_run(capsys: pytest.CaptureFixture[str], usiigaci_dataset: Path, tmp_path: Path) -> None:
    assert main(["train", "--data", str(usiigaci_dataset / "data.yaml"), "--run", str(tmp_path / "r"), "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("cellseg ")
