"""The ``cellseg`` command. Each sub-command imports its stage only when it runs, so the
device (no torch, no ultralytics) can run ``predict`` while ``train`` lives on a workstation."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cellseg import __version__
from cellseg.edge.bundles.shipped import default_model, sample_frames
from cellseg.edge.errors import CellsegError

logger = logging.getLogger("cellseg")


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    from cellseg.edge.engines.registry import AUTO, BACKENDS

    p.add_argument("--backend", default=None, choices=[AUTO, *BACKENDS],
                   help="inference backend (default: auto, or the configuration's)")  # fmt: skip
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="float precision where the backend offers one (OpenVINO: bf16 on CPUs with it)")  # fmt: skip


def _add_threshold_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conf", type=float, help="confidence threshold (default: the model's)")
    p.add_argument("--iou", type=float, help="NMS IoU threshold (default: the model's)")
    p.add_argument("--max-det", type=int, help="most detections per image (default: the model's, 1000)")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")


if TYPE_CHECKING:  # argparse's subparser type is subscriptable only to type checkers
    from cellseg.edge.tools.benchmark import Comparison

    _Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellseg",
        description="Cell counts and confluence from microscope frames: data import, training, export, prediction.",
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _training_commands(sub)
    _cv_command(sub)
    _device_commands(sub)
    _build_commands(sub)
    _engine_slot_commands(sub)
    return parser


def _training_commands(sub: _Commands) -> None:
    """Importing data, training, evaluation and export (a workstation's commands)."""
    data = sub.add_parser("data", help="import annotated images into a YOLO-seg dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="FORMAT")
    labels = data_sub.add_parser("labels", help="frames with instance label images (0 = background, 1..N = cells)")
    labels.add_argument("source", type=Path, help="folder with train/, val/, test/ split folders")
    labels.add_argument("output", type=Path, help="dataset folder to create")
    labels.add_argument("--image-name", default="raw.tif", help="frame file name in each sample folder")
    labels.add_argument("--label-name", default="instances_ids.png", help="label image file name in each sample folder")
    labels.add_argument("--class-name", default="cell")
    coco = data_sub.add_parser("coco", help="a Roboflow COCO segmentation export (train/, valid/, test/)")
    coco.add_argument("source", type=Path)
    coco.add_argument("output", type=Path)
    coco.add_argument("--skip-invalid", action="store_true", help="skip bad annotations (listed as warnings)")
    for p in (labels, coco):
        p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
        p.add_argument("--low-pct", type=float, default=0.5, help="percentile mapped to black (16-bit frames)")
        p.add_argument("--high-pct", type=float, default=99.5, help="percentile mapped to white (16-bit frames)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    train = sub.add_parser("train", help="train a YOLO-seg model (needs the 'train' extra)")
    train.add_argument("--data", type=Path, required=True, help="dataset data.yaml")
    train.add_argument("--recipe", type=Path, help="recipe YAML (default: the seed recipe, YOLOv9c-seg)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set epochs=5 (repeatable)",
    )
    train.add_argument("--run", type=Path, default=Path("runs/train/run"), help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --run from its last epoch")

    ev = sub.add_parser("eval", help="evaluate an ONNX model on a dataset's val/test splits")
    ev.add_argument("model", type=Path)
    ev.add_argument("--data", type=Path, required=True, help="dataset data.yaml")
    ev.add_argument("--split", action="append", choices=["train", "val", "test"], help="splits (default: val and test)")
    ev.add_argument("--json", type=Path, dest="json_out", help="also write the report as JSON to this file")
    ev.add_argument("--conf", type=float, help="operating confidence for counts (default: the model's)")
    ev.add_argument(
        "--sweep-conf",
        type=_conf_sweep,
        metavar="START:STOP:STEP",
        help="also report count and confluence errors at each of these confidences (e.g. 0.3:0.6:0.05, "
        "STOP included), to choose the one to ship; sweep on the train split",
    )
    ev.add_argument("--threads", type=int)
    ev.add_argument("--plot", type=Path, metavar="FILE.png",
                    help="draw predicted vs true count and confluence per image, and the worst frames' misses and "
                    "false positives")  # fmt: skip

    ex = sub.add_parser("export", help="export trained weights to ONNX with metadata, checked against PyTorch")
    ex.add_argument("weights", type=Path, help="a .pt from cellseg train (e.g. runs/train/x/weights/best.pt)")
    ex.add_argument("-o", "--output", type=Path, required=True, help="ONNX file to write")
    ex.add_argument("--check-images", type=Path, nargs="+", required=True, help="real images for the parity check")
    ex.add_argument("--imgsz", type=int, help="input size (default: the training size)")
    ex.add_argument(
        "--publish-weights", type=Path, metavar="PT", help="also write shareable weights here (paths stripped)"
    )
    ex.add_argument("--run", type=Path, help="training run folder for the metadata (default: the weights' run)")
    ex.add_argument("--opset", type=int)
    ex.add_argument(
        "--pixel-size-um", type=float, help="micrometres per pixel of the training frames (devices tile to match)"
    )
    ex.add_argument("--conf", type=float, default=0.25, help="default confidence shipped with the model")
    ex.add_argument("--iou", type=float, default=0.7, help="default NMS IoU shipped with the model")
    ex.add_argument("--max-det", type=int, default=1000, help="default max detections shipped with the model")


def _cv_command(sub: _Commands) -> None:
    cv = sub.add_parser(
        "cv",
        help="K-fold cross-validation of a training recipe over every annotated frame, folds grouped by field",
    )
    cv.add_argument("--data", type=Path, help="dataset data.yaml (its splits are pooled)")
    cv.add_argument("--folds", type=int, help="number of folds (default 5, or the run's own when continuing)")
    cv.add_argument("--recipe", type=Path, help="recipe YAML (default: the seed recipe, YOLOv9c-seg)")
    cv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field (repeatable)")  # fmt: skip
    cv.add_argument("--run", type=Path, help="CV run folder; a run started again continues where it stopped")
    cv.add_argument("--seed", type=int, help="seed of the fold assignment (default 0, or the run's own)")
    cv.add_argument(
        "--from", type=Path, dest="from_report", metavar="REPORT.json",
        help="start --run from a saved report (cv --json): its plan, recipe and finished folds, "
        "frames found by name in --data; the folds still to do are run",
    )  # fmt: skip
    cv.add_argument(
        "--field-pattern",
        metavar="REGEX",
        help="the field of a frame from its file name (a 'field' group, else the match); default: from the pixels",
    )
    cv.add_argument("--fold", type=int, action="append", default=[], help="run only this fold (repeatable)")
    cv.add_argument("--threads", type=int, help="threads for evaluation (default: all cores)")
    cv.add_argument("--json", type=Path, dest="json_out", help="also write the report as JSON to this file")
    cv.add_argument(
        "--compare", type=Path, nargs="+", metavar="RUN",
        help="print the table of CV runs (run folders or saved reports), one row each",
    )  # fmt: skip


def _device_commands(sub: _Commands) -> None:
    """Measuring: predict, growth, the daemon and its demo, the doctor, configuration checks."""
    gr = sub.add_parser("growth", help="growth curve, doubling time and passage ETA from measurements on file")
    gr.add_argument("inputs", nargs="+", type=Path,
                    help="cellseg predict --json/--csv output or a history export (JSON lines)")  # fmt: skip
    gr.add_argument("--json", action="store_true", help="one JSON object per series")
    gr.add_argument("--target-confluence", type=float, default=70.0, metavar="PCT",
                    help="confluence at which the culture is due for passage (default 70)")  # fmt: skip
    gr.add_argument("--plot", type=Path, metavar="FILE.png", help="draw counts, confluence, the fit and the ETA")
    gr.add_argument("--html", type=Path, metavar="FILE.html", help="one self-contained report page of every series")
    hi = sub.add_parser("history", help="the device's measurement history, per series")
    hi_sub = hi.add_subparsers(dest="history_command", required=True, metavar="ACTION")
    ex = hi_sub.add_parser("export", help="write the history as JSON lines (default) or CSV, for cellseg growth")
    ex.add_argument("--config", type=Path, required=True, help="device configuration (state_dir)")
    form = ex.add_mutually_exclusive_group()
    form.add_argument("--jsonl", action="store_true", help="one JSON object per line (the default)")
    form.add_argument("--csv", action="store_true", help="CSV with a header")
    ex.add_argument("--series", help="only this series")
    ex.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    pr = sub.add_parser("predict", help="count cells and confluence in images")
    pr.add_argument("inputs", nargs="+", help="[MODEL.onnx] then images, folders or glob patterns")
    pr.add_argument("--model", type=Path, help="ONNX model (default: $CELLSEG_MODEL or the shipped model)")
    fmt = pr.add_mutually_exclusive_group()
    fmt.add_argument(
        "--json", action="store_const", const="json", dest="output_format", help="one JSON object per line"
    )
    fmt.add_argument("--csv", action="store_const", const="csv", dest="output_format", help="CSV with a header")
    pr.add_argument("--overlay", type=Path, help="write overlay PNGs (outlines, ids, count) to this folder")
    pr.add_argument("--labels", type=Path, help="write 16-bit instance label images to this folder")
    pr.add_argument("--labels-format", choices=["png", "tif"], default="png")
    pr.add_argument("--pixel-size", type=float, help="micrometres per pixel, for areas in µm²")
    _add_backend_args(pr)
    tl = pr.add_argument_group("tiles (frames larger than the model's training frames)")
    tl.add_argument(
        "--tile", choices=["auto", "on", "off"], default="auto",
        help="auto: tile when letterboxing would shrink cells by more than a quarter (default)",
    )  # fmt: skip
    tl.add_argument("--tile-px", type=int, help="tile side in frame pixels (default: from the model and --pixel-size)")
    tl.add_argument("--overlap-px", type=int, help="least overlap of neighbouring tiles (default: a quarter tile)")
    tm = pr.add_argument_group("acquisition times (when the image metadata has none; else the file's mtime)")
    tm.add_argument(
        "--time-from-name",
        metavar="REGEX",
        help="file-name pattern with a (?P<datetime>...) or (?P<index>...) group, e.g. 't(?P<index>\\d+)'",
    )
    tm.add_argument("--time-format", default="%Y%m%d_%H%M%S", help="strptime format of the datetime group")
    tm.add_argument("--frame-interval", type=float, metavar="SECONDS", help="seconds between frames (index group)")
    tm.add_argument("--time-start", metavar="ISO8601", help="time of frame index 0 (index group)")
    tm.add_argument("--timezone", help="IANA zone of times written without one (default: this machine's)")
    _add_threshold_args(pr)

    run = sub.add_parser("run", help="run the device daemon with a configuration file")
    run.add_argument("--config", type=Path, required=True, help="device configuration (YAML)")

    demo = sub.add_parser("demo", help="the daemon on the sample frames with the shipped model, printing measurements")
    demo.add_argument("--broker", help="MQTT broker host[:port] (default: localhost:1883 when one answers there)")
    demo.add_argument("--overlay", type=Path, default=Path("overlays"), help="overlay folder (default: overlays/)")
    demo.add_argument("--loop", action="store_true", help="repeat the sample frames until interrupted")
    demo.add_argument("--interval", type=float, default=0.0, help="seconds between measurements")
    demo.add_argument(
        "--homeassistant", action="store_true", help="also publish Home Assistant discovery for count and confluence"
    )

    dr = sub.add_parser(
        "doctor", help="check that the service would run here: packages, engine, source, broker, state, clock"
    )
    dr.add_argument("--config", type=Path, required=True, help="device configuration (YAML)")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")

    vc = sub.add_parser(
        "validate-config",
        help="check a device configuration file and the files it names; print each problem's key path",
    )
    vc.add_argument("config", type=Path)
    vc.add_argument(
        "--schema-only",
        action="store_true",
        help="check keys and values only, not the files they name (a configuration for another machine)",
    )


def _build_commands(sub: _Commands) -> None:
    """Quantisation, keys, bundles and TensorRT engines."""
    qz = sub.add_parser("quantize", help="INT8 Q/DQ ONNX from calibration images, checked by the accuracy gate")
    qz.add_argument("model", type=Path, help="the FP32 ONNX model (from cellseg export)")
    qz.add_argument("-o", "--output", type=Path, required=True, help="INT8 ONNX file to write")
    qz.add_argument("--data", type=Path, required=True, help="dataset data.yaml (calibrate on train)")
    qz.add_argument("--calibration-images", type=int, default=20, help="images taken from the train split")
    qz.add_argument("--gate-split", action="append", choices=["train", "val", "test"],
                    help="splits the gate judges on (repeatable; default val; train less calibration)")  # fmt: skip
    qz.add_argument("--max-map-loss", type=float, default=1.0, help="most mask mAP50-95 points the gate allows lost")
    qz.add_argument("--max-count-loss", type=float, default=2.0, help="most count-error %% points allowed lost")
    qz.add_argument("--max-confluence-loss", type=float, default=1.0, help="most confluence-error pp allowed lost")
    qz.add_argument(
        "--head", choices=["float", "quantize"], default="float", help="keep the Segment head's decode in float"
    )
    qz.add_argument("--threads", type=int)
    qz.add_argument("--quiet", action="store_true", help="no progress bars")

    gt = sub.add_parser(
        "gate", help="the accuracy gate of a model on a backend and precision against the FP32 model on ONNX Runtime"
    )
    gt.add_argument("model", type=Path, help="the FP32 ONNX model: the reference (and the candidate without --int8)")
    gt.add_argument("--int8", type=Path, metavar="MODEL", help="judge this INT8 model (cellseg quantize) instead")
    gt.add_argument("--data", type=Path, required=True, help="dataset data.yaml with ground truth")
    gt.add_argument("--split", action="append", choices=["train", "val", "test"],
                    help="splits to pool (repeatable; default val); more frames, a steadier verdict")  # fmt: skip
    gt.add_argument("-o", "--output", type=Path, help="report to write (default: beside the candidate)")
    _add_backend_args(gt)
    gt.add_argument("--max-map-loss", type=float, default=1.0, help="most mask mAP50-95 points lost")
    gt.add_argument("--max-count-loss", type=float, default=2.0, help="most count-error %% points lost")
    gt.add_argument("--max-confluence-loss", type=float, default=1.0, help="most confluence-error pp lost")
    gt.add_argument("--threads", type=int)
    gt.add_argument("--quiet", action="store_true", help="no progress bars")

    kg = sub.add_parser("keygen", help="an Ed25519 key pair for signing bundles: PREFIX.key and PREFIX.pub")
    kg.add_argument("prefix", type=Path)
    kg.add_argument("--overwrite", action="store_true")

    bu = sub.add_parser("bundle", help="a signed bundle: engine or ONNX model, manifest, reference frame")
    bu.add_argument("model", type=Path, help="the ONNX model (FP32, or INT8 from cellseg quantize)")
    bu.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write (.cellseg)")
    bu.add_argument("--key", type=Path, required=True, help="the signing private key (from cellseg keygen)")
    bu.add_argument("--engine", type=Path, help="a TensorRT plan built from MODEL (default: bundle the ONNX)")
    bu.add_argument("--gate-report", type=Path, help="gate report (INT8; default MODEL.gate.json)")
    bu.add_argument("--compute-gate", type=Path, action="append", default=[], metavar="REPORT",
                    help="a passing 'cellseg gate' report of MODEL on another engine (repeatable)")  # fmt: skip
    bu.add_argument("--reference", type=Path, help="reference frame for the self-test (default: the first sample)")
    bu.add_argument("--name", help="bundle name (default: the output file's stem)")

    bd = sub.add_parser("build-engine", help="a TensorRT engine from an ONNX model (run on the target device)")
    bd.add_argument("model", type=Path, help="FP32 ONNX (for fp16) or the Q/DQ ONNX from cellseg quantize (int8)")
    bd.add_argument("-o", "--output", type=Path, required=True, help="plan file to write (.engine; .json beside it)")
    bd.add_argument("--precision", choices=["fp16", "int8"], default="fp16")
    bd.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT workspace limit")
    bd.add_argument("--timing-cache", type=Path, help="reuse and update this timing cache (faster rebuilds)")
    bd.add_argument("--calibration", type=Path, nargs="+", help="images for the implicit INT8 calibrator (fallback)")
    bd.add_argument("--validate", type=Path, nargs="*", help="frames to compare the engine with the ONNX model on")


def _engine_slot_commands(sub: _Commands) -> None:
    """A device's engines: flashing, the shipped model as a slot, rollback, and their speed."""
    fl = sub.add_parser("flash", help="verify a bundle and make it this device's engine (a running daemon swaps to it)")
    fl.add_argument("bundle", help="bundle file, or an http(s):// or file:// URL")
    fl.add_argument("--sha256", help="expected sha256 of the bundle file (required for URLs)")
    fl.add_argument("--config", type=Path, required=True, help="device configuration (state_dir, trusted keys)")

    im = sub.add_parser(
        "install-model",
        help="install an ONNX model (default: the shipped one) as an engine slot; make it active when none is",
    )
    im.add_argument("--config", type=Path, required=True, help="device configuration (state_dir)")
    im.add_argument("--model", type=Path, help="ONNX model to install (default: the model shipped with cellseg)")
    im.add_argument("--reference", type=Path, help="reference frame for its self-test (default: the first sample)")
    im.add_argument(
        "--activate",
        choices=["if-none", "always", "never"],
        default="if-none",
        help="if-none (default): only when no engine slot is active, so an upgrade keeps the running model; "
        "always: make it active (the current one is kept for rollback); never: only report",
    )

    rb = sub.add_parser("rollback", help="make the previously active engine active again")
    rb.add_argument("--config", type=Path, required=True, help="device configuration (state_dir)")

    be = sub.add_parser("bench", help="inference speed of the engine on this machine")
    be.add_argument("images", nargs="*", help="frames, folders or globs (default: the bundled sample frames)")
    be.add_argument(
        "--model",
        type=Path,
        help="ONNX model or installed engine slot (default: $CELLSEG_MODEL, else the shipped model)",
    )
    be.add_argument(
        "--config", type=Path, help="time the engine this device's daemon runs (flashed slot, backend, thresholds)"
    )
    be.add_argument("--runs", type=int, default=5, help="passes over the frames")
    _add_backend_args(be)
    be.add_argument("--compare", action="store_true",
                    help="every backend and precision this machine has, side by side on the same frames")  # fmt: skip
    be.add_argument("--int8", type=Path, metavar="MODEL", help="with --compare: also the INT8 model (cellseg quantize)")
    be.add_argument("--gate", type=Path, metavar="DATA.yaml",
                    help="with --compare: each row's accuracy gate against ONNX Runtime FP32")  # fmt: skip
    be.add_argument("--gate-split", action="append", choices=["train", "val", "test"],
                    help="splits the gate pools (repeatable; default val)")  # fmt: skip
    be.add_argument("--threads", type=int, help="ONNX Runtime threads (default: all cores)")
    be.add_argument("--json", action="store_true", help="print the report as JSON")


def _single_threaded_blas() -> None:
    """Keep numpy's BLAS on one thread, unless the user chose otherwise.

    The engine (ONNX Runtime, torch) owns the cores; numpy's BLAS only sees the small
    per-cell matrix products of the mask assembly, which multi-threading makes slower, and
    much slower when its threads wait for cores the engine holds (measured: 2.8 ms -> 10-100 ms
    per frame). Must run before numpy is first imported, which the lazy imports allow.
    """
    if "numpy" not in sys.modules:
        for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")


def main(argv: Sequence[str] | None = None) -> int:
    _single_threaded_blas()
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except CellsegError as e:
        print(f"cellseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    commands = {
        "data": _cmd_data,
        "train": _cmd_train,
        "eval": _cmd_eval,
        "cv": _cmd_cv,
        "export": _cmd_export,
        "predict": _cmd_predict,
        "growth": _cmd_growth,
        "history": _cmd_history,
        "bench": _cmd_bench,
        "validate-config": _cmd_validate_config,
        "doctor": _cmd_doctor,
        "run": _cmd_run,
        "demo": _cmd_demo,
        "quantize": _cmd_quantize,
        "gate": _cmd_gate,
        "keygen": _cmd_keygen,
        "bundle": _cmd_bundle,
        "flash": _cmd_flash,
        "rollback": _cmd_rollback,
        "install-model": _cmd_install_model,
        "build-engine": _cmd_build_engine,
    }
    return commands[args.command](args)


def _cmd_data(args: argparse.Namespace) -> int:
    from cellseg.edge.pipeline.intensity import IntensityMapping

    mapping = IntensityMapping(low_pct=args.low_pct, high_pct=args.high_pct)
    if args.data_command == "labels":
        from cellseg.training.import_labels import import_label_images

        summary = import_label_images(
            args.source,
            args.output,
            class_name=args.class_name,
            image_name=args.image_name,
            label_name=args.label_name,
            mapping=mapping,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    else:
        from cellseg.training.import_coco import import_coco

        summary = import_coco(
            args.source,
            args.output,
            mapping=mapping,
            skip_invalid=args.skip_invalid,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    print(summary.format())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from cellseg.training.recipe import load_recipe
    from cellseg.training.train import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.resume:
        saved = args.run / "recipe.yaml"
        if saved.is_file() and (args.recipe or args.overrides):
            logger.warning("--resume continues with the run's saved recipe %s; --recipe/--set are ignored", saved)
        recipe = load_recipe(saved) if saved.is_file() else recipe
    result = train(recipe, args.data, args.run, resume=args.resume)
    best = result.manifest.get("best_epoch") or {}
    print(f"training finished in {result.manifest['train_seconds']:.0f} s; best weights {result.best_weights}")
    if best:
        print(
            f"best epoch {int(best.get('epoch', 0))}: mask mAP50 {best.get('metrics/mAP50(M)', 0):.3f}, "
            f"mask mAP50-95 {best.get('metrics/mAP50-95(M)', 0):.3f}"
        )
    print(f"run manifest: {result.run_dir / 'manifest.json'}")
    return 0


def _conf_sweep(text: str) -> list[float]:
    """``START:STOP:STEP`` -> the confidences from START to STOP inclusive."""
    try:
        start, stop, step = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:STOP:STEP such as 0.3:0.6:0.05, got {text!r}") from None
    if not (0.0 < start <= stop < 1.0 and step > 0.0):
        raise argparse.ArgumentTypeError(f"need 0 < START <= STOP < 1 and STEP > 0, got {text!r}")
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > 1000:
        raise argparse.ArgumentTypeError(f"{text!r} makes {count} confidences; at most 1000")
    # Rounded, so that 0.1 + 2 * 0.05 is stored (and printed) as 0.2.
    return [round(start + i * step, 6) for i in range(count)]


def _cmd_eval(args: argparse.Namespace) -> int:
    from cellseg.training.evaluate import evaluate, write_json

    splits = tuple(args.split) if args.split else ("val", "test")
    report, kept = evaluate(
        args.model, args.data, splits, operating_conf=args.conf, threads=args.threads, sweep=args.sweep_conf or (),
        keep_predictions=args.plot is not None,
    )  # fmt: skip
    if not report.splits:
        print(f"no images in splits {', '.join(splits)} of {args.data}", file=sys.stderr)
        return 2
    print(report.format())
    if args.json_out:
        write_json(report, args.json_out)
    if args.plot:
        from cellseg.training.eval_plot import format_misses, frame_outcomes, miss_breakdown, plot_eval

        outcomes = frame_outcomes(report, kept)
        shown = plot_eval(report, outcomes, args.plot, mapping=report.mapping)
        worst = ", ".join(f"{Path(o.image).stem} ({o.count_error:+d})" for o in shown)
        print(f"\nwrote {args.plot}: counts and confluence per image; worst frames {worst}")
        print(f"where the misses are (operating confidence {report.operating_conf}):")
        print(format_misses(miss_breakdown(outcomes)))
    return 0


def _cmd_cv(args: argparse.Namespace) -> int:
    from cellseg.training.cross_validation import cross_validate, format_candidates, load_report, seed_run
    from cellseg.training.recipe import load_recipe

    if args.compare:
        print(format_candidates([load_report(run) for run in args.compare]))
        return 0
    if args.data is None or args.run is None:
        print("cellseg cv: error: --data and --run are needed (or --compare RUN...)", file=sys.stderr)
        return 2
    if args.from_report:
        seeded = seed_run(args.from_report, args.data, args.run)
        done = ", ".join(str(f.fold) for f in seeded.folds) or "none"
        print(f"cv: {args.run} started from {args.from_report} (folds finished: {done})", file=sys.stderr)
    saved = args.run / "recipe.yaml"
    if saved.is_file() and not (args.recipe or args.overrides):
        recipe = load_recipe(saved)  # continuing a run: its own recipe
    else:
        recipe = load_recipe(args.recipe, args.overrides)
    report = cross_validate(
        args.data, recipe, args.folds, args.run, seed=args.seed, field_pattern=args.field_pattern,
        only=args.fold, threads=args.threads,
    )  # fmt: skip
    print(report.format())
    if args.json_out:
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from cellseg.edge.pipeline.model_info import PostprocessConfig
    from cellseg.training.export import export_onnx

    weights, run_dir = args.weights, args.run or args.weights.resolve().parent.parent
    if args.publish_weights:
        from cellseg.training.checkpoint import publish_checkpoint

        # Export from the published copy, so the model's weights_sha256 names the shared file.
        publish_checkpoint(args.weights, args.publish_weights)
        weights = args.publish_weights
        print(f"wrote {weights} (machine paths and optimizer state removed)")
    report = export_onnx(
        weights,
        args.output,
        list(args.check_images),
        imgsz=args.imgsz,
        opset=args.opset,
        thresholds=PostprocessConfig(conf=args.conf, iou=args.iou, max_det=args.max_det),
        run_dir=run_dir,
        pixel_size_um=args.pixel_size_um,
    )
    print(f"wrote {report.onnx_path} ({report.size_bytes / 1e6:.1f} MB, sha256 {report.onnx_sha256})")
    for check in report.checks:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in check.max_abs_diff.items())
        print(f"  parity with PyTorch on {check.image}: max |diff| {diffs}")
    print(json.dumps(report.info.to_metadata(), indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from cellseg.edge.capture.acquisition import NamePattern, acquisition_rule
    from cellseg.edge.tools.predict import PredictOptions, run_predict

    inputs = list(args.inputs)
    model = args.model
    if model is None and inputs and inputs[0].lower().endswith(".onnx"):
        model = Path(inputs.pop(0))
    model = model or default_model()
    if not inputs:
        print("cellseg predict: error: no images given", file=sys.stderr)
        return 2
    options = PredictOptions(
        output_format=args.output_format or "text",
        overlay_dir=args.overlay,
        labels_dir=args.labels,
        labels_format=args.labels_format,
        conf=args.conf,
        iou=args.iou,
        max_det=args.max_det,
        pixel_size_um=args.pixel_size,
        threads=args.threads,
        backend=args.backend or "auto",
        precision=args.precision or "fp32",
        tile=args.tile,
        tile_px=args.tile_px,
        overlap_px=args.overlap_px,
        acquired=acquisition_rule(
            NamePattern(args.time_from_name, args.time_format, args.frame_interval, args.time_start)
            if args.time_from_name
            else None,
            args.timezone,
        ),
    )
    failures = run_predict(model, inputs, options)
    return 1 if failures else 0


def _cmd_growth(args: argparse.Namespace) -> int:
    from cellseg.edge.growth.model import GrowthSettings
    from cellseg.edge.tools.growth import run_growth

    settings = GrowthSettings(target_confluence_pct=args.target_confluence)
    return run_growth(list(args.inputs), settings, as_json=args.json, plot=args.plot, report=args.html)


def _cmd_history(args: argparse.Namespace) -> int:
    from cellseg.edge.config import load_config
    from cellseg.edge.growth.history import History

    config = load_config(args.config)
    path = config.state_dir / "history.sqlite"
    if not path.is_file():
        print(f"cellseg history: error: no history at {path} (the daemon writes it as it measures)", file=sys.stderr)
        return 2
    history = History(path, config.growth.history_days)
    try:
        if args.series is not None and args.series not in history.series():
            known = ", ".join(history.series()) or "none"
            print(f"cellseg history: error: no series {args.series!r} (known: {known})", file=sys.stderr)
            return 2
        fmt = "csv" if args.csv else "jsonl"
        if args.output is None:
            written = history.export(sys.stdout, fmt, args.series)
        else:
            with open(args.output, "w", newline="") as out:
                written = history.export(out, fmt, args.series)
        print(f"{written} measurements", file=sys.stderr)
    finally:
        history.close()
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from cellseg.edge.config import load_config
    from cellseg.edge.service.daemon import Daemon

    config = load_config(args.config)
    while True:
        logging.getLogger().setLevel(config.log_level)
        daemon = Daemon(config)
        daemon.install_signal_handlers()
        code = daemon.run()
        if not daemon.reload_requested.is_set():
            return code
        try:
            config = load_config(args.config)
            logger.info("configuration reloaded from %s", args.config)
        except CellsegError as e:  # a broken edit must not take the device down: keep the old one
            logger.error("reload refused, keeping the running configuration:\n%s", e)


def _broker_answers(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _cmd_demo(args: argparse.Namespace) -> int:
    import tempfile

    from cellseg.edge.config import parse_config
    from cellseg.edge.service.daemon import Daemon

    host, _, port_text = (args.broker or "localhost:1883").partition(":")
    port = int(port_text or 1883)
    use_broker = _broker_answers(host, port)
    if args.broker and not use_broker:
        print(f"cellseg demo: no MQTT broker answers at {host}:{port}; printing only", file=sys.stderr)
    # The demo's state (its spool) lives as long as the demo: nothing is left behind in /tmp.
    with tempfile.TemporaryDirectory(prefix="cellseg-demo-") as state:
        config = parse_config(
            {
                "device_id": "demo",
                "model": str(default_model()),
                "state_dir": str(state),
                "source": {"kind": "images", "images": [str(p) for p in sample_frames()],
                           "loop": args.loop, "interval_s": args.interval},
                "mqtt": {"enabled": use_broker, "host": host, "port": port,
                         "homeassistant_discovery": args.homeassistant},
                "overlay": {"dir": str(args.overlay)},
            },
            "demo",
        )  # fmt: skip
        where = f"publishing to {host}:{port} under {config.topic_prefix}/" if use_broker else "no MQTT broker found"
        print(f"cellseg demo: {where}; overlays in {args.overlay}/", file=sys.stderr)

        def echo(record: dict[str, object]) -> None:
            print(json.dumps({k: record[k] for k in ("seq", "image", "count", "confluence_pct")}), flush=True)

        daemon = Daemon(config, echo=echo)
        daemon.install_signal_handlers()
        return daemon.run()


def _cmd_validate_config(args: argparse.Namespace) -> int:
    from cellseg.edge.config import load_config
    from cellseg.edge.errors import ConfigError
    from cellseg.edge.tools.config_check import reference_problems

    config = load_config(args.config)  # a ConfigError lists every problem, one per line
    if not args.schema_only:
        problems = reference_problems(config, str(args.config))
        if problems:
            raise ConfigError("\n".join(problems))
    checked = "schema only" if args.schema_only else "and the files it names"
    print(
        f"{args.config}: OK, {checked} (device {config.device_id}, source {config.source.kind}, "
        f"topics {config.topic_prefix}/...)"
    )
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from cellseg.edge.tools.doctor import dumps, run_doctor

    if args.verbose == 0:  # the report says what went wrong; the library's log lines would repeat it
        logging.getLogger("cellseg").setLevel(logging.CRITICAL)
    report = run_doctor(args.config)
    print(dumps(report) if args.json else report.format())
    return 0 if report.ok else 1


def _gate_rows(
    rows: list[Comparison], model: Path, int8: Path | None, data: Path, *, splits: tuple[str, ...], threads: int | None
) -> None:
    """The accuracy gate's verdict on every row of a backend comparison that ran here."""
    from cellseg.build.gate import run_gate, score_model

    reference = score_model(model, data, splits, threads=threads, progress=False)
    for row in rows:
        if row.report is None:
            continue
        if row.backend == "onnxruntime" and row.precision == "fp32":
            row.verdict = "reference"
            continue
        candidate = int8 if row.precision == "int8" and int8 is not None else model
        compute = "fp32" if row.precision == "int8" else row.precision
        report = run_gate(model, candidate, data, split=splits, threads=threads, progress=False,
                          backend=row.backend, compute=compute, reference_scored=reference)  # fmt: skip
        verdict = "pass" if report.passed else "REFUSED"
        loss = report.losses["count_pct_points"]
        row.verdict = f"{verdict} ({loss:+.1f} count pts{'' if report.stable else ', unstable'})"


def _cmd_quantize(args: argparse.Namespace) -> int:
    from cellseg.build.gate import Tolerance, run_gate, write_report
    from cellseg.build.quantize import choose_calibration_images, quantize
    from cellseg.training.yolo_dataset import load_data_yaml

    tolerance = Tolerance(args.max_map_loss, args.max_count_loss, args.max_confluence_loss)
    data = load_data_yaml(args.data)
    if not data.get("train"):
        print(f"cellseg quantize: error: {args.data} has no train split to calibrate on", file=sys.stderr)
        return 2
    calibration = choose_calibration_images(Path(data["path"]) / data["train"], args.calibration_images)
    print(f"calibrating on {len(calibration.images)} train images (set sha256 {calibration.sha256[:16]}...)")
    result = quantize(args.model, args.output, calibration, head=args.head, progress=not args.quiet)
    print(f"wrote {result.output} ({result.quantized_nodes} quantised tensors, {result.float_nodes} nodes in float)")
    report = run_gate(
        args.model,
        args.output,
        args.data,
        split=tuple(args.gate_split or ["val"]),
        tolerance=tolerance,
        threads=args.threads,
        progress=not args.quiet,
    )
    gate_path = args.output.with_suffix(".gate.json")
    write_report(report, gate_path)
    print(report.format())
    print(f"gate report: {gate_path}")
    return 0 if report.passed else 3


def _cmd_gate(args: argparse.Namespace) -> int:
    from cellseg.build.gate import Tolerance, run_gate, write_report

    backend, compute = args.backend or "onnxruntime", args.precision or "fp32"
    candidate = args.int8 or args.model
    if candidate == args.model and backend in ("auto", "onnxruntime") and compute == "fp32":
        print("cellseg gate: error: that is the reference itself; name --backend/--precision or --int8",
              file=sys.stderr)  # fmt: skip
        return 2
    report = run_gate(
        args.model, candidate, args.data, split=tuple(args.split or ["val"]),
        tolerance=Tolerance(args.max_map_loss, args.max_count_loss, args.max_confluence_loss),
        threads=args.threads, progress=not args.quiet, backend=backend, compute=compute,
    )  # fmt: skip
    path = args.output or candidate.with_name(f"{candidate.stem}.{backend}-{compute}.gate.json")
    write_report(report, path)
    print(report.format())
    print(f"gate report: {path}")
    return 0 if report.passed else 3


def _cmd_keygen(args: argparse.Namespace) -> int:
    from cellseg.build.bundle import generate_keypair

    private, public = generate_keypair(args.prefix, overwrite=args.overwrite)
    print(f"wrote {private} (keep it secret: it signs engines) and {public} (install it on devices)")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from cellseg.build.bundle import EngineBuildInfo, make_bundle
    from cellseg.build.gate import read_report

    gate_path = args.gate_report or args.model.with_suffix(".gate.json")
    gate = read_report(gate_path) if gate_path.is_file() else None
    if args.gate_report and gate is None:
        print(f"cellseg bundle: error: {args.gate_report} does not exist", file=sys.stderr)
        return 2
    reference = args.reference or sample_frames()[0]
    engine_info = EngineBuildInfo.read(args.engine.with_suffix(".json")) if args.engine else None
    manifest = make_bundle(
        args.model,
        args.output,
        args.key,
        reference,
        name=args.name,
        engine=args.engine,
        engine_info=engine_info,
        gate_report=gate,
        compute_gates=[read_report(path) for path in args.compute_gate],
    )
    e = manifest.engine
    also = f", also gated for {', '.join(sorted(manifest.compute_gates))}" if manifest.compute_gates else ""
    print(
        f"wrote {args.output}: {e.kind} {e.precision}{also}, signed by key {manifest.signing_key}; "
        f"self-test expects {manifest.reference.count} cells on {reference.name}"
    )
    return 0


def _cmd_flash(args: argparse.Namespace) -> int:
    from cellseg.edge.bundles.flash import flash_file, flash_url, settings_for, store_for
    from cellseg.edge.config import load_config

    config = load_config(args.config)
    store, settings = store_for(config.state_dir), settings_for(config)
    if "://" in args.bundle:
        if not args.sha256:
            print("cellseg flash: error: a URL needs --sha256", file=sys.stderr)
            return 2
        result = flash_url(args.bundle, args.sha256, store, settings)
    else:
        result = flash_file(Path(args.bundle), store, settings)
    print(f"active engine: slot {result.slot.name} ({result.manifest.name}); self-test {json.dumps(result.self_test)}")
    return 0


def _cmd_build_engine(args: argparse.Namespace) -> int:
    from cellseg.build.engine_build import build_engine, validate_engine

    if not args.model.is_file():
        print(f"cellseg build-engine: error: {args.model}: no such ONNX model", file=sys.stderr)
        return 2
    report = build_engine(
        args.model,
        args.output,
        args.precision,
        workspace_mb=args.workspace_mb,
        timing_cache=args.timing_cache,
        calibration_images=args.calibration,
    )
    frames = args.validate if args.validate else sample_frames()
    validation = validate_engine(args.output, args.model, report, frames)
    print(json.dumps(validation, indent=2))
    return 0 if validation["passed"] else 3


def _cmd_install_model(args: argparse.Namespace) -> int:
    from cellseg.edge.bundles.flash import store_for
    from cellseg.edge.bundles.local_model import install_model
    from cellseg.edge.bundles.shipped import shipped_model
    from cellseg.edge.config import load_config

    config = load_config(args.config)
    model = args.model or shipped_model()
    name = model.stem if args.model else f"{model.stem} (shipped with cellseg {__version__})"
    outcome = install_model(
        model,
        args.reference or sample_frames()[0],
        store_for(config.state_dir),
        name=name,
        activate=args.activate,
        threads=config.engine.threads,
    )
    print(outcome.action)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from cellseg.edge.bundles.flash import store_for
    from cellseg.edge.config import load_config

    slot = store_for(load_config(args.config).state_dir).rollback()
    print(f"active engine: slot {slot.name}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from cellseg.edge.bundles.engine_select import configured_candidates, open_engine, open_first, pipeline_for
    from cellseg.edge.bundles.flash import store_for
    from cellseg.edge.config import load_config
    from cellseg.edge.tools.benchmark import run_bench
    from cellseg.edge.tools.predict import expand_inputs

    images = list(expand_inputs(args.images or [str(p) for p in sample_frames()]))
    if not images:
        print("cellseg bench: error: no images found", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("cellseg bench: error: --runs must be at least 1", file=sys.stderr)
        return 2
    if args.config is not None and args.model is not None:
        print("cellseg bench: error: --config and --model name the engine twice; give one", file=sys.stderr)
        return 2
    config = load_config(args.config) if args.config is not None else None
    if args.compare:
        from cellseg.edge.tools.benchmark import compare_backends, format_comparison

        if config is not None:
            print(
                "cellseg bench: error: --compare times a model file (--model), not a device's engine", file=sys.stderr
            )
            return 2
        model = args.model or default_model()
        rows = compare_backends(model, images, runs=args.runs, threads=args.threads, int8_model=args.int8)
        if args.gate is not None:
            splits = tuple(args.gate_split or ["val"])
            _gate_rows(rows, model, args.int8, args.gate, splits=splits, threads=args.threads)
        print(json.dumps([row.to_dict() for row in rows]) if args.json else format_comparison(rows))
        return 0
    if config is not None:
        candidates = configured_candidates(store_for(config.state_dir), config.fallback_model)
        opened, _, _ = open_first(
            candidates, args.backend or config.engine.backend, args.threads or config.engine.threads,
            compute=args.precision or config.engine.precision,
        )  # fmt: skip
    else:
        opened = open_engine(args.model or default_model(), args.backend or "auto", args.threads,
                             compute=args.precision or "fp32")  # fmt: skip
    try:
        print(f"engine: {opened.describe()}", file=sys.stderr)
        report = run_bench(opened.engine, images, runs=args.runs, pipeline=pipeline_for(opened, config))
    finally:
        opened.engine.close()
    print(json.dumps(report.to_dict()) if args.json else report.format())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
