"""What a device configuration refers to: files that exist and can be read, a model that loads.

``cellseg validate-config FILE`` checks the schema (:mod:`cellseg.edge.config`) and then these,
one line per problem with its key path, because a configuration whose model, password file or
TLS CA is missing passed validation and then could not run. ``--schema-only`` skips them, for a
configuration written on one machine for another.

Not checked here: cameras (a camera may be unplugged at the moment and the daemon retries it;
``cellseg doctor`` opens it), and folders the daemon or systemd create (state, spool, overlays).
A systemd credential is checked only where ``$CREDENTIALS_DIRECTORY`` is set (inside the unit).
"""

from __future__ import annotations

import os
from pathlib import Path

from cellseg.edge.config import Config, Secret, secret_location
from cellseg.edge.errors import CellsegError, DependencyError


def _readable(path: Path, want: str) -> str | None:
    """Why ``path`` is not a readable ``want`` ("file" or "folder"), or None."""
    if not path.exists():
        return f"{path} does not exist"
    if not (path.is_dir() if want == "folder" else path.is_file()):
        return f"{path} is not a {want}"
    try:
        if want == "folder":
            next(os.scandir(path), None)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        return f"{path} cannot be {'listed' if want == 'folder' else 'read'}: {e.strerror}"
    return None


def _secret_problem(secret: Secret) -> str | None:
    if secret.credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY"):
        return None  # systemd provides it when the unit starts; nothing to look at from here
    try:
        location = secret_location(secret)
    except CellsegError as e:
        return str(e)
    return _readable(location, "file")


def _model_problem(path: Path) -> str | None:
    """A model file or installed slot that does not load its metadata (the engine itself is
    not built: a TensorRT plan needs the GPU, which validation does not)."""
    from cellseg.edge.bundles.engine_select import read_slot_manifest, slot_model_info
    from cellseg.edge.bundles.reader import check_files
    from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine

    if path.is_dir():
        try:
            manifest = read_slot_manifest(path)
            check_files(path, manifest)
            slot_model_info(manifest, path)
        except CellsegError as e:
            return str(e)
        return None
    problem = _readable(path, "file")
    if problem is not None:
        return problem
    engine = OnnxRuntimeEngine(path, threads=1)
    try:
        engine.load()
    except DependencyError:
        return None  # no ONNX Runtime on this machine (a TensorRT device): the file is there
    except CellsegError as e:
        return str(e)
    engine.close()
    return None


def _keys_problem(location: Path) -> str | None:
    from cellseg.edge.bundles.reader import load_trusted_keys

    if not location.exists():  # a typo here would quietly make the device trust no key at all
        return f"{location} does not exist"
    try:
        load_trusted_keys([location])
    except CellsegError as e:
        return str(e)
    return None


def reference_problems(config: Config, source: str) -> list[str]:
    """One line per file the configuration names that is missing, unreadable or unusable."""
    checks: list[tuple[str, str | None]] = []
    if config.model is not None:
        checks.append(("model", _model_problem(config.model)))
    s = config.source
    if s.kind == "folder" and s.path is not None:
        checks.append(("source.path", _readable(s.path, "folder")))
    if s.kind == "video" and s.path is not None:
        checks.append(("source.path", _readable(s.path, "file")))
    checks += [(f"source.images.{i}", _readable(p, "file")) for i, p in enumerate(s.images) if s.kind == "images"]
    m = config.mqtt
    if m.password is not None:
        checks.append(("mqtt.password", _secret_problem(m.password)))
    if m.tls is not None:
        for key, path in (("ca_file", m.tls.ca_file), ("cert_file", m.tls.cert_file)):
            if path is not None:
                checks.append((f"mqtt.tls.{key}", _readable(path, "file")))
        if m.tls.key is not None:
            checks.append(("mqtt.tls.key", _secret_problem(m.tls.key)))
    for i, location in enumerate(config.flash.trusted_keys):
        checks.append((f"flash.trusted_keys.{i}", _keys_problem(location)))
    return [f"{source}: {key}: {problem}" for key, problem in checks if problem is not None]
