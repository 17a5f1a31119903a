"""`vusb serve`: export emulated devices over USB/IP until Ctrl-C.

Each `--disk` is one thumb drive (busid 1-1, 1-2, ... in the order given), then the HID and serial devices.
Ctrl-C (or SIGTERM) stops accepting, ends the sessions, and flushes + fsyncs every image before exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from emulator.devices.base import Device
from emulator.devices.storage import ImageStore, OverlayStore, Store, create_sparse_image, parse_size
from emulator.errors import VusbError
from emulator.server import USBIP_PORT, UsbipServer
from emulator.usb.setup import Speed

console = Console(stderr=True)


def open_store(path: Path, *, read_only: bool, overlay: bool, size: str | None) -> Store:
    """The backing store for one `--disk`: create a sparse image when `--size` is given and it is missing."""
    if size is not None and not path.exists():
        create_sparse_image(path, parse_size(size))
    if overlay:
        return OverlayStore(path)
    return ImageStore(path, read_only=read_only)


def build_devices(
    disks: tuple[Path, ...],
    *,
    read_only: bool,
    overlay: bool,
    size: str | None,
    vendor: str,
    product: str,
    hid_keyboard: bool,
    hid_mouse: bool,
    serial: bool,
    speed: Speed = Speed.SUPER,
) -> list[tuple[Device, str]]:
    """The devices to export, each with a one-line description for the summary."""
    from emulator.devices.mass_storage import mass_storage_device

    devices: list[tuple[Device, str]] = []
    for path in disks:
        store = open_store(path, read_only=read_only, overlay=overlay, size=size)
        mode = "copy-on-write overlay" if overlay else "read-only" if read_only else "read-write"
        dev = mass_storage_device([store], vendor=vendor, product=product, read_only=read_only, speed=speed)
        size_mib = store.block_count * store.block_size / 2**20
        devices.append((dev, f"mass storage: {path} ({size_mib:.1f} MiB, {mode}, {speed.name.lower()} speed)"))
    if hid_keyboard:
        from emulator.devices.hid import hid_keyboard_device

        devices.append((hid_keyboard_device(), "HID boot keyboard"))
    if hid_mouse:
        from emulator.devices.hid import hid_mouse_device

        devices.append((hid_mouse_device(), "HID boot mouse"))
    if serial:
        from emulator.devices.cdc_acm import cdc_acm_device

        devices.append((cdc_acm_device(), "CDC-ACM serial (loopback)"))
    return devices


async def serve(server: UsbipServer) -> None:
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    console.print(f"[green]listening on {server.host}:{server.port}[/] — Ctrl-C to stop")
    try:
        await stop.wait()
    finally:
        console.print("stopping: closing sessions, syncing images")
        await server.close()


@click.command("serve")
@click.option(
    "--listen", "host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all)."
)
@click.option("--port", default=USBIP_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--disk",
    "disks",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image file to export as a thumb drive (repeatable).",
)
@click.option("--read-only", is_flag=True, help="Export the disks write-protected.")
@click.option(
    "--overlay", is_flag=True, help="Copy-on-write: writes go to memory, the image is never modified."
)
@click.option(
    "--size", default=None, help="Create missing --disk images as sparse files of this size (e.g. 64M)."
)
@click.option("--vendor", default="vusb", show_default=True, help="SCSI INQUIRY vendor of the disks.")
@click.option(
    "--product", default="Virtual Disk", show_default=True, help="SCSI INQUIRY product of the disks."
)
@click.option(
    "--speed",
    type=click.Choice(["high", "super"]),
    default="super",
    show_default=True,
    help="Speed the disks report: a USB 3 thumb drive (super) or a USB 2 one (high). Linux's usb-storage "
    "gives a SuperSpeed disk 1 MiB commands (max_sectors 2048) instead of 120 KiB: a ninth of the URBs per byte.",
)
@click.option("--hid-keyboard", is_flag=True, help="Export a HID boot keyboard.")
@click.option("--hid-mouse", is_flag=True, help="Export a HID boot mouse.")
@click.option("--serial", is_flag=True, help="Export a CDC-ACM serial port (loopback).")
@click.option(
    "--record",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE.pcapng",
    help="Record every USB/IP session to this pcapng file (Wireshark: -d tcp.port==3240,usbip).",
)
def serve_command(
    host: str,
    port: int,
    disks: tuple[Path, ...],
    read_only: bool,
    overlay: bool,
    size: str | None,
    vendor: str,
    product: str,
    speed: str,
    hid_keyboard: bool,
    hid_mouse: bool,
    serial: bool,
    record: Path | None,
) -> None:
    """Export emulated USB devices over USB/IP (Linux `usbip attach -r HOST -b 1-1` imports them)."""
    if read_only and overlay:
        raise click.UsageError("--read-only and --overlay exclude each other")
    devices = build_devices(
        disks,
        read_only=read_only,
        overlay=overlay,
        size=size,
        vendor=vendor,
        product=product,
        hid_keyboard=hid_keyboard,
        hid_mouse=hid_mouse,
        serial=serial,
        speed=Speed.SUPER if speed == "super" else Speed.HIGH,
    )
    if not devices:
        raise click.UsageError("nothing to export: give --disk PATH, --hid-keyboard, --hid-mouse or --serial")
    recorder = None
    if record is not None:
        from captures.record import PcapngRecorder, exported_devices

        try:
            recorder = PcapngRecorder(
                record,
                mode="server",
                address=f"{host}:{port}",
                devices=exported_devices([d for d, _ in devices], [text for _, text in devices]),
            )
        except VusbError:
            for dev, _ in devices:
                with contextlib.suppress(Exception):
                    dev.close()
            raise
    server = UsbipServer([d for d, _ in devices], host=host, port=port, tap=recorder.tap if recorder else None)
    table = Table(title="vusb exports", show_lines=False)
    table.add_column("busid")
    table.add_column("id")
    table.add_column("device")
    for (busid, export), (_, text) in zip(server.exports.items(), devices, strict=True):
        d = export.device.device_descriptor
        table.add_row(busid, f"{d.id_vendor:04x}:{d.id_product:04x}", text)
    console.print(table)
    if recorder is not None:
        console.print(f"recording every session to {record}")
    try:
        asyncio.run(serve(server))
    finally:  # also when the server never started (port in use): the images are still flushed and closed
        for dev, _ in devices:
            with contextlib.suppress(Exception):
                dev.close()
        if recorder is not None:
            recorder.close()
            console.print(recorder.summary(), highlight=False)
