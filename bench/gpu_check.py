"""One-shot check of the CUDA kernels on a real NVIDIA GPU, for a machine lent without TensorRT,
pycuda, OpenCV, ONNX Runtime or a network: everything that needs those is prepared here.

    python bench/gpu_check.py prepare [--out bench/gpu_check_inputs.npz] [--frames 4]
    python bench/gpu_check.py run [--inputs bench/gpu_check_inputs.npz] [--runner cupy|emulated] [--json OUT]

``prepare`` (this machine: ONNX Runtime and OpenCV) reads real 16-bit frames (Usiigaci validation
sets and a T98G time-lapse frame), runs the numpy reference preprocessing, the shipped model and
the reference postprocessing at the shipped confidence and at a dense one (0.01, hundreds of
cells), and writes all of it into one ``.npz`` (about 20 MB: carry it to the GPU machine).

``run`` (the GPU machine: numpy, CuPy, this checkout) compiles the kernels with NVRTC for the
GPU's architecture by the device's own path (:mod:`cellseg.edge.engines.kernel_compile`), loads the cubins
through CuPy, runs ``GpuPreprocess`` and ``GpuPostprocess`` on every frame, compares them with the
references as the CPU-emulation tests do, and times preprocessing and postprocessing per frame
(median of repeats, the GPU synchronised by the download of the results). It prints a table and
exits 0 only when every comparison holds. ``--runner emulated`` runs the same kernels on the CPU
(the tests' g++ emulation), which is how the test suite knows this script works before a GPU is
ever lent. Without OpenCV, a 16-bit frame's stretch table (computed on the host by OpenCV) is the
one ``prepare`` stored; the kernels and their host planning are what is being checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DENSE = {"conf": 0.01, "iou": 0.9, "max_det": 3000}


def import_checkout() -> None:
    """``import cellseg.edge`` from this checkout, installed or not (the GPU machine has no
    network to install from): a temporary tree of links in the installed package's layout."""
    try:
        import cellseg.edge  # noqa: F401

        return
    except ImportError:
        pass
    tree = Path(tempfile.mkdtemp(prefix="cellseg-import-")) / "cellseg"
    tree.mkdir()
    for f in (REPO / "cellseg").glob("*.py"):
        (tree / f.name).symlink_to(f)
    for package, folder in {"edge": "edge", "build": "build", "models": "models", "samples": "samples"}.items():
        (tree / package).symlink_to(REPO / folder)
    sys.path.insert(0, str(tree.parent))
    for name in [m for m in sys.modules if m == "cellseg" or m.startswith("cellseg.")]:
        del sys.modules[name]


def _frames(data: Path, count: int) -> list[tuple[str, Path]]:
    usiigaci = sorted((data / "usiigaci" / "val").glob("set*/raw.tif"))
    t98g = sorted((data / "t98g_timelapse" / "frames").glob("*.tif"))
    chosen = [(f"usiigaci {p.parent.name}", p) for p in usiigaci][: max(count - 1, 1)]
    return [*chosen, (f"t98g {t98g[5].stem}", t98g[5])][:count]


def prepare(out: Path, count: int) -> None:
    from cellseg.edge.bundles.shipped import shipped_model
    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
    from cellseg.edge.pipeline.intensity import lookup_table
    from cellseg.edge.pipeline.postprocess import Postprocessor
    from cellseg.edge.pipeline.preprocess import Preprocessor
    from cellseg.edge.pipeline.types import Frame

    data = Path(os.environ.get("CELLSEG_DATA", REPO.parent / "shared" / "data"))
    arrays: dict[str, Any] = {}
    names = []
    with OnnxRuntimeEngine(shipped_model()) as engine:
        info = engine.info
        pre = Preprocessor(info.input_width, info.input_height, info.mapping)
        configs = {"shipped": info.thresholds, "dense": info.thresholds.overridden(**DENSE)}
        for i, (name, path) in enumerate(_frames(data, count)):
            pixels = read_image(path)
            view, lb = pre(Frame(pixels, source=name))
            tensor = view.copy()  # the preprocessor's buffer is reused by the next frame
            raw = engine.infer(tensor)
            arrays |= {f"frame{i}": pixels, f"tensor{i}": tensor, f"pred{i}": raw.predictions,
                       f"proto{i}": raw.prototypes, f"lut{i}": lookup_table(pixels, info.mapping),
                       f"letterbox{i}": np.array([lb.scale, lb.pad_x, lb.pad_y, lb.frame_width, lb.frame_height,
                                                  lb.input_width, lb.input_height], dtype=np.float64)}  # fmt: skip
            for key, config in configs.items():
                det = Postprocessor(config)(raw, lb)
                flat = np.concatenate([m.reshape(-1) for m in det.masks]) if len(det) else np.zeros(0, bool)
                arrays |= {f"{key}{i}_boxes": det.boxes, f"{key}{i}_scores": det.scores,
                           f"{key}{i}_origins": det.mask_origins, f"{key}{i}_areas": det.areas_px,
                           f"{key}{i}_union": np.array(int(det.union_mask().sum()) if len(det) else 0),
                           f"{key}{i}_mask_shapes": np.array([m.shape for m in det.masks], np.int64).reshape(-1, 2),
                           f"{key}{i}_masks": np.packbits(flat)}  # fmt: skip
            names.append(name)
            print(f"prepared {name}: {len(Postprocessor(configs['shipped'])(raw, lb))} cells", file=sys.stderr)
    meta = {"frames": names, "input": [info.input_width, info.input_height], "mapping": info.mapping.to_dict(),
            "configs": {k: dataclasses.asdict(c) for k, c in configs.items()}}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


class CupyRunner:
    """The kernels on the GPU through CuPy, from cubins NVRTC compiled for it (as the device
    loads them with pycuda's ``module_from_buffer``)."""

    def __init__(self) -> None:
        import cupy

        from cellseg.edge.engines.kernel_compile import KERNEL_FILES, Nvrtc, find_nvrtc, kernel_cubins, kernel_names
        from cellseg.edge.engines.kernel_compile import kernel_source as source

        self.cupy = cupy
        major_minor = cupy.cuda.Device().compute_capability
        self.arch = f"sm_{major_minor}"
        library = find_nvrtc()
        if library is None:
            raise SystemExit("no NVRTC library found (set CELLSEG_NVRTC to a libnvrtc.so)")
        self.nvrtc = Nvrtc(library)
        cubins = kernel_cubins(self.arch, nvrtc=self.nvrtc)
        self.functions: dict[str, Any] = {}
        self._files = tempfile.mkdtemp(prefix="cellseg-cubins-")
        for name in KERNEL_FILES:
            path = Path(self._files) / f"{name}.cubin"
            path.write_bytes(cubins[name])
            module = cupy.RawModule(path=str(path))
            for kernel in kernel_names(source(name)):
                self.functions[kernel] = module.get_function(kernel)

    def describe(self) -> str:
        props = self.cupy.cuda.runtime.getDeviceProperties(self.cupy.cuda.Device().id)
        return f"{props['name'].decode()} ({self.arch}), kernels compiled by NVRTC {self.nvrtc.version}"

    def upload(self, array: Any) -> Any:
        return self.cupy.asarray(np.ascontiguousarray(array))

    def zeros(self, count: int, dtype: Any) -> Any:
        return self.cupy.zeros(max(count, 1), dtype=dtype)

    def download(self, buffer: Any, count: int, dtype: Any) -> Any:
        flat = buffer.reshape(-1)
        if flat.dtype != np.dtype(dtype):
            flat = flat.view(dtype)
        return self.cupy.asnumpy(flat[:count])

    def launch(self, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int], *args: Any) -> None:
        converted = [np.uint64(0) if a is None else np.int32(a) if isinstance(a, int) else a for a in args]
        self.functions[kernel](grid, block, tuple(converted))


def _emulated_runner() -> Any:
    sys.path.insert(0, str(REPO))
    from tests.edge.cuda_emu import EmulatedRunner, build_library

    lib, signatures = build_library(Path(tempfile.mkdtemp(prefix="cellseg-emu-")))
    runner = EmulatedRunner(lib, signatures)
    runner.describe = lambda: "the CPU (g++ emulation of the kernels)"  # type: ignore[attr-defined]
    return runner


def greedy_nms(boxes: Any, scores: Any, iou_threshold: float, max_keep: int) -> Any:
    """``cellseg.edge.pipeline.postprocess.nms`` as its docstring defines it, in numpy, for a machine
    without OpenCV: highest score first (ties: lower index), a box kept while its IoU with every
    kept box is at most the threshold, in float64 as OpenCV's NMSBoxes computes it."""
    b = boxes.astype(np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    alive = np.ones(len(scores), dtype=bool)
    kept: list[int] = []
    for i in order:
        if not alive[i]:
            continue
        kept.append(int(i))
        if len(kept) == max_keep:
            break
        w = np.clip(np.minimum(b[i, 2], b[:, 2]) - np.maximum(b[i, 0], b[:, 0]), 0, None)
        h = np.clip(np.minimum(b[i, 3], b[:, 3]) - np.maximum(b[i, 1], b[:, 1]), 0, None)
        inter = w * h
        alive &= inter / (area[i] + area - inter) <= iou_threshold
    return np.asarray(kept, dtype=np.intp)


def _median_ms(work: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(inputs: Path, runner_kind: str, repeats: int) -> dict[str, Any]:
    from cellseg.edge.engines import cuda_kernels
    from cellseg.edge.engines.cuda_kernels import GpuPostprocess, GpuPreprocess
    from cellseg.edge.pipeline import postprocess
    from cellseg.edge.pipeline.intensity import IntensityMapping
    from cellseg.edge.pipeline.model_info import PostprocessConfig
    from cellseg.edge.pipeline.types import Frame, Letterbox

    z = np.load(inputs)
    meta = json.loads(str(z["meta"]))
    runner = CupyRunner() if runner_kind == "cupy" else _emulated_runner()
    width, height = meta["input"]
    mapping = IntensityMapping.from_dict(meta["mapping"])
    try:
        import cv2  # noqa: F401
    except ImportError:  # two host-side helpers use OpenCV: the stretch table and NMS
        tables = {z[f"frame{i}"].tobytes(): z[f"lut{i}"] for i in range(len(meta["frames"]))}
        cuda_kernels.lookup_table = lambda image, _mapping=None: tables[image.tobytes()]  # type: ignore[assignment]
        postprocess.nms = greedy_nms  # type: ignore[assignment]
    pre = GpuPreprocess(runner, width, height, mapping)
    rows, problems = [], []
    for i, name in enumerate(meta["frames"]):
        frame = Frame(z[f"frame{i}"], source=name)
        want = z[f"tensor{i}"]
        out, lb = pre(frame)
        got = runner.download(out, want.size, np.float32).reshape(want.shape)
        diff = float(np.abs(got - want).max())
        s, px, py, fw, fh, iw, ih = z[f"letterbox{i}"].tolist()
        stored = Letterbox(scale=s, pad_x=int(px), pad_y=int(py), frame_width=int(fw), frame_height=int(fh),
                           input_width=int(iw), input_height=int(ih))  # fmt: skip
        if lb != stored or diff > 1 / 255 + 1e-6 or float((np.abs(got - want) < 1e-6).mean()) < 0.8:
            problems.append(f"{name}: preprocessing differs (max {diff * 255:.2f} levels, geometry {lb == stored})")
        pre_ms = _median_ms(lambda f=frame, n=want.size: runner.download(pre(f)[0], n, np.float32), repeats)
        for key, c in meta["configs"].items():
            config = PostprocessConfig(**c)
            post = GpuPostprocess(runner, config)
            preds, protos = z[f"pred{i}"], z[f"proto{i}"]

            def once(
                post: Any = post, preds: Any = preds, protos: Any = protos, lb: Any = lb, masks: bool = True
            ) -> Any:
                up = runner.upload
                return post(up(preds), up(protos), preds.shape, protos.shape, lb, want_masks=masks)

            det = once()
            problems += _compare(f"{name} ({key})", det, z, f"{key}{i}")
            post_ms = _median_ms(lambda once=once: once(masks=False), repeats)  # as the daemon runs it
            rows.append({"frame": name, "thresholds": key, "cells": len(det.areas_px), "pre_ms": round(pre_ms, 3),
                         "post_ms": round(post_ms, 3), "tensor_max_diff_levels": round(diff * 255, 3)})  # fmt: skip
    return {"device": runner.describe(), "runner": runner_kind, "repeats": repeats, "rows": rows,
            "problems": problems, "passed": not problems}  # fmt: skip


def _compare(where: str, got: Any, z: Any, key: str) -> list[str]:
    boxes, scores, areas = z[f"{key}_boxes"], z[f"{key}_scores"], z[f"{key}_areas"]
    if len(got.areas_px) != len(areas):
        return [f"{where}: {len(got.areas_px)} cells, the reference has {len(areas)}"]
    problems = []
    if len(areas) and not np.allclose(got.boxes, boxes, atol=1e-4):
        problems.append(f"{where}: boxes differ by up to {np.abs(got.boxes - boxes).max():.2e}")
    if not np.array_equal(got.scores, scores) or not np.array_equal(got.mask_origins, z[f"{key}_origins"]):
        problems.append(f"{where}: scores or mask origins differ")
    shapes = z[f"{key}_mask_shapes"]
    total = int(np.prod(shapes, axis=1).sum()) if len(shapes) else 0
    want_flat = np.unpackbits(z[f"{key}_masks"])[:total].astype(bool)
    got_flat = np.concatenate([m.reshape(-1) for m in got.masks]) if got.masks else np.zeros(0, bool)
    mismatched = int((want_flat != got_flat).sum()) if got_flat.size == total else total
    # Float sums in another order may flip a pixel whose logit sits on the threshold.
    if mismatched > 1e-4 * total + 2:
        problems.append(f"{where}: {mismatched} of {total} mask pixels differ")
    union = int(z[f"{key}_union"])
    if len(areas) and (np.abs(got.areas_px - areas).max() > 2 or abs(got.covered_pixels - union) > 2 + 1e-4 * union):
        problems.append(f"{where}: areas or covered pixels differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_check_inputs.npz")
    p.add_argument("--frames", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("--inputs", type=Path, default=REPO / "bench" / "gpu_check_inputs.npz")
    r.add_argument("--runner", choices=["cupy", "emulated"], default="cupy")
    r.add_argument("--repeats", type=int, default=20)
    r.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    import_checkout()
    if args.command == "prepare":
        prepare(args.out, args.frames)
        return 0
    report = run(args.inputs, args.runner, args.repeats)
    print(f"device: {report['device']}")
    print(f"{'frame':<26} {'thresholds':<10} {'cells':>6} {'pre ms':>8} {'post ms':>8} {'pre max diff':>13}")
    for row in report["rows"]:
        print(f"{row['frame']:<26} {row['thresholds']:<10} {row['cells']:>6} {row['pre_ms']:>8.2f} "
              f"{row['post_ms']:>8.2f} {row['tensor_max_diff_levels']:>9.2f} lvl")  # fmt: skip
    for problem in report["problems"]:
        print(f"PROBLEM {problem}")
    print("all kernels match the numpy reference" if report["passed"] else f"{len(report['problems'])} problems")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
