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
from typing import Any

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


# --- the bridge: vusb attach / port / detach ---------------------------------------------------------------------


def _usbip(*args: str, port: int | None = None) -> str:
    """Run Linux's `usbip` tool; its errors become one line."""
    import shutil
    import subprocess

    tool = shutil.which("usbip")
    if tool is None:
        raise GadgetError("the `usbip` tool is missing (Debian: apt-get install usbip)")
    argv = [tool, *(("--tcp-port", str(port)) if port is not None else ()), *args]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if res.returncode != 0:
        raise GadgetError(f"`usbip {' '.join(args)}` failed: {(res.stderr or res.stdout).strip()[-300:]}")
    return res.stdout + res.stderr


@click.command("attach")
@click.option("-r", "--remote", "host", required=True, help="USB/IP server to import from.")
@click.option("-b", "--busid", required=True, help="Bus ID of the exported device (see `vusb list`).")
@click.option("--tcp-port", "tcp_port", default=3240, show_default=True, type=click.IntRange(1, 65535))
@click.option("--udc", default=None, help="Bridge: the UDC to present it on (default: the first free dummy_udc).")
@click.option("--name", default=None, help="Bridge: configfs gadget name (default: vusb-bridge-BUSID).")
@click.option("--vhci", is_flag=True, help="Use the kernel's `usbip attach` (vhci-hcd) instead of a gadget.")
@click.option("--record", type=click.Path(path_type=Path), default=None, metavar="FILE.pcapng",
              help="Bridge: record the USB/IP session to this pcapng file (wireshark -d tcp.port==3240,usbip).")
def attach_command(host: str, busid: str, tcp_port: int, udc: str | None, name: str | None, vhci: bool,
                   record: Path | None) -> None:
    """Import a remote USB/IP device and present it locally: as a gadget bridged by vusb (default, runs until
    Ctrl-C or until the remote goes away), or through the kernel's vhci-hcd (`--vhci`, returns at once)."""
    if vhci and record is not None:
        raise click.UsageError("--record needs the bridge: with --vhci the kernel moves the URBs, not vusb")
    if vhci:
        import subprocess

        subprocess.run(["modprobe", "vhci-hcd"], capture_output=True, check=False)
        _usbip("attach", "-r", host, "-b", busid, port=tcp_port)
        console.print(f"[green]attached[/] {busid} from {host}:{tcp_port} through vhci-hcd (see `vusb port`)")
        return
    from emulator.cli_host import recording

    udc = check_environment(udc)
    # The recorder is made before anything connects: a path that cannot be written is one clear error.
    with recording(record, mode="host", address=f"{host}:{tcp_port}", busids=(busid,)) as recorder:
        _bridge(host, busid, tcp_port, udc, name, recorder)


def _bridge(host: str, busid: str, tcp_port: int, udc: str, name: str | None, recorder: Any) -> None:
    """`vusb attach`'s bridge, until Ctrl-C, SIGTERM or the remote going away; `recorder` (or None) records."""
    from emulator.cli_host import note_import
    from gadgets.bridge import Bridge, BridgeError

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with Bridge(host, busid, port=tcp_port, udc=udc, name=name,
                    tap=recorder.tap if recorder is not None else None) as bridge:
            if recorder is not None and bridge.remote.remote is not None:
                note_import(recorder, bridge.remote.remote, "bridged to a gadget")
                console.print(f"recording the USB/IP session to {recorder.path}")
            assert bridge.image is not None and bridge.gadget is not None
            d = bridge.image.device
            table = Table(title="vusb bridge", show_header=False)
            table.add_row("remote", f"{busid} on {host}:{tcp_port} — {d.id_vendor:04x}:{d.id_product:04x} "
                          f"{bridge.image.strings.get(d.i_product, '')}, {bridge.image.speed.name.lower()} speed")
            table.add_row("gadget", f"{bridge.name} on {bridge.udc}")
            shown = report_lines(bridge.gadget.layout)
            for line in shown:
                table.add_row("note", line)
            console.print(table)
            console.print("[green]bridged[/] — Ctrl-C to detach")
            reported = False
            # Poll only until the numbers are out: a main thread waking up twice a second takes the GIL from
            # the bridge's loop each time, which shows in its latencies. A signal still ends a bare wait.
            while not bridge.wait(None if reported else 0.5):
                assert bridge.handler is not None
                for line in list(bridge.handler.reported):  # set once the host has configured the device
                    if line not in shown:  # the numbers libcomposite and the UDC gave, the link speed
                        console.print(f"note: {line}", highlight=False)
                        shown.append(line)
                    reported = True
            raise BridgeError(bridge.failure or "the bridge stopped on its own")
    except (KeyboardInterrupt, _Stop):
        console.print("detached: gadget unbound and removed, remote released")
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("port")
def port_command() -> None:
    """Show imported devices: vusb bridges (gadgets) and the kernel's vhci-hcd ports."""
    from gadgets.bridge import running_bridges

    table = Table(title="imported USB devices")
    for column in ("kind", "port / name", "remote", "id", "local"):
        table.add_column(column)
    for state in running_bridges():
        table.add_row("bridge", state["name"], f"{state['busid']} on {state['host']}:{state['port']}",
                      state.get("id", ""), f"{state.get('udc')} (pid {state['pid']})")
    if Path("/sys/devices/platform/vhci_hcd.0").exists():
        import re
        import shutil

        if shutil.which("usbip"):
            text = _usbip("port")
            for match in re.finditer(r"Port (\d+): <Port in Use>.*?\((\w{4}:\w{4})\).*?usbip://(\S+)", text, re.S):
                number, ids, url = match.groups()
                table.add_row("vhci", number, url, ids, "vhci_hcd")
    Console().print(table if table.row_count else "no imported devices")  # a listing: stdout


@click.command("detach")
@click.option("-p", "--port", "vhci_port", type=int, default=None, help="vhci port to detach (`usbip detach`).")
@click.option("-b", "--bridge", "bridge", default=None, help="Bridge to stop: its name or remote bus ID.")
def detach_command(vhci_port: int | None, bridge: str | None) -> None:
    """Detach an imported device: a vhci port, or a running vusb bridge (its gadget is removed)."""
    if (vhci_port is None) == (bridge is None):
        raise click.UsageError("give exactly one of --port N (vhci) or --bridge NAME")
    if vhci_port is not None:
        _usbip("detach", "-p", str(vhci_port))
        console.print(f"detached vhci port {vhci_port}")
        return
    from gadgets.bridge import running_bridges

    matches = [s for s in running_bridges() if bridge in (s["name"], s["busid"])]
    if not matches:
        raise GadgetError(f"no running bridge named {bridge!r} (see `vusb port`)")
    if len(matches) > 1:
        raise GadgetError(f"{bridge!r} matches {len(matches)} bridges: name one ({', '.join(s['name'] for s in matches)})")
    state = matches[0]
    os.kill(int(state["pid"]), signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not any(s["name"] == state["name"] for s in running_bridges()):
            console.print(f"detached bridge {state['name']}")
            return
        time.sleep(0.2)
    raise GadgetError(f"bridge {state['name']} (pid {state['pid']}) did not stop within 30 s")
