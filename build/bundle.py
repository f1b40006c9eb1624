"""``cellseg keygen`` and ``cellseg bundle``: signing keys and signed engine bundles.

The bundle's manifest (schema in :mod:`cellseg.edge.bundles.reader`) describes the engine, the model it
came from (input size, classes, thresholds, intensity mapping), the calibration set and the
accuracy gate's report for INT8 models, and what the engine finds on a reference frame, which
the device checks before it switches to the engine. An INT8 model without a passing gate
report for exactly that model is refused: that is the point of the gate.

Private keys are written 0600 and never enter a bundle, a manifest or a log line.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.edge.bundles.local_model import reference_for
from cellseg.edge.bundles.reader import MANIFEST, MANIFEST_SCHEMA, SIGNATURE, EngineSpec, FileEntry, Manifest, key_id
from cellseg.edge.errors import BundleError, ConfigError, DependencyError
from cellseg.edge.hashing import file_sha256


def generate_keypair(prefix: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<prefix>.key`` (PKCS#8 PEM, mode 0600) and ``<prefix>.pub`` (PEM)."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        raise DependencyError("cryptography", "build", "signing keys") from e
    private, public = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".pub")
    for p in (private, public):
        if p.exists() and not overwrite:
            raise ConfigError(f"{p} exists; refusing to replace a key (pass --overwrite)")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def load_private_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:  # the message never includes key material
        raise ConfigError(f"{path}: not a readable unencrypted PEM private key ({type(e).__name__})") from e
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


@dataclass(frozen=True)
class EngineBuildInfo:
    """What ``cellseg build-engine`` records about a TensorRT plan (its ``.json`` beside it)."""

    precision: str
    tensorrt_version: str
    compute_capability: str
    l4t: str | None
    onnx_sha256: str

    @classmethod
    def read(cls, path: Path) -> EngineBuildInfo:
        try:
            data = json.loads(path.read_text())
            return cls(
                precision=str(data["precision"]),
                tensorrt_version=str(data["tensorrt_version"]),
                compute_capability=str(data["compute_capability"]),
                l4t=data.get("l4t"),
                onnx_sha256=str(data["onnx_sha256"]),
            )
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConfigError(f"{path}: not a readable engine build report: {e}") from e


def make_bundle(
    model: Path,
    output: Path,
    private_key: Path,
    reference_image: Path,
    *,
    name: str | None = None,
    engine: Path | None = None,
    engine_info: EngineBuildInfo | None = None,
    gate_report: dict[str, Any] | None = None,
    compute_gates: Sequence[dict[str, Any]] = (),
    count_tolerance: int | None = None,
    threads: int | None = None,
) -> Manifest:
    """Write a signed bundle holding ``engine`` (a TensorRT plan) or else the ONNX ``model``.

    ``compute_gates``: passing ``cellseg gate`` reports of this model on other engines and
    precisions (OpenVINO BF16, OpenVINO INT8), so that devices may run it there too.
    """
    key = load_private_key(private_key)
    model_meta, precision, reference = reference_for(
        model, reference_image, count_tolerance=count_tolerance, threads=threads
    )
    calibration = (model_meta.get("quantization") or {}).get("calibration")
    if precision == "int8" or (engine_info is not None and engine_info.precision == "int8"):
        _require_passing_gate(model, gate_report)
    gates = {}
    for report in compute_gates:
        candidate = report.get("candidate", {})
        runs_as = f"{candidate.get('backend', 'onnxruntime')}:{candidate.get('compute', 'fp32')}"
        if engine is not None:
            raise BundleError("a TensorRT bundle runs on TensorRT only; it carries no gates of other engines")
        _require_passing_gate(model, report, what=runs_as)
        gates[runs_as] = report
    if engine is not None:
        if engine_info is None:
            raise ConfigError("a TensorRT engine needs its build report (the .json cellseg build-engine wrote)")
        if engine_info.onnx_sha256 != file_sha256(model):
            raise ConfigError(f"{engine.name} was built from another ONNX model than {model.name}")
        spec = EngineSpec(
            kind="tensorrt",
            file="model.engine",
            precision=engine_info.precision,  # type: ignore[arg-type]
            tensorrt_version=engine_info.tensorrt_version,
            compute_capability=engine_info.compute_capability,
            l4t=engine_info.l4t,
            onnx_sha256=engine_info.onnx_sha256,
        )
        payload = engine
    else:
        spec = EngineSpec(kind="onnx", file="model.onnx", precision=precision)  # type: ignore[arg-type]
        payload = model
    ref_name = reference.file
    files = {
        spec.file: FileEntry(sha256=file_sha256(payload), size=payload.stat().st_size),
        ref_name: FileEntry(sha256=file_sha256(reference_image), size=reference_image.stat().st_size),
    }
    manifest = Manifest(
        schema_=MANIFEST_SCHEMA,
        name=name or output.stem,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        engine=spec,
        model=model_meta,
        calibration=calibration,
        gate=gate_report,
        compute_gates=gates,
        reference=reference,
        files=files,
        signing_key=key_id(key.public_key()),
    )
    write_bundle(output, manifest, key, {spec.file: payload, ref_name: reference_image})
    return manifest


def _require_passing_gate(model: Path, gate_report: dict[str, Any] | None, *, what: str = "") -> None:
    if gate_report is None:
        raise BundleError(f"{model.name} is INT8: bundling it needs the accuracy gate's report (--gate-report)")
    if gate_report.get("candidate", {}).get("sha256") != file_sha256(model):
        raise BundleError(f"the {what + ' ' if what else ''}gate report is for another model than the one bundled")
    if not gate_report.get("passed"):
        reasons = "; ".join(gate_report.get("reasons", [])) or "no reason recorded"
        raise BundleError(f"the accuracy gate refused this {what or 'INT8'} model: {reasons}")


def write_bundle(output: Path, manifest: Manifest, key: Any, files: dict[str, Path]) -> None:
    """Sign the manifest and write the archive (to a temp file, renamed when complete)."""
    if manifest.signing_key != key_id(key.public_key()):
        raise ConfigError("the manifest names another signing key than the one signing it")
    manifest_bytes = manifest.to_json()
    signature = key.sign(manifest_bytes)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for member_name, data in ((MANIFEST, manifest_bytes), (SIGNATURE, signature)):
            info = tarfile.TarInfo(member_name)
            info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
            tar.addfile(info, io.BytesIO(data))
        for member_name, path in files.items():
            info = tar.gettarinfo(str(path), arcname=member_name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with open(path, "rb") as f:
                tar.addfile(info, f)
    tmp.replace(output)
