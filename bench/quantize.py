"""Benchmark: the INT8 Q/DQ model against its FP32 source, in one run on one machine.

Quantises the model (``cellseg quantize``'s code, 20 calibration frames from the Usiigaci train
split), runs the accuracy gate on the val split, then times both models through the device
pipeline (``cellseg bench``'s code) on the real 16-bit Usiigaci val frames, interleaved run by
run so that both see the same machine state. Prints a table; asserts nothing.

    python bench/quantize.py [--model M.onnx] [--runs 5] [--threads 2] [--ops]

``--ops`` adds where the inference time goes: ONNX Runtime's own profiler over the same frames,
summed per operator type for each model (profiling adds its own overhead to every node).
"""

from __future__ import annotations

import argparse
import collections
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


def op_profile(model: Path, tensors: list, threads: int, runs: int) -> dict[str, float]:  # type: ignore[type-arg]
    """Milliseconds per inference spent in each operator type, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="cellseg-ops-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ops")
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            for x in tensors:
                session.run(None, {name: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3
    return {op: ms / (runs * len(tensors)) for op, ms in per_op.most_common()}


def print_op_table(profiles: dict[str, dict[str, float]], top: int = 12) -> None:
    for name, ops in profiles.items():
        total = sum(ops.values())
        print(f"{name}: {total:.1f} ms per inference in operators (profiled)")
        for op, ms in list(ops.items())[:top]:
            print(f"  {op:<24}{ms:>8.2f} ms{100 * ms / total:>7.1f}%")


def main() -> int:
    from cellseg.build.gate import run_gate
    from cellseg.build.quantize import choose_calibration_images, quantize
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.tools.benchmark import BenchReport, run_bench
    from cellseg.training.import_labels import import_label_images

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "usiigaci")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", action="store_true", help="also profile both models per operator type")
    args = parser.parse_args()
    profiles: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory(prefix="cellseg-bench-") as tmp:
        dataset = Path(tmp) / "ds"
        import_label_images(args.data, dataset, progress=False)
        calibration = choose_calibration_images(dataset / "images" / "train", 20)
        int8 = Path(tmp) / "int8.onnx"
        quantize(args.model, int8, calibration, progress=False)
        gate = run_gate(args.model, int8, dataset / "data.yaml", threads=args.threads, progress=False)
        frames = sorted((args.data / "val").glob("*/raw.tif"))
        reports: dict[str, list[BenchReport]] = {"fp32": [], "int8": []}
        engines = {
            "fp32": OnnxRuntimeEngine(args.model, threads=args.threads),
            "int8": OnnxRuntimeEngine(int8, threads=args.threads),
        }
        for e in engines.values():
            e.load()
            e.warmup(2)
        for _ in range(args.runs):  # interleaved, one pass each per round
            for name, engine in engines.items():
                reports[name].append(run_bench(engine, frames, runs=1, warmup=1, engine_alone=False))
        if args.ops:
            from cellseg.edge.capture.imageio import read_image
            from cellseg.edge.pipeline.preprocess import Preprocessor
            from cellseg.edge.pipeline.types import Frame

            info = engines["fp32"].info
            pre = Preprocessor(info.input_width, info.input_height, info.mapping)
            tensors = [pre(Frame(read_image(f)))[0].copy() for f in frames]
            profiles = {name: op_profile(e.path, tensors, args.threads, 2) for name, e in engines.items()}
        for e in engines.values():
            e.close()

    def med(name: str, key: str) -> float:
        values = sorted(getattr(r, key) if key != "infer" else r.stage_ms["infer"] for r in reports[name])
        return values[len(values) // 2]

    print(f"model {args.model.name}; {len(frames)} Usiigaci val frames (16-bit) x {args.runs} runs; "
          f"ONNX Runtime, {args.threads} threads; {reports['fp32'][0].device}")  # fmt: skip
    head = f"{'precision':<10}{'infer ms':>10}{'ms/image':>10}{'images/s':>10}{'cells/frame':>12}"
    print(head)
    print("-" * len(head))
    for name in ("fp32", "int8"):
        print(f"{name:<10}{med(name, 'infer'):>10.1f}{med(name, 'ms_per_image'):>10.1f}"
              f"{med(name, 'images_per_s'):>10.2f}{med(name, 'cells_per_frame'):>12.0f}")  # fmt: skip
    print(f"INT8 speed-up: inference {med('fp32', 'infer') / med('int8', 'infer'):.2f}x, "
          f"end to end {med('int8', 'images_per_s') / med('fp32', 'images_per_s'):.2f}x")  # fmt: skip
    print()
    print(gate.format())
    if profiles:
        print()
        print_op_table(profiles)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
