"""Benchmark: one training step on real frames, with ultralytics' mask loss and with cellseg's,
computed inside each box (training/mask_loss.py).

For each model and input size: a batch of real Usiigaci train frames in the recipe's mosaics, the
network's forward pass, the loss and the backward pass, timed separately (median of ``--runs``
after one warm-up), once with each mask loss, on the same batch and weights. The network is the
given architecture untrained (its speed does not depend on its weights) or the shipped weights.
The two losses' values are printed beside each other: they agree to float32 rounding (the tests
check their gradients). Prints a table; asserts nothing.

    python bench/train_step.py [--runs 3] [--threads 2] [--case yolo11n-seg.yaml:640 ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_DATA = Path(os.environ.get("CELLSEG_DATA", REPO.parent / "shared" / "data"))
CASES = ("yolo11n-seg.yaml:640", "yolo11n-seg.yaml:1024", "yolov9c-seg.yaml:640")
FRAMES = (0, 5, 11, 17)  # a batch of 4, as the CPU recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "usiigaci")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", action="append", help=f"MODEL:IMGSZ (default: {', '.join(CASES)})")
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        print(f"no frames under {args.data}/train: set --data or CELLSEG_DATA", file=sys.stderr)
        return 2

    import torch

    from cellseg.edge.device import cpu_flags, device_name
    from cellseg.training.batches import training_batch, training_network, training_step
    from cellseg.training.import_labels import import_label_images
    from cellseg.training.offline import import_ultralytics_offline
    from cellseg.training.recipe import load_recipe

    rows = []
    with tempfile.TemporaryDirectory(prefix="cellseg-step-") as tmp:
        work = Path(tmp)
        ultralytics = import_ultralytics_offline(work / ".ultralytics", threads=args.threads)
        torch.set_num_threads(args.threads)
        import_label_images(args.data, work / "ds", progress=False)
        for case in args.case or CASES:
            model, _, imgsz = case.rpartition(":")
            recipe = load_recipe(Path("usiigaci-yolo11n-seg-cpu.yaml"), [f"imgsz={imgsz}"])
            batch, cfg = training_batch(work / "ds" / "data.yaml", recipe, FRAMES)
            network = training_network(ultralytics, model, cfg)
            print(f"{case}: {len(batch['cls'])} cells in {len(FRAMES)} mosaics ...", flush=True)
            for in_boxes in (False, True):
                training_step(network, batch, in_boxes=in_boxes)  # warm-up
                timed = [training_step(network, batch, in_boxes=in_boxes) for _ in range(args.runs)]
                medians = [
                    statistics.median(getattr(t, part) for t in timed) for part in ("forward_s", "loss_s", "backward_s")
                ]
                rows.append((case, "in boxes" if in_boxes else "ultralytics", *medians, timed[0].items["seg_loss"]))

    vector = "AVX-512" if "avx512f" in cpu_flags() else "AVX2" if "avx2" in cpu_flags() else "no AVX2"
    print(f"\ntraining step, batch {len(FRAMES)}, float32, {args.threads} threads, median of {args.runs}; "
          f"{device_name()}, {vector}")  # fmt: skip
    head = f"{'model:imgsz':<24}{'mask loss':<13}{'forward s':>10}{'loss s':>9}{'backward s':>11}{'step s':>9}{'speed-up':>9}{'seg loss':>10}"  # noqa: E501
    print(head)
    print("-" * len(head))
    baseline: dict[str, float] = {}
    for case, kind, forward, loss, backward, value in rows:
        total = forward + loss + backward
        baseline.setdefault(case, total)
        print(f"{case:<24}{kind:<13}{forward:>10.2f}{loss:>9.2f}{backward:>11.2f}{total:>9.2f}"
              f"{baseline[case] / total:>8.2f}x{value:>10.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
