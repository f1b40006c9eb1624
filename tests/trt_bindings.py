"""TensorRT's real Python bindings on a machine without TensorRT: the wheel from PyPI, imported
against stand-in libraries (each TensorRT entry point a function returning 0, built with gcc
from the module's undefined symbols). Nothing can run, but every class, method, property and
enum member is there to be looked up, which is what the API conformance test needs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.packaging import unpacked_wheel

# The bindings of each supported TensorRT, by PyPI distribution (CUDA 12 builds where split).
DISTRIBUTIONS = {"8.6.1": "tensorrt-bindings", "10.3.0": "tensorrt-cu12-bindings"}

PROBE = """
import json, sys
import tensorrt_bindings as trt
missing = []
for dotted in json.load(sys.stdin):
    obj = trt
    for part in dotted.split("."):
        if not hasattr(obj, part):
            missing.append(dotted)
            break
        obj = getattr(obj, part)
print(json.dumps({"version": trt.__version__, "missing": missing}))
"""


def _stand_ins(module: Path, out: Path) -> None:
    """A library for each TensorRT library ``module`` needs, defining the symbols it imports."""
    dynamic = subprocess.run(["readelf", "-d", str(module)], capture_output=True, text=True, check=True).stdout
    needed = [
        w.strip("[]") for line in dynamic.splitlines() if "(NEEDED)" in line for w in line.split() if "libnv" in w
    ]
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(module)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    undefined = sorted({
        f[7] for f in (line.split() for line in symbols.splitlines())
        if len(f) >= 8 and f[6] == "UND" and f[4] == "GLOBAL" and "@" not in f[7]
        and not f[7].startswith(("Py", "_Py", "__pthread"))
    })  # fmt: skip
    source = out / "stand_in.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in undefined))
    for lib in needed:
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out / lib), f"-Wl,-soname,{lib}", str(source)],
                       check=True)  # fmt: skip


def bindings(version: str, cache: Path) -> Path:
    """A folder holding ``tensorrt_bindings`` of ``version`` and its stand-in libraries."""
    where = cache / f"trt-bindings-{version}-cp{sys.version_info[0]}{sys.version_info[1]}"
    if (where / "ready").exists():
        return where
    unpacked_wheel(f"{DISTRIBUTIONS[version]}=={version}", where, "--platform", "manylinux_2_17_x86_64")
    _stand_ins(where / "tensorrt_bindings" / "tensorrt.so", where)
    (where / "ready").touch()
    return where


def missing_names(folder: Path, dotted: list[str]) -> tuple[str, list[str]]:
    """(the bindings' version, the dotted names under ``tensorrt`` that do not exist there)."""
    env = dict(os.environ, PYTHONPATH=str(folder), LD_LIBRARY_PATH=str(folder))
    proc = subprocess.run([sys.executable, "-c", PROBE], input=json.dumps(dotted), capture_output=True, text=True,
                          env=env, timeout=120, check=True)  # fmt: skip
    answer = json.loads(proc.stdout)
    return str(answer["version"]), list(answer["missing"])
