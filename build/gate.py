"""The accuracy gate: an INT8 model ships only if it is nearly as accurate as its FP32 source.

Both models run through the device pipeline (:func:`cellseg.training.evaluate.evaluate`) on
held-out images with ground truth. The gate compares each model's *accuracy* against the ground
truth -- mask mAP50-95, the per-image count error (mean absolute percentage) and the confluence
error (mean absolute, percentage points) -- and refuses the INT8 model when it loses more than
the tolerance on any of them. How closely the two models agree with each other (count and
confluence differences per image) is reported as well, for the reader; it does not decide,
because a model that is wrong in the same way as its source has lost nothing.

The candidate is a model *and* the engine that runs it: an INT8 Q/DQ model on ONNX Runtime, the
FP32 model on OpenVINO in BF16, the INT8 model on OpenVINO. The reference is the FP32 model on
ONNX Runtime in FP32, the numbers every other precision is held to.

A verdict on five frames moves with a cell or two. So the gate also gives each loss's 95 %
interval, by a paired bootstrap over the images (the same resampled images for both models; the
mAP of each sample is recomputed from the images' matches, since mAP is not a mean over images),
and says whether the verdict is *stable*: every interval wholly on one side of its tolerance.
An unstable verdict asks for more frames (``splits``), not for a looser tolerance.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellseg.edge.device import NATIVE_BF16, cpu_flags, device_name
from cellseg.edge.errors import ConfigError, DatasetError
from cellseg.edge.hashing import file_sha256
from cellseg.training.evaluate import evaluate
from cellseg.training.metrics import Accumulator, map50_95


@dataclass(frozen=True)
class Tolerance:
    """Most accuracy the quantised model may lose. Defaults: 1 mAP point, 2 count-% points, 1 pp."""

    mask_map_points: float = 1.0
    count_pct_points: float = 2.0
    confluence_pp: float = 1.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 100.0:
                raise ConfigError(f"gate tolerance {name} must be in [0, 100], got {value}")


@dataclass(frozen=True)
class ModelScore:
    model: str
    sha256: str
    precision: str  # what the engine reports: fp32, int8, bf16, int8+bf16
    mask_map50_95: float
    mask_map50: float
    count_mape_pct: float
    confluence_mae_pp: float
    backend: str = "onnxruntime"
    compute: str = "fp32"  # the float precision asked of the backend (engine.precision)

    @property
    def runs_as(self) -> str:
        """``backend:compute``, the key a bundle files this gate under."""
        return f"{self.backend}:{self.compute}"


@dataclass(frozen=True)
class Scored:
    """One model on one engine, evaluated: its score and its per-image count and confluence errors."""

    score: ModelScore
    count_abs_pct: list[float]
    confluence_abs_pp: list[float]
    counts: list[int]
    confluence: list[float]
    excluded: frozenset[str] = frozenset()
    mask_matches: list[Accumulator] = field(default_factory=list, repr=False)  # per class, image by image


@dataclass
class GateReport:
    """What the gate measured and decided; goes verbatim into the bundle's manifest."""

    passed: bool
    split: str
    images: int
    tolerance: Tolerance
    reference: ModelScore
    candidate: ModelScore
    losses: dict[str, float]
    agreement: dict[str, float]
    reasons: list[str] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    # 95 % paired-bootstrap interval of each loss, and whether each lies wholly on one side of its
    # tolerance.
    losses_ci95: dict[str, list[float]] = field(default_factory=dict)
    stable: bool = True
    excluded_calibration: int = 0  # calibration frames of an INT8 candidate left out of the split

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        r, c = self.reference, self.candidate
        rows = [
            ("mask mAP50-95", r.mask_map50_95 * 100, c.mask_map50_95 * 100, self.tolerance.mask_map_points, "points"),
            ("count error %", r.count_mape_pct, c.count_mape_pct, self.tolerance.count_pct_points, "points"),
            ("confluence err", r.confluence_mae_pp, c.confluence_mae_pp, self.tolerance.confluence_pp, "pp"),
        ]
        lines = [
            f"accuracy gate on {self.images} images ({self.split} split"
            + (f", less {self.excluded_calibration} calibration frames" if self.excluded_calibration else "")
            + "): "
            f"{c.model} on {c.backend} {c.precision} against {r.model} on {r.backend} {r.precision}",
            f"{'':<16}{r.precision:>10}{c.precision:>10}{'loss':>9}{'allowed':>9}{'95 % interval':>18}",
        ]
        keys = ["mask_map_points", "count_pct_points", "confluence_pp"]
        for (name, a, b, allowed, unit), key in zip(rows, keys, strict=True):
            ci = self.losses_ci95.get(key)
            interval = f"{ci[0]:>8.2f} to {ci[1]:<5.2f}" if ci else ""
            lines.append(f"{name:<16}{a:>10.2f}{b:>10.2f}{self.losses[key]:>9.2f}{allowed:>9.2f}{interval:>18} {unit}")
        lines.append(
            f"agreement: count differs by {self.agreement['count_mean_abs_pct']:.2f}% per image on average, "
            f"confluence by {self.agreement['confluence_mean_abs_pp']:.2f} pp"
        )
        if self.machine:
            m = self.machine
            openvino = f", OpenVINO {m['openvino']}" if "openvino" in m else ""
            lines.append(f"measured on {m['device']}, ONNX Runtime {m['onnxruntime']}{openvino}, "
                         f"int8 instructions: {m['int8_isa']}, bf16: {m.get('bf16_isa', 'unknown')}")  # fmt: skip
        lines.append("PASSED" if self.passed else "REFUSED: " + "; ".join(self.reasons))
        if not self.stable:
            lines.append(
                f"not a stable verdict: an interval straddles its tolerance on {self.images} images; "
                "gate on more frames (more splits) before trusting it"
            )
        return "\n".join(lines)


# CPU instruction-set extensions that decide how ONNX Runtime computes INT8 products: VNNI sums
# u8 x s8 in 32 bits, AVX2 and AVX-512BW without it in saturating 16 bits; dot product and i8mm on Arm.
_INT8_ISA = ("avx512_vnni", "avx_vnni", "avx512bw", "avx2", "asimddp", "i8mm")


def gate_machine(backend: str = "onnxruntime") -> dict[str, str]:
    """Where the gate ran: the device, ONNX Runtime's (and the candidate backend's) version and the
    CPU's INT8 and BF16 instructions. Recorded because a quantised or BF16 model's arithmetic on a
    CPU depends on them (build/quantize.py)."""
    import onnxruntime

    flags = cpu_flags()
    isa = " ".join(f for f in _INT8_ISA if f in flags) or "unknown"
    machine = {"device": device_name(), "onnxruntime": onnxruntime.__version__, "int8_isa": isa}
    machine["bf16_isa"] = " ".join(f for f in NATIVE_BF16 if f in flags) or "none"
    if backend == "openvino":
        from importlib import metadata

        machine["openvino"] = metadata.version("openvino")
    return machine


def score_model(
    model: Path,
    data_yaml: Path,
    splits: tuple[str, ...],
    *,
    backend: str = "onnxruntime",
    compute: str = "fp32",
    threads: int | None = None,
    progress: bool = True,
    exclude: frozenset[str] = frozenset(),
) -> Scored:
    """Evaluate one model on one engine over the pooled ``splits``, less the ``exclude``d images."""
    report, _ = evaluate(
        model, data_yaml, splits, threads=threads, progress=progress, backend=backend, precision=compute,
        exclude=exclude, pool=True,
    )  # fmt: skip
    if not report.splits:
        raise DatasetError(f"{data_yaml}: splits {', '.join(splits)} have no images to gate on")
    pooled = report.splits[0]
    per_image = pooled.per_image
    map50_95, map50 = pooled.mask["mAP50-95"], pooled.mask["mAP50"]
    count_abs_pct = [100 * abs(r.count_error) / max(r.gt_count, 1) for r in per_image]
    confluence_abs = [abs(r.confluence_error_pp) for r in per_image]
    score = ModelScore(
        model=Path(model).name, sha256=file_sha256(model), precision=report.engine_precision, mask_map50_95=map50_95,
        mask_map50=map50, count_mape_pct=statistics.fmean(count_abs_pct),
        confluence_mae_pp=statistics.fmean(confluence_abs),
        backend=report.backend, compute=compute,  # the backend that ran ('auto' resolved)
    )  # fmt: skip
    return Scored(
        score, count_abs_pct, confluence_abs, [r.pred_count for r in per_image],
        [r.pred_confluence_pct for r in per_image], exclude, pooled.mask_matches,
    )  # fmt: skip


def calibration_images(model: Path) -> frozenset[str]:
    """The frames an INT8 model was calibrated on (from its metadata): a gate leaves them out, so
    that a quantisation is never judged on the frames that set its ranges."""
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine

    with OnnxRuntimeEngine(model, threads=1) as engine:
        quantization = engine.info.extra.get("quantization") or {}
    images = (quantization.get("calibration") or {}).get("images") or []
    return frozenset(str(name) for name in images)


def _paired_interval(reference: list[float], candidate: list[float], *, draws: int = 2000) -> list[float]:
    """95 % interval of mean(candidate - reference) by resampling images (seeded: reproducible)."""
    import numpy as np

    diff = np.asarray(candidate) - np.asarray(reference)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, diff.size, size=(draws, diff.size))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def _paired_map_interval(
    reference: list[Accumulator], candidate: list[Accumulator], *, draws: int = 2000
) -> list[float]:
    """95 % interval of the mask mAP50-95 loss in points, resampling the same images for both
    models. mAP is not a mean over images, so each sample's mAP is computed afresh from the
    images' matches (kept per image by the evaluation, so nothing is matched again)."""
    import numpy as np

    n = len(reference[0].n_gts) if reference else 0
    if n == 0 or any(len(a.n_gts) != n for a in (*reference, *candidate)):
        raise ValueError("the reference and the candidate must be matched on the same images")
    rng = np.random.default_rng(0)
    losses = [
        100 * (map50_95([a.subset(idx) for a in reference]) - map50_95([a.subset(idx) for a in candidate]))
        for idx in rng.integers(0, n, size=(draws, n)).tolist()
    ]
    return [round(float(np.percentile(losses, 2.5)), 4), round(float(np.percentile(losses, 97.5)), 4)]


def run_gate(
    reference: Path,
    candidate: Path,
    data_yaml: Path,
    *,
    split: str | tuple[str, ...] = "val",
    tolerance: Tolerance | None = None,
    threads: int | None = None,
    progress: bool = True,
    backend: str = "onnxruntime",
    compute: str = "fp32",
    reference_scored: Scored | None = None,
) -> GateReport:
    """Evaluate ``reference`` (ONNX Runtime, FP32) and ``candidate`` on ``backend`` at ``compute``
    over the images of ``split`` (one split or several, pooled) and decide.

    ``reference_scored``: the reference already evaluated on the same splits (to gate several
    candidates against one reference without evaluating it each time).
    """
    tol = tolerance or Tolerance()
    splits = (split,) if isinstance(split, str) else tuple(split)
    exclude = calibration_images(candidate) if "train" in splits else frozenset()
    ref_s = reference_scored
    if ref_s is None or ref_s.excluded != exclude:
        ref_s = score_model(reference, data_yaml, splits, threads=threads, progress=progress, exclude=exclude)
    cand_s = score_model(
        candidate, data_yaml, splits, backend=backend, compute=compute, threads=threads, progress=progress,
        exclude=exclude,
    )  # fmt: skip
    ref, cand = ref_s.score, cand_s.score
    losses = {
        "mask_map_points": round((ref.mask_map50_95 - cand.mask_map50_95) * 100, 4),
        "count_pct_points": round(cand.count_mape_pct - ref.count_mape_pct, 4),
        "confluence_pp": round(cand.confluence_mae_pp - ref.confluence_mae_pp, 4),
    }
    intervals = {
        "mask_map_points": _paired_map_interval(ref_s.mask_matches, cand_s.mask_matches),
        "count_pct_points": _paired_interval(ref_s.count_abs_pct, cand_s.count_abs_pct),
        "confluence_pp": _paired_interval(ref_s.confluence_abs_pp, cand_s.confluence_abs_pp),
    }
    allowed = {
        "mask_map_points": tol.mask_map_points,
        "count_pct_points": tol.count_pct_points,
        "confluence_pp": tol.confluence_pp,
    }
    stable = all(not (low <= allowed[k] < high) for k, (low, high) in intervals.items())
    reasons = []
    if losses["mask_map_points"] > tol.mask_map_points:
        reasons.append(f"mask mAP50-95 drops by {losses['mask_map_points']:.2f} points (allowed {tol.mask_map_points})")
    if losses["count_pct_points"] > tol.count_pct_points:
        reasons.append(f"count error grows by {losses['count_pct_points']:.2f} points (allowed {tol.count_pct_points})")
    if losses["confluence_pp"] > tol.confluence_pp:
        reasons.append(f"confluence error grows by {losses['confluence_pp']:.2f} pp (allowed {tol.confluence_pp})")
    pairs = list(zip(ref_s.counts, cand_s.counts, strict=True))
    agreement = {
        "count_mean_abs_pct": round(100 * statistics.fmean(abs(b - a) / max(a, 1) for a, b in pairs), 4),
        "confluence_mean_abs_pp": round(
            statistics.fmean(abs(b - a) for a, b in zip(ref_s.confluence, cand_s.confluence, strict=True)), 4
        ),
    }
    return GateReport(
        passed=not reasons,
        split="+".join(splits),
        images=len(pairs),
        tolerance=tol,
        reference=ref,
        candidate=cand,
        losses=losses,
        agreement=agreement,
        reasons=reasons,
        machine=gate_machine(backend),
        losses_ci95=intervals,
        stable=stable,
        excluded_calibration=len(exclude),
    )


def write_report(report: GateReport, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2))
    tmp.replace(path)


def read_report(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable gate report: {e}") from e
    if not isinstance(data, dict) or "passed" not in data or "candidate" not in data:
        raise ConfigError(f"{path}: not a gate report (no 'passed' and 'candidate')")
    return data
