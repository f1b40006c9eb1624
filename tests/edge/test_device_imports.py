"""The device runs without torch or ultralytics: nothing on its path may import them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import SAMPLES


def test_predict_imports_no_training_stack(shipped_model: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        import builtins
        real_import = builtins.__import__
        def guarded(name, *args, **kwargs):
            if name.split(".")[0] in ("torch", "ultralytics", "torchvision", "pycocotools"):
                raise ImportError(f"the device must not import {{name}}")
            return real_import(name, *args, **kwargs)
        builtins.__import__ = guarded
        from cellseg.cli import main
        code = main(["predict", {str(shipped_model)!r}, {str(SAMPLES / "usiigaci-val-set46.png")!r}, "--json"])
        sys.exit(code)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"count": ' in proc.stdout
