"""The long-running daemon: the frame loop, engine swaps between frames, the MQTT contract
(topics, payloads, commands), the durable spool, the publisher, and its health (liveness,
systemd notifications)."""
