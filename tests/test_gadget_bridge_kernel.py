"""The bridge with real kernels on both ends, in the VM: remote = the kernel's usbip-host exporting a configfs
f_mass_storage gadget, or vusb's own server with an emulated keyboard; local = a FunctionFS gadget on another
dummy_udc that the kernel's usb-storage / usbhid bind to. Also `vusb attach` / `port` / `detach` (bridge and
--vhci) and what happens when either side goes away.

Marked `kernel`: the host's pytest boots the QEMU guest once and runs them there (tools/vm).
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.vm import guest

pytestmark = pytest.mark.kernel

INPUT_EVENT = struct.Struct("llHHi")
EV_KEY = 1
GADGETS = Path("/sys/kernel/config/usb_gadget")
SIZE = 16 << 20


def _evdev_node(hcd: str) -> Path | None:
    for entry in Path("/sys/class/input").glob("event*"):
        if hcd in os.path.realpath(entry / "device"):
            return Path("/dev/input") / entry.name
    return None


def _keys(node: Path, count: int, timeout: float = 30) -> list[int]:
    fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    pressed: list[int] = []
    pending = b""
    try:
        deadline = time.monotonic() + timeout
        while len(pressed) < count and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                pending += os.read(fd, 4096)
            while len(pending) >= INPUT_EVENT.size:
                _sec, _usec, kind, code, value = INPUT_EVENT.unpack_from(pending)
                pending = pending[INPUT_EVENT.size:]
                if kind == EV_KEY and value == 1:
                    pressed.append(code)
    finally:
        os.close(fd)
    return pressed


def _vusb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_kernel_usbip_host_disk_bridged_to_a_local_gadget_reads_back_and_writes_through(tmp_path):
    from gadgets.bridge import Bridge

    guest.modprobe("usb-storage", "sd_mod")
    udcs = guest.dummy_udcs(2)
    remote_udc, local_udc = udcs[0], udcs[1]
    remote_hcd, local_hcd = guest.hcd_of_udc(remote_udc), guest.hcd_of_udc(local_udc)
    backing = guest.make_backing_file(tmp_path / "backing.img", SIZE)
    original = backing.read_bytes()
    patch = os.urandom(1 << 20)
    with guest.mass_storage_gadget(backing, remote_udc, serial="vusbbr01") as gadget:
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=remote_hcd)
        with guest.usbipd() as daemon, guest.usbip_bound(dev.busid):
            guest.wait_for_disk_gone(remote_hcd)
            with Bridge("127.0.0.1", dev.busid, port=daemon.port, udc=local_udc) as bridge:
                disk = guest.wait_for_disk(local_hcd, timeout=60)
                assert "vhci_hcd" not in disk.sysfs_path and disk.size_bytes == SIZE
                assert guest.sha256_of(disk.dev, direct=True) == guest.sha256_of(backing)
                buf = mmap.mmap(-1, len(patch))
                buf[:] = patch
                fd = os.open(disk.dev, os.O_WRONLY | os.O_DIRECT)
                try:
                    assert os.pwritev(fd, [buf], 3 << 20) == len(patch)
                finally:
                    os.close(fd)
                    buf.close()
                assert bridge.failure is None
            guest.wait_for_disk_gone(local_hcd)
            assert not (GADGETS / bridge.name).exists()
    assert backing.read_bytes() == original[: 3 << 20] + patch + original[4 << 20 :]


def test_vusb_keyboard_bridged_types_into_evdev_unlinks_on_deconfigure_and_stops_when_the_server_goes():
    from emulator.devices.hid import Keyboard, hid_keyboard_device
    from emulator.server import ServerThread
    from gadgets.bridge import Bridge

    for module in ("usbhid", "hid-generic", "evdev"):
        guest.modprobe(module)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    keyboard = Keyboard()
    server = ServerThread([hid_keyboard_device(keyboard)]).start()
    try:
        with Bridge("127.0.0.1", "1-1", port=server.port, udc=udc) as bridge:
            assert bridge.handler is not None
            node = guest.poll(lambda: _evdev_node(hcd), timeout=60, what="the bridged keyboard's evdev node")
            keyboard.type_text("vusb")
            assert _keys(node, 4) == [47, 22, 31, 48]  # KEY_V, KEY_U, KEY_S, KEY_B
            busid = guest.usb_devices(hcd)[0].busid
            assert bridge.handler.outstanding() > 0
            Path(f"/sys/bus/usb/devices/{busid}/authorized").write_text("0")  # the local driver goes away
            guest.poll(lambda: bridge.handler.outstanding() == 0, timeout=20, what="the remote URBs unlinked")
            server.stop()
            assert bridge.wait(30), "the bridge did not stop when its remote went away"
            assert bridge.failure is not None and "went away" in bridge.failure
        assert not (GADGETS / bridge.name).exists()
        assert not guest.usb_devices(hcd)
    finally:
        server.stop()


def test_vusb_attach_bridge_shows_in_port_and_detach_stops_it():
    from emulator.devices.hid import hid_keyboard_device
    from emulator.server import ServerThread

    for module in ("usbhid", "hid-generic", "evdev"):
        guest.modprobe(module)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    with ServerThread([hid_keyboard_device()]) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", "attach", "-r", "127.0.0.1", "-b", "1-1", "--tcp-port",
             str(server.port), "--udc", udc, "--name", "vusbtest-attach"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            guest.poll(lambda: _evdev_node(hcd), timeout=90, what="the bridged keyboard")
            listing = _vusb("port")
            assert listing.returncode == 0 and "vusbtest-attach" in listing.stdout + listing.stderr
            stopped = _vusb("detach", "-b", "vusbtest-attach")
            assert stopped.returncode == 0, stopped.stderr
            output, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, output
    assert not (GADGETS / "vusbtest-attach").exists()
    assert "vusbtest-attach" not in _vusb("port").stdout


def test_vusb_attach_exits_non_zero_with_the_reason_when_the_remote_goes_away():
    from emulator.devices.hid import hid_keyboard_device
    from emulator.server import ServerThread

    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    guest.poll(lambda: not guest.usb_devices(hcd), timeout=30, what=f"{hcd} free of earlier devices")
    state = Path("/run/vusb/bridges/vusbtest-gone.json")
    server = ServerThread([hid_keyboard_device()]).start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "attach", "-r", "127.0.0.1", "-b", "1-1", "--tcp-port",
         str(server.port), "--udc", udc, "--name", "vusbtest-gone"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        guest.poll(state.exists, timeout=90, what="the bridge to start")
        guest.wait_for_usb_device(0x1209, 0x0001, under=hcd, timeout=60)
        server.stop()
        output, _ = proc.communicate(timeout=60)
    finally:
        server.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, output
    assert "remote device went away" in output and "Traceback" not in output
    assert not (GADGETS / "vusbtest-gone").exists() and not state.exists()


def test_vusb_attach_vhci_uses_the_kernels_usbip_and_detach_releases_the_port():
    from emulator.devices.hid import hid_keyboard_device
    from emulator.server import ServerThread

    with ServerThread([hid_keyboard_device()], host="127.0.0.1") as server:
        res = _vusb("attach", "--vhci", "-r", "127.0.0.1", "-b", "1-1", "--tcp-port", str(server.port))
        assert res.returncode == 0, res.stderr
        ports = guest.poll(lambda: guest.imported_ports() or None, timeout=30, what="a vhci port in use")
        (vhci_port,) = ports
        listing = _vusb("port")
        assert "vhci" in listing.stdout and "1209:0001" in listing.stdout
        res = _vusb("detach", "-p", str(vhci_port))
        assert res.returncode == 0, res.stderr
        guest.poll(lambda: not guest.imported_ports(), timeout=30, what="the vhci port released")
