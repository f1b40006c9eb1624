"""The device daemon: source -> preprocess -> engine -> postprocess -> measure -> spool -> MQTT.

Capture runs in its own thread and hands frames over a small queue (file sources block rather
than drop); publishing runs in the publisher's threads; the inference loop in between measures
one frame at a time. Every measurement is written to the durable spool, in one transaction with
its sequence number and (for watched files) the file's done-mark, before anything is published.

SIGTERM finishes the frame in hand, flushes what the broker will take and exits 0; systemd is
told READY, STATUS, WATCHDOG and STOPPING (see :mod:`cellseg.edge.sdnotify`).
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
from cellseg.edge.commands import Command, CommandError, SnapshotRequest, parse_command, reply
from cellseg.edge.config import Config
from cellseg.edge.engine_onnxruntime import OnnxRuntimeEngine
from cellseg.edge.errors import CellsegError, ConfigError
from cellseg.edge.measure import measurement_to_dict
from cellseg.edge.overlay import draw_overlay
from cellseg.edge.predictor import Predictor
from cellseg.edge.publisher import SCHEMA, MqttPublisher
from cellseg.edge.sdnotify import Notifier
from cellseg.edge.spool import Spool, SpoolFullError

logger = logging.getLogger(__name__)

_END = object()  # the source is exhausted


def make_source(config: Config, is_done: Callable[[str], bool]) -> Source:
    s = config.source
    if s.kind == "folder" and s.path is not None:
        return FolderSource(s.path, pattern=s.pattern, is_done=is_done, loop=s.loop)
    if s.kind == "images":
        return ImageListSource(s.images, loop=s.loop)
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
        self.started = time.monotonic()
        self.measured = 0
        self.last_error = ""
        self._commands: queue.Queue[Command] = queue.Queue(maxsize=100)
        self._last: tuple[Any, Any, int] | None = None  # (frame, result, seq) of the latest measurement

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
        if c.engine.backend == "tensorrt":
            raise ConfigError("engine.backend 'tensorrt' needs the TensorRT backend, which this version lacks")
        spool = Spool(c.spool.path or c.state_dir / "spool.sqlite", c.spool.max_messages, c.spool.when_full)
        engine = OnnxRuntimeEngine(c.model, threads=c.engine.threads)
        engine.load()
        engine.warmup()
        logger.info("engine: ONNX Runtime (%s), model %s", engine.precision, c.model)
        thresholds = engine.info.thresholds.overridden(
            conf=c.postprocess.conf, iou=c.postprocess.iou, max_det=c.postprocess.max_det
        )
        predictor = Predictor(engine, thresholds, c.measurement.pixel_size_um)
        publisher = None
        if c.mqtt.enabled:
            publisher = MqttPublisher(c.mqtt, c.topic_prefix, c.mqtt.client_id or f"cellseg-{c.device_id}", spool)
            publisher.on_command = lambda name, payload: self._accept_command(publisher, name, payload)
            publisher.start()
        source = make_source(c, spool.is_done)
        frames: queue.Queue[Any] = queue.Queue(maxsize=2)
        capture = threading.Thread(target=self._capture, args=(source, frames), name="capture", daemon=True)
        capture.start()
        self.notifier.ready(f"measuring from {source.name}")
        topic = f"{c.topic_prefix}/measurement"
        next_due = 0.0
        try:
            while not self.stop_requested.is_set():
                self.notifier.watchdog()
                if publisher is not None:
                    self._run_commands(publisher, predictor)
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
                self._measure(
                    sf, predictor=predictor, spool=spool, publisher=publisher, topic=topic, precision=engine.precision
                )
        finally:
            if self.reload_requested.is_set():
                self.notifier.send("RELOADING=1")  # READY=1 follows when the new config runs
            else:
                self.notifier.stopping()
            source.stop()
            if publisher is not None:
                self._publish_state(publisher, spool, engine.precision)
                publisher.stop()
            engine.close()
            spool.close()
        return 0

    def _capture(self, source: Source, frames: queue.Queue[Any]) -> None:
        live = getattr(source, "live", False)
        try:
            for sf in source.frames():
                if live:
                    # Live sources keep only the freshest frame: replace what waits in the queue.
                    with contextlib.suppress(queue.Empty):
                        frames.get_nowait()
                while not self.stop_requested.is_set():
                    try:
                        frames.put(sf, timeout=0.5)  # blocks: file sources never drop a frame
                        break
                    except queue.Full:
                        continue
                if self.stop_requested.is_set():
                    return
        except Exception as e:  # the daemon must outlive its source; report and end the source
            self.last_error = f"source {source.name} failed: {e}"
            logger.exception("%s", self.last_error)
        frames.put(_END)

    def _measure(
        self,
        sf: SourceFrame,
        *,
        predictor: Predictor,
        spool: Spool,
        publisher: MqttPublisher | None,
        topic: str,
        precision: str,
    ) -> None:
        try:
            result = predictor(sf.frame)
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
                self.notifier.watchdog()
                if self.stop_requested.wait(1.0):
                    return
        self.measured += 1
        if publisher is not None:
            publisher.notify_spooled()
            publisher.publish_retained("count", str(record["count"]))
            publisher.publish_retained("confluence", f"{record['confluence_pct']:.4f}")
            if self.measured % 10 == 1:
                self._publish_state(publisher, spool, precision)
        overlay = self.config.overlay
        if overlay.dir is not None and self.measured % overlay.every_n == 0:
            import cv2

            overlay.dir.mkdir(parents=True, exist_ok=True)
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
            logger.warning("refused command %s: %s", name, e)
            publisher.publish_reply(name, reply(e.request_id, False, str(e)))
        except queue.Full:
            publisher.publish_reply(name, reply(None, False, "too many commands waiting; try again"))

    def _run_commands(self, publisher: MqttPublisher, predictor: Predictor) -> None:
        """Between frames, so a command never races the measuring."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command.name == "snapshot" and isinstance(command.request, SnapshotRequest):
                self._snapshot(publisher, predictor, command.request)
            elif command.name == "reload":
                publisher.publish_reply("reload", reply(command.request.id, True, note="reloading the configuration"))
                self.request_reload()

    def _snapshot(self, publisher: MqttPublisher, predictor: Predictor, request: SnapshotRequest) -> None:
        import cv2

        if self._last is None:
            publisher.publish_reply("snapshot", reply(request.id, False, "no frame measured yet"))
            return
        frame, result, seq = self._last
        picture = draw_overlay(frame, result.detections, result.measurement, predictor.engine.info.mapping)
        ok, jpeg = cv2.imencode(".jpg", picture, [cv2.IMWRITE_JPEG_QUALITY, request.quality])
        if not ok:
            publisher.publish_reply("snapshot", reply(request.id, False, "JPEG encoding failed"))
            return
        publisher.publish_snapshot(jpeg.tobytes())
        publisher.publish_reply("snapshot", reply(request.id, True, seq=seq, bytes=len(jpeg)))

    def _publish_state(self, publisher: MqttPublisher, spool: Spool, precision: str) -> None:
        uptime = time.monotonic() - self.started
        state = {
            "schema": SCHEMA,
            "version": __version__,
            "engine": {"model": str(self.config.model), "precision": precision},
            "uptime_s": round(uptime, 1),
            "measured": self.measured,
            "fps": round(self.measured / uptime, 4) if uptime > 0 else 0.0,
            "spool_depth": spool.depth(),
            "spool_dropped": spool.dropped(),
            "last_error": self.last_error or publisher.last_error,
        }
        publisher.publish_retained("state", json.dumps(state))
