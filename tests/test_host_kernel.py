"""vusb's userspace host against the kernel's own USB/IP server (usbipd + usbip-host), in the kernel VM.

The remote is a configfs f_mass_storage gadget on dummy_udc, bound to usbip-host: the kernel exports real USB
traffic of a real (gadget) device, and vusb's host — not vhci-hcd — imports it.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools.vm import guest

pytestmark = pytest.mark.kernel

SIZE = 8 << 20


def _lsusb_fields(vid: int, pid: int) -> dict[str, list[str]]:
    out = guest.run(["lsusb", "-v", "-d", f"{vid:04x}:{pid:04x}"]).stdout
    fields: dict[str, list[str]] = {}
    for line in out.splitlines():
        m = re.match(
            r"\s+(idVendor|idProduct|bcdDevice|bcdUSB|bNumConfigurations|wTotalLength|bInterfaceClass|"
            r"bInterfaceSubClass|bInterfaceProtocol|bEndpointAddress|wMaxPacketSize|bmAttributes|"
            r"iManufacturer|iProduct|iSerial)\s+(\S+)(?:\s+(.*))?$",
            line,
        )
        if m:
            fields.setdefault(m.group(1), []).append(" ".join(x for x in (m.group(2), m.group(3) or "") if x))
    return fields


def test_vusb_disk_dump_of_kernel_exported_gadget_equals_backing_file_and_pyusb_sees_lsusb_descriptors(
    tmp_path: Path,
) -> None:
    guest.modprobe("usb-storage", "sd_mod")
    backing = guest.make_backing_file(tmp_path / "backing.img", SIZE)
    expected = guest.sha256_of(backing)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    with guest.mass_storage_gadget(backing, udc, serial="vusbhost01") as gadget:
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=hcd)
        lsusb = _lsusb_fields(gadget.vendor_id, gadget.product_id)
        sysfs_descriptors = Path(f"/sys/bus/usb/devices/{dev.busid}/descriptors").read_bytes()
        with guest.usbipd() as daemon, guest.usbip_bound(dev.busid):
            out = tmp_path / "dump.img"
            dump = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "emulator.cli",
                    "disk",
                    "dump",
                    "-r",
                    "127.0.0.1",
                    "-p",
                    str(daemon.port),
                    "-b",
                    dev.busid,
                    "-o",
                    str(out),
                    "--timeout",
                    "30",
                ],
                capture_output=True,
                text=True,
                timeout=240,
                env=dict(os.environ, COLUMNS="200"),
            )
            assert dump.returncode == 0, dump.stderr
            assert hashlib.sha256(out.read_bytes()).hexdigest() == expected

            script = f"""
import usb.core, usb.util
from emulator.pyusb_backend import get_backend
be = get_backend("127.0.0.1", "{dev.busid}", {daemon.port}, timeout=30)
d = usb.core.find(backend=be)
d.set_configuration()
raw = bytes(d.ctrl_transfer(0x80, 6, 0x0100, 0, 18))
cfg = d.get_active_configuration()
total = bytes(d.ctrl_transfer(0x80, 6, 0x0200, 0, 4))
full = bytes(d.ctrl_transfer(0x80, 6, 0x0200, 0, total[2] | total[3] << 8))
print("RAW", (raw + full).hex())
print("STR", usb.util.get_string(d, d.iManufacturer), "|", usb.util.get_string(d, d.iProduct), "|",
      usb.util.get_string(d, d.iSerialNumber))
for intf in cfg:
    print("IF", intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol)
    for ep in intf:
        print("EP", hex(ep.bEndpointAddress), ep.bmAttributes, ep.wMaxPacketSize)
be.close()
"""
            res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
            assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    raw = bytes.fromhex(next(x for x in lines if x.startswith("RAW ")).split()[1])
    # The device and configuration descriptors the kernel keeps in sysfs (what lsusb reads) == what pyusb read
    # through vusb's host from the kernel's USB/IP server.
    assert raw == sysfs_descriptors[: len(raw)]
    strings = next(x for x in lines if x.startswith("STR ")).removeprefix("STR ").split(" | ")
    assert strings[0] in lsusb["iManufacturer"][0] and strings[1] in lsusb["iProduct"][0]
    assert strings[2] == "vusbhost01" and "vusbhost01" in lsusb["iSerial"][0]
    ifs = [x.split()[1:] for x in lines if x.startswith("IF ")]
    assert [[str(int(v)) for v in i] for i in ifs] == [
        [lsusb[k][n].split()[0] for k in ("bInterfaceClass", "bInterfaceSubClass", "bInterfaceProtocol")]
        for n in range(len(ifs))
    ]
    eps = [x.split()[1:] for x in lines if x.startswith("EP ")]
    assert [int(e[0], 16) for e in eps] == [int(a.split()[0], 16) for a in lsusb["bEndpointAddress"]]
    assert [int(e[2]) for e in eps] == [int(m.split()[0], 16) & 0x7FF for m in lsusb["wMaxPacketSize"]]
