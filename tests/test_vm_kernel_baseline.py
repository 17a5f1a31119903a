"""Baselines proving the kernel VM harness: the guest's own USB stack works, and the harness reports truthfully.

The `kernel` tests run inside the guest (one boot for all of them) and use only the kernel's gadget and usbip
code, so when a vusb kernel test fails, these tell whether the harness or vusb is at fault. The `vm` tests run
on the host and boot guests of their own to prove exit status, timeouts and crashes come back as they happened.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tools.vm import guest
from tools.vm.errors import VmBootError, VmTimeout

SIZE = 16 << 20


def _write_direct(dev: os.PathLike[str] | str, offset: int, data: bytes) -> None:
    """Write `data` (page-multiple length) at `offset` with O_DIRECT, so it reaches the device now."""
    import mmap

    buf = mmap.mmap(-1, len(data))
    buf[:] = data
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buf], offset) == len(data)
    finally:
        os.close(fd)
        buf.close()


@pytest.mark.kernel
def test_kernel_mass_storage_gadget_on_dummy_udc_reads_back_and_writes_through_to_backing_file(tmp_path):
    guest.modprobe("usb-storage", "sd_mod")
    backing = guest.make_backing_file(tmp_path / "backing.img", SIZE)
    original = backing.read_bytes()
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    patch = os.urandom(1 << 20)
    with guest.mass_storage_gadget(backing, udc):
        disk = guest.wait_for_disk(hcd, timeout=30)
        assert hcd in disk.sysfs_path and "vhci_hcd" not in disk.sysfs_path
        assert disk.size_bytes == SIZE
        assert guest.sha256_of(disk.dev, direct=True) == guest.sha256_of(backing)
        _write_direct(disk.dev, 3 << 20, patch)
    guest.wait_for_disk_gone(hcd)
    expected = original[: 3 << 20] + patch + original[4 << 20 :]
    assert backing.read_bytes() == expected


@pytest.mark.kernel
def test_kernel_usbip_exported_gadget_imported_through_vhci_reads_back_its_backing_file(tmp_path):
    guest.modprobe("usb-storage", "sd_mod")
    backing = guest.make_backing_file(tmp_path / "backing.img", SIZE)
    expected = guest.sha256_of(backing)
    udc = guest.free_udc()
    hcd = guest.hcd_of_udc(udc)
    with guest.mass_storage_gadget(backing, udc, serial="vusbip01") as gadget:
        dev = guest.wait_for_usb_device(gadget.vendor_id, gadget.product_id, under=hcd)
        guest.wait_for_disk(hcd, timeout=30)
        with guest.usbipd() as daemon, guest.usbip_bound(dev.busid):
            guest.wait_for_disk_gone(hcd)  # usbip-host took the device from usb-storage
            with guest.usbip_attached("127.0.0.1", dev.busid, port=daemon.port) as vhci_port:
                disk = guest.wait_for_disk("vhci_hcd", timeout=30)
                assert hcd not in disk.sysfs_path
                assert disk.size_bytes == SIZE
                assert guest.sha256_of(disk.dev, direct=True) == expected
            assert vhci_port not in guest.imported_ports()
            guest.wait_for_disk_gone("vhci_hcd")
        # Unbound: the device went back to the local usb-storage driver.
        local = guest.wait_for_disk(hcd, timeout=30)
        assert guest.sha256_of(local.dev, direct=True) == expected


@pytest.mark.kernel
def test_kernel_guest_has_the_modules_and_mounts_kernel_tests_rely_on():
    guest.modprobe("dummy_hcd", "libcomposite", "usb_f_fs", "usb_f_mass_storage", "usb_f_hid", "usb_f_acm")
    guest.modprobe(
        "usb-storage", "usbhid", "cdc_acm", "usbip-core", "usbip-host", "vhci-hcd", "usbmon", "evdev"
    )
    for module in ("dummy_hcd", "usb_f_fs", "usbip_host", "vhci_hcd", "usbmon", "evdev", "cdc_acm"):
        assert guest.module_loaded(module), module
    mounts = Path("/proc/mounts").read_text()
    assert " /sys/kernel/config configfs " in mounts
    assert " /sys/kernel/debug debugfs " in mounts
    assert os.path.isdir("/sys/kernel/debug/usb/usbmon")
    assert os.path.isdir("/dev/bus/usb")  # devtmpfs nodes for pyusb, with no udev
    with open("/sys/class/net/lo/operstate") as f:
        assert f.read().strip() in ("up", "unknown")
    tools = ("usbip", "usbipd", "lsusb", "mkfs.vfat", "mcopy", "tcpdump", "tshark")
    found = guest.run(["sh", "-c", "for t; do command -v $t || echo MISSING $t; done", "sh", *tools]).stdout
    assert "MISSING" not in found, found


# ---- host side: the harness tells the truth ----------------------------------------------------------


@pytest.mark.vm
def test_vm_run_returns_the_guest_commands_exit_status_and_separate_streams():
    from tools.vm import run_in_vm

    res = run_in_vm('echo to-out; echo to-err >&2; echo "$VUSB_PROBE"; exit 3', env={"VUSB_PROBE": "x y"})
    assert res.returncode == 3
    assert res.stdout == "to-out\nx y\n"
    assert res.stderr == "to-err\n"
    assert 0 < res.boot_seconds < res.wall_seconds


@pytest.mark.vm
def test_vm_guest_that_hangs_is_killed_at_the_timeout_with_its_output_so_far():
    from tools.vm import run_in_vm

    started = time.monotonic()
    with pytest.raises(
        VmTimeout, match=r"did not finish within 30 s and was killed; the command had been"
    ) as info:
        run_in_vm("echo started; sleep 600", timeout=30)
    assert time.monotonic() - started < 45
    assert info.value.stdout == "started\n"  # it was killed while running the command, not while booting


@pytest.mark.vm
def test_vm_guest_kernel_crash_is_an_error_with_the_console_tail():
    from tools.vm import run_in_vm

    with pytest.raises(VmBootError, match="without an exit status") as info:
        run_in_vm("echo c > /proc/sysrq-trigger; sleep 60", timeout=120)
    assert not isinstance(info.value, VmTimeout)
    assert "Kernel panic - not syncing: sysrq triggered crash" in info.value.console_tail, (
        "panic line not in tail"
    )
