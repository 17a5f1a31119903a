#!/usr/bin/env bash
# One-step set-up on a fresh Debian machine (as root): system packages, a virtualenv in .venv with vusb
# installed (editable, with test and bench extras), and the guest kernel for the VM harness. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/install-system-deps.sh

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,bench]'

# The guest kernel for kernel tests (tools/vm): Debian's current linux-image-*-amd64 unpacked into
# ${VUSB_CACHE:-~/.cache/vusb/vm} (never installed on the host) plus a small initramfs; cached, so re-runs are cheap.
.venv/bin/python -m tools.vm prepare
