"""A daemon with a dead or hung part must stop feeding systemd's watchdog (so that systemd restarts
it), and a healthy one must never: each part of a real `cellseg run` is killed or hung in turn,
with a short WATCHDOG_USEC, while this test plays systemd's side of the notify socket."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellseg.edge.service.liveness import Liveness
from tests.daemon_setup import folder_device
from tests.mqtt_broker import Broker
from tests.notify_socket import NotifySocket

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/usr/sbin/mosquitto").exists(), reason="mosquitto is not installed"),
]
HARNESS = Path(__file__).with_name("faulty_daemon.py")
WATCHDOG_S = 2.0
FAULT_AFTER_S = 4.0  # model loaded, the first frames measured, everything connected
OBSERVE_S = 3.0  # a silence this long after the fault, with WatchdogSec=2, is a restart by systemd


def test_stalled_names_a_dead_thread_and_a_silent_part() -> None:
    import threading

    liveness = Liveness()
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    liveness.register("capture", 60.0, ended)
    liveness.register("sender", 0.05)
    liveness.register("network", 60.0)
    time.sleep(0.1)
    liveness.beat("network")
    assert liveness.stalled() == {"capture": "its thread ended", "sender": "no progress for 0 s"}
    liveness.beat("sender")
    liveness.unregister("capture")
    assert liveness.stalled() == {}


@pytest.mark.parametrize(
    "fault",
    ["none", "capture-dies", "capture-hangs", "inference-hangs", "network-dies", "network-hangs", "sender-dies",
     "sender-hangs"],
)  # fmt: skip
def test_a_dead_or_hung_part_stops_the_watchdog(fault: str, data_root: Path, tmp_path: Path) -> None:
    frames = sorted((data_root / "t98g_timelapse" / "frames").glob("*.tif"))
    broker = Broker(tmp_path)
    broker.start()
    config, incoming = folder_device(tmp_path, broker, "live-1", frames[:2])
    notify = NotifySocket(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(int(WATCHDOG_S * 1e6)))
    daemon = subprocess.Popen([sys.executable, str(HARNESS), fault, str(FAULT_AFTER_S), "run", "--config", str(config)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        started = time.monotonic()
        deadline = started + 60
        while "READY=1" not in notify.lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "READY=1" in notify.lines, daemon.stdout.read() if daemon.poll() is not None and daemon.stdout else ""
        time.sleep(FAULT_AFTER_S + 0.5)
        shutil.copy(frames[2], incoming)  # work for the inference loop after the fault
        fault_at = started + FAULT_AFTER_S
        # Long enough for the stall to be seen (the allowed silence is the watchdog period) and
        # for systemd's watchdog to have fired after the last ping.
        time.sleep(WATCHDOG_S + 0.5 + OBSERVE_S)
        end = time.monotonic()
        assert daemon.poll() is None, "the daemon must stay up and leave the restart to systemd"
    finally:
        daemon.kill()
        output = daemon.communicate(timeout=10)[0]
        notify.close()
        broker.stop()
    pings = notify.pings()
    assert any(t < fault_at for t in pings), "no watchdog pings before the fault"
    if fault == "none":
        gaps = [b - a for a, b in itertools.pairwise(pings)] + [end - pings[-1]]
        assert max(gaps) < WATCHDOG_S, f"a healthy daemon left the watchdog without a ping for {max(gaps):.1f} s"
        assert not any("stalled" in line for line in notify.lines), notify.lines
        return
    silence = end - pings[-1]
    assert silence >= OBSERVE_S, f"pings went on {pings[-1] - fault_at:.1f} s after the fault:\n{output[-3000:]}"
    if fault != "inference-hangs":  # a hung inference loop can say nothing; the others name the part
        part = fault.rsplit("-", 1)[0]
        names = {"capture": "capture", "network": "mqtt-network", "sender": "mqtt-sender"}
        said = [line for line in notify.lines if line.startswith("STATUS=stalled")]
        assert said and said[0].startswith(f"STATUS=stalled: {names[part]}"), notify.lines
        # Said when the set of stalled parts changes (a hung network loop may stall the sender
        # too), not at every ping of the watchdog's period.
        assert len(said) <= 2, said
