"""``cellseg predict`` on real frames with the shipped model: outputs a user relies on."""

from __future__ import annotations

import calendar
import csv
import io
import json
import re
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellseg.cli import main
from tests.conftest import SAMPLES

SAMPLE_FRAMES = sorted(SAMPLES.glob("*.png"))


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["predict", *args])
    return code, capsys.readouterr().out


def test_json_lines_for_a_folder(capsys: pytest.CaptureFixture[str], shipped_model: Path) -> None:
    code, out = _run(capsys, str(shipped_model), str(SAMPLES), "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["image"]).name for r in rows] == [p.name for p in SAMPLE_FRAMES]
    for r in rows:
        # Sparse-to-medium cultures: tens of cells, 5-30 % covered.
        assert 20 <= r["count"] <= 200, r
        assert 2.0 <= r["confluence_pct"] <= 40.0, r
        assert set(r["latencies_ms"]) >= {"decode", "preprocess", "infer", "postprocess", "measure"}
        assert r["areas"]["median_px"] > 100


def test_16bit_tiff_gives_the_same_answer_as_its_8bit_rendering(
    capsys: pytest.CaptureFixture[str], shipped_model: Path, usiigaci: Path
) -> None:
    code, out = _run(
        capsys,
        str(shipped_model),
        str(usiigaci / "val/set46/raw.tif"),
        str(SAMPLES / "usiigaci-val-set46.png"),
        "--json",
    )
    assert code == 0
    tiff, png = (json.loads(line) for line in out.splitlines())
    assert (tiff["count"], tiff["confluence_pct"]) == (png["count"], png["confluence_pct"])


def test_a_corrupt_image_gets_an_error_line_and_the_run_goes_on(
    capsys: pytest.CaptureFixture[str], shipped_model: Path, tmp_path: Path
) -> None:
    good = tmp_path / "a_good.png"
    shutil.copy(SAMPLE_FRAMES[0], good)
    bad = tmp_path / "b_truncated.png"
    bad.write_bytes(SAMPLE_FRAMES[0].read_bytes()[:5000])
    text = tmp_path / "c_notes.tif"
    text.write_text("not an image")
    code, out = _run(
        capsys, str(shipped_model), str(good), str(bad), str(text), str(tmp_path / "missing.png"), "--json"
    )
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["count"] > 0
    assert rows[1] == {"image": str(bad), "error": rows[1]["error"]} and "not a readable image" in rows[1]["error"]
    assert "not a readable image" in rows[2]["error"]
    assert rows[3]["error"] == "no such file"


def test_overlays_and_label_images(capsys: pytest.CaptureFixture[str], shipped_model: Path, tmp_path: Path) -> None:
    frame = SAMPLE_FRAMES[0]
    code, out = _run(
        capsys,
        str(shipped_model),
        str(frame),
        "--json",
        "--overlay",
        str(tmp_path / "ov"),
        "--labels",
        str(tmp_path / "lb"),
    )
    assert code == 0
    result = json.loads(out)
    image = cv2.imread(str(frame), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(tmp_path / "ov" / f"{frame.stem}.png"), cv2.IMREAD_UNCHANGED)
    assert overlay.shape == (*image.shape, 3)
    # Outlines are drawn in colour on a grey frame.
    assert np.count_nonzero((overlay[:, :, 1].astype(int) - overlay[:, :, 2]) > 100) > 1000
    labels = cv2.imread(str(tmp_path / "lb" / f"{frame.stem}.png"), cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == image.shape
    ids = np.unique(labels)
    assert ids[0] == 0 and ids.max() == result["count"]
    assert len(ids) - 1 >= 0.95 * result["count"]  # overlapping cells may hide a few small ones
    covered = 100 * np.count_nonzero(labels) / labels.size
    assert covered == pytest.approx(result["confluence_pct"], abs=1e-4)  # JSON keeps 4 decimals


def test_csv_output(capsys: pytest.CaptureFixture[str], shipped_model: Path) -> None:
    code, out = _run(capsys, str(shipped_model), *map(str, SAMPLE_FRAMES[:2]), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2 and int(rows[0]["count"]) > 0 and float(rows[1]["confluence_pct"]) > 0


def test_default_model_and_glob(capsys: pytest.CaptureFixture[str], shipped_model: Path) -> None:
    code, out = _run(capsys, str(SAMPLES / "usiigaci-val-set5*.png"))
    assert code == 0
    assert out.count(" cells, confluence ") == 1


@pytest.mark.parametrize(
    ("model_bytes", "message"),
    [(b"", "ONNX Runtime cannot load it"), (b"\x08\x01garbage", "ONNX Runtime cannot load it")],
)
def test_a_broken_model_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, model_bytes: bytes, message: str
) -> None:
    model = tmp_path / "broken.onnx"
    model.write_bytes(model_bytes)
    code = main(["predict", str(model), str(SAMPLE_FRAMES[0])])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_truncated_model_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], shipped_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "truncated.onnx"
    model.write_bytes(shipped_model.read_bytes()[: shipped_model.stat().st_size // 2])
    assert main(["predict", str(model), str(SAMPLE_FRAMES[0])]) == 2
    assert "truncated.onnx: ONNX Runtime cannot load it" in capsys.readouterr().err


def test_bench_reports_speed_and_stages(capsys: pytest.CaptureFixture[str], shipped_model: Path) -> None:
    code = main(["bench", "--model", str(shipped_model), "--runs", "1", "--threads", "1", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == len(SAMPLE_FRAMES) and report["precision"] == "fp32"
    assert report["input_size"] == "640x640"
    assert set(report["stage_ms"]) == {"preprocess", "infer", "postprocess", "measure"}
    assert report["images_per_s"] > 0
    assert report["ms_per_image"] >= report["stage_ms"]["infer"]
    assert report["cells_per_frame"] > 20


@pytest.mark.parametrize(("option", "message"), [("--conf=1.5", "confidence threshold"), ("--max-det=0", "max_det")])
def test_bad_thresholds_are_refused(
    capsys: pytest.CaptureFixture[str], shipped_model: Path, option: str, message: str
) -> None:
    assert main(["predict", str(shipped_model), str(SAMPLE_FRAMES[0]), option]) == 2
    assert message in capsys.readouterr().err


def test_areas_in_square_micrometres(capsys: pytest.CaptureFixture[str], shipped_model: Path) -> None:
    code, out = _run(capsys, str(shipped_model), str(SAMPLE_FRAMES[0]), "--json", "--pixel-size", "0.87")
    assert code == 0
    areas = json.loads(out)["areas"]
    assert areas["mean_um2"] == pytest.approx(areas["mean_px"] * 0.87**2, abs=0.01)
    assert areas["median_um2"] == pytest.approx(areas["median_px"] * 0.87**2, abs=0.01)
    # No float noise (it read 3052.5777000000003): every number in areas has at most 4 decimals.
    assert not re.search(r"\d\.\d{5,}", json.dumps(areas)), areas
    assert areas["histogram_um2"]["counts"] == areas["histogram_px"]["counts"]
    assert sum(areas["histogram_px"]["counts"]) == json.loads(out)["count"]


def test_the_pixel_size_reaches_text_and_csv_and_csv_has_a_time(
    capsys: pytest.CaptureFixture[str], shipped_model: Path
) -> None:
    frame = str(SAMPLE_FRAMES[0])
    _, text = _run(capsys, str(shipped_model), frame, "--pixel-size", "0.87")
    median = json.loads(_run(capsys, str(shipped_model), frame, "--json", "--pixel-size", "0.87")[1])["areas"]
    assert f"median area {median['median_px']:.0f} px ({median['median_um2']:.0f} µm²)" in text
    started = time.time()
    _, out = _run(capsys, str(shipped_model), frame, "--csv", "--pixel-size", "0.87")
    row = next(csv.DictReader(io.StringIO(out)))
    assert float(row["median_area_um2"]) == pytest.approx(median["median_um2"], abs=0.01)
    assert float(row["mean_area_um2"]) == pytest.approx(median["mean_um2"], abs=0.01)
    when = calendar.timegm(time.strptime(row["time_utc"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert row["time_utc"].endswith("Z") and abs(when - started) < 60
    _, plain = _run(capsys, str(shipped_model), frame, "--csv")
    assert next(csv.DictReader(io.StringIO(plain)))["median_area_um2"] == ""  # no pixel size, no µm²


def test_label_tiffs_read_back_with_their_pixel_size(
    capsys: pytest.CaptureFixture[str], shipped_model: Path, tmp_path: Path
) -> None:
    """Written so that the project reads them back (tifffile without imagecodecs, and OpenCV),
    with the pixel size as ImageJ's resolution in µm, as Fiji shows it."""
    import tifffile

    from cellseg.edge.capture.imageio import read_image

    frame = SAMPLE_FRAMES[0]
    code, _ = _run(capsys, str(shipped_model), str(frame), "--labels", str(tmp_path), "--labels-format", "tif",
                   "--pixel-size", "0.87")  # fmt: skip
    assert code == 0
    path = tmp_path / f"{frame.stem}.tif"
    with tifffile.TiffFile(path) as tif:
        labels = tif.asarray()
        page = tif.pages[0]
        assert page.compression.name in ("NONE", "ADOBE_DEFLATE")  # codecs tifffile has without imagecodecs
        x_res = page.tags["XResolution"].value
        assert x_res[0] / x_res[1] == pytest.approx(1 / 0.87, rel=1e-4)
        assert tif.imagej_metadata["unit"] == "um"
    assert labels.dtype == np.uint16 and labels.max() > 0
    assert (read_image(path) == labels).all()
