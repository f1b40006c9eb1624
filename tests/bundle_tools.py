"""Bad bundles, made the way an attacker, a flaky link or a careless build would make them."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from cellseg.build.bundle import load_private_key, write_bundle
from cellseg.edge.bundles.reader import MANIFEST, SIGNATURE, Manifest, key_id


def members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        out = {}
        for m in tar.getmembers():
            f = tar.extractfile(m)
            assert f is not None
            out[m.name] = f.read()
        return out


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path


def resigned(good: Path, out: Path, key: Path, change: dict[str, Any], tmp: Path) -> Path:
    """``good`` with manifest fields replaced (e.g. the engine spec), signed again with ``key``."""
    files = members(good)
    data = json.loads(files[MANIFEST])
    for dotted, value in change.items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    private = load_private_key(key)
    data["signing_key"] = key_id(private.public_key())
    manifest = Manifest.model_validate(data)
    paths = {}
    for name in manifest.files:
        p = tmp / f"{out.stem}-{name}"
        p.write_bytes(files[name])
        paths[name] = p
    write_bundle(out, manifest, private, paths)
    return out


def bad_bundles(good: Path, trusted_key: Path, untrusted_key: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (bundle file, a phrase its refusal must contain)."""
    files = members(good)
    out: dict[str, tuple[Path, str]] = {}
    unsigned = {k: v for k, v in files.items() if k != SIGNATURE}
    out["unsigned"] = (write_tar(tmp / "unsigned.cellseg", unsigned), "unsigned")
    out["untrusted"] = (resigned(good, tmp / "untrusted.cellseg", untrusted_key, {}, tmp), "does not trust")
    model = bytearray(files["model.onnx"])
    model[len(model) // 2] ^= 0xFF  # one flipped byte in the weights, same size
    out["tampered"] = (write_tar(tmp / "tampered.cellseg", {**files, "model.onnx": bytes(model)}), "sha256")
    manifest = json.loads(files[MANIFEST])
    manifest["reference"]["count_tolerance"] = 1000
    edited = {**files, MANIFEST: json.dumps(manifest).encode()}
    out["altered_manifest"] = (write_tar(tmp / "altered.cellseg", edited), "altered after signing")
    raw = good.read_bytes()
    (tmp / "truncated.cellseg").write_bytes(raw[: len(raw) * 2 // 3])
    out["truncated"] = (tmp / "truncated.cellseg", "the file is truncated: it ends after")
    # Signed by a trusted key, but what it signed is not a manifest (was: "signed by key ?").
    garbage = b"<html>502 Bad Gateway</html>"
    signer = load_private_key(trusted_key)
    out["manifest_not_json"] = (
        write_tar(tmp / "notjson.cellseg", {MANIFEST: garbage, SIGNATURE: signer.sign(garbage)}),
        "manifest.json is not JSON",
    )
    out["traversal"] = (write_tar(tmp / "traversal.cellseg", {**files, "../../etc/cron.d/evil": b"* * * * * root sh"}),
                        "unsafe path")  # fmt: skip
    link = tarfile.TarInfo("model2.onnx")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    out["symlink"] = (write_tar(tmp / "symlink.cellseg", files, [link]), "link")
    other = {"engine.kind": "tensorrt", "engine.tensorrt_version": "10.3.0", "engine.compute_capability": "8.7",
             "engine.l4t": "36.4.0"}  # fmt: skip
    out["other_device"] = (resigned(good, tmp / "trt.cellseg", trusted_key, other, tmp), "TensorRT")
    wrong = {"reference.count": 400, "reference.count_tolerance": 2}
    out["self_test"] = (resigned(good, tmp / "selftest.cellseg", trusted_key, wrong, tmp), "self-test")
    return out
