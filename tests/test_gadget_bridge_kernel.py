"""The bridge with real kernels on both ends, in the VM: remote = the kernel's usbip-host exporting a configfs
f_mass_storage gadget, or vusb's own server with an emulated keyboard; local = a FunctionFS gadget on another
dummy_udc that the kernel's usb-storage / usbhid bind to. Also `vusb attach` / `port` / `detach` (bridge and
--vhci) and what happens when either side goes away.

Marked `kernel`: the host's pytest boots the QEMU guest once and runs them there (tools/vm).
"""

from __future__ import annotations

import contextlib
import difflib
import mmap
import os
import select
import subprocess
import sys
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.vm import guest

pytestmark = pytest.mark.kernel

GADGETS = Path("/sys/kernel/config/usb_gadget")
SIZE = 16 << 20


def _evdev_node(hcd: str) -> Path | None:
    for entry in Path("/sys/class/input").glob("event*"):
        if hcd in os.path.realpath(entry / "device"):
            return Path("/dev/input") / entry.name
    return None


def _vusb(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "emulator.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@contextlib.contextmanager
def _vusb_attach(port: int, udc: str, name: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """`vusb attach` bridging 127.0.0.1:PORT's 1-1 onto `udc` as gadget `name`, killed if still running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emulator.cli", "attach", "-r", "127.0.0.1", "-b", "1-1", "--tcp-port",
         str(port), "--udc", udc, "--name", name, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _vusb_detach(proc: subprocess.Popen[str], name: str) -> str:
    """`vusb detach -b NAME`; what the attach process printed until it exited."""
    stopped = _vusb("detach", "-b", name)
    assert stopped.returncode == 0, stopped.stderr
    output, _ = proc.communicate(timeout=60)
    return output


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


# What `lsusb -v` may show differently for the bridged device, and why (everything else must be equal):
LSUSB_RENUMBERED = {
    "bEndpointAddress",  # the UDC picks the endpoint numbers (dummy_udc's ep3 is isochronous-only)
    "bInterfaceNumber",  # libcomposite numbers the function's interfaces
}
LSUSB_STRING_INDEX = ("iManufacturer", "iProduct", "iSerial", "iConfiguration", "iInterface", "iFunction")
# string indices are libcomposite's (the texts must match); the Bus/Device line names a different bus


def _lsusb_v(sysfs_path: str) -> list[str]:
    bus = int(Path(sysfs_path, "busnum").read_text())
    dev = int(Path(sysfs_path, "devnum").read_text())
    text = guest.run(["lsusb", "-v", "-s", f"{bus}:{dev}"]).stdout
    lines = []
    for line in text.splitlines():
        words = line.split()
        if not words or line.startswith("Bus ") or words[0] in LSUSB_RENUMBERED:
            continue
        if words[0] in LSUSB_STRING_INDEX and len(words) >= 2 and words[1].isdigit():
            words[1] = "N"
        lines.append(" ".join(words))
    return lines


def test_lsusb_of_the_bridged_disk_equals_the_originals_but_for_the_numbers_libcomposite_and_the_udc_give(
        tmp_path):
    from gadgets.bridge import Bridge

    guest.modprobe("usb-storage", "sd_mod")
    remote_udc, local_udc = guest.dummy_udcs(2)[:2]
    remote_hcd, local_hcd = guest.hcd_of_udc(remote_udc), guest.hcd_of_udc(local_udc)
    backing = guest.make_backing_file(tmp_path / "backing.img", 1 << 20)
    with guest.mass_storage_gadget(backing, remote_udc, serial="vusblsusb1") as gadget:
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=remote_hcd)
        original = _lsusb_v(dev.sysfs_path)
        with guest.usbipd() as daemon, guest.usbip_bound(dev.busid), \
                Bridge("127.0.0.1", dev.busid, port=daemon.port, udc=local_udc):
            guest.wait_for_disk(local_hcd, timeout=60)
            (bridged,) = guest.usb_devices(local_hcd)
            mirrored = _lsusb_v(bridged.sysfs_path)
    assert "iSerial N vusblsusb1" in mirrored and any(line.startswith("bInterfaceClass 8") for line in mirrored)
    assert mirrored == original, "\n".join(difflib.unified_diff(original, mirrored, "original", "bridged",
                                                                 lineterm=""))


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
            typed = guest.keys_typed(node, lambda: keyboard.type_text("vusb"), 4)
            assert typed == [47, 22, 31, 48]  # KEY_V, KEY_U, KEY_S, KEY_B
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


def test_vusb_serial_port_bridged_is_a_tty_acm_that_echoes_what_is_written():
    from emulator.devices.cdc_acm import cdc_acm_device
    from emulator.server import ServerThread
    from gadgets.bridge import Bridge
    from gadgets.cli import cdc_acm_dynamic_id

    guest.modprobe("cdc_acm")
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    device = cdc_acm_device()  # vusb's loopback serial port
    message = os.urandom(5000)
    with ServerThread([device]) as server, cdc_acm_dynamic_id(device, True), \
            Bridge("127.0.0.1", "1-1", port=server.port, udc=udc) as bridge:
        node = guest.poll(lambda: _tty_acm_under(hcd), timeout=60, what="the bridged ttyACM node")
        fd = os.open(node, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)  # SET_LINE_CODING (a data stage) and SET_CONTROL_LINE_STATE reach the remote
            termios.tcflush(fd, termios.TCIOFLUSH)
            os.write(fd, message)
            echoed = b""
            deadline = time.monotonic() + 60
            while len(echoed) < len(message) and time.monotonic() < deadline:
                if select.select([fd], [], [], 0.5)[0]:
                    echoed += os.read(fd, 4096)
        finally:
            os.close(fd)
        assert bridge.failure is None
    assert echoed == message


def _tty_acm_under(hcd: str) -> Path | None:
    for entry in Path("/sys/class/tty").glob("ttyACM*"):
        if hcd in os.path.realpath(entry / "device"):
            return Path("/dev") / entry.name
    return None


def test_vusb_attach_bridge_reports_the_renumbering_shows_in_port_and_detach_stops_it():
    from emulator.devices.hid import hid_keyboard_device
    from emulator.server import ServerThread

    for module in ("usbhid", "hid-generic", "evdev"):
        guest.modprobe(module)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    with ServerThread([hid_keyboard_device()]) as server, \
            _vusb_attach(server.port, udc, "vusbtest-attach") as proc:
        guest.poll(lambda: _evdev_node(hcd), timeout=90, what="the bridged keyboard")
        listing = _vusb("port")
        assert listing.returncode == 0 and "vusbtest-attach" in listing.stdout + listing.stderr
        output = _vusb_detach(proc, "vusbtest-attach")
    assert proc.returncode == 0, output
    assert "libcomposite answers" in output and "SET_CONFIGURATION" in output, output
    assert "interface 0 -> host interface 0" in output and "(ep1) -> host endpoint 0x" in output, output
    assert not (GADGETS / "vusbtest-attach").exists()
    assert "vusbtest-attach" not in _vusb("port").stdout


def test_server_killed_mid_read_unplugs_the_bridged_disk_and_vusb_attach_exits_1_with_one_line(tmp_path):
    """SIGKILL of the remote `vusb serve` while dd reads through the bridge: the gadget goes (the kernel logs
    the disconnect), the reader ends, `vusb attach` exits 1 with the reason in one line, configfs is clean."""
    guest.modprobe("usb-storage", "sd_mod")
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    guest.poll(lambda: not guest.usb_devices(hcd), timeout=30, what=f"{hcd} free of earlier devices")
    image = guest.make_backing_file(tmp_path / "disk.img", 64 << 20)
    state = Path("/run/vusb/bridges/vusbtest-gone.json")
    port = 3311
    server = subprocess.Popen([sys.executable, "-m", "emulator.cli", "serve", "--disk", str(image), "--read-only",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    attach = reader = None
    try:
        guest.wait_for_tcp("127.0.0.1", port, timeout=120)
        attach = subprocess.Popen(
            [sys.executable, "-m", "emulator.cli", "attach", "-r", "127.0.0.1", "-b", "1-1", "--tcp-port",
             str(port), "--udc", udc, "--name", "vusbtest-gone"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        disk = guest.wait_for_disk(hcd, timeout=120)
        (bridged,) = guest.usb_devices(hcd)
        dmesg_before = len(guest.run(["dmesg"]).stdout.splitlines())
        reader = subprocess.Popen(["dd", f"if={disk.dev}", "of=/dev/null", "bs=1M", "iflag=direct"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stat = Path("/sys/block", disk.name, "stat")
        guest.poll(lambda: int(stat.read_text().split()[2]) > 8 << 11, timeout=60, what="dd to be reading")
        assert reader.poll() is None, "dd finished before the server could be killed mid-read"
        server.kill()  # SIGKILL: no goodbye on the USB/IP connection
        _, errors = attach.communicate(timeout=120)
        reader.wait(timeout=120)
    finally:
        for proc in (reader, attach, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert attach.returncode == 1, errors
    lines = [line for line in errors.splitlines() if line.strip()]  # after the start-up table, one line
    assert lines and lines[-1].startswith("vusb: error: the remote device went away: "), errors
    assert "Traceback" not in errors and sum("went away" in line for line in lines) == 1, errors
    assert reader.returncode != 0  # the disk went away under it
    new_dmesg = guest.run(["dmesg"]).stdout.splitlines()[dmesg_before:]
    assert any(f"usb {bridged.busid}: USB disconnect" in line for line in new_dmesg), "\n".join(new_dmesg)
    assert not guest.usb_devices(hcd)
    assert not [g.name for g in GADGETS.iterdir() if g.name.startswith("vusb")] and not state.exists()


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


def test_vusb_attach_record_writes_the_bridged_sessions_usbip_traffic_to_pcapng(tmp_path):
    """`vusb attach --record`: what the kernel's usb-storage reads through the bridge is in the recording —
    every READ(10) of the 4 MiB read paired with its CSW, passed, its data bytes all there."""
    from captures.transactions import analyze
    from emulator.devices.mass_storage import mass_storage_device
    from emulator.server import ServerThread

    guest.modprobe("usb-storage", "sd_mod")
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    guest.poll(lambda: not guest.usb_devices(hcd), timeout=30, what=f"{hcd} free of earlier devices")
    image = guest.make_backing_file(tmp_path / "disk.img", SIZE)
    recording = tmp_path / "bridge.pcapng"
    with ServerThread([mass_storage_device(image, read_only=True)]) as server, \
            _vusb_attach(server.port, udc, "vusbtest-rec", "--record", str(recording)) as proc:
        disk = guest.wait_for_disk(hcd, timeout=120)
        fd = os.open(disk.dev, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 4 << 20)
            assert os.preadv(fd, [buf], 0) == 4 << 20
        finally:
            os.close(fd)
        with open(image, "rb") as f:
            assert bytes(buf) == f.read(4 << 20)
        output = _vusb_detach(proc, "vusbtest-rec")
    assert proc.returncode == 0, output
    assert "recording the USB/IP session to" in output and "recorded " in output, output
    reads = [c for c in analyze(recording).scsi_commands if c.name == "READ_10"]
    covered = {lba for c in reads if c.csw_status == 0 and c.data_bytes == c.blocks * 512
               for lba in range(c.logical_block_address, c.logical_block_address + c.blocks)}
    assert set(range((4 << 20) // 512)) <= covered, f"{len(reads)} READ(10) recorded"
