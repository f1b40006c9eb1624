"""``cellseg cv`` on real frames: fields found from the pixels, folds that never split a field, and a
small real CV that is interrupted and continued."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cellseg.cli import main
from cellseg.edge.errors import ConfigError, DatasetError
from cellseg.training.cross_validation import (
    CvReport,
    FoldResult,
    assign_folds,
    cross_validate,
    format_candidates,
    load_report,
    pool_dataset,
    seed_run,
)
from cellseg.training.fields import field_groups, groups_by_name
from cellseg.training.recipe import load_recipe


def test_a_time_lapse_is_one_field_and_other_sets_are_their_own(data_root: Path) -> None:
    """The 12 T98G frames (10 minutes apart, one field) are one field; Usiigaci train set1 is the
    same image as the time-lapse's first frame, so it joins them; the five val sets are apart."""
    t98g = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    usiigaci = data_root / "usiigaci"
    others = [usiigaci / "val" / f"set{i}" / "raw.tif" for i in range(46, 51)]
    frames = [*t98g, usiigaci / "train" / "set1" / "raw.tif", *others]
    groups = field_groups(frames, progress=False)
    assert len(t98g) == 12
    assert set(groups[:13]) == {groups[0]}, groups
    assert len(set(groups[13:])) == 5 and groups[0] not in groups[13:], groups


def test_fields_from_the_file_name(data_root: Path) -> None:
    t98g = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    names = [*t98g, Path("20180101ef002xy02t01.tif")]
    assert groups_by_name(names, r"xy(?P<field>\d+)t") == [0] * 12 + [1]
    with pytest.raises(ConfigError, match=r"does not match set7\.png"):
        groups_by_name([Path("set7.png")], r"xy(?P<field>\d+)")
    with pytest.raises(ConfigError, match="not a regular expression"):
        groups_by_name(names, r"xy(")


def test_folds_keep_fields_whole_and_sizes_even() -> None:
    groups = [0, 0, 0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    cells = [50] * len(groups)
    folds = assign_folds(groups, cells, 3, seed=0)
    for g in set(groups):
        assert len({folds[i] for i, gi in enumerate(groups) if gi == g}) == 1, f"field {g} straddles folds"
    sizes = [folds.count(f) for f in range(3)]
    assert sorted(sizes) == [4, 5, 5], sizes
    assert assign_folds(groups, cells, 3, seed=0) == folds, "the same seed deals the same folds"
    assert any(assign_folds(groups, cells, 3, seed=s) != folds for s in range(1, 6))
    with pytest.raises(ConfigError, match="3 fields cannot make 4 folds"):
        assign_folds([0, 0, 1, 2], [1, 1, 1, 1], 4)
    with pytest.raises(ConfigError, match="at least 2 folds"):
        assign_folds(groups, cells, 1)


def _small_dataset(usiigaci_dataset: Path, dest: Path) -> Path:
    """Eight real frames (six train, two val) as links, to keep the CV below a minute."""
    chosen = {"train": ["set1", "set2", "set3", "set4", "set5", "set6"], "val": ["set46", "set47"]}
    for split, names in chosen.items():
        for sub, ext in (("images", ".png"), ("labels", ".txt")):
            (dest / sub / split).mkdir(parents=True)
            for name in names:
                (dest / sub / split / f"{name}{ext}").symlink_to(usiigaci_dataset / sub / split / f"{name}{ext}")
    (dest / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "val": "images/val", "names": ["cell"]}))
    return dest / "data.yaml"


@pytest.mark.slow
def test_a_real_cv_interrupted_and_continued(
    usiigaci_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _small_dataset(usiigaci_dataset, tmp_path / "ds")
    run = tmp_path / "cv"
    tiny = ["epochs=1", "imgsz=160", "plots=false", "workers=0"]
    recipe = load_recipe(Path("usiigaci-yolo11n-seg-cpu.yaml"), tiny)

    # A first session gets through fold 1 only.
    first = cross_validate(data, recipe, 2, run, only=[1], progress=False)
    assert [f.fold for f in first.folds] == [1]
    fold1_result = run / "fold1" / "result.json"
    written = fold1_result.stat().st_mtime_ns

    plan = json.loads((run / "folds.json").read_text())
    assert plan["groups"] == 8 and len(plan["images"]) == 8
    for fold in (1, 2):
        held = {Path(p["image"]).name for p in plan["images"] if p["fold"] == fold}
        train_dir = run / "fold1" / "data" / "images" / "train"
        if fold == 1:
            trained_on = {p.name for p in train_dir.iterdir()}
            assert held and not held & trained_on, "a held-out frame was trained on"
            assert len(held | trained_on) == 8
        assert 3 <= len(held) <= 5

    # Continuing with another recipe is refused: its folds would mix two models.
    with pytest.raises(ConfigError, match="another recipe"):
        cross_validate(data, load_recipe(Path("usiigaci-yolo11n-seg-cpu.yaml"), [*tiny, "lr0=0.01"]), 2, run)
    with pytest.raises(ConfigError, match="2-fold CV with seed 0"):
        cross_validate(data, recipe, 3, run)

    # The next session, through the command: fold 1 is kept, fold 2 is run, the table printed.
    code = main(["cv", "--data", str(data), "--run", str(run), "--fold", "2", "--json", str(tmp_path / "cv.json")])
    assert code == 0
    captured = capsys.readouterr()
    said = captured.err
    assert "cv fold 1/2: finished earlier, kept" not in said  # --fold 2 only
    assert re.search(r"cv fold 2/2: training on \d frames, \d held out", said)
    assert re.search(r"cv fold 2/2 done in \d+ min: count MAPE [\d.]+ %", said)
    assert fold1_result.stat().st_mtime_ns == written, "a finished fold was run again"
    report = load_report(run)
    assert [f.fold for f in report.folds] == [1, 2]
    assert sorted(name for f in report.folds for name in f.images) == sorted(p.image.name for p in pool_dataset(data))
    for f in report.folds:
        assert f.epochs == 1 and f.train_seconds > 0
        assert 0.2 <= f.conf <= 0.7
        assert f.cells == sum(r["gt_count"] for r in f.per_image)
        assert set(f.metrics) >= {"count_mape_pct", "confluence_mae_pp", "mask_map50", "mask_map50_95", "instance_f1"}
    out = captured.out
    assert "cv: 2 of 2 folds, 8 fields" in out and "mean ± sd" in out
    saved = json.loads((tmp_path / "cv.json").read_text())
    assert saved["summary"]["count_mape_pct"]["mean"] == pytest.approx(
        sum(f.metrics["count_mape_pct"] for f in report.folds) / 2
    )

    # The fold's model records the size of the frames it learnt on, for tiled inference.
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine

    with OnnxRuntimeEngine(run / "fold2" / "model.onnx") as engine:
        assert engine.info.trained_frame_px == 1024

    assert main(["cv", "--compare", str(run), str(run)]) == 0
    table = capsys.readouterr().out
    assert table.count("cv ") == 2 and "2/2" in table

    # The machine is gone after fold 1 of a second CV; its saved report starts the run elsewhere
    # (frames found by name in this machine's copy of the dataset), and only fold 2 is trained.
    seen = load_report(tmp_path / "cv.json")
    seen.folds = seen.folds[:1]
    (tmp_path / "after-fold1.json").write_text(json.dumps(seen.to_dict()))
    elsewhere = _small_dataset(usiigaci_dataset, tmp_path / "ds-elsewhere")
    again = tmp_path / "cv-elsewhere"
    assert (
        main(["cv", "--data", str(elsewhere), "--run", str(again), "--from", str(tmp_path / "after-fold1.json")]) == 0
    )
    said = capsys.readouterr().err
    assert f"started from {tmp_path / 'after-fold1.json'} (folds finished: 1)" in said
    assert "cv fold 1/2: finished earlier, kept" in said and "cv fold 2/2 done in" in said
    continued = load_report(again)
    assert continued.folds[0] == report.folds[0]
    assert continued.folds[1].images == report.folds[1].images and continued.folds[1].epochs == 1
    assert all(Path(p["image"]).parent.parent.parent == elsewhere.parent for p in _plan_of(again)["images"])


def _plan_of(run: Path) -> dict[str, Any]:
    plan: dict[str, Any] = json.loads((run / "folds.json").read_text())
    return plan


PUBLISHED = Path(__file__).parents[2] / "docs" / "cv" / "yolo11n-640-e90-k3.json"


def test_a_published_report_starts_the_run_again_on_another_machine(
    usiigaci_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The project's 3-fold CV of the nano at 640 px was run on a machine that is gone; its report
    in docs/ and the Usiigaci set imported here make the same run folder again, so nothing is
    trained twice and the plan is the published one, not recomputed."""
    saved = json.loads(PUBLISHED.read_text())
    run = tmp_path / "run"
    code = main(["cv", "--data", str(usiigaci_dataset / "data.yaml"), "--run", str(run), "--from", str(PUBLISHED)])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.err.count("finished earlier, kept") == 3 and "training on" not in captured.err
    assert "3 of 3 folds, 45 fields" in captured.out and "7.954±1.944" in captured.out
    report = load_report(run)
    assert report.folds == [FoldResult(**f) for f in saved["folds"]]
    assert report.plan == saved["plan"] and report.recipe == saved["recipe"]
    assert load_recipe(run / "recipe.yaml").imgsz == 640
    for planned in _plan_of(run)["images"]:
        assert Path(planned["image"]).is_file() and Path(planned["label"]).is_file()
        assert Path(planned["image"]).is_relative_to(usiigaci_dataset)

    # Started again without --from, it is an ordinary run; another --from on it is refused.
    assert main(["cv", "--data", str(usiigaci_dataset / "data.yaml"), "--run", str(run)]) == 0
    assert capsys.readouterr().err.count("finished earlier, kept") == 3
    with pytest.raises(ConfigError, match="is a CV run already"):
        seed_run(PUBLISHED, usiigaci_dataset / "data.yaml", run)


def test_a_report_that_does_not_fit_the_dataset_is_refused(usiigaci_dataset: Path, tmp_path: Path) -> None:
    data = usiigaci_dataset / "data.yaml"
    small = _small_dataset(usiigaci_dataset, tmp_path / "ds")
    with pytest.raises(DatasetError, match=r"not the dataset .* 37 planned frames are not in it \(e\.g\. set10\.png\)"):
        seed_run(PUBLISHED, small, tmp_path / "run")
    assert not (tmp_path / "run" / "folds.json").exists()

    saved = json.loads(PUBLISHED.read_text())
    recounted = json.loads(PUBLISHED.read_text())
    recounted["plan"]["images"][0]["cells"] += 1
    moved = json.loads(PUBLISHED.read_text())
    moved["folds"][0]["images"][0] = "set1.png"
    broken = {**saved, "recipe": {**saved["recipe"], "imgsz": "large"}}
    no_seed = {**saved, "plan": {k: v for k, v in saved["plan"].items() if k != "seed"}}
    no_fold = json.loads(PUBLISHED.read_text())
    del no_fold["plan"]["images"][3]["fold"]
    cases = [
        (recounted, DatasetError, r"1 frames have other cell counts \(e\.g\. set1\.png\)"),
        (moved, ConfigError, "fold 1's frames are not the plan's"),
        ({k: v for k, v in saved.items() if k != "plan"}, ConfigError, "has no plan"),
        (
            {k: v for k, v in saved.items() if k != "folds"},
            ConfigError,
            r"not a cellseg cv report \(KeyError: 'folds'\)",
        ),
        (broken, ConfigError, "recipe: imgsz"),
        (no_seed, ConfigError, r"its plan is malformed \(KeyError: 'seed'\)"),
        (no_fold, ConfigError, r"its plan is malformed \(KeyError: 'fold'\)"),
    ]
    for i, (report, error, message) in enumerate(cases):
        path = tmp_path / f"report{i}.json"
        path.write_text(json.dumps(report))
        with pytest.raises(error, match=message):
            seed_run(path, data, tmp_path / f"run{i}")
        assert not (tmp_path / f"run{i}" / "folds.json").exists(), "a refused report left a run behind"
    (tmp_path / "cut.json").write_text(PUBLISHED.read_text()[:5000])
    with pytest.raises(ConfigError, match=r"not a cellseg cv report \(JSONDecodeError"):
        seed_run(tmp_path / "cut.json", data, tmp_path / "cut")


def _published(name: str, folds: list[int]) -> CvReport:
    """The project's published 3-fold CV of the nano at 640 px, limited to some of its folds."""
    saved = json.loads((Path(__file__).parents[2] / "docs" / "cv" / "yolo11n-640-e90-k3.json").read_text())
    kept = [FoldResult(**f) for f in saved["folds"] if f["fold"] in folds]
    return CvReport(name, saved["recipe"], saved["data"], saved["folds_total"], saved["groups"], kept)


def test_candidates_with_different_finished_folds_are_also_compared_on_their_common_folds() -> None:
    full, partial = _published("full", [1, 2, 3]), _published("one-fold-so-far", [2])
    table = format_candidates([full, partial]).splitlines()
    assert "7.954±1.944" in table[2] and "3/3" in table[2]  # the published mean over all three folds
    assert table[4] == "on the folds every candidate finished (2), like for like:"
    fold2 = f"{full.folds[1].metrics['count_mape_pct']:.3f}"
    assert fold2 == "9.982" and all(fold2 in row and "1/3" in row for row in table[5:7])
    # The same folds done: one table. No fold in common, or folds of another plan: said, not compared.
    assert len(format_candidates([full, _published("again", [1, 2, 3])]).splitlines()) == 4
    apart = format_candidates([_published("a", [1]), _published("b", [3])])
    assert apart.endswith("no fold is finished by every candidate: the means above are over different folds")
    other_plan = _published("other", [2])
    other_plan.folds[0].images = other_plan.folds[0].images[1:]
    assert format_candidates([full, other_plan]).endswith("compare them only over all folds")
