"""``cellseg export``: PyTorch weights -> static ONNX with cellseg metadata, checked against PyTorch.

The export is declared good only after ONNX Runtime's outputs match the PyTorch model's on
real images, preprocessed exactly as the device will preprocess them.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cellseg.edge.capture.imageio import read_image
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.errors import CellsegError, DependencyError, ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.intensity import IntensityMapping
from cellseg.edge.pipeline.model_info import CELLSEG_METADATA_KEY, ModelInfo, PostprocessConfig
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Frame
from cellseg.training.dfl_softmax import REWRITE, rewrite_dfl_softmax
from cellseg.training.offline import import_ultralytics_offline

logger = logging.getLogger(__name__)

# FP32 ONNX Runtime vs PyTorch on the same input: differences come from operator order only.
# Relative to each output's magnitude, 1e-3 is two orders above what is seen and far below
# what a wrong export (other preprocessing, other weights, wrong opset lowering) produces.
PARITY_RTOL = 1e-3


@dataclass
class ParityCheck:
    image: str
    max_abs_diff: dict[str, float]
    scale: dict[str, float]

    @property
    def ok(self) -> bool:
        return all(self.max_abs_diff[k] <= PARITY_RTOL * max(1.0, self.scale[k]) for k in self.max_abs_diff)


@dataclass
class ExportReport:
    onnx_path: Path
    onnx_sha256: str
    size_bytes: int
    info: ModelInfo
    checks: list[ParityCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)


def _run_metadata(run_dir: Path) -> dict[str, Any]:
    """Recipe and dataset hash from the training run, when its files are there."""
    meta: dict[str, Any] = {}
    if (run_dir / "recipe.yaml").is_file():
        meta["recipe"] = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    if (run_dir / "manifest.json").is_file():
        manifest = json.loads((run_dir / "manifest.json").read_text())
        meta["dataset_sha256"] = manifest.get("dataset_sha256", "")
        frame_px = training_frame_px(Path(manifest["data"])) if manifest.get("data") else None
        if frame_px is not None:
            meta["trained_frame_px"] = frame_px
    return meta


def training_frame_px(data_yaml: Path, *, sample: int = 200) -> int | None:
    """Median longest side of a dataset's training frames (up to ``sample`` of them): the frame
    size at which the model learnt what a cell looks like, which tiled inference reproduces."""
    from PIL import Image

    from cellseg.training.evaluate import split_images
    from cellseg.training.yolo_dataset import load_data_yaml

    try:
        images = [image for image, _ in split_images(load_data_yaml(data_yaml), "train")]
    except CellsegError:
        return None  # the dataset moved since training: the model then records no frame size
    step = max(1, len(images) // sample)
    sides = []
    for image in images[::step]:
        with Image.open(image) as im:  # reads the header only
            sides.append(max(im.size))
    return int(statistics.median(sides)) if sides else None


def weights_epoch(checkpoint: dict[str, Any]) -> dict[str, float] | None:
    """The epoch these weights were saved at, with that epoch's row of the training results.

    Read from the checkpoint itself, not the run folder: ``best.pt`` and ``last.pt`` of one run
    are different epochs (and a published copy is neither file). ultralytics stores the weights'
    own validation metrics and the results of every epoch; the epoch is the one whose metrics
    they are (the latest, should two epochs have the same). ``None`` when the checkpoint lacks them.
    """
    metrics = checkpoint.get("train_metrics") or {}
    results = checkpoint.get("train_results") or {}
    epochs = results.get("epoch") or []
    keys = [k for k in metrics if k in results and k != "epoch"]
    if not keys:
        return None
    for i in reversed(range(len(epochs))):
        # Both are rounded to 5 decimals by ultralytics; compare at that precision.
        if all(abs(float(results[k][i]) - float(metrics[k])) <= 1e-5 for k in keys):
            return {k: float(v[i]) for k, v in results.items() if len(v) == len(epochs)}
    return None


def export_onnx(
    weights: Path,
    output: Path,
    check_images: list[Path],
    *,
    imgsz: int | None = None,
    opset: int | None = None,
    thresholds: PostprocessConfig | None = None,
    mapping: IntensityMapping | None = None,
    run_dir: Path | None = None,
    pixel_size_um: float | None = None,
) -> ExportReport:
    """Export ``weights`` to ``output`` (ONNX) and check it on ``check_images``.

    ``run_dir`` is the training run whose recipe, dataset hash and training frame size go into
    the metadata (default: the run folder the weights lie in, ``<run>/weights/best.pt``).
    ``pixel_size_um``: micrometres per pixel of the training frames, recorded so that a device
    whose camera has other pixels tiles its frames to the scale the model knows.

    Raises:
        ModelError: the weights are missing, the export fails, or the check fails (the
            output file is then removed, so a bad export is never left behind looking good).
    """
    weights, output = Path(weights), Path(output)
    if not weights.is_file():
        raise ModelError(f"{weights}: no such weights file")
    if not check_images:
        raise ModelError("export needs at least one real image to check the ONNX model against PyTorch")
    try:
        import onnx
    except ImportError as e:
        raise DependencyError("onnx", "train", "ONNX export") from e

    with tempfile.TemporaryDirectory(prefix="cellseg-export-") as tmp:
        ultralytics = import_ultralytics_offline(Path(tmp) / ".ultralytics")
        # ultralytics writes the .onnx beside the weights; a copy keeps the run folder clean.
        local = Path(tmp) / "model.pt"
        shutil.copyfile(weights, local)
        model = ultralytics.YOLO(str(local), task="segment")
        trained_args = getattr(model.model, "args", None) or {}
        size = imgsz or int(trained_args.get("imgsz", 640))
        kwargs: dict[str, Any] = {"format": "onnx", "imgsz": size, "dynamic": False, "batch": 1, "simplify": True}
        if opset is not None:
            kwargs["opset"] = opset
        exported = Path(model.export(**kwargs))
        proto = onnx.load(str(exported))
        rewrites = [REWRITE] if rewrite_dfl_softmax(proto) else []
        meta = {p.key: p.value for p in proto.metadata_props}
        base = ModelInfo.from_metadata(meta, exported)
        info = ModelInfo(
            input_width=base.input_width,
            input_height=base.input_height,
            class_names=base.class_names,
            stride=base.stride,
            mapping=mapping or IntensityMapping(),
            thresholds=thresholds or PostprocessConfig(),
            weights_sha256=file_sha256(weights),
            extra={
                "precision": "fp32",
                "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "source_weights": weights.name,
                "weights_epoch": weights_epoch(getattr(model, "ckpt", None) or {}),
                "graph_rewrites": rewrites,
                **_run_metadata(run_dir or weights.resolve().parent.parent),
                **({"trained_pixel_um": pixel_size_um} if pixel_size_um else {}),
            },
        )
        entry = next((p for p in proto.metadata_props if p.key == CELLSEG_METADATA_KEY), None)
        if entry is None:
            entry = proto.metadata_props.add()
            entry.key = CELLSEG_METADATA_KEY
        entry.value = json.dumps(info.to_metadata())
        output.parent.mkdir(parents=True, exist_ok=True)
        partial = output.with_suffix(".onnx.partial")
        onnx.save(proto, str(partial))
        checks = check_parity(model, partial, check_images)
        report = ExportReport(partial, file_sha256(partial), partial.stat().st_size, info, checks)
        if not report.ok:
            partial.unlink()
            worst = [c for c in checks if not c.ok]
            raise ModelError(f"ONNX export does not match PyTorch on {len(worst)} image(s): {worst[:3]}")
        partial.replace(output)
        report.onnx_path = output
        return report


def check_parity(model: Any, onnx_path: Path, images: list[Path]) -> list[ParityCheck]:
    """Compare ONNX Runtime with the PyTorch model on real images, preprocessed as on the device."""
    try:
        import torch
    except ImportError as e:
        raise DependencyError("torch", "train", "the export check") from e
    net = model.model.float().eval()
    checks = []
    with OnnxRuntimeEngine(onnx_path) as engine:
        pre = Preprocessor(engine.info.input_width, engine.info.input_height, engine.info.mapping)
        for path in images:
            tensor, _ = pre(Frame(read_image(path), source=str(path)))
            ort_out = engine.infer(tensor)
            with torch.no_grad():
                torch_out = net(torch.from_numpy(tensor.copy()))
            preds, protos = (t[0].numpy() for t in torch_out[0])
            diffs = {
                "boxes": float(np.abs(ort_out.predictions[:4] - preds[:4]).max()),
                "scores_and_coefficients": float(np.abs(ort_out.predictions[4:] - preds[4:]).max()),
                "prototypes": float(np.abs(ort_out.prototypes - protos).max()),
            }
            scales = {
                "boxes": float(np.abs(preds[:4]).max()),
                "scores_and_coefficients": float(np.abs(preds[4:]).max()),
                "prototypes": float(np.abs(protos).max()),
            }
            checks.append(ParityCheck(str(path), diffs, scales))
            logger.info("parity %s: %s", path, diffs)
    return checks
