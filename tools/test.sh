#!/usr/bin/env bash
# Runs everything: lint, types, and the whole pytest suite — host tests here, kernel tests (marked `kernel`)
# inside one QEMU/TCG boot of Debian's kernel (tools/vm). Exits non-zero on any failure, including when no
# test was collected or when the kernel suite could not run.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup.sh

echo "== ruff"
.venv/bin/ruff check emulator gadgets captures tests tools
echo "== mypy --strict (emulator/usbip, emulator/usb)"
.venv/bin/mypy emulator/usbip emulator/usb
echo "== pytest"
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "vusb: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
