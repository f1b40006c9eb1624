"""Engine slots on the device: where flashed bundles live, which one is active, and rollback.

Layout under ``<state_dir>/engines``::

    slots/<name>/        one complete, verified bundle each (manifest, signature, files)
    slots/.partial-*     a bundle being unpacked; never active, removed by clean()
    incoming/            downloads in progress
    active  -> slots/<name>   the engine the daemon runs
    previous -> slots/<name>  the one before, for rollback
    .lock                held while a flash or rollback changes anything

Power-cut safety: a slot is unpacked into a ``.partial-`` folder, every file fsynced, then
renamed to its final name (atomic) and the folder fsynced; ``active`` is switched by writing a
new symlink beside it and renaming it over the old one (atomic), then fsyncing the folder. At
every instant ``active`` names either the old complete slot or the new complete slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from cellseg.edge.errors import SlotError

logger = logging.getLogger(__name__)

ACTIVE = "active"
PREVIOUS = "previous"
PARTIAL_PREFIX = ".partial-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SlotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.slots = root / "slots"
        self.incoming = root / "incoming"

    def ensure(self) -> None:
        for d in (self.root, self.slots, self.incoming):
            d.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across processes (the daemon and ``cellseg flash`` may both flash)."""
        self.ensure()
        with open(self.root / ".lock", "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except OSError:
            return None
        slot = (self.root / target).resolve()
        return slot if slot.is_dir() else None

    def active(self) -> Path | None:
        """The active slot's folder, or None (no flashed engine: the configured model runs)."""
        return self._link(ACTIVE)

    def previous(self) -> Path | None:
        return self._link(PREVIOUS)

    def active_target(self) -> str | None:
        """The raw link text: cheap to poll for changes made by another process."""
        try:
            return os.readlink(self.root / ACTIVE)
        except OSError:
            return None

    def new_partial(self) -> Path:
        self.ensure()
        partial = self.slots / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}"
        partial.mkdir()
        return partial

    def commit(self, partial: Path, label: str) -> Path:
        """Give a fully written partial slot its final name; returns the slot folder."""
        _fsync_dir(partial)
        name = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{label}-{uuid.uuid4().hex[:6]}"
        slot = self.slots / name
        os.rename(partial, slot)
        _fsync_dir(self.slots)
        return slot

    def _set_link(self, name: str, slot: Path) -> None:
        tmp = self.root / f".{name}.{uuid.uuid4().hex[:8]}"
        os.symlink(os.path.relpath(slot, self.root), tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def activate(self, slot: Path) -> None:
        """Make ``slot`` active; the slot active until now becomes ``previous``. Hold the lock."""
        current = self.active()
        if current is not None and current != slot.resolve():
            self._set_link(PREVIOUS, current)
        self._set_link(ACTIVE, slot)
        logger.info("active engine slot: %s", slot.name)

    def rollback(self) -> Path:
        """Swap ``active`` and ``previous``; returns the slot now active."""
        with self.locked():
            previous, current = self.previous(), self.active()
            if previous is None:
                raise SlotError("no previous engine slot to roll back to")
            self._set_link(ACTIVE, previous)
            if current is not None:
                self._set_link(PREVIOUS, current)
            return previous

    def clean(self) -> list[str]:
        """Remove partial slots, unfinished downloads and slots neither active nor previous."""
        if not self.slots.is_dir():
            return []
        with self.locked():
            return self.remove_unused()

    def remove_unused(self) -> list[str]:
        """clean() for a caller that already holds the lock (a flash, after activating)."""
        removed: list[str] = []
        keep = {p for p in (self.active(), self.previous()) if p is not None}
        for entry in self.slots.iterdir():
            if entry.resolve() not in keep:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        for entry in self.incoming.iterdir():
            entry.unlink(missing_ok=True)
            removed.append(f"incoming/{entry.name}")
        for entry in self.root.iterdir():  # link temp files from an interrupted switch
            if entry.name.startswith((f".{ACTIVE}.", f".{PREVIOUS}.")):
                entry.unlink(missing_ok=True)
        return removed
