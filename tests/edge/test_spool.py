"""The durable spool: order, acknowledgement, bounds, and survival of a killed process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cellseg.edge.errors import SpoolFullError
from cellseg.edge.service.spool import Spool


def test_messages_come_out_in_order_until_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    ids = [spool.put("t/measurement", f"m{i}".encode()) for i in range(5)]
    assert ids == sorted(ids)
    assert [m.payload for m in spool.oldest()] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    spool.ack(ids[0])
    spool.ack(ids[2])
    assert [m.payload for m in spool.oldest()] == [b"m1", b"m3", b"m4"]
    assert [m.payload for m in spool.oldest(limit=1, after=ids[1])] == [b"m3"]
    assert spool.depth() == 3
    spool.close()
    reopened = Spool(tmp_path / "s.sqlite")
    assert [m.payload for m in reopened.oldest()] == [b"m1", b"m3", b"m4"]


def test_drop_oldest_keeps_the_bound_and_counts_what_it_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=100, when_full="drop_oldest")
    for i in range(130):
        spool.put("t", str(i).encode())
    assert spool.depth() == 100
    assert spool.dropped() == 30
    assert spool.oldest(limit=1)[0].payload == b"30"


def test_stop_measuring_refuses_when_full(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite", max_messages=100, when_full="stop_measuring")
    for i in range(100):
        spool.put("t", str(i).encode())
    with pytest.raises(SpoolFullError, match="spool full"):
        spool.put("t", b"one too many")
    assert spool.depth() == 100 and spool.dropped() == 0


def test_concurrent_put_and_ack_lose_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    acked: list[bytes] = []
    done = threading.Event()

    def publisher() -> None:
        while not done.is_set() or spool.depth():
            for m in spool.oldest(limit=10):
                acked.append(m.payload)
                spool.ack(m.id)

    thread = threading.Thread(target=publisher)
    thread.start()
    for i in range(300):
        spool.put("t", str(i).encode())
    done.set()
    thread.join(timeout=30)
    assert acked == [str(i).encode() for i in range(300)]


def test_a_killed_writer_loses_nothing_it_was_told_was_stored(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    log = tmp_path / "stored.txt"
    writer = textwrap.dedent(
        f"""
        from pathlib import Path
        from cellseg.edge.service.spool import Spool
        spool = Spool(Path({str(path)!r}))
        with open({str(log)!r}, "a") as log:
            for i in range(100000):
                spool.put("t", str(i).encode())
                log.write(f"{{i}}\\n")  # only after put() returned
                log.flush()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", writer])
    deadline = time.time() + 30
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 50):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    confirmed = [int(x) for x in log.read_text().split()]
    assert len(confirmed) >= 50
    stored = [int(m.payload) for m in Spool(path).oldest(limit=1_000_000)]
    # Everything confirmed is there, in order, and at most the one put in flight besides.
    assert stored[: len(confirmed)] == confirmed
    assert len(stored) - len(confirmed) in (0, 1)


def test_sequence_numbers_and_done_marks_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite")
    results = [spool.put_measurement("t", lambda seq: f"seq {seq}".encode(), done_key=f"file{i}") for i in range(3)]
    assert [seq for _, seq in results] == [1, 2, 3]
    spool.close()
    spool = Spool(tmp_path / "s.sqlite")
    assert spool.is_done("file1") and not spool.is_done("file9")
    _, seq = spool.put_measurement("t", lambda seq: f"seq {seq}".encode())
    assert seq == 4
    assert [m.payload for m in spool.oldest()] == [b"seq 1", b"seq 2", b"seq 3", b"seq 4"]
