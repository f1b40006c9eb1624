"""``cellseg run`` with one part of the daemon broken on purpose once it has run for a while: how
the liveness tests kill or hang a thread inside a real daemon process.

    python tests/edge/faulty_daemon.py FAULT AFTER_S run --config FILE

A part "dies" by raising SystemExit in its thread, which ends the thread without a word (as an
unexpected BaseException would); it "hangs" by blocking forever where it would do its work; it
is "slow" when each call takes SLOW_S seconds more (e.g. a large model on the CPU fallback).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
SLOW_S = 3.0


def _breaking(original: Callable[..., Any], due: Callable[[], bool], how: str) -> Callable[..., Any]:
    def broken(*args: Any, **kwargs: Any) -> Any:
        if due():
            if how == "dies":
                raise SystemExit(f"injected: {original.__qualname__} dies")
            if how == "slow":
                time.sleep(SLOW_S)
            else:
                threading.Event().wait()  # hangs, forever
        return original(*args, **kwargs)

    return broken


def install(fault: str, after_s: float) -> None:
    import paho.mqtt.client as mqtt

    from cellseg.edge.capture.files import FolderSource
    from cellseg.edge.pipeline.host import HostPipeline
    from cellseg.edge.service.spool import Spool

    if fault == "none":
        return
    start = time.monotonic()

    def due() -> bool:
        return time.monotonic() - start > after_s

    part, how = fault.rsplit("-", 1)
    target: tuple[Any, str] = {
        "capture": (FolderSource, "_candidates"),  # the capture thread's poll of the folder
        "inference": (HostPipeline, "__call__"),  # the inference loop (which also feeds the watchdog)
        "network": (mqtt.Client, "loop"),  # the MQTT network thread
        "sender": (Spool, "oldest"),  # the spool sender thread
    }[part]
    owner, name = target
    setattr(owner, name, _breaking(getattr(owner, name), due, how))


if __name__ == "__main__":
    install(sys.argv[1], float(sys.argv[2]))
    from cellseg.cli import main

    sys.exit(main(sys.argv[3:]))
