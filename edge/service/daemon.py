"""The device daemon: source -> preprocess -> engine -> postprocess -> measure -> spool -> MQTT.

Capture runs in its own thread and hands frames over a small queue (file sources block rather
than drop); publishing runs in the publisher's threads; the inference loop in between measures
one frame at a time. Every measurement is written to the durable spool, in one transaction with
its sequence number and (for watched files) the file's done-mark, before anything is published.

SIGTERM finishes the frame in hand, flushes what the broker will take and exits 0; systemd is
told READY, STATUS, WATCHDOG and STOPPING (see :mod:`cellseg.edge.service.sdnotify`).

The watchdog is fed from the inference loop and only while no other part is stalled
(:mod:`cellseg.edge.service.liveness`): a capture, MQTT network or sender thread that dies or hangs
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellseg.edge.capture import Source, SourceFrame
from cellseg.edge.capture.from_config import make_source
from cellseg.edge.config import Config
from cellseg.edge.engines.registry import BACKENDS, Backend
from cellseg.edge.errors import CellsegError, CommandError, SpoolFullError
from cellseg.edge.growth.tracker import GrowthTracker
from cellseg.edge.pipeline.contract import FrameResult
from cellseg.edge.pipeline.overlay import draw_overlay
from cellseg.edge.pipeline.types import Frame, Measurement
from cellseg.edge.service import contract
from cellseg.edge.service.commands import (
    Command,
    FlashRequest,
    GrowthPlotRequest,
    ReloadRequest,
    SnapshotRequest,
    parse_command,
)
from cellseg.edge.service.contract import (
    CONFLUENCE,
    COUNT,
    EVENT,
    GROWTH,
    GROWTH_PLOT,
    MEASUREMENT,
    SNAPSHOT,
    STATE,
    DaemonState,
    reply,
)
from cellseg.edge.service.engine_keeper import EngineKeeper
from cellseg.edge.service.liveness import Liveness
from cellseg.edge.service.publisher import MqttPublisher
from cellseg.edge.service.sdnotify import Notifier
from cellseg.edge.service.spool import Spool

logger = logging.getLogger(__name__)

_END = object()  # the source is exhausted
CAPTURE = "capture"
# Parts may stay silent this long when no watchdog period says otherwise (run from a shell).
DEFAULT_MAX_SILENCE_S = 60.0


@dataclass(frozen=True)
class _Measured:
    """The latest measurement, kept for snapshots."""

    frame: Frame
    result: FrameResult
    seq: int


@dataclass
class _Run:
    """What one run of the daemon works with, made in :meth:`Daemon.run`."""

    spool: Spool
    engines: EngineKeeper
    publisher: MqttPublisher | None
    growth: GrowthTracker | None


class Daemon:
    """Runs the pipeline until stopped (or until a finite source is exhausted).

    Args:
        config: the validated configuration.
        notifier: systemd notifications (default: from the environment).
        echo: called with each measurement's JSON object (``cellseg demo`` prints them).
        backends: the backend table (default: every built-in backend).
    """

    def __init__(
        self,
        config: Config,
        notifier: Notifier | None = None,
        echo: Callable[[dict[str, Any]], None] | None = None,
        backends: Mapping[str, Backend] = BACKENDS,
    ) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.echo = echo
        self.backends = backends
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()
        self.exit_code = 0
        self.liveness = Liveness()
        self.max_silence_s = self.notifier.watchdog_s or DEFAULT_MAX_SILENCE_S
        self._stall_reported: list[str] = []
        self.started = time.monotonic()
        self.measured = 0
        self.last_error = ""
        self.last_flash: dict[str, Any] = {}
        self._commands: queue.Queue[Command] = queue.Queue(maxsize=100)
        self._last: _Measured | None = None
        # The command table: each validated command's handler, run by the frame loop between frames.
        self._handlers: dict[type[Any], Callable[[_Run, MqttPublisher, Any], None]] = {
            SnapshotRequest: self._snapshot,
            FlashRequest: self._flash,
            ReloadRequest: self._reload,
            GrowthPlotRequest: self._growth_plot,
        }

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
        engines = EngineKeeper(c, self.backends)
        engines.load()
        self._take_error(engines)
        growth = GrowthTracker(c) if c.growth.enabled else None
        run = _Run(spool, engines, None, growth)
        if c.mqtt.enabled:
            client_id = c.mqtt.client_id or f"cellseg-{c.device_id}"
            publisher = MqttPublisher(c.mqtt, c.topic_prefix, client_id, spool, liveness=self.liveness,
                                      max_silence_s=self.max_silence_s,
                                      growth_series=growth.default_series if growth else None)  # fmt: skip
            publisher.on_command = lambda name, payload: self._accept_command(publisher, name, payload)
            publisher.start()
            run.publisher = publisher
        source = make_source(c.source, spool.is_done)
        source.heartbeat = self.liveness.beater(CAPTURE)
        frames: queue.Queue[Any] = queue.Queue(maxsize=2)
        capture = threading.Thread(target=self._capture, args=(source, frames), name=CAPTURE, daemon=True)
        self.liveness.register(CAPTURE, self.max_silence_s, capture)
        capture.start()
        self.notifier.ready(f"measuring from {source.name}")
        next_due = 0.0
        try:
            while not self.stop_requested.is_set():
                self._ping()
                self._swap_engine_if_flashed(run)
                if run.publisher is not None:
                    self._run_commands(run, run.publisher)
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
                self._measure(sf, run)
        finally:
            if self.reload_requested.is_set():
                self.notifier.send("RELOADING=1")  # READY=1 follows when the new config runs
            else:
                self.notifier.stopping()
            source.stop()
            if run.publisher is not None:
                self._publish_state(run, run.publisher)
            engines.close()
            if run.publisher is not None:
                run.publisher.stop()
            if growth is not None:
                growth.close()
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

    def _take_error(self, engines: EngineKeeper) -> None:
        if engines.last_error:
            self.last_error, engines.last_error = engines.last_error, ""

    def _swap_engine_if_flashed(self, run: _Run) -> None:
        """Between frames: a flashed engine swapped in (or refused), reported to whom it concerns."""
        outcome = run.engines.swap_if_flashed()
        self._take_error(run.engines)
        if outcome is None:
            return
        if outcome.last_flash is not None:
            self.last_flash = outcome.last_flash
        if run.publisher is None:
            return
        if outcome.from_command:
            run.publisher.publish_reply("flash", reply(outcome.request_id, outcome.ok, outcome.error, **outcome.reply))
        self._publish_state(run, run.publisher)

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

    def _measure(self, sf: SourceFrame, run: _Run) -> None:
        running = run.engines.running
        overlay = self.config.overlay
        # Decided before measuring: the CUDA pipeline copies masks back only for overlay frames.
        overlay_due = overlay.dir is not None and (self.measured + 1) % overlay.every_n == 0
        try:
            result = running.pipeline(sf.frame, want_masks=overlay_due)
        except CellsegError as e:
            self.last_error = f"{sf.frame.source}: {e}"
            logger.error("%s", self.last_error)
            return
        except Exception as e:  # one frame that trips a bug must not end months of measuring
            self.last_error = f"{sf.frame.source}: unexpected {type(e).__name__}: {e}"
            logger.exception("%s", self.last_error)
            return
        series = run.growth.series_of(result.measurement.source) if run.growth else None
        record = contract.measurement_payload(result.measurement, running.opened.engine.precision, series)
        seq = self._spool(run, record, sf.done_key)
        if seq is None:
            return
        self.measured += 1
        if run.publisher is not None:
            run.publisher.notify_spooled()
            run.publisher.publish_retained(COUNT, contract.count_payload(result.measurement))
            run.publisher.publish_retained(CONFLUENCE, contract.confluence_payload(result.measurement))
            if self.measured % 10 == 1:
                self._publish_state(run, run.publisher)
        if series is not None:
            self._grow(run, result.measurement, series)
        if overlay_due and overlay.dir is not None:
            import cv2

            overlay.dir.mkdir(parents=True, exist_ok=True)
            picture = draw_overlay(sf.frame, result.detections, result.measurement, running.opened.engine.info.mapping)
            cv2.imwrite(str(overlay.dir / f"{Path(sf.frame.source).stem}.png"), picture)
        self._last = _Measured(sf.frame, result, seq)
        if self.echo is not None:
            self.echo(record)
        self.notifier.status(f"{self.measured} measured; last {record['count']} cells, {record['confluence_pct']:.1f}%")

    def _grow(self, run: _Run, m: Measurement, series: str) -> None:
        """The measurement into its series' history, the refitted growth published (retained),
        and a passage-due event through the spool, so that it survives an outage."""
        if run.growth is None:
            return
        try:
            update = run.growth.observe(m, series)
        except CellsegError as e:
            self.last_error = f"growth of {m.source}: {e}"
            logger.error("%s", self.last_error)
            return
        except Exception as e:  # a fit that trips a bug must not stop the measuring
            self.last_error = f"growth of {m.source}: unexpected {type(e).__name__}: {e}"
            logger.exception("%s", self.last_error)
            return
        name = contract.safe_series(update.series)
        if update.passage_due_at is not None:
            event = contract.passage_due_event(update.series, update.passage_due_at, m.confluence_pct)
            run.spool.put(EVENT.under(self.config.topic_prefix), event.encode())
            logger.warning("series %s is due for passage (%.1f %% confluence)", update.series, m.confluence_pct)
        if run.publisher is not None:
            run.publisher.publish_retained(GROWTH, contract.growth_payload(update.series, update.fit), name)
            run.publisher.notify_spooled()

    def _spool(self, run: _Run, record: dict[str, Any], done_key: str | None) -> int | None:
        """Into the spool with the next sequence number (and the file's done-mark), in one
        transaction; the sequence number, or None when stopped while the spool was full."""

        def payload(seq: int) -> bytes:
            record["seq"] = seq
            return json.dumps(record).encode()

        topic = MEASUREMENT.under(self.config.topic_prefix)
        while True:
            try:
                _, seq = run.spool.put_measurement(topic, payload, done_key=done_key)
                return seq
            except SpoolFullError as e:
                # Policy stop_measuring: hold this measurement until the broker drains the spool.
                self.last_error = str(e)
                logger.warning("%s; waiting for the broker to take the backlog", e)
                self._ping()
                if self.stop_requested.wait(1.0):
                    return None

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

    def _run_commands(self, run: _Run, publisher: MqttPublisher) -> None:
        """Between frames, so a command never races the measuring."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            self._handlers[type(command.request)](run, publisher, command.request)

    def _reload(self, run: _Run, publisher: MqttPublisher, request: ReloadRequest) -> None:
        publisher.publish_reply("reload", reply(request.id, True, note="reloading the configuration"))
        self.request_reload()

    def _flash(self, run: _Run, publisher: MqttPublisher, request: FlashRequest) -> None:
        refusal = run.engines.start_flash(request)
        if refusal is not None:
            publisher.publish_reply("flash", reply(request.id, False, refusal))

    def _snapshot(self, run: _Run, publisher: MqttPublisher, request: SnapshotRequest) -> None:
        import cv2

        if self._last is None:
            publisher.publish_reply("snapshot", reply(request.id, False, "no frame measured yet"))
            return
        running = run.engines.running
        last = self._last
        detections = last.result.detections
        if detections.masks is None:  # the masks stayed on the GPU: run the frame again for them
            detections = running.pipeline(last.frame, want_masks=True).detections
        picture = draw_overlay(last.frame, detections, last.result.measurement, running.opened.engine.info.mapping)
        ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, request.quality])
        if not ok:
            publisher.publish_reply("snapshot", reply(request.id, False, "JPEG encoding failed"))
            return
        publisher.publish_picture(SNAPSHOT, jpeg.tobytes())
        publisher.publish_reply("snapshot", reply(request.id, True, seq=last.seq, bytes=len(jpeg)))

    def _growth_plot(self, run: _Run, publisher: MqttPublisher, request: GrowthPlotRequest) -> None:
        if run.growth is None:
            publisher.publish_reply("growth_plot", reply(request.id, False, "growth is off (growth.enabled: false)"))
            return
        series = request.series or run.growth.default_series
        try:
            drawn = run.growth.picture(series)
        except CellsegError as e:  # matplotlib missing: the reply says which extra brings it
            publisher.publish_reply("growth_plot", reply(request.id, False, str(e)))
            return
        if drawn is None:
            known = ", ".join(run.growth.history.series()) or "none yet"
            publisher.publish_reply("growth_plot", reply(request.id, False, f"no measurements in series {series!r} "
                                                         f"(series: {known})"))  # fmt: skip
            return
        png, points = drawn
        publisher.publish_picture(GROWTH_PLOT, png, contract.safe_series(series))
        publisher.publish_reply("growth_plot", reply(request.id, True, series=series, bytes=len(png), points=points))

    def _publish_state(self, run: _Run, publisher: MqttPublisher) -> None:
        state = DaemonState(
            engine=run.engines.running.describe(),
            last_flash=self.last_flash,
            uptime_s=time.monotonic() - self.started,
            measured=self.measured,
            spool_depth=run.spool.depth(),
            spool_dropped=run.spool.dropped(),
            last_error=self.last_error or publisher.last_error,
        )
        publisher.publish_retained(STATE, contract.state_payload(state))
