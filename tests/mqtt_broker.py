"""A real mosquitto broker for tests, started as a plain process on a free loopback port."""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def make_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    ca_key, ca, key, csr, cert = (workdir / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt"))
    ext = workdir / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=cellseg test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return ca, cert, key


def free_port() -> int:
    """A free port below the ephemeral range.

    Some tests choose the broker's port first and start it seconds later while a client keeps
    trying to connect; a port from the ephemeral range could meanwhile become the local end of
    one of those very connections (or any other), and the broker could not bind it.
    """
    low, _high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


class Broker:
    """mosquitto on 127.0.0.1:<port>, with an optional password file; stop/start keep the port."""

    def __init__(self, workdir: Path, passwords: dict[str, str] | None = None, tls: bool = False) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.workdir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        lines = [
            f"listener {self.port} 127.0.0.1",
            # Persistence: a restarted broker still has what it acknowledged but had not yet
            # delivered to a persistent subscriber session (saved on a clean stop).
            "persistence true",
            f"persistence_location {workdir}/",
            "user root",  # started as root, mosquitto would switch to 'mosquitto' and lose our files
            "max_queued_messages 100000",
            "log_dest stderr",
        ]
        self.ca_file: Path | None = None
        if tls:
            self.ca_file, cert, key = make_certificates(workdir)
            lines += [f"cafile {self.ca_file}", f"certfile {cert}", f"keyfile {key}"]
        if passwords:
            pwfile = workdir / "passwd"
            pwfile.touch()
            for user, password in passwords.items():
                subprocess.run(["mosquitto_passwd", "-b", str(pwfile), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {pwfile}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=(self.workdir / "mosquitto.log").open("ab"))  # fmt: skip
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                log = (self.workdir / "mosquitto.log").read_text()[-2000:]
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {log}")
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not start; see {self.workdir / 'mosquitto.log'}")

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Subscriber:
    """A paho client that records every message under a topic filter."""

    host: str
    port: int
    topic: str
    messages: list[Any] = field(default_factory=list)
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        import paho.mqtt.client as mqtt

        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-sub-{free_port()}",
                                  clean_session=False)  # fmt: skip
        self.client.on_connect = lambda c, u, f, rc, p: (c.subscribe(self.topic, qos=1), self._ready.set())
        self.client.on_message = self._record
        if self.ca_file is not None:
            self.client.tls_set(ca_certs=str(self.ca_file))
        if self.username is not None:
            self.client.username_pw_set(self.username, self.password)
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not self._ready.wait(10):
            raise RuntimeError("test subscriber could not connect")

    def _record(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append((message.topic, bytes(message.payload), bool(message.retain)))

    def payloads(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return bool(predicate())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
