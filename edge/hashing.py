"""The sha256 of a file, read in chunks: the identity of models, engines and bundle members
(manifests, engine ids, the gate's reports and flashing all name files by it)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
