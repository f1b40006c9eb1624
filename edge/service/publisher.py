"""MQTT publishing (paho-mqtt 2) of what the device measures, fed by the durable spool.

The topics and payloads are :mod:`cellseg.edge.service.contract`'s. How they travel:

- ``measurement`` goes through the spool: it is removed from the spool only on the broker's
  PUBACK. Messages spooled before the current connection was up are sent marked historical
  (a backlog replayed after an outage or a restart).
- ``count``, ``confluence``, ``state``: the latest values, retained, published directly (only the
  newest matters; every measurement is in ``measurement``).

Connection problems (broker away, wrong password) are logged and retried with backoff by the
network thread; measuring goes on meanwhile and the spool holds the backlog. On every
(re)connection the latest retained values are published again, so a subscriber that arrives
after an outage sees the newest count, confluence and state at once, not the pre-outage ones.

Every paho callback is guarded: an exception in one is logged and reported in ``last_error``,
never allowed to end the network loop (a 30,000-deep JSON command once did, silencing the device).
The network loop and the sender beat a :class:`~cellseg.edge.service.liveness.Liveness` registry, so a
thread that dies or hangs anyway stops the watchdog and systemd restarts the service.
"""

from __future__ import annotations

import functools
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cellseg.edge.config import MqttConfig, read_secret, secret_location
from cellseg.edge.errors import DependencyError
from cellseg.edge.service import contract
from cellseg.edge.service.contract import AVAILABILITY, COMMAND, COMMAND_RESULT, MEASUREMENT, Topic
from cellseg.edge.service.liveness import Liveness
from cellseg.edge.service.spool import Spool

logger = logging.getLogger(__name__)

# A message that stays unacknowledged this long while connected is sent again (QoS 1 allows a
# duplicate; subscribers recognise it by its sequence number).
RESEND_AFTER_S = 30.0
MAX_IN_FLIGHT = 20
RECONNECT_MIN_S, RECONNECT_MAX_S = 1.0, 60.0
LOOP_TIMEOUT_S = 0.5
NETWORK, SENDER = "mqtt-network", "mqtt-sender"

_Callback = TypeVar("_Callback", bound=Callable[..., None])


def new_client(config: MqttConfig, client_id: str) -> Any:
    """A paho client (MQTT 3.1.1, callback API 2) with the configured credentials and TLS; not
    yet connected. The daemon's publisher and ``cellseg doctor`` connect with exactly this."""
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
    except ImportError as e:
        raise DependencyError("paho-mqtt", "edge", "publishing over MQTT") from e
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if config.username is not None:
        password = read_secret(config.password) if config.password is not None else None
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        keyfile = str(secret_location(config.tls.key)) if config.tls.key is not None else None
        client.tls_set(
            ca_certs=str(config.tls.ca_file) if config.tls.ca_file else None,
            certfile=str(config.tls.cert_file) if config.tls.cert_file else None,
            keyfile=keyfile,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    return client


class MqttPublisher:
    """Publishes spooled messages and retained state; runs paho's loop and a sender thread.

    Args:
        config: the ``mqtt`` section.
        prefix: topic prefix, e.g. ``cellseg/microscope-1``.
        client_id: MQTT client id.
        spool: the durable spool the pipeline writes measurements into.
        on_command: called from the network thread with (command name, payload bytes) for
            messages on ``<prefix>/cmd/<name>``.
        liveness: where the network and sender threads report progress (default: a private one).
        max_silence_s: how long either may go without progress before it counts as stalled.
        growth_series: the series whose growth Home Assistant discovery offers (None: none).
    """

    def __init__(
        self,
        config: MqttConfig,
        prefix: str,
        client_id: str,
        spool: Spool,
        on_command: Callable[[str, bytes], None] | None = None,
        *,
        liveness: Liveness | None = None,
        max_silence_s: float = 60.0,
        growth_series: str | None = None,
    ) -> None:
        self.config = config
        self.prefix = prefix
        self.spool = spool
        self.on_command = on_command
        self.connected = threading.Event()
        self.last_error = ""
        self._connected_at = 0.0
        self._lock = threading.Lock()
        self._in_flight: dict[int, tuple[int, float]] = {}  # paho mid -> (spool id, sent at)
        # Spool ids only grow and are sent in order: everything up to here was handed to paho.
        self._last_sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()  # the sender
        self._net_stop = threading.Event()  # the network loop, which outlives the sender at stop
        self._sender: threading.Thread | None = None
        self._network: threading.Thread | None = None
        self.liveness = liveness or Liveness()
        self.max_silence_s = max_silence_s
        self.growth_series = growth_series  # whose growth Home Assistant discovery shows
        # The latest value of each retained topic, published again on every (re)connection.
        self._retained: dict[str, str | bytes] = {}

        self.client = new_client(config, client_id)
        self.client.on_connect = self._guarded(self._on_connect)
        self.client.on_disconnect = self._guarded(self._on_disconnect)
        self.client.on_publish = self._guarded(self._on_publish)
        self.client.on_message = self._guarded(self._on_message)
        self.client.max_inflight_messages_set(MAX_IN_FLIGHT)
        self.client.will_set(AVAILABILITY.under(prefix), "offline", qos=AVAILABILITY.qos, retain=True)

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background and start sending; returns at once."""
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self._network = threading.Thread(target=self._network_loop, name=NETWORK, daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=SENDER, daemon=True)
        for thread in (self._network, self._sender):
            self.liveness.register(thread.name, self.max_silence_s, thread)
            thread.start()

    def stop(self, flush_timeout_s: float = 5.0) -> None:
        """Send what can be sent within the timeout, publish ``offline`` and disconnect."""
        deadline = time.monotonic() + flush_timeout_s
        while self.connected.is_set() and self.spool.depth() and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.05)
        self._stop.set()
        self._wake.set()
        for name in (NETWORK, SENDER):
            self.liveness.unregister(name)
        if self._sender is not None:
            self._sender.join(timeout=5)
        if self.connected.is_set():
            info = self.client.publish(AVAILABILITY.under(self.prefix), "offline", qos=AVAILABILITY.qos, retain=True)
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        self.client.disconnect()
        self._net_stop.set()
        if self._network is not None:
            self._network.join(timeout=5)

    def _network_loop(self) -> None:
        """paho's network loop (``loop``/``reconnect``, its public API) in a thread of our own
        rather than ``loop_start``'s, so that every pass beats and a thread that ends is seen.
        Connection attempts back off exponentially (1 s to 60 s) until a connection is accepted,
        a refused CONNECT included; anything unexpected that escapes ends the thread, and then
        the watchdog restarts the service."""
        delay, next_attempt = RECONNECT_MIN_S, 0.0
        while not self._net_stop.is_set():
            self.liveness.beat(NETWORK)
            if self.client.loop(timeout=LOOP_TIMEOUT_S) == 0:  # MQTT_ERR_SUCCESS: a connection, served
                if self.connected.is_set():
                    delay = RECONNECT_MIN_S
                continue
            if self._stop.is_set():  # stopping: no new connection
                return
            while not self._net_stop.is_set() and time.monotonic() < next_attempt:  # back off, beating
                self.liveness.beat(NETWORK)
                self._net_stop.wait(min(1.0, next_attempt - time.monotonic()))
            next_attempt, delay = time.monotonic() + delay, min(delay * 2, RECONNECT_MAX_S)
            try:
                self.client.reconnect()
            except OSError as e:  # refused, unreachable, no such host, TLS handshake
                self.last_error = f"cannot connect to {self.config.host}:{self.config.port}: {e}"
                logger.warning("%s; retrying", self.last_error)

    # --- publishing ------------------------------------------------------------------------
    def notify_spooled(self) -> None:
        """Tell the sender that the spool has something new."""
        self._wake.set()

    def publish_retained(self, topic: Topic, payload: str | bytes, name: str = "") -> None:
        """Latest-value topics (count, confluence, state, growth of a series ``name``): retained,
        not spooled. The value is kept and published again on every (re)connection."""
        full = topic.under(self.prefix, name)
        self._retained[full] = payload
        if self.connected.is_set():
            self.client.publish(full, payload, qos=topic.qos, retain=True)

    def publish_reply(self, command: str, payload: bytes) -> None:
        """A command's answer on ``cmd/<name>/result``."""
        self.client.publish(COMMAND_RESULT.under(self.prefix, command), payload, qos=COMMAND_RESULT.qos)

    def publish_picture(self, topic: Topic, picture: bytes, name: str = "") -> None:
        """A picture asked for by a command (the snapshot, a growth plot): not retained."""
        self.client.publish(topic.under(self.prefix, name), picture, qos=topic.qos)

    def _send_loop(self) -> None:
        while not self._stop.is_set():
            self.liveness.beat(SENDER)
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self.connected.is_set():
                self._send_pending()

    def _send_pending(self) -> None:
        """Publish spooled messages newer than the last one sent, up to MAX_IN_FLIGHT unacknowledged."""
        now = time.monotonic()
        with self._lock:
            stale = [spool_id for spool_id, sent in self._in_flight.values() if now - sent > RESEND_AFTER_S]
            if stale:  # lost somewhere: send again from the oldest of them (QoS 1 allows duplicates)
                self._in_flight = {m: e for m, e in self._in_flight.items() if e[0] not in stale}
                self._last_sent = min(self._last_sent, min(stale) - 1)
            room = MAX_IN_FLIGHT - len(self._in_flight)
        if room <= 0:
            return
        for message in self.spool.oldest(limit=room, after=self._last_sent):
            if self._stop.is_set() or not self.connected.is_set():
                break
            payload = message.payload
            if message.created < self._connected_at and message.topic == MEASUREMENT.under(self.prefix):
                payload = contract.mark_historical(payload)
            info = self.client.publish(message.topic, payload, qos=1)
            if info.rc != 0:  # not MQTT_ERR_SUCCESS
                # The connection dropped just now: everything unacknowledged goes again on reconnect.
                logger.debug("publish of spooled message %d deferred (rc %s)", message.id, info.rc)
                break
            with self._lock:
                self._in_flight[info.mid] = (message.id, time.monotonic())
                self._last_sent = max(self._last_sent, message.id)
                # on_publish may already have run for this mid (fast brokers): settle it now.
                if info.is_published():
                    self._settle(info.mid)

    def _settle(self, mid: int) -> None:
        entry = self._in_flight.pop(mid, None)
        if entry is not None:
            self.spool.ack(entry[0])

    # --- paho callbacks (the network thread) -----------------------------------------------
    def _guarded(self, callback: _Callback) -> _Callback:
        """``callback``, made unable to end the network loop: an exception is logged, kept in
        ``last_error`` and swallowed (paho re-raises callback exceptions out of its loop)."""

        @functools.wraps(callback)
        def guarded(*args: Any) -> None:
            try:
                callback(*args)
            except Exception as e:
                self.last_error = f"MQTT {callback.__name__.strip('_')} failed: {type(e).__name__}: {e}"
                logger.exception("%s", self.last_error)

        return guarded  # type: ignore[return-value]

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            # Frigate marks itself connected here; a refused connection is not one.
            self.last_error = f"broker {self.config.host}:{self.config.port} refused the connection: {reason_code}"
            logger.error("%s; retrying", self.last_error)
            return
        logger.info("connected to %s:%d", self.config.host, self.config.port)
        self.last_error = ""
        self._connected_at = time.time()
        # The spool is the truth: whatever was in flight when the connection dropped is sent
        # again from it. (paho may re-send its own copies too; a duplicate is allowed at QoS 1
        # and recognisable by its sequence number, a message stuck unacknowledged is not.)
        with self._lock:
            self._in_flight.clear()
            self._last_sent = 0
        client.publish(AVAILABILITY.under(self.prefix), "online", qos=AVAILABILITY.qos, retain=True)
        for topic, payload in list(self._retained.items()):  # newer than what the broker retained
            client.publish(topic, payload, qos=1, retain=True)
        if self.config.homeassistant_discovery:
            for topic, payload in contract.discovery_messages(self.prefix, self.config.discovery_prefix,
                                                              self.growth_series):  # fmt: skip
                client.publish(topic, payload, qos=contract.DISCOVERY.qos, retain=True)
        client.subscribe(COMMAND.under(self.prefix, "+"), qos=COMMAND.qos)
        self.connected.set()
        self._wake.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        # After a refused connection paho reports a disconnect too: keep the refusal's reason.
        if was_connected and not self._stop.is_set():
            self.last_error = f"disconnected from {self.config.host}:{self.config.port}: {reason_code}"
            logger.warning("%s; reconnecting", self.last_error)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._lock:
            self._settle(mid)
        self._wake.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        name = message.topic.removeprefix(COMMAND.under(self.prefix))
        if self.on_command is not None and "/" not in name:
            self.on_command(name, bytes(message.payload))
