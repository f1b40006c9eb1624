"""``cellseg quantize``: an explicit INT8 Q/DQ ONNX model from calibration images.

ONNX Runtime static quantisation, QDQ format: per-channel signed INT8 weights and unsigned
INT8 activations (on x86 CPUs signed activations run slower than FP32: the u8s8 kernels are
the fast ones), MinMax calibration. The same Q/DQ model builds an explicit-quantisation
TensorRT INT8 engine.

The weights use 7 bits of the signed range (ONNX Runtime's ``reduce_range``). x86 CPUs without
VNNI (AVX2 only, such as AMD Zen 3) multiply u8 by s8 with ``vpmaddubsw``, which saturates the
sum of two products at 16 bits; with full-range weights those CPUs compute a different model
than VNNI CPUs or TensorRT do, so the accuracy gate's verdict would depend on the machine that
ran it. Measured on the shipped model on a Zen 3: full-range weights lost 0.82 mask mAP points
there, 7-bit weights none.

The Segment head's decode (the DFL softmax, the box arithmetic, the class sigmoid and the
concatenation of boxes, scores and coefficients) stays in float by default: one activation scale
cannot span box coordinates in pixels and scores in [0, 1], and quantising it kills every
detection. So do the class-logit convolutions (the last Conv of each ``cv3`` branch): the count
is decided where a score crosses the operating confidence, and one u8 scale over the whole logit
range (about -27..+2 on the shipped model) moves a score near 0.45 in steps of 0.03, which
flipped enough cells to grow the count error by 2.8 points; in float they cost about 1 % of the
inference time. The other Conv branches and the prototype branch are quantised (measured on the
shipped model: keeping all of the head's activations in float is slower and no more accurate).
``head="quantize"`` quantises the whole head anyway; it exists so the accuracy gate can be shown
to refuse such a model.

The calibration set is chosen from the training images, deterministically (evenly spaced in
name order), and preprocessed by the device's own :class:`~cellseg.edge.pipeline.preprocess.Preprocessor`
so calibration sees exactly the tensors the device will feed. Its hash (names and file hashes)
goes into the model's metadata and from there into the bundle's manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from cellseg.edge.capture.imageio import IMAGE_SUFFIXES, read_image
from cellseg.edge.errors import ConfigError, DatasetError, DependencyError, ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.model_info import CELLSEG_METADATA_KEY, ModelInfo
from cellseg.edge.pipeline.preprocess import Preprocessor
from cellseg.edge.pipeline.types import Frame

logger = logging.getLogger(__name__)

HeadPolicy = Literal["float", "quantize"]


@dataclass(frozen=True)
class CalibrationSet:
    """The images calibration ran on, and a hash that identifies them (names and contents)."""

    images: tuple[Path, ...]
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "count": len(self.images), "images": [p.name for p in self.images]}


def choose_calibration_images(folder: Path, count: int) -> CalibrationSet:
    """``count`` images evenly spaced over ``folder``'s images in name order (all when fewer)."""
    if count < 1:
        raise ConfigError(f"calibration needs at least one image, got count={count}")
    if not folder.is_dir():
        raise DatasetError(f"calibration folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DatasetError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    if len(images) > count:
        picks = np.linspace(0, len(images) - 1, count).round().astype(int)
        images = [images[i] for i in picks]
    h = hashlib.sha256()
    for p in images:
        h.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    return CalibrationSet(tuple(images), h.hexdigest())


def head_float_nodes(model: Any) -> list[str]:
    """The Segment head's nodes that stay in float: its decode -- the nodes outside the Conv
    branches (box ``cv2``, class ``cv3``, mask-coefficient ``cv4``) and the prototype branch
    (``proto``): the DFL softmax, the box arithmetic, the class sigmoid and the concatenations --
    and the class-logit Convs, the last Conv of each ``cv3`` branch (the one whose output leaves
    the branch). The head is the highest ``/model.N/``."""
    numbered = [(int(m.group(1)), n) for n in model.graph.node if (m := re.match(r"/model\.(\d+)/", n.name))]
    if not numbered:
        raise ModelError("cannot find the Segment head: node names are not ultralytics' '/model.N/...'")
    head = max(i for i, _ in numbered)
    head_nodes = [n for i, n in numbered if i == head]
    branch = re.compile(rf"/model\.{head}/(cv[234]\.\d+|proto)/")
    # In exports from before the DFL rewrite (training/dfl_softmax.py) the DFL's fixed 1x1 Conv
    # stays quantised: its inputs are softmax probabilities in [0, 1], which u8 holds well, and in
    # float it cost 2-3 ms per frame with no accuracy gained. The rewrite's MatMul is decode, float.
    decode = [n.name for n in head_nodes if n.op_type not in ("Conv", "ConvTranspose") and not branch.match(n.name)]
    class_branch = re.compile(rf"/model\.{head}/cv3\.\d+/")
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n.name)
    logits = []
    for n in head_nodes:
        if n.op_type == "Conv" and (m := class_branch.match(n.name)):
            inside = m.group(0)
            if any(not c.startswith(inside) for c in consumers.get(n.output[0], [])):
                logits.append(n.name)
    if not logits:
        raise ModelError("cannot find the Segment head's class-logit convolutions ('cv3' branches)")
    return decode + logits


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over preprocessed frames, with a progress bar."""

    def __init__(self, input_name: str, tensors: Iterator[npt.NDArray[np.float32]], total: int, progress: bool):
        self.input_name = input_name
        self._tensors = tensors
        self._bar = tqdm(total=total, desc="calibrate", unit="image", disable=not progress)

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        tensor = next(self._tensors, None)
        if tensor is None:
            self._bar.close()
            return None
        self._bar.update(1)
        return {self.input_name: tensor}

    def rewind(self) -> None:  # part of the protocol; MinMax reads the data once
        raise NotImplementedError("calibration data is read once")


def _tensors(images: Sequence[Path], pre: Preprocessor) -> Iterator[npt.NDArray[np.float32]]:
    for path in images:
        tensor, _ = pre(Frame(read_image(path), source=str(path)))
        yield tensor


@dataclass(frozen=True)
class QuantizeResult:
    output: Path
    calibration: CalibrationSet
    float_nodes: int
    quantized_nodes: int


def quantize(
    model: Path,
    output: Path,
    calibration: CalibrationSet,
    *,
    head: HeadPolicy = "float",
    progress: bool = True,
) -> QuantizeResult:
    """Write an INT8 Q/DQ copy of ``model`` to ``output``, calibrated on ``calibration``."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise DependencyError("onnxruntime", "build", "INT8 quantisation") from e
    if not model.is_file():
        raise ModelError(f"{model}: no such model file")
    try:
        source = onnx.load(str(model))
    except Exception as e:  # onnx raises DecodeError and friends for corrupt files
        raise ModelError(f"{model}: not a readable ONNX model: {e}") from e
    meta = {p.key: p.value for p in source.metadata_props}
    info = ModelInfo.from_metadata(meta, model)
    if info.extra.get("precision", "fp32") != "fp32":
        raise ModelError(f"{model}: already quantised ({info.extra['precision']}); quantise the FP32 export")
    exclude = head_float_nodes(source) if head == "float" else []
    pre = Preprocessor(info.input_width, info.input_height, info.mapping)
    input_name = source.graph.input[0].name
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cellseg-quantize-") as tmp:
        # Shape inference and constant folding first, as ONNX Runtime recommends for QDQ.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        reader = _Reader(input_name, _tensors(calibration.images, pre), len(calibration.images), progress)
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,  # see the module's docstring: no u8s8 saturation on any CPU
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        result = onnx.load(str(quantized))
    # The device reads precision and provenance from the cellseg metadata entry.
    ours = info.to_metadata()
    ours.update(
        precision="int8",
        quantization={
            "method": "onnxruntime quantize_static QDQ, MinMax, per-channel 7-bit s8 weights, u8 activations",
            "head": head,
            "float_nodes": len(exclude),
            "calibration": calibration.to_dict(),
            "source_sha256": file_sha256(model),
        },
    )
    meta[CELLSEG_METADATA_KEY] = json.dumps(ours)
    del result.metadata_props[:]
    for key, value in meta.items():
        result.metadata_props.add(key=key, value=value)
    tmp_out = output.with_name(output.name + ".tmp")
    onnx.save(result, str(tmp_out))
    tmp_out.replace(output)
    n_q = sum(1 for n in result.graph.node if n.op_type == "QuantizeLinear")
    logger.info("wrote %s: %d QuantizeLinear nodes, %d head nodes kept in float", output, n_q, len(exclude))
    return QuantizeResult(output, calibration, len(exclude), n_q)
