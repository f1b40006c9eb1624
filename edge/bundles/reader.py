"""Engine bundles: the manifest schema, Ed25519 signatures, and safe reading of a bundle file.

A bundle is an uncompressed tar archive holding ``manifest.json``, ``manifest.sig`` (the raw
64-byte Ed25519 signature of the manifest's exact bytes) and the files the manifest lists with
their sha256 and size: the engine (a TensorRT plan or an ONNX model) and the self-test's
reference frame. The signature covers the manifest and the manifest covers every file, so one
verification vouches for the whole bundle.

Reading is defensive, because a bundle arrives over the network: member names must be plain
file names (no directories, ``..``, absolute paths, links or devices), every member must be
listed in the signed manifest and every listed file present, sizes and hashes must match, and
nothing is written anywhere before the signature has been verified.

The build stage writes bundles (:mod:`cellseg.build.bundle`); the device reads them here, so
the schema lives on the device side and both share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellseg.edge.errors import BundleError, DependencyError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MANIFEST_SCHEMA = 1
MAX_MANIFEST_BYTES = 1 << 20
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileEntry(_Strict):
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$")
    size: int = Field(..., ge=0)


class EngineSpec(_Strict):
    """What the engine is and what it needs from the device."""

    kind: Literal["onnx", "tensorrt"]
    file: str
    precision: Literal["fp32", "fp16", "int8"]
    # TensorRT plans only run with the TensorRT version and GPU they were built for.
    tensorrt_version: str | None = None
    compute_capability: str | None = Field(None, pattern=r"^\d+\.\d+$")
    l4t: str | None = None
    onnx_sha256: str | None = Field(None, description="the ONNX model the engine was built from")


class Reference(_Strict):
    """A frame and what the engine must find on it for the on-device self-test to pass."""

    file: str
    count: int = Field(..., ge=0)
    confluence_pct: float = Field(..., ge=0.0, le=100.0)
    boxes: list[list[float]] = Field(default_factory=list, description="x0, y0, x1, y1 per cell, frame pixels")
    count_tolerance: int = Field(2, ge=0, description="allowed |count - expected|")
    confluence_tolerance_pp: float = Field(0.5, ge=0.0, description="allowed confluence difference")
    box_match_fraction: float = Field(0.9, ge=0.0, le=1.0, description="expected boxes that must be found")
    box_iou: float = Field(0.8, gt=0.0, le=1.0, description="IoU that counts as found")


class Manifest(_Strict):
    schema_: int = Field(MANIFEST_SCHEMA, alias="schema")
    name: str = Field(..., min_length=1, max_length=200)
    created: str
    engine: EngineSpec
    model: dict[str, Any] = Field(..., description="the cellseg model metadata: input size, classes, thresholds")
    calibration: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    # Accuracy gates of the other engines and precisions this bundle may run on, by
    # ``backend:precision`` (``openvino:bf16``): the device runs a bundle only on its own
    # precision or on one of these (see engine_select.require_gate).
    compute_gates: dict[str, dict[str, Any]] = Field(default_factory=dict)
    reference: Reference
    files: dict[str, FileEntry]
    signing_key: str = Field(..., description="id of the key that signed it (sha256 of the raw public key, 16 hex)")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> bytes:
        data = self.model_dump(by_alias=True)
        if not data["compute_gates"]:
            # Left out when empty: a bundle without them reads on devices that predate them.
            del data["compute_gates"]
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @property
    def engine_entry(self) -> FileEntry:
        return self.files[self.engine.file]


def parse_manifest(data: bytes) -> Manifest:
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"manifest is not JSON: {e}") from e
    if not isinstance(raw, dict) or raw.get("schema") != MANIFEST_SCHEMA:
        got = raw.get("schema") if isinstance(raw, dict) else type(raw).__name__
        raise BundleError(f"manifest schema {got!r} is not {MANIFEST_SCHEMA}, which this version reads")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise BundleError(f"manifest is invalid: {problems}") from e
    for name in manifest.files:
        if not _SAFE_NAME.match(name) or name in (MANIFEST, SIGNATURE):
            raise BundleError(f"manifest lists an unsafe file name {name!r}")
    for role, name in (("engine", manifest.engine.file), ("reference", manifest.reference.file)):
        if name not in manifest.files:
            raise BundleError(f"manifest's {role} file {name!r} is not among its files")
    return manifest


def _crypto() -> Any:
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return ed25519
    except ImportError as e:
        raise DependencyError("cryptography", "edge", "bundle signatures") from e


def key_id(public_key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Any:
    """An Ed25519 public key from a PEM file (``cellseg keygen``'s ``.pub``, or openssl's)."""
    ed25519 = _crypto()
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: not a readable PEM public key: {e}") from e
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise BundleError(f"{path}: not an Ed25519 public key")
    return key


def load_trusted_keys(locations: list[Path]) -> dict[str, Any]:
    """Public keys by id, from files and from the ``*.pub`` files of directories."""
    keys: dict[str, Any] = {}
    for location in locations:
        files = sorted(location.glob("*.pub")) if location.is_dir() else [location] if location.exists() else []
        for f in files:
            key = load_public_key(f)
            keys[key_id(key)] = key
    return keys


def verify_signature(manifest_bytes: bytes, signature: bytes, trusted: dict[str, Any]) -> None:
    """Raises BundleError unless a trusted key signed these exact bytes; the reason tells an
    untrusted signer from a manifest changed after signing."""
    from cryptography.exceptions import InvalidSignature

    if not trusted:
        raise BundleError("this device trusts no signing keys (see flash.trusted_keys); refusing every bundle")
    try:  # unverified, only to name the signer in the refusal
        claimed_data = json.loads(manifest_bytes)
    except ValueError as e:
        raise BundleError(f"{MANIFEST} is not JSON ({e}): the bundle is corrupt, or not a cellseg bundle") from e
    claimed = claimed_data.get("signing_key") if isinstance(claimed_data, dict) else None
    if not isinstance(claimed, str):
        raise BundleError(f"{MANIFEST} names no signing key: the bundle is corrupt, or not a cellseg bundle")
    if claimed not in trusted:
        raise BundleError(f"bundle is signed by key {claimed}, which this device does not trust")
    try:
        trusted[claimed].verify(signature, manifest_bytes)
    except InvalidSignature as e:
        raise BundleError(f"signature by key {claimed} does not verify: the manifest was altered after signing") from e


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature verified; its files are checked again as they are extracted."""

    path: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes


def _check_member(member: tarfile.TarInfo) -> None:
    if not member.isfile():
        kind = "link" if member.issym() or member.islnk() else "directory" if member.isdir() else "special file"
        raise BundleError(f"archive member {member.name!r} is a {kind}; bundles hold plain files only")
    if not _SAFE_NAME.match(member.name):
        raise BundleError(f"archive member {member.name!r} has an unsafe path (bundles hold plain names only)")


def open_bundle(path: Path, trusted: dict[str, Any]) -> VerifiedBundle:
    """Read a bundle's member list and manifest and verify the signature; extracts nothing."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            by_name = {m.name: m for m in members}
            if len(by_name) != len(members):
                raise BundleError("archive holds the same name twice")
            for required in (MANIFEST, SIGNATURE):
                if required not in by_name:
                    raise BundleError(
                        "bundle is unsigned (no manifest.sig)"
                        if required == SIGNATURE
                        else f"archive has no {required}"
                    )
            if by_name[MANIFEST].size > MAX_MANIFEST_BYTES:
                raise BundleError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
            manifest_bytes = _read_member(tar, by_name[MANIFEST])
            signature = _read_member(tar, by_name[SIGNATURE])
    except (tarfile.TarError, EOFError) as e:
        raise BundleError(f"{path.name}: {_what_is_wrong(path, e)}") from e
    except OSError as e:
        raise BundleError(f"{path.name}: cannot read: {e}") from e
    verify_signature(manifest_bytes, signature, trusted)
    manifest = parse_manifest(manifest_bytes)
    extra = set(by_name) - set(manifest.files) - {MANIFEST, SIGNATURE}
    if extra:
        raise BundleError(f"archive holds files its manifest does not list: {', '.join(sorted(extra))}")
    for name, entry in manifest.files.items():
        if name not in by_name:
            raise BundleError(f"archive lacks {name}, which its manifest lists")
        if by_name[name].size != entry.size:
            raise BundleError(f"{name} is {by_name[name].size} bytes, the manifest says {entry.size}")
    return VerifiedBundle(path, manifest, manifest_bytes, signature)


def _what_is_wrong(path: Path, error: BaseException) -> str:
    """What a tar error means for this file: cut short (where), or not an archive at all."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    # Walk the headers as far as they go: the last one read names the member the file ends in.
    last: tarfile.TarInfo | None = None
    try:
        with tarfile.open(path, "r|") as stream:
            for member in stream:
                last = member
                if member.offset_data + member.size > size:
                    break
    except (tarfile.TarError, EOFError):
        pass
    if last is None:
        return f"not a bundle archive (no tar header in its {size} bytes; {error})"
    end = last.offset_data + last.size
    if end > size:
        have = max(0, size - last.offset_data)
        return (
            f"the file is truncated: it ends after {size} bytes, inside {last.name!r} ({have} of {last.size} bytes); "
            "the download or copy was incomplete: fetch it again and check its sha256"
        )
    return f"the file is truncated or damaged after {last.name!r} ({size} bytes; {error})"


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise BundleError(f"archive member {member.name!r} cannot be read")
    data = f.read()
    if len(data) != member.size:
        raise BundleError(f"archive is truncated inside {member.name}")
    return data


def extract_verified(bundle: VerifiedBundle, dest: Path, fsync: bool = True) -> None:
    """Write the manifest, signature and listed files into ``dest`` (which must exist), hashing
    each file as it streams; a mismatch raises BundleError and leaves ``dest`` for the caller to
    discard."""
    try:
        with tarfile.open(bundle.path, "r:") as tar:
            for name, entry in bundle.manifest.files.items():
                member = tar.getmember(name)
                src = tar.extractfile(member)
                if src is None:
                    raise BundleError(f"archive member {name!r} cannot be read")
                h, size = hashlib.sha256(), 0
                with open(dest / name, "xb") as out:
                    while block := src.read(1 << 20):
                        h.update(block)
                        size += len(block)
                        out.write(block)
                    out.flush()
                    if fsync:
                        os.fsync(out.fileno())
                if size != entry.size:
                    raise BundleError(f"archive is truncated inside {name}")
                if h.hexdigest() != entry.sha256:
                    raise BundleError(f"{name} does not match its sha256 in the manifest (tampered or corrupt)")
    except tarfile.TarError as e:
        raise BundleError(f"{bundle.path.name}: archive became unreadable: {e}") from e
    except EOFError as e:
        raise BundleError(f"{bundle.path.name}: archive is truncated") from e
    for name, data in ((MANIFEST, bundle.manifest_bytes), (SIGNATURE, bundle.signature)):
        write_synced(dest / name, data, fsync)


def write_synced(path: Path, data: bytes, fsync: bool = True) -> None:
    """Create ``path`` (it must not exist) with ``data``, on disk when this returns."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def check_files(folder: Path, manifest: Manifest) -> None:
    """Every listed file in ``folder`` has its manifest size and hash (an installed slot's check)."""
    from cellseg.edge.hashing import file_sha256

    for name, entry in manifest.files.items():
        p = folder / name
        try:
            size = p.stat().st_size
        except OSError as e:
            raise BundleError(f"{p}: missing ({e.strerror})") from e
        if size != entry.size:
            raise BundleError(f"{p}: {size} bytes, the manifest says {entry.size}")
        if file_sha256(p) != entry.sha256:
            raise BundleError(f"{p}: does not match its sha256 in the manifest")
