"""A power cut during a flash, approximated by SIGKILL at 20 random moments of `cellseg flash`:
afterwards the device always has a complete, verified, loadable active engine."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cellseg.edge.bundles.engine_select import open_engine, read_slot_manifest
from cellseg.edge.bundles.flash import FlashSettings, flash_file
from cellseg.edge.bundles.reader import check_files, load_trusted_keys
from cellseg.edge.bundles.slots import PARTIAL_PREFIX, SlotStore
from cellseg.edge.device import DeviceFacts
from tests.conftest import SHIPPED_MODEL

pytestmark = pytest.mark.slow


def test_sigkill_at_random_points_of_a_flash_leaves_a_complete_active_slot(
    bundles: dict[str, Path], signing_keys: tuple[Path, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "cellseg.yaml"
    config.write_text(yaml.safe_dump({
        "device_id": "scope-7", "model": str(SHIPPED_MODEL), "state_dir": str(state),
        "source": {"kind": "folder", "path": str(tmp_path)},
        "flash": {"trusted_keys": [str(signing_keys[1])]},
    }))  # fmt: skip
    store = SlotStore(state / "engines")
    settings = FlashSettings(load_trusted_keys([signing_keys[1]]), 1 << 30, DeviceFacts(onnxruntime="1"), threads=1)
    flash_file(bundles["fp32"], store, settings)

    def flash_cmd(bundle: Path) -> list[str]:
        return [sys.executable, "-m", "cellseg", "flash", str(bundle), "--config", str(config)]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    # How long a whole flash of each bundle takes here and now (the two differ: the FP32 model's
    # self-test is slower), so that the kills spread over each one's own run, its end included.
    full = {}
    for name in ("int8", "fp32"):
        t0 = time.monotonic()
        done = subprocess.run(flash_cmd(bundles[name]), check=False, capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        full[name] = time.monotonic() - t0
        assert done.returncode == 0, done.stderr
    rng = random.Random(20261125)
    outcomes = {"switched": 0, "kept": 0}
    for i in range(20):
        before = store.active()
        assert before is not None
        name = "fp32" if read_slot_manifest(before).engine.precision == "int8" else "int8"
        proc = subprocess.Popen(flash_cmd(bundles[name]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(rng.uniform(0.3, 1.2) * full[name])  # most of the early part is Python starting up
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        active = store.active()
        assert active is not None, f"kill {i}: no active slot"
        assert not active.name.startswith(PARTIAL_PREFIX)
        manifest = read_slot_manifest(active)
        check_files(active, manifest)  # every file complete and as signed
        opened = open_engine(active, threads=1)
        opened.engine.close()
        outcomes["switched" if active != before else "kept"] += 1
        store.clean()  # what the daemon does when it starts
        left = [p.name for p in store.slots.iterdir()]
        assert len(left) <= 2 and not any(n.startswith(PARTIAL_PREFIX) for n in left)
        assert not list(store.incoming.iterdir())
    print(f"kills: {outcomes}, full flash {full['int8']:.2f} s (int8), {full['fp32']:.2f} s (fp32)")
    # The kills landed both before and after the switch.
    assert outcomes["switched"] > 0 and outcomes["kept"] > 0, outcomes
