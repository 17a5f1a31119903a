#!/usr/bin/env bash
# Installs the Debian packages vusb's tests and tools need on a fresh Debian machine (run as root).
# Idempotent: packages already present are skipped; `apt-get update` runs only when something is missing.
set -euo pipefail

PACKAGES=(
  qemu-system-x86 busybox-static cpio kmod   # the kernel VM harness (tools/vm)
  usbip usbutils                             # interop peer: Linux's own usbip/usbipd, lsusb
  libusb-1.0-0 libaio1                       # pyusb backend, python-functionfs AIO
  dosfstools mtools                          # make and inspect FAT images without mounting
  tshark tcpdump                             # the reference dissector, captures
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "vusb: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
