"""Backends come from one table: a new one is a module plus its entry, and the daemon, engine
selection and the pipeline contract take it without a change anywhere else.

The new backend is OpenCV DNN (tests/edge/opencv_dnn_backend.py), a real engine: the daemon runs
real frames through it and publishes to a real broker, and what it measures agrees with the
ONNX Runtime backend on the same frames.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cellseg.edge.bundles.engine_select import open_engine, pipeline_for
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.config import parse_config
from cellseg.edge.engines.registry import BACKENDS, choose_backend
from cellseg.edge.errors import ConfigError
from cellseg.edge.pipeline.types import Frame
from cellseg.edge.service.daemon import Daemon
from tests.edge.opencv_dnn_backend import OPENCV_DNN, OpenCvDnnEngine
from tests.mqtt_broker import Broker, Subscriber

PREFIX = "cellseg/dnn-scope"


def test_auto_takes_the_first_backend_that_runs_the_kind_and_a_named_one_must_run_it() -> None:
    table = {"opencv-dnn": OPENCV_DNN, **BACKENDS}
    assert choose_backend("onnx", "auto", "m.onnx", table) is OPENCV_DNN
    assert choose_backend("onnx", "auto", "m.onnx").name == "onnxruntime"  # the built-in table
    assert choose_backend("tensorrt", "auto", "slot", table).name == "tensorrt"
    with pytest.raises(ConfigError, match="'opencv-dnn' but slot holds a TensorRT engine"):
        choose_backend("tensorrt", "opencv-dnn", "slot", table)
    with pytest.raises(ConfigError, match="not a backend"):
        choose_backend("onnx", "coreml", "m.onnx", table)


def test_a_new_backend_measures_what_onnx_runtime_does(shipped_model: Path, usiigaci: Path) -> None:
    frames = sorted((usiigaci / "val").rglob("raw.tif"))[:3]
    assert frames
    table = {"opencv-dnn": OPENCV_DNN, **BACKENDS}
    dnn, ort = open_engine(shipped_model, "opencv-dnn", backends=table), open_engine(shipped_model, "onnxruntime")
    try:
        assert isinstance(dnn.engine, OpenCvDnnEngine) and dnn.backend is OPENCV_DNN
        for path in frames:
            frame = Frame(read_image(path), source=str(path))
            a = pipeline_for(dnn)(frame).measurement
            b = pipeline_for(ort)(frame).measurement
            assert abs(a.count - b.count) <= 1, (path, a.count, b.count)
            assert abs(a.confluence_pct - b.confluence_pct) < 0.2
            assert a.engine_id.startswith("opencv-dnn:")
    finally:
        dnn.engine.close()
        ort.engine.close()


def test_the_daemon_runs_a_backend_registered_in_its_table(shipped_model: Path, usiigaci: Path, tmp_path: Path) -> None:
    frames = sorted((usiigaci / "val").rglob("raw.tif"))[:3]
    broker = Broker(tmp_path)
    broker.start()
    try:
        sub = Subscriber(broker.host, broker.port, f"{PREFIX}/#")
        config = parse_config({
            "device_id": "dnn-scope", "state_dir": str(tmp_path / "state"), "model": str(shipped_model),
            "source": {"kind": "images", "images": [str(p) for p in frames]},
            "mqtt": {"host": broker.host, "port": broker.port},
        })  # fmt: skip
        daemon = Daemon(config, backends={"opencv-dnn": OPENCV_DNN, **BACKENDS})
        outcome: list[int] = []
        runner = threading.Thread(target=lambda: outcome.append(daemon.run()), daemon=True)
        runner.start()
        runner.join(timeout=120)
        assert outcome == [0], "the daemon did not finish the three frames"
        assert sub.wait_for(lambda: len(sub.payloads(f"{PREFIX}/measurement")) == 3, timeout=30)
        records = [json.loads(p) for p in sub.payloads(f"{PREFIX}/measurement")]
        assert [r["seq"] for r in records] == [1, 2, 3]
        assert all(r["engine_id"].startswith("opencv-dnn:") and r["count"] > 0 for r in records)
        assert sub.wait_for(lambda: bool(sub.payloads(f"{PREFIX}/state")), timeout=30)
        state = json.loads(sub.payloads(f"{PREFIX}/state")[-1])
        assert state["engine"]["backend"] == "opencv-dnn" and state["measured"] == 3
        sub.close()
    finally:
        broker.stop()
