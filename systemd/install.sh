#!/usr/bin/env bash
# Install cellseg as a systemd service, from a checkout of the repository. Run as root.
#
#   sudo systemd/install.sh            # CPU device (ONNX Runtime)
#   sudo EXTRAS=edge,trt systemd/install.sh   # Jetson: OpenCV and TensorRT come from JetPack
#
# Creates the 'cellseg' system user (in group 'video' for cameras and the Jetson GPU), a venv in
# /opt/cellseg that sees the system's packages (JetPack's OpenCV with GStreamer, TensorRT),
# /etc/cellseg/cellseg.yaml (kept if present), /var/lib/cellseg, and the unit; checks the config,
# then enables and starts the service (NO_START=1 to skip that).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/opt/cellseg}
extras=${EXTRAS:-edge,cpu}

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo)" >&2
  exit 1
fi

id cellseg >/dev/null 2>&1 ||
  useradd --system --home-dir /var/lib/cellseg --shell /usr/sbin/nologin --groups video cellseg

install -d -m 0755 "$prefix"
rm -rf "$prefix/src" && cp -r "$repo" "$prefix/src"
python3 -m venv --system-site-packages "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet "$prefix/src[$extras]"
ln -sf "$prefix/venv/bin/cellseg" /usr/local/bin/cellseg

install -d -m 0750 -o root -g cellseg /etc/cellseg /etc/cellseg/trusted-keys
if [ ! -f /etc/cellseg/cellseg.yaml ]; then
  install -m 0640 -o root -g cellseg "$repo/systemd/cellseg.yaml" /etc/cellseg/cellseg.yaml
fi
install -d -m 0750 -o cellseg -g cellseg /var/lib/cellseg /var/lib/cellseg/incoming
install -m 0644 "$repo/systemd/cellseg.service" /etc/systemd/system/cellseg.service

/usr/local/bin/cellseg validate-config /etc/cellseg/cellseg.yaml
if [ "${NO_START:-0}" != 1 ]; then
  systemctl daemon-reload
  systemctl enable --now cellseg.service
  systemctl --no-pager status cellseg.service || true
fi
