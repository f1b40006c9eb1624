"""Benchmark: what the speed targets look like with the design's model, YOLOv9c-seg.

The shipped model is a YOLO11n-seg (2.8 M parameters) because YOLOv9c-seg cannot be trained on a
CPU in reasonable time (see models/README.md). Inference time does not depend on the values of
the weights, so this builds the *architecture* of YOLOv9c-seg (ultralytics' ``yolov9c-seg.yaml``,
one class, untrained: no weights are downloaded), exports it to ONNX at 640x640 and times:

- FP32 and INT8 Q/DQ inference (``cellseg quantize``'s code, calibrated on 20 Usiigaci train
  frames) with ONNX Runtime on the real 16-bit Usiigaci val frames: the INT8 speed-up;
- cellseg's preprocess + postprocess measured in the same run **with the shipped model** (real
  detections, 100+ cells at the given confidence) as a share of YOLOv9c-seg's inference time.

The untrained network detects nothing, so its own accuracy and cell counts mean nothing and are
not reported; only its inference time is used. Prints a table; asserts nothing.

    python bench/design_model.py [--runs 3] [--threads 2] [--conf 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from cellseg.edge.bundles.shipped import default_model  # noqa: E402  (after the BLAS setting above)

DEFAULT_DATA = Path(os.environ.get("CELLSEG_DATA", REPO.parent / "shared" / "data"))
ARCHITECTURE = "yolov9c-seg.yaml"


def export_architecture(workdir: Path, shipped: Path) -> Path:
    """The untrained one-class YOLOv9c-seg as ONNX, carrying the shipped model's cellseg metadata
    (same input size, class and intensity mapping) marked as untrained."""
    import onnx
    import yaml

    from cellseg.edge.pipeline.model_info import CELLSEG_METADATA_KEY
    from cellseg.training.dfl_softmax import REWRITE, rewrite_dfl_softmax
    from cellseg.training.offline import import_ultralytics_offline

    ultralytics = import_ultralytics_offline(workdir / ".ultralytics")
    found = sorted(Path(ultralytics.__file__).parent.glob(f"cfg/models/**/{ARCHITECTURE}"))
    if not found:
        raise SystemExit(f"this ultralytics ({ultralytics.__version__}) has no {ARCHITECTURE}")
    spec = yaml.safe_load(found[0].read_text())
    spec["nc"] = 1  # one class, as the shipped model: the head's shape matches what cellseg runs
    spec_path = workdir / ARCHITECTURE
    spec_path.write_text(yaml.safe_dump(spec))
    model = ultralytics.YOLO(str(spec_path), task="segment")
    here = Path.cwd()
    os.chdir(workdir)  # ultralytics writes the export into the current directory
    try:
        exported = Path(model.export(format="onnx", imgsz=640, simplify=True, batch=1, dynamic=False)).resolve()
    finally:
        os.chdir(here)

    source = onnx.load(str(shipped))
    ours = json.loads({p.key: p.value for p in source.metadata_props}[CELLSEG_METADATA_KEY])
    for key in ("weights_sha256", "recipe", "best_epoch", "weights_epoch", "dataset_sha256"):
        ours.pop(key, None)
    ours["source_weights"] = f"untrained {ARCHITECTURE} (architecture timing only)"
    graph = onnx.load(str(exported))
    if not rewrite_dfl_softmax(graph):  # as cellseg export does
        raise SystemExit(f"{ARCHITECTURE}: its DFL is not of the form training/dfl_softmax.py rewrites")
    ours["graph_rewrites"] = [REWRITE]
    graph.metadata_props.add(key=CELLSEG_METADATA_KEY, value=json.dumps(ours))
    out = workdir / "yolov9c-seg-untrained.onnx"
    onnx.save(graph, str(out))
    return out


def main() -> int:
    from cellseg.build.quantize import choose_calibration_images, quantize
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.pipeline.host import HostPipeline
    from cellseg.edge.pipeline.postprocess import PostprocessConfig
    from cellseg.edge.tools.benchmark import run_bench
    from cellseg.training.import_labels import import_label_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "usiigaci")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--conf", type=float, default=0.1, help="the shipped model's confidence for pre+post")
    args = parser.parse_args()
    frames = sorted((args.data / "val").glob("*/raw.tif"))
    if not frames:
        print(f"no frames under {args.data}/val: set --data or CELLSEG_DATA", file=sys.stderr)
        return 2
    shipped = default_model()

    with tempfile.TemporaryDirectory(prefix="cellseg-design-") as tmp:
        work = Path(tmp)
        print(f"exporting the untrained {ARCHITECTURE} architecture ...", flush=True)
        fp32 = export_architecture(work, shipped)
        dataset = work / "ds"
        import_label_images(args.data, dataset, progress=False)
        print("quantising it (20 calibration frames) ...", flush=True)
        int8 = work / "yolov9c-seg-untrained.int8.onnx"
        quantize(fp32, int8, choose_calibration_images(dataset / "images" / "train", 20), progress=False)

        with OnnxRuntimeEngine(shipped, threads=args.threads) as engine:
            predictor = HostPipeline(engine, PostprocessConfig(conf=args.conf, iou=0.7, max_det=1000))
            report = run_bench(engine, frames, runs=args.runs, warmup=2, predictor=predictor, engine_alone=False)
        times = {}  # the design model's median inference, through the same pipeline
        for name, path in (("fp32", fp32), ("int8", int8)):
            with OnnxRuntimeEngine(path, threads=args.threads) as engine:
                times[name] = run_bench(engine, frames, runs=args.runs, warmup=2, engine_alone=False).stage_ms["infer"]

    stage = report.stage_ms
    pre_post = stage["preprocess"] + stage["postprocess"]
    print(f"\n{len(frames)} Usiigaci val frames (1024x1022, 16-bit) x {args.runs} runs; ONNX Runtime, "
          f"{args.threads} threads; {report.device}")  # fmt: skip
    print(f"shipped {shipped.name} at conf {args.conf}: {report.cells_per_frame:.0f} cells/frame, "
          f"preprocess {stage['preprocess']:.2f} + postprocess {stage['postprocess']:.2f} = {pre_post:.2f} ms, "
          f"its own inference {stage['infer']:.1f} ms ({100 * pre_post / stage['infer']:.1f} %)")  # fmt: skip
    head = f"{'model':<30}{'precision':>10}{'infer ms':>10}{'pre+post %':>12}"
    print(head)
    print("-" * len(head))
    for name, ms in times.items():
        print(f"{'YOLOv9c-seg (untrained)':<30}{name:>10}{ms:>10.1f}{100 * pre_post / ms:>11.1f}%")
    print(f"YOLOv9c-seg INT8 speed-up: {times['fp32'] / times['int8']:.2f}x")
    print("pre+post %: the shipped model's preprocess + postprocess at its cell count, over YOLOv9c-seg's inference")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
