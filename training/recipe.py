"""Training recipes: what to train, on what, for how long, declared once with bounds.

The defaults are the project's seed setup (YOLOv9c-seg, 30 epochs, batch 4, lr0 0.001,
SGD momentum 0.95, weight decay 0.0005, 640 px). A recipe file overrides any of them, and
``--set key=value`` on the command line overrides the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cellseg.edge.config import format_errors, read_yaml
from cellseg.edge.errors import ConfigError

RECIPES_DIR = Path(__file__).parent / "recipes"


class Recipe(BaseModel):
    """One training run's settings; every field maps onto an ultralytics train argument."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        "yolov9c-seg.yaml",
        description="ultralytics architecture YAML (trained from scratch) or a local .pt to fine-tune",
    )
    epochs: int = Field(30, ge=1, le=10000, description="training epochs")
    batch: int = Field(4, ge=1, le=1024, description="images per batch")
    imgsz: int = Field(640, ge=64, le=4096, multiple_of=32, description="square training size (px)")
    optimizer: Literal["SGD", "Adam", "AdamW", "NAdam", "RAdam", "RMSProp", "auto"] = Field(
        "SGD", description="optimiser"
    )
    nbs: int = Field(
        64,
        ge=1,
        le=1024,
        description="nominal batch size: gradients are accumulated over nbs/batch batches before each step",
    )
    lr0: float = Field(0.001, gt=0, le=1.0, description="initial learning rate")
    lrf: float = Field(0.01, gt=0, le=1.0, description="final learning rate as a fraction of lr0")
    momentum: float = Field(0.95, ge=0, lt=1.0, description="SGD momentum / Adam beta1")
    weight_decay: float = Field(0.0005, ge=0, le=0.1, description="weight decay")
    warmup_epochs: float = Field(3.0, ge=0, le=100, description="learning-rate warm-up epochs")
    patience: int = Field(100, ge=0, le=10000, description="stop after this many epochs without improvement")
    seed: int = Field(0, ge=0, description="random seed")
    workers: int = Field(2, ge=0, le=64, description="data-loader worker processes")
    close_mosaic: int = Field(10, ge=0, description="turn mosaic augmentation off for the last N epochs")
    mosaic: float = Field(1.0, ge=0, le=1.0, description="mosaic augmentation probability")
    degrees: float = Field(0.0, ge=0, le=180, description="random rotation range (deg)")
    flipud: float = Field(0.0, ge=0, le=1.0, description="vertical flip probability")
    fliplr: float = Field(0.5, ge=0, le=1.0, description="horizontal flip probability")
    scale: float = Field(0.5, ge=0, le=0.95, description="random scale gain")
    hsv_h: float = Field(0.015, ge=0, le=1.0, description="hue augmentation (colour images only matter)")
    hsv_s: float = Field(0.7, ge=0, le=1.0, description="saturation augmentation")
    hsv_v: float = Field(0.4, ge=0, le=1.0, description="brightness augmentation")
    max_det: int = Field(1000, ge=1, le=100000, description="detections kept per image in validation")
    overlap_mask: bool = Field(True, description="merge instance masks for the loss (ultralytics default)")
    mask_ratio: int = Field(4, ge=1, le=16, description="mask downsample ratio for the loss")
    plots: bool = Field(True, description="write training plots")
    val: bool = Field(
        True,
        description="validate on the val split every epoch (cross-validation turns it off: its held-out "
        "fold must not choose the epoch)",
    )
    device: str = Field("cpu", description="'cpu', or a CUDA device index such as '0'")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads (default: all cores)")
    cpu_bf16: bool = Field(
        False,
        description="on the CPU, run the network in bfloat16 (autocast; weights, optimiser and loss stay "
        "float32): about twice as fast where the CPU has AVX512-BF16 or AMX; float32 on a CPU without them",
    )

    @model_validator(mode="after")
    def _bf16_is_for_the_cpu(self) -> Recipe:
        if self.cpu_bf16 and self.device != "cpu":
            raise ValueError(f"cpu_bf16 is for training on the CPU; device is {self.device!r}")
        return self

    def train_args(self) -> dict[str, Any]:
        """Keyword arguments for ``YOLO.train`` (the fields ultralytics knows)."""
        return self.model_dump(exclude={"model", "threads", "cpu_bf16"})


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def load_recipe(path: Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file (the seed defaults when ``None``) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and (RECIPES_DIR / path.name).is_file():
            path = RECIPES_DIR / path.name
        if not path.is_file():
            raise ConfigError(f"{path}: no such recipe file (bundled recipes: {bundled_recipes()})")
        loaded = read_yaml(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of field: value")
        data.update(loaded or {})
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value")
        data[key.strip()] = _parse_value(value)
    return recipe_from_dict(data, str(path) if path else "recipe")


def recipe_from_dict(data: dict[str, Any], source: str) -> Recipe:
    """A recipe from its fields (as a recipe file or a saved CV report holds them); ``source`` names
    where they came from in the error."""
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise ConfigError("\n".join(format_errors(e, source))) from e
    except TypeError as e:  # not a mapping of field: value
        raise ConfigError(f"{source}: a recipe must be a mapping of field: value") from e


def bundled_recipes() -> list[str]:
    return sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))
