"""The importing side of the command line, shaped like Linux's `usbip`: `vusb list -r HOST`,
`vusb info -r HOST -b BUSID`, `vusb disk dump|write`, and `vusb demo` (server + userspace host in one
process, a round trip of a file-system image through an emulated thumb drive).

Everything here runs on the userspace host (`emulator.host`, `emulator.msc_host`): no kernel module, no
root. `--record FILE.pcapng` records the session on the importing side (`captures.record`). Files are never
left half-written: a dump goes to a temporary file next to the output and is renamed
only once complete (and verified, with --verify); on failure the temporary file is deleted and the error
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.tree import Tree

from emulator.host import (
    CONNECT_TIMEOUT,
    HostError,
    RemoteDevice,
    StallError,
    import_device,
    list_devices,
)
from emulator.msc_host import DEFAULT_MAX_TRANSFER, MassStorage
from emulator.usb.descriptors import (
    Descriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
    UnknownDescriptor,
)
from emulator.usb.setup import ClassCode, Speed
from emulator.usbip.constants import USBIP_PORT

CHUNK = 1 << 20
"""Bytes per progress step (16 READ/WRITE commands of 64 KiB)."""

_MIB = float(1 << 20)


def _console() -> Console:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: do not fold tables and lines at 80 columns
        console = Console(highlight=False, width=200)
    return console


_CLASS_NAMES = {ClassCode.PER_INTERFACE: "(per interface)", ClassCode.COMM: "CDC Communications",
                ClassCode.HID: "HID", ClassCode.CDC_DATA: "CDC Data", ClassCode.CSCID: "Smart Card",
                ClassCode.MISC: "Miscellaneous", ClassCode.APP_SPEC: "Application Specific",
                ClassCode.VENDOR_SPEC: "Vendor Specific", ClassCode.USB_TYPE_C_BRIDGE: "USB Type-C Bridge"}


def _class_name(code: int) -> str:
    try:
        klass = ClassCode(code)
    except ValueError:
        return f"class {code:#04x}"
    return _CLASS_NAMES.get(klass) or klass.name.replace("_", " ").title()


def _speed_name(speed: int) -> str:
    try:
        return {Speed.LOW: "1.5 Mbit/s (low)", Speed.FULL: "12 Mbit/s (full)", Speed.HIGH: "480 Mbit/s (high)",
                Speed.SUPER: "5 Gbit/s (super)", Speed.SUPER_PLUS: "10 Gbit/s (super+)"}[Speed(speed)]
    except (KeyError, ValueError):
        return f"unknown ({speed})"


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / _MIB:.1f} MiB in {seconds:.2f} s ({nbytes / _MIB / max(seconds, 1e-9):.1f} MiB/s)"


remote_option = click.option("-r", "--remote", "host", required=True, metavar="HOST",
                             help="The USB/IP server (name or address).")
port_option = click.option("-p", "--port", default=USBIP_PORT, show_default=True, type=click.IntRange(1, 65535),
                           help="The server's TCP port.")
busid_option = click.option("-b", "--busid", required=True, metavar="BUSID", help="The device's bus id (e.g. 1-1).")
record_option = click.option("--record", type=click.Path(path_type=Path), default=None,
                              metavar="FILE.pcapng", help="Record the USB/IP session to this pcapng file "
                              "(open it with: wireshark -d tcp.port==3240,usbip FILE).")
timeout_option = click.option("--timeout", default=CONNECT_TIMEOUT, show_default=True, type=click.FloatRange(0.1),
                              help="Seconds to wait for the server to connect and answer.")


@contextlib.contextmanager
def recording(path: Path | None, *, mode: str, address: str, busids: tuple[str, ...] = (),
               devices: tuple[Any, ...] = ()) -> Iterator[Any]:
    """A `captures.record.PcapngRecorder` for `--record` (None without it), closed and summed up at the end.
    Created before anything connects, so a path that cannot be written is one clear error up front."""
    if path is None:
        yield None
        return
    from captures.record import PcapngRecorder, RecordedDevice

    recorder = PcapngRecorder(path, mode=mode, address=address,
                              devices=devices or tuple(RecordedDevice(b) for b in busids))
    try:
        yield recorder
    finally:
        recorder.close()
        Console(stderr=True, highlight=False).print(recorder.summary())


def note_import(recorder: Any, device: RemoteDevice, detail: str | None = None) -> None:
    """Name the imported device in the recording (OP_REP_IMPORT carries only its busid and VID:PID)."""
    if recorder is not None:
        d = device.device_descriptor
        recorder.annotate(f"imported {device.busid}: {d.id_vendor:04x}:{d.id_product:04x}"
                          + (f" {detail}" if detail else "") + f" from {device.host}:{device.port}")


# -- vusb list ---------------------------------------------------------------------------------------------


@click.command("list")
@remote_option
@port_option
@timeout_option
def list_command(host: str, port: int, timeout: float) -> None:
    """List the devices a USB/IP server exports (OP_REQ_DEVLIST), like `usbip list -r`."""
    devices = asyncio.run(list_devices(host, port, timeout=timeout))
    console = _console()
    if not devices:
        console.print(f"{host}:{port} exports no devices")
        return
    table = Table(title=f"Exportable USB devices on {host}:{port}")
    for column in ("busid", "VID:PID", "speed", "device class", "interfaces", "path"):
        table.add_column(column)
    for extra in devices:
        d = extra.udev
        interfaces = ", ".join(f"{_class_name(i.bInterfaceClass)} ({i.bInterfaceClass:02x}/"
                               f"{i.bInterfaceSubClass:02x}/{i.bInterfaceProtocol:02x})" for i in extra.uinf)
        device_class = ("defined at interface level" if d.bDeviceClass == 0 else
                        f"{_class_name(d.bDeviceClass)} ({d.bDeviceClass:02x}/{d.bDeviceSubClass:02x}/"
                        f"{d.bDeviceProtocol:02x})")
        table.add_row(d.busid, f"{d.idVendor:04x}:{d.idProduct:04x}", _speed_name(d.speed), device_class,
                      interfaces or "-", d.path)
    console.print(table)


# -- vusb info ---------------------------------------------------------------------------------------------


def _fields(descriptor: Descriptor) -> list[tuple[str, Any]]:
    if isinstance(descriptor, UnknownDescriptor):
        return [("bDescriptorType", f"{descriptor.type_code:#04x}"), ("data", descriptor.payload.hex(" ") or "-")]
    out: list[tuple[str, Any]] = []
    for field in dataclasses.fields(descriptor):  # type: ignore[arg-type]
        value = getattr(descriptor, field.name)
        if field.name == "extra" and not value:
            continue
        if isinstance(value, bytes):
            value = value.hex(" ")
        elif isinstance(value, int) and (field.name.startswith(("id_", "bcd_")) or field.name == "attributes"):
            value = f"{value:#06x}" if field.name.startswith(("id_", "bcd_")) else f"{value:#04x}"
        elif field.name == "endpoint_address":
            value = f"{value:#04x} {'IN' if value & 0x80 else 'OUT'}"
        out.append((field.name, value))
    return out


async def _strings(device: RemoteDevice) -> dict[int, str]:
    indexes: set[int] = set()
    d = device.device_descriptor
    indexes.update((d.i_manufacturer, d.i_product, d.i_serial_number))
    for config in device.configurations:
        for descriptor in config.walk():
            for name in ("i_configuration", "i_interface", "i_function"):
                indexes.add(getattr(descriptor, name, 0))
    strings: dict[int, str] = {}
    for index in sorted(i for i in indexes if i):
        try:
            text = await device.get_string(index)
        except StallError:
            continue
        if text is not None:
            strings[index] = text
    return strings


def _label(descriptor: Descriptor, strings: dict[int, str]) -> str:
    fields = ", ".join(
        f"{name}={value}" + (f" “{strings[value]}”" if name.startswith("i_") and isinstance(value, int)
                              and value in strings else "")
        for name, value in _fields(descriptor))
    return f"[bold]{type(descriptor).__name__}[/] {fields}"


def describe(device: RemoteDevice, strings: dict[int, str]) -> Tree:
    """The device's descriptors as a tree: device → configuration → interface/alt → endpoint."""
    d = device.device_descriptor
    head = f"[bold]{device.busid}[/] {d.id_vendor:04x}:{d.id_product:04x}"
    names = [strings.get(i) for i in (d.i_manufacturer, d.i_product)]
    if any(names):
        head += " " + " ".join(n for n in names if n)
    tree = Tree(head)
    tree.add(f"speed {_speed_name(device.speed)}, devid {device.devid:#x}")
    tree.add(_label(d, strings))
    for config in device.configurations:
        node = tree.add(_label(config.descriptor, strings))
        for extra in config.descriptors:
            node.add(_label(extra, strings))
        for interface in config.interfaces:
            for alt in interface.alternates:
                for lead in alt.leading:
                    node.add(_label(lead, strings))
                desc: InterfaceDescriptor = alt.descriptor
                inode = node.add(f"[cyan]interface {desc.interface_number} alt {desc.alternate_setting}: "
                                 f"{_class_name(desc.interface_class)}[/] — {_label(desc, strings)}")
                for extra in alt.descriptors:
                    inode.add(_label(extra, strings))
                for endpoint in alt.endpoints:
                    e: EndpointDescriptor = endpoint.descriptor
                    enode = inode.add(f"[green]endpoint {e.endpoint_address:#04x} "
                                      f"{e.transfer_type.name.lower()} {'IN' if e.endpoint_address & 0x80 else 'OUT'}"
                                      f"[/] — {_label(e, strings)}")
                    for extra in endpoint.descriptors:
                        enode.add(_label(extra, strings))
    if strings:
        snode = tree.add("strings")
        for index, text in strings.items():
            snode.add(f"{index}: “{text}”")
    return tree


@click.command("info")
@remote_option
@busid_option
@port_option
@timeout_option
@record_option
def info_command(host: str, busid: str, port: int, timeout: float, record: Path | None) -> None:
    """Import a device and show its descriptors, read from the device itself, like `lsusb -v`."""

    async def run(recorder: Any) -> tuple[Tree, int]:
        tap = recorder.tap if recorder is not None else None
        async with await import_device(host, busid, port, timeout=timeout, tap=tap) as device:
            strings = await _strings(device)
            product = strings.get(device.device_descriptor.i_product)
            note_import(recorder, device, f"“{product}”" if product else None)
            return describe(device, strings), len(device.raw_configurations)

    with recording(record, mode="host", address=f"{host}:{port}", busids=(busid,)) as recorder:
        tree, _ = asyncio.run(run(recorder))
    _console().print(tree)


# -- vusb disk dump / write --------------------------------------------------------------------------------


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console)


@contextlib.asynccontextmanager
async def _open_disk(host: str, busid: str, port: int, timeout: float, lun: int, max_transfer: int,
                     urbs: int, recorder: Any = None) -> AsyncIterator[MassStorage]:
    tap = recorder.tap if recorder is not None else None
    async with await import_device(host, busid, port, timeout=timeout, tap=tap) as device:
        msc = await MassStorage(device, lun=lun, max_transfer=max_transfer, urbs_per_command=urbs).open()
        note_import(recorder, device, f"(SCSI INQUIRY “{msc.inquiry_data}”)")
        yield msc


def _show_disk(console: Console, msc: MassStorage) -> None:
    assert msc.capacity is not None and msc.inquiry_data is not None
    cap = msc.capacity
    console.print(f"[bold]{msc.device.busid}[/] LUN {msc.lun}: {msc.inquiry_data} — {cap.block_count} blocks "
                  f"of {cap.block_size} bytes = {cap.size / _MIB:.1f} MiB")


async def read_to(msc: MassStorage, size: int, sink: Callable[[bytes], object], progress: Progress,
                  label: str) -> tuple[str, float]:
    """Read the first `size` bytes of the disk into `sink`; the sha256 and seconds it took."""
    assert msc.capacity is not None
    bs = msc.capacity.block_size
    digest = hashlib.sha256()
    task = progress.add_task(label, total=size)
    start = time.perf_counter()
    position = 0
    while position < size:
        n = min(CHUNK, size - position)
        blocks = -(-n // bs)
        data = await msc.read_blocks(position // bs, blocks)
        data = data[:n]
        digest.update(data)
        sink(data)
        position += n
        progress.update(task, advance=n)
    return digest.hexdigest(), time.perf_counter() - start


async def write_from(msc: MassStorage, source: Any, size: int, progress: Progress, label: str) -> tuple[str, float]:
    """Write `size` bytes from the file `source` to the start of the disk; a partial last block keeps the
    rest of its old contents (read, patched, written). Returns the sha256 of what was written and seconds."""
    assert msc.capacity is not None
    bs = msc.capacity.block_size
    digest = hashlib.sha256()
    task = progress.add_task(label, total=size)
    start = time.perf_counter()
    position = 0
    while position < size:
        n = min(CHUNK, size - position)
        data = source.read(n)
        if len(data) != n:
            raise HostError(f"the input file ended early ({position + len(data)} of {size} bytes)")
        digest.update(data)
        if n % bs:
            whole = n - n % bs
            tail_lba = (position + whole) // bs
            tail = bytearray(await msc.read_blocks(tail_lba, 1))
            tail[:n - whole] = data[whole:]
            data = data[:whole] + bytes(tail)
        await msc.write_blocks(position // bs, data)
        position += n
        progress.update(task, advance=n)
    await msc.synchronize_cache()
    return digest.hexdigest(), time.perf_counter() - start


disk_options = [
    remote_option, busid_option, port_option, timeout_option,
    click.option("--lun", default=0, show_default=True, type=click.IntRange(0, 15), help="Logical unit."),
    click.option("--max-transfer", default=DEFAULT_MAX_TRANSFER, show_default=True, type=click.IntRange(512),
                 help="Bytes per READ/WRITE command."),
    click.option("--urbs", default=1, show_default=True, type=click.IntRange(1, 64),
                 help="Data URBs per command, submitted together."),
    click.option("--verify", is_flag=True, help="Read back and compare sha256."),
    record_option,
]


def _with_disk_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(disk_options):
        function = option(function)
    return function


@click.group("disk")
def disk_group() -> None:
    """Read or write a remote USB disk through the userspace mass-storage host (BOT + SCSI)."""


@disk_group.command("dump")
@_with_disk_options
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write the disk image to.")
def dump_command(host: str, busid: str, port: int, timeout: float, lun: int, max_transfer: int, urbs: int,
                 verify: bool, record: Path | None, output: Path) -> None:
    """Copy a whole remote disk into a file."""
    console = _console()
    directory = output.resolve().parent
    if not directory.is_dir():
        raise click.BadParameter(f"{directory} is not a directory", param_hint="--output")
    with recording(record, mode="host", address=f"{host}:{port}", busids=(busid,)) as recorder:
        _dump(console, host, busid, port, timeout, lun, max_transfer, urbs, verify, output, directory, recorder)


def _dump(console: Console, host: str, busid: str, port: int, timeout: float, lun: int, max_transfer: int,
          urbs: int, verify: bool, output: Path, directory: Path, recorder: Any) -> None:
    """The body of `vusb disk dump`, inside its recording (if any)."""
    try:
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below; renamed or deleted by hand
            dir=directory, prefix=f".{output.name}.", suffix=".partial", delete=False)
    except OSError as exc:
        raise HostError(f"cannot create a file in {directory}: {exc.strerror or exc}") from None
    temp = Path(handle.name)

    async def run() -> None:
        async with _open_disk(host, busid, port, timeout, lun, max_transfer, urbs, recorder) as msc:
            _show_disk(console, msc)
            assert msc.capacity is not None
            size = msc.capacity.size
            with _progress(console) as progress:
                digest, seconds = await read_to(msc, size, handle.write, progress, "reading")
                handle.flush()
                os.fsync(handle.fileno())
                console.print(f"read {_rate(size, seconds)}, sha256 {digest}")
                if verify:
                    again, seconds = await read_to(msc, size, lambda data: None, progress, "verifying")
                    on_disk = _sha256_file(temp)
                    if not digest == again == on_disk:
                        raise HostError(f"verification failed: first read {digest}, second read {again}, "
                                        f"file {on_disk}")
                    console.print(f"verified: device read twice and file agree ({_rate(size, seconds)})")

    try:
        try:
            asyncio.run(run())
        finally:
            handle.close()
        os.replace(temp, output)
    except BaseException as exc:
        temp.unlink(missing_ok=True)
        if isinstance(exc, HostError):
            raise HostError(f"{exc} — {output} was not written (partial data deleted)") from exc
        raise
    console.print(f"[green]wrote {output}[/]")


@disk_group.command("write")
@_with_disk_options
@click.option("-i", "--input", "input_", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The image file to write.")
def write_command(host: str, busid: str, port: int, timeout: float, lun: int, max_transfer: int, urbs: int,
                  verify: bool, record: Path | None, input_: Path) -> None:
    """Write a file to the start of a remote disk (like dd), then SYNCHRONIZE CACHE."""
    console = _console()
    size = input_.stat().st_size

    async def run(recorder: Any) -> None:
        async with _open_disk(host, busid, port, timeout, lun, max_transfer, urbs, recorder) as msc:
            _show_disk(console, msc)
            assert msc.capacity is not None
            if size > msc.capacity.size:
                raise HostError(f"{input_} is {size} bytes, larger than the disk ({msc.capacity.size} bytes)")
            with _progress(console) as progress, input_.open("rb") as source:
                digest, seconds = await write_from(msc, source, size, progress, "writing")
                console.print(f"wrote {_rate(size, seconds)}, sha256 {digest}")
                if verify:
                    back, seconds = await read_to(msc, size, lambda data: None, progress, "verifying")
                    if back != digest:
                        raise HostError(f"verification failed: wrote sha256 {digest}, read back {back}")
                    console.print(f"verified: read back {_rate(size, seconds)}, sha256 matches")

    with recording(record, mode="host", address=f"{host}:{port}", busids=(busid,)) as recorder:
        asyncio.run(run(recorder))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# -- vusb demo ---------------------------------------------------------------------------------------------

DEMO_DISK_SIZE = 32 << 20


def build_demo_image(directory: Path, size: int) -> tuple[Path, str]:
    """A file-system image to round-trip: FAT made with mkfs.vfat + mcopy if installed, else a generated
    image. Returns its path and a sentence saying which."""
    image = directory / "fs.img"
    mkfs, mcopy = shutil.which("mkfs.vfat") or shutil.which("mkfs.fat"), shutil.which("mcopy")
    if mkfs and mcopy:
        files = directory / "files"
        files.mkdir()
        (files / "README.TXT").write_text("This FAT image travelled over USB/IP through vusb's userspace host.\n")
        payload = min(4 << 20, size // 4)  # room to spare for the FAT and directory
        (files / "RANDOM.BIN").write_bytes(os.urandom(payload))
        try:
            subprocess.run([mkfs, "-C", "-n", "VUSBDEMO", str(image), str(size // 1024)], check=True,
                           capture_output=True, timeout=30)
            subprocess.run([mcopy, "-i", str(image), str(files / "README.TXT"), str(files / "RANDOM.BIN"), "::/"],
                           check=True, capture_output=True, timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            image.unlink(missing_ok=True)
            detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) \
                else str(exc)
            note = f"mkfs.vfat/mcopy failed ({detail}); "
        else:
            return image, (f"a FAT file system made with {Path(mkfs).name} + mcopy (README.TXT, RANDOM.BIN "
                           f"{payload / _MIB:g} MiB)")
    else:
        note = "mkfs.vfat/mcopy not installed; "
    # A generated image: a recognisable header, then pseudo-random blocks (nothing compresses it away).
    with image.open("wb") as f:
        f.write(b"VUSB DEMO IMAGE\n".ljust(512, b"\0"))
        remaining = size - 512
        while remaining:
            n = min(CHUNK, remaining)
            f.write(os.urandom(n))
            remaining -= n
    return image, note + "a generated image (header + random data)"


@click.command("demo")
@click.option("--size", default=DEMO_DISK_SIZE // (1 << 20), show_default=True, type=click.IntRange(1, 1024),
              help="Size of the emulated thumb drive in MiB.")
@click.option("--urbs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Data URBs per SCSI command.")
@record_option
def demo_command(size: int, urbs: int, record: Path | None) -> None:
    """Serve an emulated thumb drive on 127.0.0.1, import it with the userspace host, write a file-system
    image through it, read it back and check sha256. Leaves nothing behind."""
    from emulator.devices.mass_storage import mass_storage_device
    from emulator.devices.storage import create_sparse_image
    from emulator.server import UsbipServer

    console = _console()
    disk_size = size << 20
    with tempfile.TemporaryDirectory(prefix="vusb-demo-") as tmp:
        directory = Path(tmp)
        image, how = build_demo_image(directory, disk_size)
        readback = directory / "readback.img"
        image_size = image.stat().st_size
        console.print(f"[bold]image:[/] {how}, {image_size / _MIB:.1f} MiB")
        disk = create_sparse_image(directory / "thumbdrive.img", disk_size)
        device = mass_storage_device(str(disk), product="Demo Thumb Drive")

        async def run(recorder: Any) -> None:
            tap = recorder.tap if recorder is not None else None
            async with UsbipServer([device], host="127.0.0.1", port=0, tap=tap) as server:
                console.print(f"[bold]server:[/] vusb USB/IP server on 127.0.0.1:{server.port}, exporting an "
                              f"emulated thumb drive ({disk_size / _MIB:.0f} MiB sparse image)")
                for extra in await list_devices("127.0.0.1", server.port):
                    u = extra.udev
                    console.print(f"[bold]devlist:[/] {u.busid} {u.idVendor:04x}:{u.idProduct:04x} "
                                  f"{_speed_name(u.speed)}")
                async with await import_device("127.0.0.1", "1-1", server.port) as remote:
                    d = remote.device_descriptor
                    product = await remote.get_string(d.i_product) if d.i_product else None
                    console.print(f"[bold]imported:[/] {remote.busid} {d.id_vendor:04x}:{d.id_product:04x} "
                                  f"“{product or '?'}” over the userspace host")
                    msc = await MassStorage(remote, urbs_per_command=urbs).open()
                    assert msc.capacity is not None
                    console.print(f"[bold]INQUIRY:[/] {msc.inquiry_data}; [bold]capacity:[/] "
                                  f"{msc.capacity.block_count} blocks of {msc.capacity.block_size} bytes")
                    with _progress(console) as progress, image.open("rb") as source, \
                            readback.open("wb") as sink:
                        wrote, write_s = await write_from(msc, source, image_size, progress, "write")
                        back, read_s = await read_to(msc, image_size, sink.write, progress, "read back")
                    console.print(f"write: {_rate(image_size, write_s)}")
                    console.print(f"read:  {_rate(image_size, read_s)}")
                    console.print(f"sha256 written:   {wrote}")
                    console.print(f"sha256 read back: {back}")
                    if wrote != back:
                        raise HostError("the image read back differs from the one written (sha256 mismatch)")

        devices: tuple[Any, ...] = ()
        if record is not None:
            from captures.record import exported_devices

            devices = tuple(exported_devices([device], [f"demo drive, {disk_size / _MIB:.0f} MiB sparse image"]))
        with recording(record, mode="server", address="127.0.0.1 (a free port)", devices=devices) as recorder:
            asyncio.run(run(recorder))
        mdir = shutil.which("mdir")
        if mdir and how.startswith("a FAT"):
            listing = subprocess.run([mdir, "-i", str(readback), "::/"], capture_output=True, text=True,
                                     timeout=30)
            if listing.returncode == 0:
                console.print("[bold]mdir of the image read back:[/]")
                console.print(listing.stdout.rstrip(), markup=False)
    console.print("[bold green]OK:[/] the image read back is identical to the one written")


def register(cli: click.Group) -> None:
    """Add the host-side commands to the `vusb` group."""
    for command in (list_command, info_command, disk_group, demo_command):
        cli.add_command(command)


__all__ = ["build_demo_image", "describe", "register"]
