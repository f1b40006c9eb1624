"""What the device needs to know about a model, read from the metadata embedded in its export.

``cellseg export`` writes a ``cellseg`` metadata entry (JSON) next to the keys ultralytics'
exporter writes (``imgsz``, ``names``, ``stride``, ...). Models exported by ultralytics alone
still load: the ultralytics keys are enough, with the default intensity mapping.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

from cellseg.edge.errors import ConfigError, ModelMetadataError
from cellseg.edge.pipeline.intensity import IntensityMapping

CELLSEG_METADATA_KEY = "cellseg"
METADATA_SCHEMA = 1


@dataclass(frozen=True)
class PostprocessConfig:
    """Postprocess thresholds: a model ships its defaults in its metadata; users may override them."""

    conf: float = 0.25
    iou: float = 0.7
    max_det: int = 1000
    mask_threshold: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf <= 1.0:
            raise ConfigError(f"confidence threshold must be in [0, 1], got {self.conf}")
        if not 0.0 < self.iou <= 1.0:
            raise ConfigError(f"NMS IoU threshold must be in (0, 1], got {self.iou}")
        if self.max_det < 1:
            raise ConfigError(f"max_det must be at least 1, got {self.max_det}")
        if not 0.0 < self.mask_threshold < 1.0:
            raise ConfigError(f"mask threshold must be in (0, 1), got {self.mask_threshold}")

    def overridden(
        self, *, conf: float | None = None, iou: float | None = None, max_det: int | None = None
    ) -> PostprocessConfig:
        """A copy with the given thresholds replaced; ``None`` keeps this config's value."""
        return PostprocessConfig(
            conf=self.conf if conf is None else conf,
            iou=self.iou if iou is None else iou,
            max_det=self.max_det if max_det is None else max_det,
            mask_threshold=self.mask_threshold,
        )


@dataclass(frozen=True)
class ModelInfo:
    """Input geometry, classes and preprocessing of one model.

    Attributes:
        input_width, input_height: engine input size (static).
        class_names: names by class index.
        num_masks: number of mask prototypes (32 for YOLO-seg).
        stride: largest feature stride.
        mapping: the 16-to-8-bit intensity mapping the model was trained with.
        thresholds: default postprocess thresholds.
        weights_sha256: hash of the training weights it was exported from, when known.
        extra: the rest of the cellseg metadata (recipe, export time, ...).
    """

    input_width: int
    input_height: int
    class_names: tuple[str, ...]
    num_masks: int = 32
    stride: int = 32
    mapping: IntensityMapping = field(default_factory=IntensityMapping)
    thresholds: PostprocessConfig = field(default_factory=PostprocessConfig)
    weights_sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def trained_frame_px(self) -> int | None:
        """Longest side of the frames it was trained on (each letterboxed whole into the input),
        when its export recorded it: the scale at which the model knows cells."""
        value = self.extra.get("trained_frame_px")
        return int(value) if isinstance(value, int | float) and value > 0 else None

    @property
    def trained_pixel_um(self) -> float | None:
        """Micrometres per pixel of its training frames, when its export was told."""
        value = self.extra.get("trained_pixel_um")
        return float(value) if isinstance(value, int | float) and value > 0 else None

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: object = "model") -> ModelInfo:
        """Parse ONNX ``metadata_props`` (string values) written by ultralytics and cellseg."""
        ours: dict[str, Any] = {}
        if CELLSEG_METADATA_KEY in meta:
            try:
                ours = json.loads(meta[CELLSEG_METADATA_KEY])
            except json.JSONDecodeError as e:
                raise ModelMetadataError(f"{source}: '{CELLSEG_METADATA_KEY}' metadata is not JSON: {e}") from e
            if ours.get("schema") != METADATA_SCHEMA:
                raise ModelMetadataError(
                    f"{source}: cellseg metadata schema {ours.get('schema')!r}, this version reads {METADATA_SCHEMA}"
                )
        try:
            names = ours.get("class_names") or _names_from_ultralytics(meta)
            imgsz = ours.get("imgsz") or ast.literal_eval(meta["imgsz"])
            stride = int(ours.get("stride") or ast.literal_eval(meta.get("stride", "32")))
        except (KeyError, ValueError, SyntaxError) as e:
            raise ModelMetadataError(
                f"{source}: metadata lacks input size or class names ({e}); export it with 'cellseg export'"
            ) from e
        if isinstance(imgsz, int):
            imgsz = [imgsz, imgsz]
        try:
            mapping = IntensityMapping.from_dict(ours.get("intensity_mapping", {}))
            thresholds = PostprocessConfig(**ours.get("thresholds", {}))
        except (ConfigError, TypeError) as e:
            raise ModelMetadataError(f"{source}: invalid cellseg metadata: {e}") from e
        return cls(
            input_width=int(imgsz[1]),
            input_height=int(imgsz[0]),
            class_names=tuple(str(n) for n in names),
            stride=stride,
            mapping=mapping,
            thresholds=thresholds,
            weights_sha256=str(ours.get("weights_sha256", "")),
            extra={
                k: v
                for k, v in ours.items()
                if k not in {"class_names", "imgsz", "stride", "intensity_mapping", "thresholds"}
            },
        )

    def to_metadata(self) -> dict[str, Any]:
        """The ``cellseg`` metadata entry (JSON-ready) for this model."""
        return {
            "schema": METADATA_SCHEMA,
            "class_names": list(self.class_names),
            "imgsz": [self.input_height, self.input_width],
            "stride": self.stride,
            "intensity_mapping": self.mapping.to_dict(),
            "thresholds": {
                "conf": self.thresholds.conf,
                "iou": self.thresholds.iou,
                "max_det": self.thresholds.max_det,
                "mask_threshold": self.thresholds.mask_threshold,
            },
            "weights_sha256": self.weights_sha256,
            **self.extra,
        }


def _names_from_ultralytics(meta: dict[str, str]) -> list[str]:
    names = ast.literal_eval(meta["names"])  # a Python dict literal such as "{0: 'cell'}"
    if isinstance(names, dict):
        return [names[k] for k in sorted(names)]
    return list(names)
