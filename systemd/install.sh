#!/usr/bin/env bash
# Install, upgrade or remove cellseg as a systemd service. Run as root.
#
#   sudo systemd/install.sh                          install or upgrade from this checkout (builds the wheel)
#   sudo systemd/install.sh --wheel cellseg-X.whl    install or upgrade from a built wheel
#   sudo systemd/install.sh --wheel W --wheelhouse DIR   offline: every dependency from DIR (pip wheel/download)
#   sudo systemd/install.sh --doctor                 check the installed service, inside its own sandbox
#   sudo systemd/install.sh --as-service CMD [ARG...]  run a command as the service runs (user, sandbox)
#   sudo systemd/install.sh --uninstall [--purge]    remove it; --purge also deletes config, state and spool
#
# Options: --extras LIST (default edge,cpu; edge,trt on a Jetson, where OpenCV and TensorRT come
# from JetPack), --no-start (install only), --prefix DIR (default /opt/cellseg).
#
# What it makes: the 'cellseg' system user (added to 'video' and 'render' where they exist, for
# cameras and the GPU), a venv in PREFIX that sees the system's packages (JetPack's OpenCV with
# GStreamer, TensorRT), /usr/local/bin/cellseg, /etc/cellseg/cellseg.yaml (kept when present; a
# newer default is written beside it as cellseg.yaml.dist), /etc/cellseg/trusted-keys,
# /var/lib/cellseg (state, spool, engine slots) with incoming/ for the microscope software (its
# user joins group 'cellseg'), and the unit. The model shipped in the wheel becomes the first
# active engine slot, so the service measures at once; an upgrade keeps the running engine (a
# model must not change under a running experiment). Then it validates the configuration,
# (re)starts the service and runs `cellseg doctor` in the unit's sandbox: exit 0 when the
# service is active and the doctor found nothing wrong, 3 when it is running but the doctor
# found problems (printed, each with its fix), 1 on a failed step.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/opt/cellseg}
extras=${EXTRAS:-}
wheel="" wheelhouse="" mode=install purge=0 start=1
config=/etc/cellseg/cellseg.yaml
unit_path=/etc/systemd/system/cellseg.service
state=/var/lib/cellseg

die() { echo "install.sh: $*" >&2; exit 1; }
step() { echo "== $*"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) wheel=$(realpath "${2:?--wheel needs a file}"); shift 2 ;;
    --wheelhouse) wheelhouse=$(realpath "${2:?--wheelhouse needs a folder}"); shift 2 ;;
    --extras) extras=${2:?--extras needs a list}; shift 2 ;;
    --prefix) prefix=${2:?--prefix needs a folder}; shift 2 ;;
    --no-start) start=0; shift ;;
    --doctor) mode=doctor; shift ;;
    --as-service) mode=as-service; shift; break ;;
    --uninstall) mode=uninstall; shift ;;
    --purge) purge=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "run as root (sudo)"
[ "$purge" = 0 ] || [ "$mode" = uninstall ] || die "--purge goes with --uninstall"

# Run a command as the service runs: the unit's user and sandbox (its [Service] settings, but
# for those that only make sense for the long-running daemon) through a transient unit.
as_service() {
  local line key props=() in_service=0
  if [ ! -d /run/systemd/system ]; then  # no systemd running (an image build): the user at least
    runuser -u cellseg -- "$@"
    return
  fi
  while IFS= read -r line; do
    case "$line" in
      '['*) if [ "$line" = "[Service]" ]; then in_service=1; else in_service=0; fi; continue ;;
      ''|'#'*) continue ;;
    esac
    [ "$in_service" = 1 ] || continue
    key=${line%%=*}
    case "$key" in
      Type|NotifyAccess|ExecStart|Restart|RestartSec|WatchdogSec|TimeoutStopSec|KillSignal) continue ;;
    esac
    props+=(-p "$line")
  done < "$unit_path"
  systemd-run --quiet --wait --pipe --collect --service-type=exec "${props[@]}" -- "$@"
}

spool_depth() {  # unsent measurements in the spool, or "?" when it cannot be read
  python3 - "$state/spool.sqlite" 2>/dev/null <<'EOF' || echo "?"
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
EOF
}

if [ "$mode" = doctor ] || [ "$mode" = as-service ]; then
  [ -f "$unit_path" ] || die "cellseg is not installed ($unit_path is missing)"
  if [ "$mode" = doctor ]; then set -- /usr/local/bin/cellseg doctor --config "$config"; fi
  [ $# -gt 0 ] || die "--as-service needs a command"
  status=0
  as_service "$@" || status=$?
  exit "$status"
fi

if [ "$mode" = uninstall ]; then
  step "stopping and removing the service"
  if [ -f "$unit_path" ]; then
    systemctl disable --now cellseg.service || true
    rm -f "$unit_path"
    systemctl daemon-reload
  fi
  if [ "$(readlink /usr/local/bin/cellseg 2>/dev/null)" = "$prefix/venv/bin/cellseg" ]; then
    rm -f /usr/local/bin/cellseg
  fi
  rm -rf "$prefix"
  if [ "$purge" = 1 ]; then
    [ -f "$state/spool.sqlite" ] && echo "deleting $(spool_depth) unsent measurements with $state"
    rm -rf /etc/cellseg "$state"
    if id cellseg >/dev/null 2>&1; then userdel cellseg; fi
    echo "removed cellseg, its configuration, state, spool and user"
  else
    echo "removed the program and the unit; kept $config and the keys in /etc/cellseg, and $state"
    echo "(engine slots, and $(spool_depth) measurements not yet sent); --uninstall --purge deletes them"
  fi
  exit 0
fi

# --- install or upgrade ----------------------------------------------------------------------
if [ -e /etc/nv_tegra_release ]; then
  l4t=$(sed -n 's/^# R\([0-9]*\) (release).*/\1/p' /etc/nv_tegra_release)
  if [ -n "$l4t" ] && [ "$l4t" -lt 36 ]; then
    die "this Jetson runs L4T R$l4t (JetPack 5 or older: Python 3.8, TensorRT 8.5), and cellseg needs JetPack 6 \
(L4T R36: Python 3.10, TensorRT 8.6 or 10.3). Flash JetPack 6 on an Orin; a Xavier cannot run it: run cellseg \
on a PC next to the microscope instead (ONNX Runtime on the CPU)"
  fi
fi
python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
  die "cellseg needs Python 3.10 or newer; this python3 is $(python3 -V 2>&1)"
python3 -c 'import ensurepip' 2>/dev/null ||
  die "python3 cannot make a virtual environment: apt-get install python3-venv"
if [ -z "$extras" ]; then
  if [ -e /etc/nv_tegra_release ]; then extras=edge,trt; else extras=edge,cpu; fi
fi

upgrade=0
[ -x "$prefix/venv/bin/cellseg" ] && upgrade=1
step "user cellseg"
id cellseg >/dev/null 2>&1 ||
  useradd --system --user-group --home-dir "$state" --shell /usr/sbin/nologin cellseg
for group in video render; do
  if getent group "$group" >/dev/null; then usermod -a -G "$group" cellseg; fi
done

step "virtual environment $prefix/venv (system packages visible)"
install -d -m 0755 "$prefix"
if ! "$prefix/venv/bin/python" -c '' 2>/dev/null; then
  rm -rf "$prefix/venv"
  python3 -m venv --system-site-packages "$prefix/venv"
fi
pip_args=(--disable-pip-version-check --quiet)
[ -z "$wheelhouse" ] || pip_args+=(--no-index --find-links "$wheelhouse")
# On a Jetson the venv uses JetPack's OpenCV and TensorRT, both built for numpy 1: keep numpy < 2.
[ ! -e /etc/nv_tegra_release ] || pip_args+=(--constraint "$repo/systemd/jetson-constraints.txt")
if [ -z "$wheel" ]; then
  [ -f "$repo/pyproject.toml" ] || die "no --wheel given and $repo is not a cellseg checkout"
  # Building needs setuptools from an index (an isolated PEP 517 build); offline, bring the wheel.
  [ -z "$wheelhouse" ] || die "an offline install (--wheelhouse) needs --wheel: build it with 'pip wheel --no-deps .'"
  step "building the wheel from $repo"
  build=$(mktemp -d)
  trap 'rm -rf "$build"' EXIT
  "$prefix/venv/bin/pip" wheel "${pip_args[@]}" --no-deps --wheel-dir "$build" "$repo"
  wheel=$(ls "$build"/cellseg-*.whl)
fi
step "installing $(basename "$wheel") [$extras]"
"$prefix/venv/bin/pip" install "${pip_args[@]}" "${wheel}[${extras}]"
# The same version again (a rebuilt wheel): replace the package's files, not its dependencies.
"$prefix/venv/bin/pip" install "${pip_args[@]}" --force-reinstall --no-deps "$wheel"
ln -sfn "$prefix/venv/bin/cellseg" /usr/local/bin/cellseg
[ ! -f "$repo/README.md" ] || install -m 0644 "$repo/README.md" "$prefix/README.md"

step "configuration /etc/cellseg, state $state"
install -d -m 0750 -o root -g cellseg /etc/cellseg /etc/cellseg/trusted-keys
if [ ! -f "$config" ]; then
  install -m 0640 -o root -g cellseg "$repo/systemd/cellseg.yaml" "$config"
elif ! cmp -s "$repo/systemd/cellseg.yaml" "$config"; then
  install -m 0640 -o root -g cellseg "$repo/systemd/cellseg.yaml" "$config.dist"
  echo "kept your $config; this version's default is beside it as $config.dist"
fi
install -d -m 0750 -o cellseg -g cellseg "$state"
# setgid: images the microscope software writes keep group cellseg, so the service can read them.
install -d -m 2770 -o cellseg -g cellseg "$state/incoming"
install -m 0644 "$repo/systemd/cellseg.service" "$unit_path"
[ ! -d /run/systemd/system ] || systemctl daemon-reload

/usr/local/bin/cellseg validate-config "$config"
step "engine slot"
as_service /usr/local/bin/cellseg install-model --config "$config"

[ "$start" = 1 ] || { echo "installed; not started (--no-start)"; exit 0; }
step "starting cellseg.service"
systemctl enable --quiet cellseg.service
# Type=notify: restart returns once the daemon said READY=1 (or failed).
systemctl restart cellseg.service || {
  journalctl -u cellseg.service -n 30 --no-pager >&2 || true
  die "cellseg.service did not start (journal above)"
}
systemctl --no-pager --lines=0 status cellseg.service | head -3
step "cellseg doctor, inside the service's sandbox"
if as_service /usr/local/bin/cellseg doctor --config "$config"; then
  echo "cellseg is $([ "$upgrade" = 1 ] && echo upgraded || echo installed) and measuring"
else
  echo "cellseg runs, but the doctor found problems (above); fix them, then: $0 --doctor" >&2
  exit 3
fi
