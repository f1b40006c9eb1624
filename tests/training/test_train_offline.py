"""A tiny real training run with the network switched off: the air-gapped path end to end,
including an interrupted run resumed from its last epoch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cellseg.training.checkpoint import publish_checkpoint

pytestmark = pytest.mark.slow

# Runs in a fresh interpreter so ultralytics is imported for the first time under our settings,
# as in a user's `cellseg train`. Every network call is refused and recorded.
DRIVER = textwrap.dedent(
    """
    import json, os, socket, sys
    attempts = []
    def refuse(*args, **kwargs):
        attempts.append(repr(args)[:200])
        raise OSError("network is disabled in this test")
    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    socket.gethostbyname = refuse
    if os.environ.get("CRASH_AFTER_FIRST_EPOCH") == "1":
        # A power cut right after epoch 1's checkpoint was written. The hook goes in after
        # cellseg's own offline import, so the test itself never imports ultralytics first.
        import cellseg.training.train as train_module
        offline_import = train_module.import_ultralytics_offline
        def import_then_hook(*args, **kwargs):
            ultralytics = offline_import(*args, **kwargs)
            from ultralytics.engine.trainer import BaseTrainer
            original = BaseTrainer.save_model
            def save_then_die(self):
                result = original(self)
                with open(os.environ["ATTEMPTS_FILE"], "w") as f:
                    json.dump(attempts, f)
                os._exit(17)
            BaseTrainer.save_model = save_then_die
            return ultralytics
        train_module.import_ultralytics_offline = import_then_hook
    from cellseg.cli import main
    code = main(sys.argv[1:])
    with open(os.environ["ATTEMPTS_FILE"], "w") as f:
        json.dump(attempts, f)
    sys.exit(code)
    """
)


def _subset(dataset: Path, dest: Path, train: list[str], val: list[str]) -> Path:
    for split, names in (("train", train), ("val", val)):
        for sub, ext in (("images", ".png"), ("labels", ".txt")):
            (dest / sub / split).mkdir(parents=True)
            for name in names:
                shutil.copy(dataset / sub / split / f"{name}{ext}", dest / sub / split / f"{name}{ext}")
    shutil.copy(dataset / "data.yaml", dest / "data.yaml")
    return dest / "data.yaml"


def _train(args: list[str], tmp_path: Path, crash: bool = False) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    attempts = tmp_path / f"attempts-{len(list(tmp_path.glob('attempts-*')))}.json"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),  # nothing may be written to the user's home
        "ATTEMPTS_FILE": str(attempts),
        "CRASH_AFTER_FIRST_EPOCH": "1" if crash else "0",
        "PYTHONPATH": ":".join(sys.path),
    }
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        env=env,
        capture_output=True,
        check=False,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    return proc, json.loads(attempts.read_text()) if attempts.exists() else ["<driver did not finish>"]


def test_tiny_training_runs_offline_and_resumes(usiigaci_dataset: Path, tmp_path: Path) -> None:
    data = _subset(usiigaci_dataset, tmp_path / "ds", ["set1", "set2", "set3", "set4"], ["set46", "set47"])
    run = tmp_path / "runs" / "tiny"
    common = ["-v", "train", "--data", str(data), "--run", str(run)]  # -v: cellseg's info lines
    overrides = [
        "model=yolo11n-seg.yaml",
        "epochs=2",
        "batch=2",
        "imgsz=128",
        "workers=0",
        "threads=2",
        "close_mosaic=0",
        "cpu_bf16=true",  # the network in bfloat16 where the CPU computes it natively, else float32
    ]

    first, attempts = _train([*common, *[arg for o in overrides for arg in ("--set", o)]], tmp_path, crash=True)
    assert first.returncode == 17, first.stdout[-3000:] + first.stderr[-3000:]
    assert attempts == [], f"network was attempted: {attempts}"
    assert (run / "weights" / "last.pt").is_file()
    assert not (run / "manifest.json").exists()  # the run did not finish

    second, attempts = _train([*common, "--resume"], tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert attempts == [], f"network was attempted: {attempts}"
    assert "Resuming training" in second.stdout + second.stderr
    # The resumed run keeps its recipe's bfloat16 network (on a CPU without native bfloat16, the
    # float32 it falls back to, said each time), and no checkpoint carries the hooks that do it.
    from cellseg.training.cpu_bf16 import cpu_has_native_bf16

    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    for proc in (first, second):
        said = proc.stdout + proc.stderr
        assert said.count("the network trains in bfloat16") == (dtype == "bfloat16")
        assert said.count("the network trains in float32 here") == (dtype == "float32")
        # The mask loss inside each box, put into each run's training criterion once.
        assert said.count("mask loss: computed inside each object's box (v8SegmentationLoss)") == 1
    import torch

    for weights in ("last.pt", "best.pt"):
        saved = torch.load(run / "weights" / weights, map_location="cpu", weights_only=False)
        hooked = [name for name, m in saved["model"].named_modules() if m._forward_hooks or m._forward_pre_hooks]
        assert hooked == [] and saved["model"].model[0].conv.weight.dtype == torch.float16  # ultralytics saves fp16
        assert getattr(saved["model"], "criterion", None) is None  # nor the criterion with cellseg's mask loss

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["epochs_completed"] == 2
    assert manifest["recipe"]["imgsz"] == 128 and manifest["recipe"]["model"] == "yolo11n-seg.yaml"
    assert manifest["recipe"]["cpu_bf16"] is True and manifest["network_dtype"] == [dtype]
    assert manifest["mask_loss"] == ["in-box"]
    assert len(manifest["dataset_sha256"]) == 64
    assert {"ultralytics", "torch", "cellseg"} <= set(manifest["versions"])
    assert manifest["best_epoch"] is not None and "metrics/mAP50-95(M)" in manifest["best_epoch"]
    assert (run / "weights" / "best.pt").is_file()
    # ultralytics' settings and fonts stay inside the run directory, not in the home folder.
    assert (run / ".ultralytics" / "Ultralytics" / "Arial.ttf").is_file()
    assert not (tmp_path / "home" / ".config" / "Ultralytics").exists()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["epochs"] == 2

    # Published weights keep the training arguments but none of this machine's paths.
    published = tmp_path / "shared" / "tiny.pt"
    args = publish_checkpoint(run / "weights" / "best.pt", published)
    assert args["data"] == "data.yaml" and args["imgsz"] == 128
    assert str(tmp_path).encode() not in published.read_bytes()
    assert str(tmp_path).encode() in (run / "weights" / "best.pt").read_bytes()


def test_pretrained_weights_are_never_downloaded(usiigaci_dataset: Path, tmp_path: Path) -> None:
    from cellseg.edge.errors import ConfigError
    from cellseg.training.recipe import load_recipe
    from cellseg.training.train import train

    recipe = load_recipe(None, ["model=yolo11n-seg.pt"])
    with pytest.raises(ConfigError, match="never downloaded"):
        train(recipe, usiigaci_dataset / "data.yaml", tmp_path / "run")
