"""Tiled inference: the tile plan, the merge across seams, and real frames larger than the
training frames (mosaics of real validation frames) against their ground truth."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from cellseg.edge.bundles.engine_select import open_engine, pipeline_for
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.config import parse_config
from cellseg.edge.errors import ConfigError
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.model_info import ModelInfo
from cellseg.edge.pipeline.tiling import (
    Tile,
    TiledPipeline,
    TileSettings,
    merge_tiles,
    tile_starts,
)
from cellseg.edge.pipeline.types import Detections, Frame

VAL = range(46, 51)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(2048, 1024, 256), (3072, 1024, 256), (1500, 1024, 100), (1024, 1024, 256), (700, 1024, 256), (4096, 1000, 0)],
)
def test_tiles_cover_the_frame_with_at_least_the_overlap(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and min(starts[-1] + tile, length) == length
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap, "neighbours overlap by less than asked"
        assert b > a
    if length <= tile:
        assert starts == [0]


def test_settings_from_the_model_and_the_pixel_size() -> None:
    info = ModelInfo(640, 640, ("cell",), extra={"trained_frame_px": 1024, "trained_pixel_um": 0.867})
    auto = TileSettings.resolve("auto", info)
    assert auto == TileSettings("auto", 1024, 256)
    assert not auto.applies_to(1024, 1022) and not auto.applies_to(1300, 1300)  # a quarter smaller at most
    assert auto.applies_to(1400, 1000) and auto.applies_to(4096, 3000)
    assert TileSettings.resolve("on", info).applies_to(1100, 1000)
    # A camera with pixels three times finer sees each cell three times larger: one tile covers
    # as much of the culture as a training frame did, and a frame three times larger is not tiled.
    fine = TileSettings.resolve("auto", info, pixel_size_um=0.867 / 3)
    assert fine is not None and fine.tile_px == 3072 and not fine.applies_to(3072, 3066)
    assert TileSettings.resolve("auto", info, tile_px=800, overlap_px=100) == TileSettings("auto", 800, 100)
    assert TileSettings.resolve("off", info) is None
    unknown = ModelInfo(640, 640, ("cell",))
    assert TileSettings.resolve("auto", unknown) is None
    with pytest.raises(ConfigError, match="tile size is unknown"):
        TileSettings.resolve("on", unknown)
    with pytest.raises(ConfigError, match="between 0 and half the tile"):
        TileSettings("on", 1000, 600)


def _det(cells: list[tuple[int, int, int, int, float]], size: tuple[int, int]) -> Detections:
    """Rectangular cells (x0, y0, x1, y1, score) in a tile of ``size``."""
    return Detections.from_masks(
        np.array([c[:4] for c in cells], np.float32).reshape(-1, 4),
        np.array([c[4] for c in cells], np.float32),
        np.zeros(len(cells), np.int32),
        np.array([c[:2] for c in cells], np.int32).reshape(-1, 2),
        [np.ones((c[3] - c[1], c[2] - c[0]), bool) for c in cells],
        frame_width=size[0],
        frame_height=size[1],
    )


def test_merging_counts_each_cell_once() -> None:
    """Two tiles of a 200x100 frame, overlapping over x 80..120."""
    left, right = Tile(0, 0, 120, 100), Tile(80, 0, 200, 100)
    parts = [
        (left, _det([(10, 10, 30, 30, 0.9),  # only in the left tile
                     (90, 40, 110, 60, 0.8),  # whole in both tiles: one cell
                     (100, 70, 120, 90, 0.95)], (120, 100))),  # cut by the left tile's right edge
        (right, _det([(10, 40, 30, 60, 0.7),  # = frame 90..110, the same cell as above
                      (20, 70, 50, 90, 0.6),  # = frame 100..130: the whole of the cut one
                      (60, 10, 110, 30, 0.9)], (120, 100))),  # only in the right tile
    ]  # fmt: skip
    merged = merge_tiles(parts, 200, 100)
    assert len(merged) == 4
    kept = {tuple(int(v) for v in b) for b in merged.boxes}
    assert kept == {(10, 10, 30, 30), (90, 40, 110, 60), (100, 70, 130, 90), (140, 10, 190, 30)}
    # The whole cell wins over the higher-scoring piece the left tile cut off.
    assert (100, 70, 120, 90) not in kept
    assert merged.covered_pixels == 400 + 400 + 600 + 1000
    assert list(merged.scores) == sorted(merged.scores, reverse=True)


def test_a_cell_cut_in_every_tile_is_kept_once() -> None:
    left, right = Tile(0, 0, 120, 100), Tile(80, 0, 200, 100)
    parts = [
        (left, _det([(40, 10, 120, 50, 0.8)], (120, 100))),  # frame 40..120, cut on the right
        (right, _det([(0, 10, 90, 50, 0.7)], (120, 100))),  # frame 80..170, cut on the left
    ]
    merged = merge_tiles(parts, 200, 100)
    assert len(merged) == 1 and float(merged.scores[0]) == pytest.approx(0.8)


def _mosaic(usiigaci: Path, sets: tuple[int, ...]) -> tuple[np.ndarray, int, float]:
    """Four real val frames 2x2: 2048x2044 px at the training pixel size; its true count and
    confluence (cells cut by the frames' own borders stay the pieces the annotators drew)."""
    images, labels = [], []
    for k, s in enumerate(sets):
        folder = usiigaci / "val" / f"set{s}"
        images.append(read_image(folder / "raw.tif"))
        lab = cv2.imread(str(folder / "instances_ids.png"), cv2.IMREAD_UNCHANGED).astype(np.int32)
        labels.append(np.where(lab > 0, lab + 1000 * k, 0))
    image = np.vstack([np.hstack(images[:2]), np.hstack(images[2:])])
    label = np.vstack([np.hstack(labels[:2]), np.hstack(labels[2:])])
    return image, len(np.unique(label)) - 1, 100.0 * float((label > 0).mean())


@pytest.fixture(scope="module")
def host(shipped_model: Path) -> HostPipeline:
    opened = open_engine(shipped_model, "onnxruntime", threads=2)
    return HostPipeline(opened.engine)


def test_a_large_real_frame_is_measured_as_its_parts_are(usiigaci: Path, host: HostPipeline) -> None:
    """A 2048-px mosaic of four val frames: letterboxed whole, its cells are half the size the model
    learnt and most are missed; tiled, it counts what the four frames count one by one."""
    sets = (46, 47, 48, 49)
    image, gt_count, gt_confluence = _mosaic(usiigaci, sets)
    settings = TileSettings.resolve("auto", host.engine.info)
    assert settings is not None and settings.applies_to(image.shape[1], image.shape[0])
    tiled = TiledPipeline(host, settings)(Frame(image)).measurement
    whole = host(Frame(image)).measurement
    parts = [host(Frame(read_image(usiigaci / "val" / f"set{s}" / "raw.tif"))).measurement for s in sets]
    one_by_one = sum(p.count for p in parts)
    print(f"\nmosaic {sets}: truth {gt_count} cells {gt_confluence:.2f} % | untiled {whole.count} "
          f"{whole.confluence_pct:.2f} % | tiled {tiled.count} {tiled.confluence_pct:.2f} % | "
          f"frames one by one {one_by_one}")  # fmt: skip
    assert abs(tiled.count - one_by_one) <= 0.03 * one_by_one, "the seams lost or doubled cells"
    # Within half a point: tiles across the mosaic's seams see cells of two unrelated frames side
    # by side, and the mosaic is stretched to 8 bits as one frame (measured: 0.43 points).
    assert abs(tiled.confluence_pct - np.mean([p.confluence_pct for p in parts])) < 0.5
    assert abs(tiled.count - gt_count) < 0.6 * abs(whole.count - gt_count), "tiling should recover most misses"
    assert abs(tiled.confluence_pct - gt_confluence) < 0.5 * abs(whole.confluence_pct - gt_confluence)
    assert set(tiled.latencies_ms) >= {"infer", "merge_tiles", "map_frame"}


def test_an_upscaled_real_frame_with_its_pixel_size_is_not_tiled(usiigaci: Path, host: HostPipeline) -> None:
    """A frame from a camera with 3x finer pixels (a real val frame upscaled 3x): its cells are
    as large in pixels as the frame is larger, so letterboxing it gives the model the training
    scale, and tiling it by frame size alone would blow cells up threefold."""
    image = read_image(usiigaci / "val" / "set46" / "raw.tif")
    big = cv2.resize(image, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    native = host(Frame(image)).measurement
    settings = TileSettings.resolve("auto", host.engine.info, pixel_size_um=0.867 / 3)
    assert settings is not None and not settings.applies_to(big.shape[1], big.shape[0])
    letterboxed = TiledPipeline(host, settings)(Frame(big)).measurement
    assert abs(letterboxed.count - native.count) <= 2
    assert abs(letterboxed.confluence_pct - native.confluence_pct) < 0.5
    wrong = TiledPipeline(host, TileSettings("on", 1024, 256))(Frame(big)).measurement
    print(f"\n3x upscaled set46: native {native.count} {native.confluence_pct:.2f} % | letterboxed "
          f"{letterboxed.count} {letterboxed.confluence_pct:.2f} % | tiled at 1024 {wrong.count} "
          f"{wrong.confluence_pct:.2f} %")  # fmt: skip
    assert wrong.confluence_pct < native.confluence_pct - 1.0, "tiles at the wrong scale should lose coverage"


def test_the_daemon_pipeline_and_predict_tile(
    usiigaci: Path, shipped_model: Path, tmp_path: Path, host: HostPipeline
) -> None:
    config = parse_config({"device_id": "d", "source": {"kind": "images", "images": ["x.png"]}})
    opened = open_engine(shipped_model, "onnxruntime", threads=2)
    assert isinstance(pipeline_for(opened, config), TiledPipeline)
    off = parse_config({"device_id": "d", "source": {"kind": "images", "images": ["x.png"]}, "tiling": {"mode": "off"}})
    assert not isinstance(pipeline_for(opened, off), TiledPipeline)
    with pytest.raises(ConfigError, match=r"tiling: overlap_px 600 is more than half of tile_px 1000"):
        parse_config({"device_id": "d", "source": {"kind": "images", "images": ["x.png"]},
                      "tiling": {"tile_px": 1000, "overlap_px": 600}})  # fmt: skip
    opened.engine.close()

    image, _, _ = _mosaic(usiigaci, (46, 47, 48, 50))
    path = tmp_path / "mosaic.tif"
    assert cv2.imwrite(str(path), image)
    counts = {}
    for mode in ("auto", "off"):
        out = subprocess.run(
            [sys.executable, "-m", "cellseg", "predict", "--json", "--tile", mode, str(path)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        counts[mode] = json.loads(out)["count"]
    expected = TiledPipeline(host, TileSettings("auto", 1024, 256))(Frame(image)).measurement.count
    assert counts["auto"] == expected and counts["off"] < 0.6 * counts["auto"]
