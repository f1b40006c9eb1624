"""Flashing an engine bundle onto this device.

fetch (size limit, sha256) -> verify signature and every hash -> check the manifest against
this device -> unpack into a new slot -> load and self-test on the reference frame -> activate.
Each refusal raises :class:`~cellseg.edge.bundles.reader.BundleError` whose message is the reason, and
leaves the active slot as it was. The whole flash holds the slot store's lock, so the daemon
and ``cellseg flash`` never flash at the same time.

Activation switches the ``active`` link; a running daemon swaps engines between two frames when
it sees the link change (``cellseg flash`` from a shell), or takes over the engine the
self-test already loaded (its own ``cmd/flash``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.edge.bundles.engine_select import OpenedEngine, open_engine
from cellseg.edge.bundles.reader import Manifest, extract_verified, load_trusted_keys, open_bundle
from cellseg.edge.bundles.slots import SlotStore
from cellseg.edge.capture.imageio import read_image
from cellseg.edge.config import Config
from cellseg.edge.device import DeviceFacts, check_compatible
from cellseg.edge.engines.registry import choose_backend
from cellseg.edge.errors import BundleError, ConfigError
from cellseg.edge.pipeline.host import HostPipeline
from cellseg.edge.pipeline.types import Frame

logger = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("file", "http", "https")
# What a flash requested over MQTT may fetch: a remote client naming local files could probe the
# device's file system through the error messages, so file:// needs flash.allow_file_urls.
REMOTE_SCHEMES = ("http", "https")
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class FlashSettings:
    trusted_keys: dict[str, Any]
    max_bytes: int
    facts: DeviceFacts
    backend: str = "auto"
    threads: int | None = None
    schemes: tuple[str, ...] = ALLOWED_SCHEMES  # URL schemes flash_url may fetch
    compute: str = "fp32"  # engine.precision: the flashed engine is self-tested, and then run, at it


@dataclass
class FlashResult:
    slot: Path
    manifest: Manifest
    self_test: dict[str, Any]
    opened: OpenedEngine | None = field(default=None, repr=False)


def fetch(url: str, sha256: str | None, dest: Path, max_bytes: int, schemes: tuple[str, ...] = ALLOWED_SCHEMES) -> Path:
    """Download (or copy) ``url`` to ``dest``, refusing more than ``max_bytes``, a hash mismatch or
    a scheme not in ``schemes``."""
    scheme = urllib.parse.urlsplit(url).scheme or "file"
    if scheme not in schemes:
        hint = "; flash.allow_file_urls accepts local files" if scheme == "file" else ""
        raise BundleError(f"URL scheme '{scheme}' is not allowed (use {', '.join(schemes)}{hint})")
    h, size = hashlib.sha256(), 0
    try:
        if scheme == "file":
            path = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path) if "://" in url else url)
            if path.stat().st_size > max_bytes:
                raise BundleError(f"bundle is {path.stat().st_size} bytes, more than the {max_bytes}-byte limit")
            src: Any = open(path, "rb")  # noqa: SIM115 -- closed by the `with src` below
        else:
            src = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)
            length = src.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                src.close()
                raise BundleError(f"download is {length} bytes, more than the {max_bytes}-byte limit")
        with src, open(dest, "wb") as out:
            while block := src.read(1 << 20):
                size += len(block)
                if size > max_bytes:  # a server may lie about or omit Content-Length
                    raise BundleError(f"download exceeds the {max_bytes}-byte limit; stopped")
                h.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
    except BundleError:
        dest.unlink(missing_ok=True)
        raise
    except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
        dest.unlink(missing_ok=True)
        raise BundleError(f"cannot fetch {url}: {e}") from e
    if sha256 is not None and h.hexdigest() != sha256.lower():
        dest.unlink(missing_ok=True)
        raise BundleError(f"downloaded file's sha256 {h.hexdigest()} is not the {sha256} requested")
    return dest


def self_test(opened: OpenedEngine, slot: Path, manifest: Manifest) -> dict[str, Any]:
    """Run the engine on the bundle's reference frame; BundleError when it misses the expectation."""
    ref = manifest.reference
    frame = Frame(read_image(slot / ref.file), source=ref.file)
    result = HostPipeline(opened.engine)(frame)
    m, det = result.measurement, result.detections
    found = _matched_fraction(np.asarray(ref.boxes, dtype=np.float64).reshape(-1, 4), det.boxes, ref.box_iou)
    report = {
        "count": m.count,
        "expected_count": ref.count,
        "confluence_pct": round(m.confluence_pct, 4),
        "expected_confluence_pct": ref.confluence_pct,
        "boxes_found": round(found, 4),
        "infer_ms": round(m.latencies_ms.get("infer", 0.0), 2),
    }
    problems = []
    if abs(m.count - ref.count) > ref.count_tolerance:
        problems.append(f"{m.count} cells, expected {ref.count} ± {ref.count_tolerance}")
    if abs(m.confluence_pct - ref.confluence_pct) > ref.confluence_tolerance_pp:
        problems.append(
            f"confluence {m.confluence_pct:.2f}%, expected {ref.confluence_pct:.2f} ± {ref.confluence_tolerance_pp} pp"
        )
    if found < ref.box_match_fraction:
        problems.append(f"{found:.0%} of the expected cells found, at least {ref.box_match_fraction:.0%} required")
    if problems:
        raise BundleError("self-test on the reference frame failed: " + "; ".join(problems))
    return report


def _matched_fraction(expected: np.ndarray[Any, Any], found: np.ndarray[Any, Any], iou: float) -> float:
    if len(expected) == 0:
        return 1.0
    if len(found) == 0:
        return 0.0
    f = found.astype(np.float64)
    x0 = np.maximum(expected[:, None, 0], f[None, :, 0])
    y0 = np.maximum(expected[:, None, 1], f[None, :, 1])
    x1 = np.minimum(expected[:, None, 2], f[None, :, 2])
    y1 = np.minimum(expected[:, None, 3], f[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_e = (expected[:, 2] - expected[:, 0]) * (expected[:, 3] - expected[:, 1])
    area_f = (f[:, 2] - f[:, 0]) * (f[:, 3] - f[:, 1])
    ious = inter / np.maximum(area_e[:, None] + area_f[None, :] - inter, 1e-9)
    return float((ious.max(axis=1) >= iou).mean())


def install(bundle_path: Path, store: SlotStore, settings: FlashSettings, keep_engine: bool = False) -> FlashResult:
    """Verify, check, unpack and self-test a bundle file into a new slot (not yet active).

    Call with the store's lock held. With ``keep_engine`` the self-tested engine stays loaded in
    the result for the caller to run; otherwise it is closed.
    """
    verified = open_bundle(bundle_path, settings.trusted_keys)
    manifest = verified.manifest
    check_compatible(manifest.engine, settings.facts)
    try:  # before unpacking anything: the same rule open_engine applies
        choose_backend(manifest.engine.kind, settings.backend, f"bundle {manifest.name}")
    except ConfigError as e:
        raise BundleError(str(e)) from e
    partial = store.new_partial()
    try:
        extract_verified(verified, partial)
        try:
            opened = open_engine(partial, settings.backend, settings.threads, compute=settings.compute)
        except BundleError:
            raise
        except Exception as e:  # a plan or model the runtime rejects is a refusal, not a crash
            raise BundleError(f"engine does not load: {e}") from e
        try:
            report = self_test(opened, partial, manifest)
        except Exception:
            opened.engine.close()
            raise
        if not keep_engine:
            opened.engine.close()
        label = manifest.engine.kind + "-" + manifest.engine.precision
        slot = store.commit(partial, label)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # The engine was loaded from the partial folder's path; it now lives under the slot's name.
    kept = OpenedEngine(opened.engine, opened.backend, slot, manifest) if keep_engine else None
    logger.info("installed %s into slot %s (self-test: %s)", manifest.name, slot.name, report)
    return FlashResult(slot, manifest, report, kept)


def flash_file(bundle_path: Path, store: SlotStore, settings: FlashSettings, keep_engine: bool = False) -> FlashResult:
    """``cellseg flash BUNDLE``: install and activate."""
    with store.locked():
        result = install(bundle_path, store, settings, keep_engine=keep_engine)
        store.activate(result.slot)
        store.remove_unused()
    return result


def flash_url(
    url: str, sha256: str | None, store: SlotStore, settings: FlashSettings, keep_engine: bool = False
) -> FlashResult:
    """Fetch, install and activate; the download is removed afterwards either way."""
    with store.locked():
        dest = store.incoming / f"{os.getpid()}-{hashlib.sha256(url.encode()).hexdigest()[:12]}.bundle"
        try:
            fetch(url, sha256, dest, settings.max_bytes, settings.schemes)
            result = install(dest, store, settings, keep_engine=keep_engine)
        finally:
            dest.unlink(missing_ok=True)
        try:
            store.activate(result.slot)
            store.remove_unused()
        except BaseException:
            if result.opened is not None:
                result.opened.engine.close()
            raise
    return result


def store_for(state_dir: Path) -> SlotStore:
    return SlotStore(state_dir / "engines")


def settings_for(config: Config, facts: DeviceFacts | None = None, *, remote: bool = False) -> FlashSettings:
    """Flash settings from the device configuration (keys, size limit, backend). ``remote``: for a
    flash requested over MQTT, which fetches file:// URLs only when the configuration allows it."""
    schemes: tuple[str, ...] = ALLOWED_SCHEMES
    if remote:
        schemes = REMOTE_SCHEMES + (("file",) if config.flash.allow_file_urls else ())
    return FlashSettings(
        trusted_keys=load_trusted_keys(list(config.flash.trusted_keys)),
        max_bytes=int(config.flash.max_download_mb * 1024 * 1024),
        facts=facts or DeviceFacts.detect(),
        backend=config.engine.backend,
        threads=config.engine.threads,
        schemes=schemes,
        compute=config.engine.precision,
    )
