"""The daemon's engine: which one runs, and swapping it between frames.

At start the active flashed slot runs, else the previous one, else the configured model. A flash
(``cmd/flash``) verifies, unpacks and self-tests the new engine in a thread of its own; the frame
loop then swaps it in between two frames (:meth:`EngineKeeper.swap_if_flashed`), so a frame is
never measured half by one engine and half by another. A slot another process activated
(``cellseg flash`` from a shell, a rollback) is picked up the same way. A flashed engine that
cannot run here leaves the running one in place; the reason is reported.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cellseg.edge.bundles.engine_select import (
    OpenedEngine,
    configured_candidates,
    open_engine,
    open_first,
    pipeline_for,
)
from cellseg.edge.bundles.flash import FlashResult, flash_url, settings_for, store_for
from cellseg.edge.bundles.slots import SlotStore
from cellseg.edge.config import Config
from cellseg.edge.engines.registry import BACKENDS, Backend
from cellseg.edge.errors import CellsegError, ConfigError, ModelError
from cellseg.edge.pipeline.contract import Pipeline
from cellseg.edge.service.commands import FlashRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Running:
    """The engine in use, the pipeline around it, and the slot link it came from (None for the
    configured model)."""

    opened: OpenedEngine
    pipeline: Pipeline
    target: str | None

    def describe(self) -> dict[str, Any]:
        """The ``engine`` entry of the state payload."""
        opened, e = self.opened, self.opened.engine
        return {"id": e.engine_id, "backend": opened.backend.name, "precision": e.precision,
                "slot": opened.path.name if opened.manifest else None, "model": str(opened.path)}  # fmt: skip


@dataclass(frozen=True)
class FlashOutcome:
    """What a swap attempt has to report: to the flash's requester when it came over MQTT
    (``from_command``: ``request_id``, ``ok``, ``error``, and ``reply``'s extra fields), and in the
    state (``last_flash``, None to leave it as it was)."""

    request_id: str | None
    ok: bool
    error: str
    reply: dict[str, Any]
    last_flash: dict[str, Any] | None
    from_command: bool


class EngineKeeper:
    """Owns the running engine; call its methods from the frame loop's thread only (the flash
    worker hands its result over a queue).

    Args:
        config: the validated configuration.
        backends: the backend table (default: every built-in backend).
    """

    def __init__(self, config: Config, backends: Mapping[str, Backend] = BACKENDS) -> None:
        self.config = config
        self.backends = backends
        self.store: SlotStore = store_for(config.state_dir)
        self.last_error = ""
        self._running: Running | None = None
        self._flash_thread: threading.Thread | None = None
        # A finished cmd/flash: (request id, result or refusal), for the loop to act on between frames.
        self._flashed: queue.Queue[tuple[str | None, FlashResult | str]] = queue.Queue()

    @property
    def running(self) -> Running:
        if self._running is None:
            raise ModelError("no engine is loaded (call load() first)")
        return self._running

    def load(self) -> None:
        """The active flashed slot, else the previous one, else the configured model."""
        removed = self.store.clean()
        if removed:
            logger.info("removed unfinished or superseded engine files: %s", ", ".join(removed))
        c = self.config
        opened, target, errors = open_first(configured_candidates(self.store, c.fallback_model), c.engine.backend,
                                            c.engine.threads, self.backends, compute=c.engine.precision)  # fmt: skip
        self._use(opened, target if target is not None else self.store.active_target())
        if errors:
            self.last_error = "fell back to another engine: " + "; ".join(errors)

    def _use(self, opened: OpenedEngine, target: str | None) -> None:
        old = self._running
        try:
            pipeline = pipeline_for(opened, self.config)
        except Exception as e:  # e.g. the CUDA kernels do not compile: keep what runs now
            opened.engine.close()
            raise ConfigError(f"cannot run {opened.path}: {type(e).__name__}: {e}") from e
        self._running = Running(opened, pipeline, target)
        if old is not None:
            old.opened.engine.close()
        logger.info("engine: %s", opened.describe())

    def start_flash(self, request: FlashRequest) -> str | None:
        """Start flashing ``request``'s bundle in the background; the refusal, when it cannot start."""
        if self.flashing():
            return "a flash is already in progress"
        try:
            settings = settings_for(self.config, remote=True)
        except CellsegError as e:
            return str(e)

        def work() -> None:
            try:
                result = flash_url(request.url, request.sha256, self.store, settings, keep_engine=True)
                self._flashed.put((request.id, result))
            except CellsegError as e:
                logger.error("flash of %s refused: %s", request.url, e)
                self._flashed.put((request.id, str(e)))
            except Exception as e:  # a bug in flashing must not take the measuring down
                logger.exception("flash of %s failed", request.url)
                self._flashed.put((request.id, f"unexpected {type(e).__name__}: {e}"))

        logger.warning("flashing %s", request.url)
        self._flash_thread = threading.Thread(target=work, name="flash", daemon=True)
        self._flash_thread.start()
        return None

    def flashing(self) -> bool:
        return self._flash_thread is not None and self._flash_thread.is_alive()

    def swap_if_flashed(self) -> FlashOutcome | None:
        """Between frames: take over a flashed engine (ours, or one ``cellseg flash`` activated);
        what to report, or None when nothing changed."""
        try:
            request_id, outcome = self._flashed.get_nowait()
        except queue.Empty:
            return self._follow_the_active_slot()
        if isinstance(outcome, str):
            return FlashOutcome(request_id, False, outcome, {}, {"ok": False, "error": outcome}, True)
        try:
            if outcome.opened is None:  # flashed without keeping the engine: nothing to swap in
                raise ModelError("it came without its loaded engine")
            self._use(outcome.opened, self.store.active_target())
        except CellsegError as e:
            error = f"flashed slot {outcome.slot.name} is active on disk but cannot run here: {e}"
            self.last_error = error
            logger.error("%s", error)
            return FlashOutcome(request_id, False, error, {}, {"ok": False, "error": error}, True)
        engine = self.running.opened.engine
        return FlashOutcome(
            request_id, True, "",
            {"slot": outcome.slot.name, "engine_id": engine.engine_id, "precision": engine.precision,
             "self_test": outcome.self_test},
            {"ok": True, "slot": outcome.slot.name, "bundle": outcome.manifest.name},
            True,
        )  # fmt: skip

    def _follow_the_active_slot(self) -> FlashOutcome | None:
        """Another process flashed or rolled back: load the slot now active, keep ours if it fails."""
        target = self.store.active_target()
        if target == self.running.target or self.flashing():
            return None
        slot = self.store.active()
        if slot is None:
            self._running = Running(self.running.opened, self.running.pipeline, target)
            return None
        c = self.config
        try:
            self._use(open_engine(slot, c.engine.backend, c.engine.threads, self.backends, compute=c.engine.precision),
                      target)  # fmt: skip
        except CellsegError as e:
            # Do not retry every frame; the error stays reported.
            self._running = Running(self.running.opened, self.running.pipeline, target)
            self.last_error = f"newly active engine {slot.name} does not load, keeping the running one: {e}"
            logger.error("%s", self.last_error)
            return FlashOutcome(None, False, self.last_error, {}, None, False)
        last = {"ok": True, "slot": slot.name, "by": "cellseg flash"}
        return FlashOutcome(None, True, "", {}, last, False)

    def close(self) -> None:
        """At stop: wait for a flash in progress, close an engine flashed but not yet swapped in
        (its slot is active on disk, and runs at the next start), then the running one."""
        if self._flash_thread is not None:
            self._flash_thread.join()
        while True:
            try:
                _, outcome = self._flashed.get_nowait()
            except queue.Empty:
                break
            if isinstance(outcome, FlashResult) and outcome.opened is not None:
                outcome.opened.engine.close()
        if self._running is not None:
            self._running.opened.engine.close()
            self._running = None
