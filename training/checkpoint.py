"""Publishing a trained checkpoint: the weights without the trainer's machine-specific state.

An ultralytics checkpoint carries the absolute paths of the machine it was trained on (dataset,
run folder) and the git state of the working directory; a model shared with another lab, or
committed, should not. ``publish_checkpoint`` keeps the weights, the training arguments and
metrics, and reduces every path to its last component.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cellseg.edge.errors import DependencyError, ModelError

_PATH_ARGS = ("data", "project", "save_dir", "model", "pretrained", "resume", "cfg", "tracker")
_DROPPED_KEYS = ("git", "optimizer", "scaler", "stopper")


def _strip_paths(args: dict[str, Any]) -> dict[str, Any]:
    for key in _PATH_ARGS:
        value = args.get(key)
        if isinstance(value, str) and ("/" in value or "\\" in value):
            args[key] = Path(value).name
    return args


def publish_checkpoint(source: Path, destination: Path) -> dict[str, Any]:
    """Write a copy of ``source`` fit to share; returns the training arguments kept."""
    try:
        import torch
    except ImportError as e:
        raise DependencyError("torch", "train", "publishing weights") from e
    if not Path(source).is_file():
        raise ModelError(f"{source}: no such weights file")
    try:
        ckpt = torch.load(str(source), map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises a variety of unpickling errors for bad files
        raise ModelError(f"{source}: not a PyTorch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or (ckpt.get("model") is None and ckpt.get("ema") is None):
        raise ModelError(f"{source}: not an ultralytics checkpoint (no model inside)")
    if ckpt.get("model") is None:
        ckpt["model"] = ckpt["ema"]  # the EMA weights are the ones ultralytics evaluates and exports
    ckpt["ema"] = None
    for key in _DROPPED_KEYS:
        ckpt.pop(key, None)
    args = _strip_paths(dict(ckpt.get("train_args") or {}))
    ckpt["train_args"] = args
    # The model object keeps its own copy of the training arguments (a namespace or a dict),
    # and path attributes of its own (pt_path: where a resumed run loaded it from).
    for name, value in list(vars(ckpt["model"]).items()):
        if isinstance(value, str) and ("/" in value or "\\" in value):
            setattr(ckpt["model"], name, Path(value).name)
    model_args = getattr(ckpt["model"], "args", None)
    if isinstance(model_args, dict):
        ckpt["model"].args = _strip_paths(dict(model_args))
    elif model_args is not None:
        for key, value in _strip_paths(dict(vars(model_args))).items():
            setattr(model_args, key, value)
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_suffix(destination.suffix + ".partial")
    torch.save(ckpt, str(partial))
    partial.replace(destination)
    return args
