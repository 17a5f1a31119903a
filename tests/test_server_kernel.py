"""vusb's USB/IP server against Linux's own client: `usbip list/attach` and vhci-hcd, in the kernel VM.

The server runs in a thread of the guest-side test process; Linux's usbip tools import its devices through
vhci_hcd, and the kernel's usb-storage, usbhid and cdc_acm drivers bind to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import select
import struct
import subprocess
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.devices.storage import create_sparse_image
from tools.vm import guest

pytestmark = pytest.mark.kernel

IMAGE_SIZE = 32 << 20


@contextlib.contextmanager
def served(devices: list) -> Iterator[int]:
    from emulator.server import ServerThread

    with ServerThread(devices) as server:
        guest.wait_for_tcp("127.0.0.1", server.port)
        yield server.port


def _mtools_read(image: Path, name: str) -> bytes:
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    res = subprocess.run(
        ["mcopy", "-n", "-i", str(image), f"::{name}", "-"], capture_output=True, env=env, check=True
    )
    return res.stdout


def test_usbip_list_shows_vusb_exports_and_attached_disk_takes_a_vfat_filesystem(tmp_path: Path) -> None:
    from emulator.devices.mass_storage import mass_storage_device

    guest.modprobe("usb-storage", "sd_mod", "vfat")
    image = create_sparse_image(tmp_path / "disk.img", IMAGE_SIZE)
    files = {f"FILE{i}.BIN": os.urandom(100_000 + i * 4096) for i in range(3)}
    device = mass_storage_device([image], vendor="vusb", product="KernelTest")
    with served([device]) as port:
        listing = guest.usbip("list", "-r", "127.0.0.1", port=port)
        assert "1-1" in listing and "1209:0004" in listing, listing
        with guest.usbip_attached("127.0.0.1", "1-1", port=port) as vhci_port:
            disk = guest.wait_for_disk("vhci_hcd", timeout=60)
            assert disk.size_bytes == IMAGE_SIZE
            assert Path(f"/sys/block/{disk.name}/ro").read_text().strip() == "0"
            guest.run(["mkfs.vfat", "-n", "VUSB", str(disk.dev)])
            mnt = tmp_path / "mnt"
            mnt.mkdir()
            guest.run(["mount", "-t", "vfat", str(disk.dev), str(mnt)])
            try:
                for name, data in files.items():
                    (mnt / name).write_bytes(data)
                os.sync()
            finally:
                guest.run(["umount", str(mnt)])
            assert vhci_port in guest.imported_ports()
        guest.wait_for_disk_gone("vhci_hcd")
    # Independently of the kernel: mtools reads the image file the server wrote.
    for name, data in files.items():
        assert hashlib.sha256(_mtools_read(image, name)).hexdigest() == hashlib.sha256(data).hexdigest()


def test_read_only_export_is_write_protected_in_the_kernel_and_image_is_unchanged(tmp_path: Path) -> None:
    from emulator.devices.mass_storage import mass_storage_device

    guest.modprobe("usb-storage", "sd_mod")
    image = tmp_path / "ro.img"
    image.write_bytes(os.urandom(4 << 20))
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    device = mass_storage_device([image], read_only=True)
    with served([device]) as port, guest.usbip_attached("127.0.0.1", "1-1", port=port):
        disk = guest.wait_for_disk("vhci_hcd", timeout=60)
        guest.poll(
            lambda: Path(f"/sys/block/{disk.name}/ro").read_text().strip() == "1",
            timeout=10,
            what="the kernel to mark the disk read-only (MODE SENSE WP bit)",
        )
        assert guest.sha256_of(disk.dev, direct=True) == before
        res = subprocess.run(
            ["dd", "if=/dev/zero", f"of={disk.dev}", "bs=4096", "count=1", "oflag=direct"],
            capture_output=True,
            text=True,
        )
        assert res.returncode != 0, "a write to a write-protected disk must fail"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_superspeed_disk_attaches_on_vhci_super_speed_hub_and_gets_1mib_commands(tmp_path: Path) -> None:
    """`vusb serve --speed super`: vhci puts the disk on its SuperSpeed hub, usb-storage gives it 1 MiB
    commands (max_sectors 2048), and 1 MiB O_DIRECT writes and reads land in the image byte for byte."""
    from emulator.devices.mass_storage import mass_storage_device
    from emulator.usb.setup import Speed

    guest.modprobe("usb-storage", "sd_mod")
    image = create_sparse_image(tmp_path / "ss.img", 8 << 20)
    data = os.urandom(4 << 20)
    device = mass_storage_device([image], speed=Speed.SUPER)
    with served([device]) as port:
        with guest.usbip_attached("127.0.0.1", "1-1", port=port):
            assert "Super Speed(5000Mbps)" in guest.usbip("port"), guest.usbip("port")
            disk = guest.wait_for_disk("vhci_hcd", timeout=60)
            usb_dev = Path(f"/sys/block/{disk.name}").resolve()
            while not (usb_dev / "speed").exists() or not (usb_dev / "idVendor").exists():
                usb_dev = usb_dev.parent
            assert (usb_dev / "speed").read_text().strip() == "5000"
            assert (usb_dev / "version").read_text().strip() == "3.20"  # bcdUSB
            assert Path(f"/sys/block/{disk.name}/queue/max_hw_sectors_kb").read_text().strip() == "1024"
            fd = os.open(disk.dev, os.O_RDWR | os.O_DIRECT)
            try:
                buf = guest_aligned(len(data))
                buf[:] = data
                assert os.pwritev(fd, [buf], 1 << 20) == len(data)
                os.fsync(fd)
                back = guest_aligned(len(data))
                assert os.preadv(fd, [back], 1 << 20) == len(data)
                assert bytes(back) == data
            finally:
                os.close(fd)
        guest.wait_for_disk_gone("vhci_hcd")
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert hashlib.sha256(f.read(len(data))).digest() == hashlib.sha256(data).digest()


def guest_aligned(size: int) -> mmap.mmap:
    """A page-aligned buffer, as O_DIRECT wants."""
    return mmap.mmap(-1, size)


def _input_event_device(under: str, timeout: float = 30) -> Path:
    def find() -> Path | None:
        for ev in sorted(Path("/sys/class/input").glob("event*")):
            if under in str(ev.resolve()):
                return Path("/dev/input") / ev.name
        return None

    return guest.poll(find, timeout=timeout, what=f"an input event device under {under}")


_INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on x86_64: timeval, type, code, value
EV_KEY = 1
KEY_H, KEY_I = 35, 23


def test_hid_keyboard_attached_keys_typed_through_python_arrive_as_evdev_events() -> None:
    from emulator.devices.hid import Keyboard, hid_keyboard_device

    guest.modprobe("usbhid", "hid-generic", "evdev")
    kb = Keyboard()
    with served([hid_keyboard_device(kb)]) as port, guest.usbip_attached("127.0.0.1", "1-1", port=port):
        node = _input_event_device("vhci_hcd")
        fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
        try:
            kb.type_text("hi")
            pressed: list[int] = []
            deadline = time.monotonic() + 20
            while len(pressed) < 2 and time.monotonic() < deadline:
                if not select.select([fd], [], [], 0.5)[0]:
                    continue
                data = os.read(fd, _INPUT_EVENT.size * 64)
                for off in range(0, len(data) - _INPUT_EVENT.size + 1, _INPUT_EVENT.size):
                    _, _, etype, code, value = _INPUT_EVENT.unpack_from(data, off)
                    if etype == EV_KEY and value == 1:
                        pressed.append(code)
        finally:
            os.close(fd)
    assert pressed == [KEY_H, KEY_I]


def _tty_under(under: str, timeout: float = 30) -> Path:
    def find() -> Path | None:
        for t in sorted(Path("/sys/class/tty").glob("ttyACM*")):
            if under in str(t.resolve()) and Path("/dev", t.name).exists():
                return Path("/dev", t.name)
        return None

    return guest.poll(find, timeout=timeout, what=f"a ttyACM device under {under}")


def test_cdc_acm_attached_tty_echoes_bytes() -> None:
    from emulator.devices.cdc_acm import cdc_acm_device

    guest.modprobe("cdc_acm")
    with served([cdc_acm_device()]) as port, guest.usbip_attached("127.0.0.1", "1-1", port=port):
        node = _tty_under("vhci_hcd")
        fd = os.open(node, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(fd)
            termios.tcflush(fd, termios.TCIOFLUSH)
            message = b"vusb says hello over USB/IP\n" * 4
            os.write(fd, message)
            got = b""
            deadline = time.monotonic() + 20
            while len(got) < len(message) and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.5)[0]:
                    got += os.read(fd, 4096)
        finally:
            os.close(fd)
    assert got == message
