"""The accuracy gate: an INT8 model ships only if it is nearly as accurate as its FP32 source.

Both models run through the device pipeline (:func:`cellseg.training.evaluate.evaluate`) on
held-out images with ground truth. The gate compares each model's *accuracy* against the ground
truth -- mask mAP50-95, the per-image count error (mean absolute percentage) and the confluence
error (mean absolute, percentage points) -- and refuses the INT8 model when it loses more than
the tolerance on any of them. How closely the two models agree with each other (count and
confluence differences per image) is reported as well, for the reader; it does not decide,
because a model that is wrong in the same way as its source has lost nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cellseg.edge.device import device_name
from cellseg.edge.errors import ConfigError, DatasetError
from cellseg.edge.hashing import file_sha256
from cellseg.training.evaluate import SplitReport, evaluate


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
    precision: str
    mask_map50_95: float
    mask_map50: float
    count_mape_pct: float
    confluence_mae_pp: float


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
            f"accuracy gate on {self.images} held-out images ({self.split} split)",
            f"{'':<16}{r.precision:>10}{c.precision:>10}{'loss':>9}{'allowed':>9}",
        ]
        keys = ["mask_map_points", "count_pct_points", "confluence_pp"]
        for (name, a, b, allowed, unit), key in zip(rows, keys, strict=True):
            lines.append(f"{name:<16}{a:>10.2f}{b:>10.2f}{self.losses[key]:>9.2f}{allowed:>9.2f} {unit}")
        lines.append(
            f"agreement: count differs by {self.agreement['count_mean_abs_pct']:.2f}% per image on average, "
            f"confluence by {self.agreement['confluence_mean_abs_pp']:.2f} pp"
        )
        if self.machine:
            m = self.machine
            lines.append(f"measured on {m['device']}, ONNX Runtime {m['onnxruntime']}, "
                         f"int8 instructions: {m['int8_isa']}")  # fmt: skip
        lines.append("PASSED" if self.passed else "REFUSED: " + "; ".join(self.reasons))
        return "\n".join(lines)


def _score(model: Path, report: SplitReport, precision: str) -> ModelScore:
    return ModelScore(
        model=model.name,
        sha256=file_sha256(model),
        precision=precision,
        mask_map50_95=report.mask["mAP50-95"],
        mask_map50=report.mask["mAP50"],
        count_mape_pct=report.count_mape_pct,
        confluence_mae_pp=report.confluence_mae_pp,
    )


# CPU instruction-set extensions that decide how ONNX Runtime computes INT8 products: VNNI sums
# u8 x s8 in 32 bits, AVX2 and AVX-512BW without it in saturating 16 bits; dot product and i8mm on Arm.
_INT8_ISA = ("avx512_vnni", "avx_vnni", "avx512bw", "avx2", "asimddp", "i8mm")


def gate_machine() -> dict[str, str]:
    """Where the gate ran: the device, ONNX Runtime's version and the CPU's INT8 instructions.
    Recorded because an INT8 model's arithmetic on a CPU depends on them (build/quantize.py)."""
    import onnxruntime

    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    isa = " ".join(f for f in _INT8_ISA if f in flags) or "unknown"
    return {"device": device_name(), "onnxruntime": onnxruntime.__version__, "int8_isa": isa}


def _precision(model: Path) -> str:
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine

    with OnnxRuntimeEngine(model, threads=1) as engine:
        return engine.precision


def run_gate(
    reference: Path,
    candidate: Path,
    data_yaml: Path,
    *,
    split: str = "val",
    tolerance: Tolerance | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> GateReport:
    """Evaluate both ONNX models on ``split`` of the dataset and decide."""
    tol = tolerance or Tolerance()
    scores, reports = [], []
    for model in (reference, candidate):
        report, _ = evaluate(model, data_yaml, (split,), threads=threads, progress=progress)
        if not report.splits:
            raise DatasetError(f"{data_yaml}: split '{split}' has no images to gate on")
        reports.append(report.splits[0])
        scores.append(_score(model, report.splits[0], _precision(model)))
    ref, cand = scores
    losses = {
        "mask_map_points": round((ref.mask_map50_95 - cand.mask_map50_95) * 100, 4),
        "count_pct_points": round(cand.count_mape_pct - ref.count_mape_pct, 4),
        "confluence_pp": round(cand.confluence_mae_pp - ref.confluence_mae_pp, 4),
    }
    reasons = []
    if losses["mask_map_points"] > tol.mask_map_points:
        reasons.append(f"mask mAP50-95 drops by {losses['mask_map_points']:.2f} points (allowed {tol.mask_map_points})")
    if losses["count_pct_points"] > tol.count_pct_points:
        reasons.append(f"count error grows by {losses['count_pct_points']:.2f} points (allowed {tol.count_pct_points})")
    if losses["confluence_pp"] > tol.confluence_pp:
        reasons.append(f"confluence error grows by {losses['confluence_pp']:.2f} pp (allowed {tol.confluence_pp})")
    pairs = list(zip(reports[0].per_image, reports[1].per_image, strict=True))
    agreement = {
        "count_mean_abs_pct": round(
            100 * sum(abs(b.pred_count - a.pred_count) / max(a.pred_count, 1) for a, b in pairs) / len(pairs), 4
        ),
        "confluence_mean_abs_pp": round(
            sum(abs(b.pred_confluence_pct - a.pred_confluence_pct) for a, b in pairs) / len(pairs), 4
        ),
    }
    return GateReport(
        passed=not reasons,
        split=split,
        images=len(pairs),
        tolerance=tol,
        reference=ref,
        candidate=cand,
        losses=losses,
        agreement=agreement,
        reasons=reasons,
        machine=gate_machine(),
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
