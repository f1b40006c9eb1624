from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.edge.errors import ConfigError
from cellseg.training.recipe import bundled_recipes, load_recipe


def test_defaults_are_the_seed_setup() -> None:
    r = load_recipe()
    assert (r.model, r.epochs, r.batch, r.lr0, r.optimizer, r.momentum, r.weight_decay, r.imgsz) == (
        "yolov9c-seg.yaml",
        30,
        4,
        0.001,
        "SGD",
        0.95,
        0.0005,
        640,
    )
    assert load_recipe(Path("seed-yolov9c-seg.yaml")) == r


def test_every_bundled_recipe_is_valid() -> None:
    assert "usiigaci-yolo11n-seg-cpu.yaml" in bundled_recipes()
    for name in bundled_recipes():
        load_recipe(Path(name))


def test_overrides_win_and_are_typed() -> None:
    r = load_recipe(Path("seed-yolov9c-seg.yaml"), ["epochs=5", "model=yolov8s-seg.yaml", "fliplr=0"])
    assert (r.epochs, r.model, r.fliplr) == (5, "yolov8s-seg.yaml", 0.0)
    assert r.train_args()["epochs"] == 5 and "model" not in r.train_args()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("epochs=0", "epochs: Input should be greater than or equal to 1"),
        ("imgsz=650", "imgsz: Input should be a multiple of 32"),
        ("optimiser=SGD", "optimiser: Extra inputs are not permitted"),
        ("lr0=fast", "lr0: Input should be a valid number"),
        ("epochs", "must look like key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [override])


def test_bad_recipe_file(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")


def test_cpu_bf16_is_a_cpu_setting_that_ultralytics_never_sees() -> None:
    recipe = load_recipe(None, ["cpu_bf16=true"])
    assert recipe.cpu_bf16 and "cpu_bf16" not in recipe.train_args()
    with pytest.raises(ConfigError, match="cpu_bf16 is for training on the CPU; device is '0'"):
        load_recipe(None, ["cpu_bf16=true", "device='0'"])
