"""Run a command under the system-call filter a systemd unit file declares, without systemd.

    /usr/bin/python3 seccomp_exec.py UNIT_FILE -- COMMAND [ARGS...]

Reproduces what systemd 252 does with the unit's ``SystemCallFilter=`` lines: the first line
decides the mode (a list without ``~`` is an allow list, and systemd then adds ``@default``),
later lines add to it or (with ``~``) remove from it; groups are resolved by
``systemd-analyze syscall-filter`` on this machine; calls outside the allow list get
``SystemCallErrorNumber=`` (an errno) or, without it, kill the process with SIGSYS, as under
systemd. ``SystemCallArchitectures=native`` is libseccomp's default (other ABIs are killed).
The filter is loaded with no_new_privs and survives the ``exec`` of the command.

Needs Debian's ``python3-seccomp`` (libseccomp's bindings), hence the system interpreter; the
command itself may run any Python.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path


def service_lines(unit: Path, key: str) -> list[str]:
    values, section = [], ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.startswith(key + "="):
            values.append(line.split("=", 1)[1].strip())
    return values


def expand(name: str, seen: set[str] | None = None) -> set[str]:
    """A syscall name, or every syscall of a @group (nested groups resolved)."""
    if not name.startswith("@"):
        return {name}
    seen = seen if seen is not None else set()
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager", name],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            calls |= expand(item, seen)
    return calls


def allowed_syscalls(unit: Path) -> set[str]:
    lines = service_lines(unit, "SystemCallFilter")
    if not lines or lines[0].startswith("~"):
        raise SystemExit(f"{unit}: expected an allow-list SystemCallFilter= first (what the unit ships)")
    allowed = expand("@default")
    for value in lines:
        remove = value.startswith("~")
        names = set().union(*(expand(n) for n in value.lstrip("~").split()))
        allowed = allowed - names if remove else allowed | names
    return allowed


def main(argv: list[str]) -> None:
    import seccomp

    if "--" not in argv or argv.index("--") != 1:
        raise SystemExit(__doc__)
    unit, command = Path(argv[0]), argv[2:]
    error_number = service_lines(unit, "SystemCallErrorNumber")
    # Under systemd a call outside the allow list gets this errno, or without one kills (SIGSYS).
    default = seccomp.ERRNO(getattr(errno, error_number[-1])) if error_number else seccomp.KILL_PROCESS
    sf = seccomp.SyscallFilter(defaction=default)
    for name in sorted(allowed_syscalls(unit)):
        try:
            sf.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):
            continue  # a name of another architecture (e.g. the *_time64 calls of 32-bit ABIs)
    sf.load()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
