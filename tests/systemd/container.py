"""A Debian system booted with systemd-nspawn: a real systemd as PID 1 of its own namespaces,
for starting cellseg's unit the way a device does, on a machine whose own init is not systemd.

The root file system is made once by debootstrap (about a minute) and cached; each boot runs on a
copy. The container shares the host's network, so a broker started by the tests on the host's
loopback is the broker of the service inside. Commands run inside through ``nsenter``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

# What the device needs from the distribution: systemd, a Python that makes venvs, and the two
# libraries pip's OpenCV wheel links against. Everything else comes from cellseg's wheelhouse.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "libgl1", "libglib2.0-0")
SUITE = "bookworm"
MIRROR = os.environ.get("CELLSEG_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def missing_tools() -> list[str]:
    return [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(tool) is None]


def cached_rootfs(cache: Path) -> Path:
    """A minimal Debian root file system with :data:`PACKAGES`, made once per package list."""
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    root = cache / f"rootfs-{SUITE}-{key}"
    if (root / "usr" / "lib" / "systemd" / "systemd").exists():
        return root
    partial = cache / f".partial-{key}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial), MIRROR],
                   check=True, capture_output=True, timeout=900)  # fmt: skip
    partial.rename(root)
    return root


class Container:
    """A booted copy of ``rootfs`` at ``where``; ``binds`` are host paths -> container paths (read-only)."""

    def __init__(self, rootfs: Path, where: Path, binds: dict[Path, str]) -> None:
        self.root = where
        subprocess.run(["cp", "-a", str(rootfs), str(where)], check=True)
        # A machine id and a host name, as an installed system has; the journal keys on the first.
        (where / "etc" / "machine-id").write_text(hashlib.md5(str(where).encode()).hexdigest() + "\n")
        (where / "etc" / "hostname").write_text("cellseg-ci\n")
        self._log = (where.parent / f"{where.name}.console.log").open("wb")
        command = ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--directory", str(where), "--boot",
                   "--console=pipe", *(f"--bind-ro={host}:{inside}" for host, inside in binds.items())]  # fmt: skip
        self.nspawn = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.pid = self._init_pid()

    def _init_pid(self, timeout: float = 60.0) -> int:
        """The container's systemd: nspawn's child, once it answers as running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.nspawn.returncode}: {self.console()}")
            children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
            pids = children.read_text().split() if children.exists() else []
            if pids:
                self.pid = int(pids[0])
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return self.pid
            time.sleep(0.2)
        raise RuntimeError(f"the container's systemd did not come up in {timeout:.0f} s: {self.console()}")

    def console(self) -> str:
        self._log.flush()
        return (self.root.parent / f"{self.root.name}.console.log").read_text(errors="replace")[-3000:]

    def run(self, *command: str, check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside, in all the container's namespaces, with a clean environment."""
        proc = subprocess.run(["nsenter", "--target", str(self.pid), "--all", "env", "-i",
                               *(f"{k}={v}" for k, v in CLEAN_ENV.items()), *command],
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def path(self, inside: str) -> Path:
        """A path inside the container, as seen from the host."""
        return self.root / inside.lstrip("/")

    def poweroff(self) -> None:
        if self.nspawn.poll() is None:
            self.run("systemctl", "poweroff", check=False, timeout=60)
            try:
                self.nspawn.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)
