"""A local ONNX model (by default the one shipped in the wheel) installed as an engine slot.

``cellseg install-model`` puts a model into ``<state_dir>/engines`` the way a flash does: a slot
with a manifest that lists every file's sha256, and the expected outputs on a reference frame,
so that ``cellseg flash`` later replaces it as usual and ``cellseg rollback`` returns to it.
``systemd/install.sh`` runs it once, so a fresh device measures right away; and because the
running engine is a slot, upgrading the package never swaps the model under a running
experiment (a growth curve must not change model half-way): a newer shipped model becomes
active only when asked for (``--activate always``).

Such a slot has no signature: it did not arrive over the network, it was installed by whoever
can already write the state folder. Its manifest's ``signing_key`` is :data:`LOCAL_SIGNER`,
which can never name a trusted key (key ids are 16 hex digits), so no bundle can pass as one.

The reference outputs are computed here, on the device side, because the build stage's bundle
writer computes them the same way (:func:`reference_for`); the device and the builder share one
definition.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cellseg.edge.bundles.engine_select import read_slot_manifest
from cellseg.edge.bundles.reader import (
    MANIFEST,
    MANIFEST_SCHEMA,
    EngineSpec,
    FileEntry,
    Manifest,
    Reference,
    write_synced,
)
from cellseg.edge.bundles.slots import SlotStore
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.engines.onnxruntime_engine import OnnxRuntimeEngine
from cellseg.edge.errors import CellsegError, ModelError
from cellseg.edge.hashing import file_sha256
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.types import Frame

logger = logging.getLogger(__name__)

LOCAL_SIGNER = "local-install"
Activation = Literal["if-none", "always", "never"]


def reference_for(
    model: Path, image: Path, *, count_tolerance: int | None = None, threads: int | None = None
) -> tuple[dict[str, Any], str, Reference]:
    """What ``model`` finds on ``image``: (the model's cellseg metadata, its precision, the
    self-test's :class:`Reference` with the file name ``reference<suffix>``)."""
    with OnnxRuntimeEngine(model, threads=threads) as engine:
        result = HostPipeline(engine)(Frame(read_image(image), source=image.name))
        info = engine.info.to_metadata()
        precision = engine.precision
    m = result.measurement
    boxes = [[round(float(v), 2) for v in box] for box in result.detections.boxes]
    # A GPU engine differs from the CPU model in the last bits: allow a couple of cells either way.
    tolerance = count_tolerance if count_tolerance is not None else max(2, round(0.03 * m.count))
    reference = Reference(
        file="reference" + image.suffix.lower(),
        count=m.count,
        confluence_pct=round(m.confluence_pct, 4),
        boxes=boxes,
        count_tolerance=tolerance,
    )
    return info, precision, reference


@dataclass(frozen=True)
class InstallOutcome:
    """What :func:`install_model` did: ``slot`` is the slot holding the model (None when nothing
    was installed), ``active`` the slot active afterwards, ``action`` a sentence for the admin."""

    slot: Path | None
    active: Path | None
    action: str


def _copy_synced(src: Path, dest: Path) -> None:
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def _model_sha(slot: Path) -> str | None:
    """The sha256 a slot's manifest gives its engine file (None for an unreadable slot)."""
    try:
        manifest = read_slot_manifest(slot)
    except CellsegError:  # a damaged slot holds no model we could be repeating
        return None
    entry = manifest.files.get(manifest.engine.file)
    return entry.sha256 if entry is not None else None


def install_model(
    model: Path,
    reference_image: Path,
    store: SlotStore,
    *,
    name: str,
    activate: Activation = "if-none",
    threads: int | None = None,
) -> InstallOutcome:
    """Install the ONNX ``model`` as a slot and, per ``activate``, make it the active engine.

    ``if-none``: only when no slot is active (a first install; an upgrade keeps what runs);
    ``always``: make it active (the slot active until now becomes ``previous``);
    ``never``: only report. Nothing is done when the active slot already holds this model.
    Power-cut safe as a flash is: the slot is complete before the ``active`` link moves.
    """
    if not model.is_file():
        raise ModelError(f"{model}: no such model file")
    sha = file_sha256(model)
    with store.locked():
        active = store.active()
        if active is not None and _model_sha(active) == sha:
            return InstallOutcome(active, active, f"{model.name} is already the active engine (slot {active.name})")
        if activate == "never" or (activate == "if-none" and active is not None):
            return InstallOutcome(
                None,
                active,
                f"kept the active engine (slot {active.name if active else 'none'}); "
                f"{model.name} was not installed (--activate always installs and activates it)",
            )
        partial = store.new_partial()
        try:
            _copy_synced(model, partial / "model.onnx")
            _copy_synced(reference_image, partial / ("reference" + reference_image.suffix.lower()))
            meta, precision, reference = reference_for(partial / "model.onnx", reference_image, threads=threads)
            manifest = Manifest(
                schema_=MANIFEST_SCHEMA,
                name=name,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                engine=EngineSpec(kind="onnx", file="model.onnx", precision=precision),  # type: ignore[arg-type]
                model=meta,
                reference=reference,
                files={
                    "model.onnx": FileEntry(sha256=sha, size=model.stat().st_size),
                    reference.file: FileEntry(sha256=file_sha256(reference_image), size=reference_image.stat().st_size),
                },
                signing_key=LOCAL_SIGNER,
            )
            write_synced(partial / MANIFEST, manifest.to_json())
            slot = store.commit(partial, f"onnx-{precision}-local")
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        store.activate(slot)
        store.remove_unused()
    logger.info("installed %s into slot %s and made it active", model.name, slot.name)
    before = f"; slot {active.name} is kept for cellseg rollback" if active is not None else ""
    return InstallOutcome(slot, slot, f"installed {model.name} into slot {slot.name}, now the active engine{before}")
