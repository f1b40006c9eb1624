"""The device daemon: source -> preprocess -> engine -> postprocess -> measure -> spool -> MQTT.

Capture runs in its own thread and hands frames over a small queue (file sources block rather
than drop); publishing runs in the publisher's threads; the inference loop in between measures
one frame at a time. Every measurement is written to the durable spool, in one transaction with
its sequence number and (for watched files) the file's done-mark, before anything is published.

SIGTERM finishes the frame in hand, flushes what the broker will take and exits 0; systemd is
told READY, STATUS, WATCHDOG and STOPPING (see :mod:`cellseg.edge.sdnotify`).

The watchdog is fed from the inference loop and only while no other part is stalled
(:mod:`cellseg.edge.liveness`): a capture, MQTT network or sender thread that dies or hangs
stops the pings, and systemd restarts the service. Run without a watchdog (from a shell), the
daemon instead stops with exit status 1 when a part stalls, so nothing lingers half-alive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellseg import __version__
from cellseg.edge.capture import Source, SourceFrame
from cellseg.edge.capture.files import FolderSource, ImageListSource
from cellseg.edge.capture.video import VideoFileSource, live_source
from cellseg.edge.commands import Command, CommandError, FlashRequest, SnapshotRequest, parse_command, reply
from cellseg.edge.config import Config
from cellseg.edge.engine_select import OpenedEngine, configured_candidates, open_engine, open_first, predictor_for
from cellseg.edge.errors import CellsegError, ConfigError
from cellseg.edge.flash import FlashResult, flash_url, settings_for, store_for
from cellseg.edge.gpu_predictor import GpuPredictor
from cellseg.edge.liveness import Liveness
from cellseg.edge.measure import measurement_to_dict
from cellseg.edge.overlay import draw_overlay
from cellseg.edge.predictor import Predictor
from cellseg.edge.publisher import SCHEMA, MqttPublisher
from cellseg.edge.sdnotify import Notifier
from cellseg.edge.slots import SlotStore
from cellseg.edge.spool import Spool, SpoolFullError

logger = logging.getLogger(__name__)

_END = object()  # the source is exhausted
CAPTURE = "capture"
# Parts may stay silent this long when no watchdog period says otherwise (run from a shell).
DEFAULT_MAX_SILENCE_S = 60.0


def make_source(config: Config, is_done: Callable[[str], bool]) -> Source:
    s = config.source
    if s.kind == "folder" and s.path is not None:
        return FolderSource(s.path, pattern=s.pattern, is_done=is_done, loop=s.loop, max_pixels=s.max_pixels)
    if s.kind == "images":
        return ImageListSource(s.images, loop=s.loop, max_pixels=s.max_pixels)
    if s.kind == "video" and s.path is not None:
        return VideoFileSource(s.path, loop=s.loop)
    if s.kind in ("v4l2", "rtsp", "csi"):
        return live_source(s.kind, device=s.device, url=s.url, pipeline=s.pipeline, width=s.width, height=s.height)
    raise ConfigError(f"source kind '{s.kind}' is missing its settings")


class Daemon:
    """Runs the pipeline until stopped (or until a finite source is exhausted).

    Args:
        config: the validated configuration.
        notifier: systemd notifications (default: from the environment).
        echo: called with each measurement's JSON object (``cellseg demo`` prints them).
    """

    def __init__(
        self, config: Config, notifier: Notifier | None = None, echo: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.echo = echo
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.exit_code = 0
        self.liveness = Liveness()
        self.max_silence_s = self.notifier.watchdog_s or DEFAULT_MAX_SILENCE_S
        self._stall_reported: list[str] = []
        self.started = time.monotonic()
        self.measured = 0
        self.last_error = ""
        self._commands: queue.Queue[Command] = queue.Queue(maxsize=100)
        self._last: tuple[Any, Any, int] | None = None  # (frame, result, seq) of the latest measurement
        self._opened: OpenedEngine | None = None
        self._predictor: Predictor | GpuPredictor | None = None
        self._active_target: str | None = None  # the slot link the running engine came from
        self._flash_thread: threading.Thread | None = None
        # A finished cmd/flash: (request id, result or refusal), for the loop to act on between frames.
        self._flashed: queue.Queue[tuple[str | None, FlashResult | str]] = queue.Queue()
        self.last_flash: dict[str, Any] = {}

    def request_stop(self, *_: object) -> None:
        self.stop_requested.set()

    def request_reload(self, *_: object) -> None:
        """SIGHUP or the reload command: finish the frame, stop, and let the caller start anew."""
        self.reload_requested.set()
        self.stop_requested.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    def run(self) -> int:
        c = self.config
        spool = Spool(c.spool.path or c.state_dir / "spool.sqlite", c.spool.max_messages, c.spool.when_full)
        store = store_for(c.state_dir)
        removed = store.clean()
        if removed:
            logger.info("removed unfinished or superseded engine files: %s", ", ".join(removed))
        self._load_engine(store)
        publisher = None
        if c.mqtt.enabled:
            client_id = c.mqtt.client_id or f"cellseg-{c.device_id}"
            publisher = MqttPublisher(c.mqtt, c.topic_prefix, client_id, spool, liveness=self.liveness,
                                      max_silence_s=self.max_silence_s)  # fmt: skip
            publisher.on_command = lambda name, payload: self._accept_command(publisher, name, payload)
            publisher.start()
        source = make_source(c, spool.is_done)
        source.heartbeat = self.liveness.beater(CAPTURE)
        frames: queue.Queue[Any] = queue.Queue(maxsize=2)
        capture = threading.Thread(target=self._capture, args=(source, frames), name=CAPTURE, daemon=True)
        self.liveness.register(CAPTURE, self.max_silence_s, capture)
        capture.start()
        self.notifier.ready(f"measuring from {source.name}")
        topic = f"{c.topic_prefix}/measurement"
        next_due = 0.0
        try:
            while not self.stop_requested.is_set():
                self._ping()
                self._swap_engine_if_flashed(store, publisher, spool)
                if publisher is not None:
                    self._run_commands(publisher, store)
                # Wait for the interval before taking a frame, so a live source's is fresh, and in
                # short slices, so the watchdog keeps hearing from us.
                wait = next_due - time.monotonic()
                if wait > 0:
                    self.stop_requested.wait(min(wait, self.notifier.ping_interval_s))
                    continue
                try:
                    item = frames.get(timeout=self.notifier.ping_interval_s)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                sf: SourceFrame = item
                next_due = time.monotonic() + c.source.interval_s
                self._measure(sf, spool=spool, publisher=publisher, topic=topic)
        finally:
            if self.reload_requested.is_set():
                self.notifier.send("RELOADING=1")  # READY=1 follows when the new config runs
            else:
                self.notifier.stopping()
            source.stop()
            if self._flash_thread is not None:
                self._flash_thread.join()
                self._close_flashed()
            if publisher is not None:
                self._publish_state(publisher, spool)
                publisher.stop()
            if self._opened is not None:
                self._opened.engine.close()
            spool.close()
        return self.exit_code

    def _ping(self) -> None:
        """Feed the watchdog, unless a part has stalled: then say which, once, and let systemd
        restart the service (or, without a watchdog, stop with exit status 1)."""
        stalled = self.liveness.stalled()
        if not stalled:
            if self._stall_reported:
                logger.warning("all parts make progress again")
                self._stall_reported = []
            self.notifier.watchdog()
            return
        if sorted(stalled) != self._stall_reported:  # said once per set of stalled parts
            self._stall_reported = sorted(stalled)
            self.last_error = "stalled: " + "; ".join(f"{name}: {why}" for name, why in sorted(stalled.items()))
            logger.error("%s; no more watchdog pings, so that the service is restarted", self.last_error)
            self.notifier.status(self.last_error)
        if self.notifier.watchdog_s is None:
            self.exit_code = 1
            self.request_stop()

    # -- engines ---------------------------------------------------------------------------

    def _load_engine(self, store: SlotStore) -> None:
        """The active flashed slot, else the previous one, else the configured model."""
        c = self.config
        opened, target, errors = open_first(
            configured_candidates(store, c.fallback_model), c.engine.backend, c.engine.threads
        )
        self._use(opened, target if target is not None else store.active_target())
        if errors:
            self.last_error = "fell back to another engine: " + "; ".join(errors)

    def _use(self, opened: OpenedEngine, target: str | None) -> None:
        old = self._opened
        try:
            predictor = predictor_for(opened, self.config)
        except Exception as e:  # e.g. the CUDA kernels do not compile: keep what runs now
            opened.engine.close()
            raise ConfigError(f"cannot run {opened.path}: {type(e).__name__}: {e}") from e
        self._predictor = predictor
        self._opened = opened
        self._active_target = target
        if old is not None:
            old.engine.close()
        logger.info("engine: %s", opened.describe())

    def _swap_engine_if_flashed(self, store: SlotStore, publisher: MqttPublisher | None, spool: Spool) -> None:
        """Between frames: take over a flashed engine (ours, or one `cellseg flash` activated)."""
        try:
            request_id, outcome = self._flashed.get_nowait()
        except queue.Empty:
            request_id, outcome = None, None
        if isinstance(outcome, FlashResult):
            assert outcome.opened is not None
            try:
                self._use(outcome.opened, store.active_target())
            except CellsegError as e:
                outcome = f"flashed slot {outcome.slot.name} is active on disk but cannot run here: {e}"
                self.last_error = outcome
                logger.error("%s", outcome)
        if isinstance(outcome, FlashResult):
            assert outcome.opened is not None
            self.last_flash = {"ok": True, "slot": outcome.slot.name, "bundle": outcome.manifest.name}
            if publisher is not None:
                publisher.publish_reply(
                    "flash",
                    reply(
                        request_id,
                        True,
                        slot=outcome.slot.name,
                        engine_id=outcome.opened.engine.engine_id,
                        precision=outcome.opened.engine.precision,
                        self_test=outcome.self_test,
                    ),
                )
                self._publish_state(publisher, spool)
            return
        if isinstance(outcome, str):
            self.last_flash = {"ok": False, "error": outcome}
            if publisher is not None:
                publisher.publish_reply("flash", reply(request_id, False, outcome))
                self._publish_state(publisher, spool)
            return
        target = store.active_target()
        if target == self._active_target or (self._flash_thread is not None and self._flash_thread.is_alive()):
            return
        # Another process flashed or rolled back: load the slot now active, keep ours if it fails.
        slot = store.active()
        if slot is None:
            self._active_target = target
            return
        try:
            self._use(open_engine(slot, self.config.engine.backend, self.config.engine.threads), target)
            self.last_flash = {"ok": True, "slot": slot.name, "by": "cellseg flash"}
        except CellsegError as e:
            self._active_target = target  # do not retry every frame; the error stays reported
            self.last_error = f"newly active engine {slot.name} does not load, keeping the running one: {e}"
            logger.error("%s", self.last_error)
        if publisher is not None:
            self._publish_state(publisher, spool)

    def _start_flash(self, publisher: MqttPublisher, store: SlotStore, request: FlashRequest) -> None:
        if self._flash_thread is not None and self._flash_thread.is_alive():
            publisher.publish_reply("flash", reply(request.id, False, "a flash is already in progress"))
            return
        try:
            settings = settings_for(self.config, remote=True)
        except CellsegError as e:
            publisher.publish_reply("flash", reply(request.id, False, str(e)))
            return

        def work() -> None:
            try:
                result = flash_url(request.url, request.sha256, store, settings, keep_engine=True)
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

    def _close_flashed(self) -> None:
        """At stop: an engine flashed but not yet swapped in is closed (its slot is active on disk)."""
        while True:
            try:
                _, outcome = self._flashed.get_nowait()
            except queue.Empty:
                return
            if isinstance(outcome, FlashResult) and outcome.opened is not None:
                outcome.opened.engine.close()

    def _capture(self, source: Source, frames: queue.Queue[Any]) -> None:
        try:
            for sf in source.frames():
                if source.live:
                    # Live sources keep only the freshest frame: replace what waits in the queue.
                    with contextlib.suppress(queue.Empty):
                        frames.get_nowait()
                while not self.stop_requested.is_set():
                    source.heartbeat()  # waiting for the inference loop is progress, not a stall
                    try:
                        frames.put(sf, timeout=0.5)  # blocks: file sources never drop a frame
                        break
                    except queue.Full:
                        continue
                if self.stop_requested.is_set():
                    self.liveness.unregister(CAPTURE)
                    return
        except Exception as e:  # the daemon must outlive its source; report and end the source
            self.last_error = f"source {source.name} failed: {e}"
            logger.exception("%s", self.last_error)
        # An ending this thread chose is not a stall; only a death by anything else stays watched.
        self.liveness.unregister(CAPTURE)
        frames.put(_END)

    def _measure(
        self,
        sf: SourceFrame,
        *,
        spool: Spool,
        publisher: MqttPublisher | None,
        topic: str,
    ) -> None:
        predictor = self._predictor
        assert predictor is not None
        precision = predictor.engine.precision
        overlay = self.config.overlay
        # Decided before measuring: the GPU predictor copies masks back only for overlay frames.
        overlay_due = overlay.dir is not None and (self.measured + 1) % overlay.every_n == 0
        try:
            result = predictor(sf.frame, want_masks=overlay_due)
        except CellsegError as e:
            self.last_error = f"{sf.frame.source}: {e}"
            logger.error("%s", self.last_error)
            return
        except Exception as e:  # one frame that trips a bug must not end months of measuring
            self.last_error = f"{sf.frame.source}: unexpected {type(e).__name__}: {e}"
            logger.exception("%s", self.last_error)
            return
        record = measurement_to_dict(result.measurement)
        record.update(schema=SCHEMA, precision=precision)

        def payload(seq: int) -> bytes:
            record["seq"] = seq
            return json.dumps(record).encode()

        while True:
            try:
                _, seq = spool.put_measurement(topic, payload, done_key=sf.done_key)
                break
            except SpoolFullError as e:
                # Policy stop_measuring: hold this measurement until the broker drains the spool.
                self.last_error = str(e)
                logger.warning("%s; waiting for the broker to take the backlog", e)
                self._ping()
                if self.stop_requested.wait(1.0):
                    return
        self.measured += 1
        if publisher is not None:
            publisher.notify_spooled()
            publisher.publish_retained("count", str(record["count"]))
            publisher.publish_retained("confluence", f"{record['confluence_pct']:.4f}")
            if self.measured % 10 == 1:
                self._publish_state(publisher, spool)
        if overlay_due and overlay.dir is not None:
            import cv2

            overlay.dir.mkdir(parents=True, exist_ok=True)
            assert result.detections is not None  # asked for above
            picture = draw_overlay(sf.frame, result.detections, result.measurement, predictor.engine.info.mapping)
            cv2.imwrite(str(overlay.dir / f"{Path(sf.frame.source).stem}.png"), picture)
        self._last = (sf.frame, result, seq)
        if self.echo is not None:
            self.echo(record)
        self.notifier.status(f"{self.measured} measured; last {record['count']} cells, {record['confluence_pct']:.1f}%")

    def _accept_command(self, publisher: MqttPublisher, name: str, payload: bytes) -> None:
        """Paho's thread: validate, answer bad commands at once, queue good ones for the loop."""
        try:
            command = parse_command(name, payload)
            self._commands.put_nowait(command)
        except CommandError as e:
            logger.warning("refused command %.64s: %s", name, e)
            publisher.publish_reply(name, reply(e.request_id, False, str(e)))
        except queue.Full:
            publisher.publish_reply(name, reply(None, False, "too many commands waiting; try again"))
        except Exception as e:  # a bug here must still answer, and never reach the network loop
            logger.exception("command %.64s failed", name)
            publisher.publish_reply(name, reply(None, False, f"internal error: {type(e).__name__}"))

    def _run_commands(self, publisher: MqttPublisher, store: SlotStore) -> None:
        """Between frames, so a command never races the measuring."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command.name == "snapshot" and isinstance(command.request, SnapshotRequest):
                self._snapshot(publisher, command.request)
            elif command.name == "flash" and isinstance(command.request, FlashRequest):
                self._start_flash(publisher, store, command.request)
            elif command.name == "reload":
                publisher.publish_reply("reload", reply(command.request.id, True, note="reloading the configuration"))
                self.request_reload()

    def _snapshot(self, publisher: MqttPublisher, request: SnapshotRequest) -> None:
        import cv2

        predictor = self._predictor
        if self._last is None or predictor is None:
            publisher.publish_reply("snapshot", reply(request.id, False, "no frame measured yet"))
            return
        frame, result, seq = self._last
        detections = result.detections
        if detections is None:  # the masks stayed on the GPU: run the frame again for them
            detections = predictor(frame, want_masks=True).detections
        picture = draw_overlay(frame, detections, result.measurement, predictor.engine.info.mapping)
        ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, request.quality])
        if not ok:
            publisher.publish_reply("snapshot", reply(request.id, False, "JPEG encoding failed"))
            return
        publisher.publish_snapshot(jpeg.tobytes())
        publisher.publish_reply("snapshot", reply(request.id, True, seq=seq, bytes=len(jpeg)))

    def _publish_state(self, publisher: MqttPublisher, spool: Spool) -> None:
        uptime = time.monotonic() - self.started
        engine: dict[str, Any] = {}
        if self._opened is not None:
            e = self._opened.engine
            engine = {"id": e.engine_id, "backend": self._opened.backend, "precision": e.precision,
                      "slot": self._opened.path.name if self._opened.manifest else None,
                      "model": str(self._opened.path)}  # fmt: skip
        state = {
            "schema": SCHEMA,
            "version": __version__,
            "engine": engine,
            "last_flash": self.last_flash,
            "uptime_s": round(uptime, 1),
            "measured": self.measured,
            "fps": round(self.measured / uptime, 4) if uptime > 0 else 0.0,
            "spool_depth": spool.depth(),
            "spool_dropped": spool.dropped(),
            "last_error": self.last_error or publisher.last_error,
        }
        publisher.publish_retained("state", json.dumps(state))
