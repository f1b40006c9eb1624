"""``cellseg doctor``: would the service run on this machine as configured, and if not, what to do.

Each check gives ``ok``, ``info``, ``warn`` or ``fail``, one line of detail and, for ``warn`` and
``fail``, one line saying how to fix it. The exit status is 0 only when nothing failed. Checks
follow what the daemon needs, in the order it needs it: Python and packages, the configuration,
an engine that loads and passes its self-test (and the GPU's device nodes where one is used),
the active slot's integrity, the source yielding a frame, the broker accepting the configured
credentials, the state folder, the clock.

The doctor changes nothing: it writes only a probe file in the state folder (removed at once),
reads the spool read-only, and connects to the broker with its own client id (connecting with
the service's id would disconnect the running service). Run it as the service user, inside the
unit's sandbox, to see what the service sees: ``systemd/install.sh --doctor`` does that.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import platform
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cellseg.edge.config import Config, load_config
from cellseg.edge.device import (
    GPU_DEVICE_NODES,
    NV_TEGRA_RELEASE,
    DeviceFacts,
    dist_version,
    jetpack_for,
    l4t_release,
)
from cellseg.edge.errors import CellsegError

Status = Literal["ok", "info", "warn", "fail"]

# Below this the spool and engine slots cannot be trusted to write (a flash needs the engine's
# size again); a TensorRT plan of YOLOv9c-seg is ~60 MB, its bundle download as much again.
MIN_FREE_MB = 200
LOW_FREE_MB = 1024
BROKER_TIMEOUT_S = 5.0
LIVE_SOURCE_TIMEOUT_S = 15.0
ARGUS_SOCKET = Path("/tmp/argus_socket")
TIMESYNC_MARKER = Path("/run/systemd/timesync/synchronized")

# The packages the device imports: (import name, distribution for the version, pip extra, required).
DEVICE_PACKAGES: tuple[tuple[str, str, str, bool], ...] = (
    ("numpy", "numpy", "edge", True),
    ("cv2", "opencv", "cpu", True),
    ("yaml", "pyyaml", "edge", True),
    ("pydantic", "pydantic", "edge", True),
    ("paho.mqtt", "paho-mqtt", "edge", True),
    ("cryptography", "cryptography", "edge", True),
    ("onnxruntime", "onnxruntime", "cpu", False),
    ("tifffile", "tifffile", "edge", False),
)


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    config_path: str
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config_path, "ok": self.ok, "checks": [asdict(c) for c in self.checks]}

    def format(self) -> str:
        lines = [f"cellseg doctor: {self.config_path}"]
        width = max((len(c.name) for c in self.checks), default=8)
        for c in self.checks:
            lines.append(f"  {c.status.upper() if c.status == 'fail' else c.status:<5} {c.name:<{width}}  {c.detail}")
            if c.fix:
                lines.append(f"  {'':<5} {'':<{width}}  fix: {c.fix}")
        n = len(self.failed)
        lines.append(
            "the service would run as configured"
            if n == 0
            else f"{n} problem{'s' if n > 1 else ''} to fix before the service runs as configured"
        )
        return "\n".join(lines)


# --- environment -----------------------------------------------------------------------------


def check_python() -> list[Check]:
    where = f"Python {platform.python_version()} on {platform.machine()}"
    l4t = l4t_release(NV_TEGRA_RELEASE)
    if l4t:
        where += f", Jetson L4T {l4t} (JetPack {jetpack_for(l4t)})"
    return [Check("python", "ok", where + f", as user {_user()}")]


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return str(os.geteuid())


def _version(module: Any, dist: str) -> str:
    found = dist_version(dist, f"{dist}-python", f"{dist}-python-headless", f"{dist}-gpu")
    # A system package without pip metadata (JetPack's OpenCV) still knows its version.
    return found or str(getattr(module, "__version__", "?"))


def check_packages() -> list[Check]:
    found: list[str] = []
    checks: list[Check] = []
    for module_name, dist, extra, required in DEVICE_PACKAGES:
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, and numpy-ABI errors raised as others by compiled modules
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            fix = f"pip install 'cellseg[{extra}]' in the service's environment"
            if module_name == "cv2" and "numpy" in str(e):
                fix = "OpenCV was built for another numpy major version: pip install 'numpy<2' (JetPack's OpenCV)"
            checks.append(Check(f"package {dist}", "fail" if required else "warn", f"import failed: {first_line}", fix))
            continue
        found.append(f"{dist} {_version(module, dist)}")
    checks.insert(0, Check("packages", "ok", ", ".join(found)))
    return checks


# --- engine ----------------------------------------------------------------------------------


def check_engine(config: Config, path: Path) -> list[Check]:
    from cellseg.edge.bundles.engine_select import configured_candidates, open_first
    from cellseg.edge.bundles.flash import self_test, store_for
    from cellseg.edge.bundles.shipped import sample_frames
    from cellseg.edge.capture.imageio import read_image
    from cellseg.edge.pipeline.host import HostPipeline
    from cellseg.edge.pipeline.types import Frame

    facts = DeviceFacts.detect()
    checks = [
        Check(
            "runtimes",
            "ok" if facts.onnxruntime or facts.tensorrt else "fail",
            facts.describe(),
            "" if facts.onnxruntime or facts.tensorrt else "pip install 'cellseg[cpu]' (ONNX Runtime)",
        )
    ]
    store = store_for(config.state_dir)
    try:
        opened, _, errors = open_first(
            configured_candidates(store, config.fallback_model), config.engine.backend, config.engine.threads,
            compute=config.engine.precision,
        )  # fmt: skip
    except CellsegError as e:
        fix = f"cellseg install-model --config {path} (the shipped model as a slot), or flash a bundle"
        if config.model is not None:
            fix = f"fix model: in {path}, or " + fix
        checks.append(Check("engine", "fail", str(e), fix))
        return checks
    try:
        if opened.manifest is not None:
            report = self_test(opened, opened.path, opened.manifest)
            tested = (
                f"self-test {report['count']} cells (expected {report['expected_count']}), "
                f"{report['infer_ms']:.0f} ms inference"
            )
        else:
            frame = sample_frames()[0]
            m = HostPipeline(opened.engine)(Frame(read_image(frame), source=frame.name)).measurement
            tested = f"{m.count} cells on {frame.name}, {m.latencies_ms.get('infer', 0.0):.0f} ms inference"
    except CellsegError as e:
        checks.append(Check("engine", "fail", f"{opened.describe()}: {e}", "cellseg rollback, or flash a bundle"))
        return checks
    finally:
        opened.engine.close()
    status: Status = "warn" if errors else "ok"
    detail = f"{opened.describe()}; {tested}"
    fix = ""
    if errors:
        detail += "; it runs because these did not load: " + "; ".join(errors)
        fix = "the slot check below says how to replace what did not load"
    checks.append(Check("engine", status, detail, fix))
    return checks


def _gpu_kind() -> str | None:
    """``jetson``, ``dgpu`` (a PC with an NVIDIA card), or None: the device nodes to expect."""
    if NV_TEGRA_RELEASE.exists():
        return "jetson"
    return "dgpu" if Path("/dev/nvidiactl").exists() else None


def check_gpu_nodes(config: Config, path: Path) -> list[Check]:
    """The device nodes CUDA opens, where this machine has them (a Jetson, or a dGPU box)."""
    kind = _gpu_kind()
    if kind is None:
        if config.engine.backend == "tensorrt":
            return [
                Check(
                    "gpu",
                    "fail",
                    "engine.backend is tensorrt but this machine has no NVIDIA GPU device nodes",
                    "set engine.backend: auto (ONNX Runtime on the CPU) or run on a Jetson",
                )
            ]
        return [Check("gpu", "info", "no NVIDIA GPU on this machine; engines run on the CPU")]
    present = [p for p in GPU_DEVICE_NODES[kind] if Path(p).exists()]
    denied = [p for p in present if not os.access(p, os.R_OK | os.W_OK)]
    if not present:
        return [Check("gpu", "warn", f"none of the {kind} GPU device nodes exist", "check the NVIDIA driver install")]
    if denied:
        return [
            Check(
                "gpu",
                "fail",
                f"no read/write access to {', '.join(denied)} as {_user()}",
                "add the service user to the group owning them: usermod -aG video,render cellseg",
            )
        ]
    return [Check("gpu", "ok", f"{len(present)} {kind} GPU device nodes accessible")]


def check_kernels(config: Config, path: Path) -> list[Check]:
    """On a GPU machine: the CUDA kernels compile for this GPU with NVRTC (in memory: the daemon
    caches its own copy), since the service cannot count on nvcc being on its PATH."""
    from cellseg.edge.engines.kernel_compile import Nvrtc, find_nvrtc, kernel_cubins
    from cellseg.edge.errors import KernelBuildError

    facts = DeviceFacts.detect()
    if _gpu_kind() is None and not facts.tensorrt:
        return [Check("kernels", "info", "no NVIDIA GPU: the CUDA kernels are not needed")]
    library = find_nvrtc()
    if library is None:
        return [Check("kernels", "warn", "no NVRTC library: the kernels would be compiled by nvcc, which the "
                      "service's PATH does not have", "JetPack's CUDA has libnvrtc in /usr/local/cuda/lib64 "
                      "(apt install cuda-nvrtc-12-6); elsewhere pip install nvidia-cuda-nvrtc-cu12")]  # fmt: skip
    if facts.compute_capability is None:
        return [Check("kernels", "warn", f"NVRTC at {library}, but no GPU answers through CUDA (pycuda)",
                      "pip install 'cellseg[trt]' (pycuda), and check the GPU's device nodes")]  # fmt: skip
    arch = "sm_" + facts.compute_capability.replace(".", "")
    try:
        nvrtc = Nvrtc(library)
        kernel_cubins(arch, nvrtc=nvrtc)
    except KernelBuildError as e:
        return [Check("kernels", "fail", f"the CUDA kernels do not compile for {arch}: {e}",
                      "report this as a cellseg bug, with cellseg doctor --json")]  # fmt: skip
    return [Check("kernels", "ok", f"NVRTC {nvrtc.version} compiles the CUDA kernels for {arch}")]


def check_slot(config: Config, path: Path) -> list[Check]:
    from cellseg.edge.bundles.engine_select import read_slot_manifest
    from cellseg.edge.bundles.flash import store_for
    from cellseg.edge.bundles.local_model import LOCAL_SIGNER
    from cellseg.edge.bundles.reader import (
        MANIFEST,
        SIGNATURE,
        check_files,
        load_trusted_keys,
        verify_signature,
    )
    from cellseg.edge.errors import BundleError

    store = store_for(config.state_dir)
    slot = store.active()
    if slot is None:
        return [
            Check(
                "slot",
                "warn",
                f"no engine slot is active; the fallback model {config.fallback_model} runs",
                f"cellseg install-model --config {path} (a slot can be rolled back to and replaced by a flash)",
            )
        ]
    previous = store.previous()
    back = f"cellseg rollback (to slot {previous.name}), or " if previous is not None else ""
    try:
        manifest = read_slot_manifest(slot)
    except CellsegError as e:
        return [Check("slot", "fail", f"active slot {slot.name}: {e}", back + "flash a bundle")]
    local = manifest.signing_key == LOCAL_SIGNER and not (slot / SIGNATURE).exists()
    again = f"cellseg install-model --config {path} --activate always" if local else "flash the bundle again"
    try:
        check_files(slot, manifest)
        if local:
            origin = "installed locally by cellseg install-model (unsigned)"
        else:
            trusted = load_trusted_keys(list(config.flash.trusted_keys))
            verify_signature((slot / MANIFEST).read_bytes(), (slot / SIGNATURE).read_bytes(), trusted)
            origin = f"signed by trusted key {manifest.signing_key}"
    except (CellsegError, OSError) as e:
        fix = back + again
        if isinstance(e, BundleError) and "does not trust" in str(e):
            fix = "add the signer's .pub to flash.trusted_keys, or flash a bundle signed by a trusted key"
        return [Check("slot", "fail", f"active slot {slot.name}: {e}", fix)]
    return [Check("slot", "ok", f"{slot.name} ({manifest.name}): every file matches its sha256; {origin}")]


# --- source, broker, state, clock ------------------------------------------------------------


def _first_frame(config: Config, timeout_s: float) -> tuple[Any, str]:
    """The first frame the configured source yields within ``timeout_s``, or an error text."""
    from cellseg.edge.capture.from_config import make_source

    source = make_source(config.source, lambda _key: False)
    box: dict[str, Any] = {}

    def take() -> None:
        try:
            for sf in source.frames():
                box["frame"] = sf.frame
                return
            box["error"] = "the source ended without a frame"
        except Exception as e:  # any source failure is what the doctor reports
            box["error"] = f"{type(e).__name__}: {e}"

    reader = threading.Thread(target=take, name="doctor-source", daemon=True)
    reader.start()
    reader.join(timeout_s)
    source.stop()
    if "frame" in box:
        return box["frame"], ""
    reason = box.get("error") or f"no frame within {timeout_s:.0f} s"
    last = getattr(source, "last_error", "")
    return None, f"{reason} ({last})" if last else reason


def check_source(config: Config, path: Path) -> list[Check]:
    from cellseg.edge.capture.imageio import IMAGE_SUFFIXES

    s = config.source
    if s.kind == "folder" and s.path is not None:
        folder = s.path
        if not folder.is_dir():
            return [
                Check(
                    "source",
                    "fail",
                    f"watched folder {folder} does not exist",
                    f"mkdir -p {folder} and let the microscope software write there, or set source.path",
                )
            ]
        if not os.access(folder, os.R_OK | os.X_OK):
            return [
                Check(
                    "source",
                    "fail",
                    f"watched folder {folder} is not readable by {_user()}",
                    f"chgrp cellseg {folder} && chmod g+rx {folder}",
                )
            ]
        images = [p for p in folder.glob(s.pattern) if p.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            return [Check("source", "ok", f"watching {folder} for {s.pattern}; no image waiting")]
        newest = max(images, key=lambda p: p.stat().st_mtime)
        from cellseg.edge.capture.imageio import read_image

        try:
            pixels = read_image(newest, s.max_pixels)
        except CellsegError as e:
            return [
                Check(
                    "source",
                    "warn",
                    f"the newest image in {folder} does not read: {e}",
                    "the daemon skips unreadable files; check what writes them",
                )
            ]
        shape = "x".join(str(v) for v in pixels.shape[1::-1])
        waiting = f"{len(images)} image{'s' if len(images) > 1 else ''} in {folder}"
        return [Check("source", "ok", f"{waiting}; the newest, {newest.name}, reads ({shape}, {pixels.dtype})")]
    checks: list[Check] = []
    if s.kind == "csi" and "nvarguscamerasrc" in (s.pipeline or "nvarguscamerasrc"):
        checks.append(_check_argus())
    frame, error = _first_frame(config, LIVE_SOURCE_TIMEOUT_S)
    if frame is None:
        fix = {
            "v4l2": "check the camera is plugged in (ls /dev/video*); the running service may hold it: stop it first",
            "rtsp": "check the stream URL and that the camera answers (ffprobe URL)",
            "csi": "check nvargus-daemon runs (systemctl status nvargus-daemon) and the pipeline",
        }.get(s.kind, f"check source in {path}")
        checks.append(Check("source", "fail", f"{s.kind} source yields no frame: {error}", fix))
    else:
        checks.append(
            Check("source", "ok", f"{s.kind} source yields frames ({frame.width}x{frame.height}, {frame.pixels.dtype})")
        )
    return checks


def _check_argus() -> Check:
    """CSI cameras need nvargus-daemon's socket; the unit binds it into its private /tmp."""
    if not ARGUS_SOCKET.exists():
        return Check(
            "argus",
            "fail",
            f"{ARGUS_SOCKET} does not exist (nvargus-daemon not running?)",
            "systemctl restart nvargus-daemon, then systemctl restart cellseg",
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2.0)
        try:
            sock.connect(str(ARGUS_SOCKET))
        except OSError as e:
            return Check(
                "argus",
                "fail",
                f"{ARGUS_SOCKET} refuses connections: {e.strerror}",
                "systemctl restart cellseg (after nvargus-daemon restarts, its socket is new)",
            )
    return Check("argus", "ok", f"{ARGUS_SOCKET} accepts connections")


def check_broker(config: Config, path: Path) -> list[Check]:
    m = config.mqtt
    if not m.enabled:
        return [Check("broker", "info", "mqtt.enabled is false: measurements are spooled, not published")]
    from cellseg.edge.service.publisher import new_client

    where = f"{m.host}:{m.port}" + (" (TLS)" if m.tls else "") + (f" as {m.username}" if m.username else "")
    fix = f"start the broker at {m.host}:{m.port}, or set mqtt.host / mqtt.port in {path}"
    try:
        client = new_client(m, f"cellseg-doctor-{os.getpid()}")
    except CellsegError as e:  # an unreadable password file or credential
        return [Check("broker", "fail", str(e), f"check mqtt.password in {path} and the file it names")]
    result: dict[str, Any] = {}
    answered = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason_code: Any, _p: Any) -> None:
        result["reason"] = reason_code
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(m.host, m.port, keepalive=10)
    except (OSError, ValueError) as e:  # refused, unreachable, name not resolved, TLS handshake
        return [Check("broker", "fail", f"cannot connect to {where}: {e}", fix)]
    client.loop_start()
    try:
        if not answered.wait(BROKER_TIMEOUT_S):
            return [
                Check("broker", "fail", f"{where} accepted TCP but sent no CONNACK in {BROKER_TIMEOUT_S:.0f} s", fix)
            ]
        reason = result["reason"]
        if reason.is_failure:
            return [
                Check(
                    "broker",
                    "fail",
                    f"{where} refused the connection: {reason}",
                    "check mqtt.username and the password file (and the broker's ACL)",
                )
            ]
    finally:
        client.disconnect()
        client.loop_stop()
    return [Check("broker", "ok", f"{where} accepts the configured credentials")]


def check_state(config: Config, path: Path) -> list[Check]:
    state = config.state_dir
    checks: list[Check] = []
    if not state.is_dir():
        return [
            Check(
                "state",
                "fail",
                f"state folder {state} does not exist",
                "systemd creates it (StateDirectory=cellseg); outside systemd: mkdir it, owned by the service user",
            )
        ]
    probe = state / f".doctor-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as e:
        fix = f"chown -R cellseg:cellseg {state}"
        if e.errno == errno.EROFS:  # the unit's ProtectSystem=strict leaves only its StateDirectory writable
            fix = f"keep state_dir under /var/lib/cellseg, or add ReadWritePaths={state} (systemctl edit cellseg)"
        return [Check("state", "fail", f"cannot write in {state} as {_user()}: {e.strerror}", fix)]
    free_mb = shutil.disk_usage(state).free / 2**20
    status: Status = "fail" if free_mb < MIN_FREE_MB else "warn" if free_mb < LOW_FREE_MB else "ok"
    fix = "" if status == "ok" else f"free space on the file system of {state} (the spool and engine slots live there)"
    checks.append(Check("state", status, f"{state} is writable; {free_mb:,.0f} MB free", fix))
    spool = config.spool.path or state / "spool.sqlite"
    if spool.exists():
        checks.append(_spool_depth(spool))
    return checks


def _spool_depth(path: Path) -> Check:
    from cellseg.edge.service.spool import read_depth

    try:
        depth = read_depth(path)
    except CellsegError as e:
        return Check("spool", "warn", str(e), "run the doctor as the service user")
    return Check("spool", "info", f"{depth} message{'s' if depth != 1 else ''} waiting in {path} for the broker")


def _clock_floor() -> float:
    """No correct clock reads earlier than the moment this package was installed."""
    import cellseg

    return Path(cellseg.__file__).stat().st_mtime


def check_clock() -> list[Check]:
    now, floor = time.time(), _clock_floor()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    if now < floor - 60:
        installed = time.strftime("%Y-%m-%d", time.gmtime(floor))
        return [
            Check(
                "clock",
                "fail",
                f"the clock says {stamp}, before cellseg was installed ({installed}): "
                "measurements would carry wrong times",
                "enable NTP (timedatectl set-ntp true) or set the clock",
            )
        ]
    if TIMESYNC_MARKER.exists():
        return [Check("clock", "ok", f"{stamp}, synchronised by systemd-timesyncd")]
    return [
        Check(
            "clock",
            "warn",
            f"{stamp}; not known to be synchronised",
            "enable NTP (timedatectl set-ntp true) so acquisition times stay right (ignore with chrony/ntpd)",
        )
    ]


def run_doctor(config_path: Path) -> DoctorReport:
    report = DoctorReport(str(config_path))
    report.checks += check_python()
    report.checks += check_packages()
    try:
        config = load_config(config_path)
    except CellsegError as e:
        report.checks.append(
            Check(
                "config",
                "fail",
                str(e).replace("\n", "; "),
                f"edit {config_path}; cellseg validate-config {config_path} lists each problem",
            )
        )
        report.checks += check_clock()
        return report
    report.checks.append(
        Check(
            "config", "ok", f"device {config.device_id}, source {config.source.kind}, topics {config.topic_prefix}/..."
        )
    )
    steps: list[Callable[[Config, Path], list[Check]]] = [
        check_engine,
        check_gpu_nodes,
        check_kernels,
        check_slot,
        check_source,
        check_broker,
        check_state,
    ]
    for step in steps:
        try:
            report.checks += step(config, config_path)
        except Exception as e:  # a check that trips must not hide the others
            name = step.__name__.removeprefix("check_")
            report.checks.append(
                Check(
                    name,
                    "fail",
                    f"check failed unexpectedly: {type(e).__name__}: {e}",
                    "report this as a cellseg bug, with the output of cellseg doctor --json",
                )
            )
    report.checks += check_clock()
    return report


def dumps(report: DoctorReport) -> str:
    return json.dumps(report.to_dict(), indent=2)
