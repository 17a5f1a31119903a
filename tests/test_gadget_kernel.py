"""vusb's device models as real gadgets (configfs + FunctionFS on dummy_hcd), seen by the kernel's own host
drivers in the VM: usb-storage, usbhid + evdev, cdc_acm. Also `vusb emulate` end to end and its teardown.

Marked `kernel`: the host's pytest boots the QEMU guest once and runs them there (tools/vm).
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import subprocess
import sys
import termios
import time
import tty
from pathlib import Path

import pytest

from tools.vm import guest

pytestmark = pytest.mark.kernel

KEY_H, KEY_E, KEY_L, KEY_O = 35, 18, 38, 24
GADGETS = Path("/sys/kernel/config/usb_gadget")


def _write_direct(dev: Path, offset: int, data: bytes) -> None:
    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


def _read_direct(dev: Path, offset: int, length: int) -> bytes:
    buf = mmap.mmap(-1, length)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], offset) == length
        return bytes(buf)
    finally:
        os.close(fd)
        buf.close()


def _node_under(cls: str, pattern: str, hcd: str) -> Path | None:
    for entry in Path("/sys/class", cls).glob(pattern):
        if hcd in os.path.realpath(entry / "device"):
            return Path("/dev") / (entry.name if cls == "tty" else f"input/{entry.name}")
    return None


def test_mass_storage_model_as_gadget_is_a_usb_storage_disk_that_reads_back_and_writes_through(tmp_path):
    from emulator.devices.mass_storage import mass_storage_device
    from gadgets.model import device_gadget

    guest.modprobe("usb-storage", "sd_mod")
    image = guest.make_backing_file(tmp_path / "disk.img", 16 << 20)
    original = image.read_bytes()
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    patch = os.urandom(1 << 20)
    device = mass_storage_device(str(image))
    try:
        with device_gadget(device, name="vusbtest-ms", udc=udc):
            disk = guest.wait_for_disk(hcd, timeout=60)
            assert hcd in disk.sysfs_path and disk.size_bytes == 16 << 20
            assert guest.sha256_of(disk.dev, direct=True) == guest.sha256_of(image)
            _write_direct(disk.dev, 5 << 20, patch)
            guest.drop_caches()
            assert _read_direct(disk.dev, 5 << 20, len(patch)) == patch
    finally:
        device.close()
    guest.wait_for_disk_gone(hcd)
    assert image.read_bytes() == original[: 5 << 20] + patch + original[6 << 20 :]
    assert not (GADGETS / "vusbtest-ms").exists()


def test_hid_keyboard_model_as_gadget_types_keys_that_arrive_as_evdev_events():
    from emulator.devices.hid import Keyboard, hid_keyboard_device
    from gadgets.model import device_gadget

    for module in ("usbhid", "hid-generic", "evdev"):
        guest.modprobe(module)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    keyboard = Keyboard()
    with device_gadget(hid_keyboard_device(keyboard), name="vusbtest-kbd", udc=udc):
        node = guest.poll(lambda: _node_under("input", "event*", hcd), timeout=60, what="the keyboard's evdev node")
        pressed = guest.keys_typed(node, lambda: keyboard.type_text("hello"), 5)
    assert pressed == [KEY_H, KEY_E, KEY_L, KEY_L, KEY_O]
    assert not (GADGETS / "vusbtest-kbd").exists()


def test_cdc_acm_model_as_gadget_is_a_tty_acm_that_echoes_what_is_written():
    from emulator.devices.cdc_acm import cdc_acm_device
    from gadgets.cli import cdc_acm_dynamic_id
    from gadgets.model import device_gadget

    guest.modprobe("cdc_acm")
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    device = cdc_acm_device()
    message = os.urandom(5000)
    with cdc_acm_dynamic_id(device, True) as entry, device_gadget(device, name="vusbtest-acm", udc=udc):
        assert entry is not None
        node = guest.poll(lambda: _node_under("tty", "ttyACM*", hcd), timeout=60, what="the ttyACM node")
        fd = os.open(node, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)
            termios.tcflush(fd, termios.TCIOFLUSH)
            os.write(fd, message)
            echoed = b""
            deadline = time.monotonic() + 30
            while len(echoed) < len(message) and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.5)[0]:
                    echoed += os.read(fd, 4096)
        finally:
            os.close(fd)
    assert echoed == message
    assert "1209 0003" not in (Path("/sys/bus/usb/drivers/cdc_acm/new_id").read_text())


def test_second_server_of_the_same_gadget_is_refused_while_the_first_runs():
    from emulator.devices.hid import hid_keyboard_device
    from gadgets.ffs import FunctionFsError
    from gadgets.model import device_gadget

    udc = guest.free_udc()
    with device_gadget(hid_keyboard_device(), name="vusbtest-twice", udc=udc):
        with pytest.raises(FunctionFsError, match="another vusb process"):
            device_gadget(hid_keyboard_device(), name="vusbtest-twice").__enter__()
        assert (GADGETS / "vusbtest-twice" / "UDC").read_text().strip() == udc  # the first is untouched
    assert not (GADGETS / "vusbtest-twice").exists()


def test_vusb_emulate_serves_a_disk_until_sigint_and_leaves_nothing_in_configfs(tmp_path):
    guest.modprobe("usb-storage", "sd_mod")
    image = guest.make_backing_file(tmp_path / "cli.img", 4 << 20)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "emulate", "--gadget", "mass-storage", "--disk", str(image),
         "--udc", udc, "--name", "vusbtest-cli"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        disk = guest.wait_for_disk(hcd, timeout=90)
        assert guest.sha256_of(disk.dev, direct=True) == guest.sha256_of(image)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "stopped" in output
    guest.wait_for_disk_gone(hcd)
    assert not (GADGETS / "vusbtest-cli").exists()
    assert not any("vusbtest-cli" in line for line in Path("/proc/mounts").read_text().splitlines())


def test_vusb_emulate_names_the_fix_when_the_udc_does_not_exist():
    guest.dummy_udcs(1)
    res = subprocess.run([sys.executable, "-m", "emulator.cli", "emulate", "--gadget", "hid-keyboard",
                          "--udc", "dummy_udc.31"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "no UDC dummy_udc.31" in res.stderr and "modprobe dummy_hcd" in res.stderr
    assert "Traceback" not in res.stderr
