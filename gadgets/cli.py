"""`vusb emulate --gadget KIND`: a vusb device model as a real USB gadget on a UDC, until Ctrl-C.

On a machine with a USB device controller (or `dummy_hcd`, whose host side is this same machine) the model
becomes a device the kernel's own drivers bind to: usb-storage for `mass-storage`, usbhid for the HID
ones, cdc_acm for `serial`. Ctrl-C or SIGTERM unbinds the UDC and removes the gadget from configfs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import click
from rich.console import Console
from rich.table import Table

from emulator.devices.base import Device
from emulator.errors import VusbError
from gadgets.configfs import GadgetError, ensure_configfs, free_udc, list_udcs
from gadgets.ffs import FunctionFsError, FunctionFsGadget, report_lines

log = logging.getLogger(__name__)
console = Console(stderr=True)

KINDS = ("mass-storage", "hid-keyboard", "hid-mouse", "serial")
CDC_ACM_DRIVER = Path("/sys/bus/usb/drivers/cdc_acm")
# cdc_acm's quirk table entry with NO_UNION_NORMAL (Conexant CX93010): a dynamic ID that copies it lets
# cdc_acm bind an ACM function whose functional descriptors FunctionFS could not carry.
NO_UNION_NORMAL_REFERENCE = (0x0572, 0x1321)


def check_environment(udc: str | None) -> str:
    """Root, configfs, FunctionFS and a free UDC, or one line that says what to do."""
    if os.geteuid() != 0:
        raise GadgetError("gadgets need root (configfs writes and FunctionFS mounts): run with sudo, or inside "
                          "the vusb VM (python -m tools.vm run -- ...)")
    ensure_configfs()
    if udc is None:
        return free_udc()
    if udc not in list_udcs():
        raise GadgetError(f"no UDC {udc} (have: {', '.join(list_udcs()) or 'none'}); for a local test bus "
                          "`modprobe dummy_hcd num=2`")
    return udc


def build_model(kind: str, *, disk: Path | None, read_only: bool, overlay: bool, size: str | None) -> tuple[Device, str]:
    """The model to present, and one line that describes it."""
    if kind == "mass-storage":
        assert disk is not None
        from emulator.cli_serve import open_store
        from emulator.devices.mass_storage import mass_storage_device

        if not disk.exists() and size is None:
            raise GadgetError(f"{disk} does not exist (give --size to create a sparse image)")
        store = open_store(disk, read_only=read_only, overlay=overlay, size=size)
        mode = "copy-on-write overlay" if overlay else "read-only" if read_only else "read-write"
        mib = store.block_count * store.block_size / 2**20
        return mass_storage_device([store], read_only=read_only), f"mass storage {disk} ({mib:.1f} MiB, {mode})"
    if kind == "hid-keyboard":
        from emulator.devices.hid import hid_keyboard_device

        return hid_keyboard_device(), "HID boot keyboard"
    if kind == "hid-mouse":
        from emulator.devices.hid import hid_mouse_device

        return hid_mouse_device(), "HID boot mouse"
    from emulator.devices.cdc_acm import cdc_acm_device

    return cdc_acm_device(), "CDC-ACM serial port (loopback)"


@contextlib.contextmanager
def cdc_acm_dynamic_id(device: Device, enabled: bool) -> Iterator[str | None]:
    """Tell the local cdc_acm driver to take this ACM function without its functional descriptors (f_fs
    refuses CS_INTERFACE descriptors), for the life of the gadget. Only sensible when the host is this
    machine (dummy_hcd)."""
    if not enabled:
        yield None
        return
    import subprocess

    subprocess.run(["modprobe", "cdc_acm"], capture_output=True, check=False)
    d = device.device_descriptor
    entry = f"{d.id_vendor:04x} {d.id_product:04x}"
    ref = " ".join(f"{x:04x}" for x in NO_UNION_NORMAL_REFERENCE)
    try:
        (CDC_ACM_DRIVER / "new_id").write_text(f"{entry} 02 {ref}")
    except OSError as exc:
        if exc.errno != 17:  # EEXIST: already there from an earlier run
            log.warning("cannot add %s to cdc_acm (%s): the host may not bind the serial port", entry, exc)
            yield None
            return
    try:
        yield entry
    finally:
        with contextlib.suppress(OSError):
            (CDC_ACM_DRIVER / "remove_id").write_text(entry)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@click.command("emulate")
@click.option("--gadget", "kind", type=click.Choice(KINDS), required=True, help="The device model to present.")
@click.option("--disk", type=click.Path(path_type=Path), help="mass-storage: the image file.")
@click.option("--read-only", is_flag=True, help="mass-storage: write-protected.")
@click.option("--overlay", is_flag=True, help="mass-storage: copy-on-write, the image is never modified.")
@click.option("--size", default=None, help="mass-storage: create a missing image as a sparse file (e.g. 64M).")
@click.option("--udc", default=None, help="USB device controller (default: the first free dummy_udc.N).")
@click.option("--name", default="vusb", show_default=True, help="configfs gadget name.")
@click.option("--type", "text", default=None, help="hid-keyboard: type this once the host has configured it.")
@click.option("--host-driver/--no-host-driver", default=None,
              help="serial: let the local cdc_acm bind (default: on for dummy_udc).")
def emulate_command(kind: str, disk: Path | None, read_only: bool, overlay: bool, size: str | None,
                    udc: str | None, name: str, text: str | None, host_driver: bool | None) -> None:
    """Present an emulated device to a USB host through a Linux gadget (configfs + FunctionFS)."""
    from gadgets.model import device_gadget

    if read_only and overlay:
        raise click.UsageError("--read-only and --overlay exclude each other")
    if text is not None and kind != "hid-keyboard":
        raise click.UsageError("--type is for --gadget hid-keyboard")
    if (kind == "mass-storage") != (disk is not None):
        raise click.UsageError("--disk PATH goes with --gadget mass-storage, and only with it")
    udc = check_environment(udc)
    device, description = build_model(kind, disk=disk, read_only=read_only, overlay=overlay, size=size)
    local_host = udc.startswith("dummy_udc.")
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with cdc_acm_dynamic_id(device, kind == "serial" and (host_driver if host_driver is not None
                                                              else local_host)) as acm_id, \
                device_gadget(device, name=name, udc=udc) as gadget:
            _summary(gadget, description, acm_id)
            if text is not None:
                _type_when_ready(gadget, device, text)
            while not gadget.wait(0.5):
                pass
            raise FunctionFsError("the FunctionFS event loop ended on its own")
    except (KeyboardInterrupt, _Stop):
        console.print("stopped: gadget unbound and removed")
    finally:
        signal.signal(signal.SIGTERM, previous)
        with contextlib.suppress(Exception):
            device.close()


def _summary(gadget: FunctionFsGadget, description: str, acm_id: str | None) -> None:
    spec = gadget.spec
    table = Table(title="vusb gadget", show_header=False)
    table.add_row("device", f"{description} — {spec.idVendor:04x}:{spec.idProduct:04x}")
    table.add_row("gadget", f"{spec.name} on {gadget.udc}"
                  + (f" (host side: dummy_hcd.{gadget.udc.split('.')[-1]})" if gadget.udc and
                     gadget.udc.startswith("dummy_udc.") else ""))
    for line in report_lines(gadget.layout):
        table.add_row("note", line)
    if acm_id:
        table.add_row("host", f"cdc_acm told to bind {acm_id} (dynamic ID with the NO_UNION_NORMAL quirk)")
    console.print(table)
    console.print("[green]bound[/] — Ctrl-C to stop")


def _type_when_ready(gadget: FunctionFsGadget, device: Device, text: str) -> None:
    """Type once the host has configured the keyboard and had a moment to open it."""
    from emulator.devices.hid import Keyboard

    keyboard = next(f for f in device.functions if isinstance(f, Keyboard))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not device.configured:
        if gadget.wait(0.1):
            return
    if not device.configured:
        raise VusbError("the host did not configure the keyboard within 30 s; nothing typed")
    time.sleep(1.0)
    keyboard.type_text(text)
    console.print(f"typed {len(text)} characters")
