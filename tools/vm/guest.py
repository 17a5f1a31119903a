"""Helpers for tests that run inside the guest (kernel-marked tests): modules, configfs gadgets, disks, usbip.

Everything waits by polling with a deadline (never a bare sleep as synchronisation), finds devices by their
sysfs path rather than their name (after `usbip bind` the local /dev/sdX vanishes and the imported disk may
take the same name), and undoes what it set up even when the body fails. Standard library only: Python in the
TCG guest is 12-15x slower than on the host, so imports stay lean.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tools.vm.errors import VmError

T = TypeVar("T")

CONFIGFS_GADGETS = Path("/sys/kernel/config/usb_gadget")
UDC_CLASS = Path("/sys/class/udc")
USB_DEVICES = Path("/sys/bus/usb/devices")
USBIP_PORT = 3240


class GuestError(VmError):
    """A guest-side step failed (a command, a wait, a configfs write); the message says which."""


def in_vm() -> bool:
    """True inside a guest started by the harness."""
    return os.environ.get("VUSB_IN_VM") == "1"


def poll(check: Callable[[], T | None], *, timeout: float, what: str, interval: float = 0.05) -> T:
    """Call `check` until it returns neither None nor False, and return that; `GuestError` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure (when `check`) raise with its exit status and output."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise GuestError(f"`{argv[0]}` is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from exc
    if check and res.returncode != 0:
        raise GuestError(
            f"`{' '.join(argv)}` exited {res.returncode}: {(res.stderr or res.stdout).strip()[-1000:]}"
        )
    return res


def write_attr(path: Path, value: str) -> None:
    """Write one sysfs/configfs attribute, naming the file in the error."""
    try:
        path.write_text(value)
    except OSError as exc:
        raise GuestError(f"writing {value!r} to {path} failed: {exc.strerror or exc}") from exc


# ---- modules -----------------------------------------------------------------------------------------


def modprobe(*modules: str, **params: object) -> None:
    """Load modules (plain `modprobe`, so dependencies come along); `params` apply to a single module."""
    if not modules:
        raise GuestError("modprobe: no module named")
    if params and len(modules) != 1:
        raise GuestError("modprobe: parameters can only be given for one module at a time")
    if params:
        run(["modprobe", modules[0], *(f"{k}={v}" for k, v in params.items())])
    else:
        run(["modprobe", "-a", *modules])  # one process: each exec costs ~0.3 s under TCG


def module_loaded(module: str) -> bool:
    return Path("/sys/module", module.replace("-", "_")).is_dir()


def dummy_udcs(count: int = 1) -> list[str]:
    """Make sure dummy_hcd provides at least `count` UDCs (`dummy_udc.0` ...); returns their names.

    dummy_hcd takes its controller count at load time, so a smaller earlier load is reloaded (possible only
    while no gadget is bound to it).
    """
    if not 1 <= count <= 32:
        raise GuestError(f"dummy_hcd supports 1..32 controllers, not {count}")
    have = sorted(p.name for p in UDC_CLASS.glob("dummy_udc.*")) if UDC_CLASS.is_dir() else []
    if len(have) < count:
        if module_loaded("dummy_hcd"):
            bound = [u for u in have if udc_function(u)]
            if bound:
                raise GuestError(
                    f"dummy_hcd must be reloaded for {count} UDCs but {bound} have gadgets bound"
                )
            run(["modprobe", "-r", "dummy_hcd"])
        modprobe("dummy_hcd", num=count)
        names = [f"dummy_udc.{i}" for i in range(count)]
        poll(lambda: all((UDC_CLASS / n).exists() for n in names), timeout=10, what=f"{count} dummy UDCs")
        have = sorted(p.name for p in UDC_CLASS.glob("dummy_udc.*"))
    return have


def udc_function(udc: str) -> str:
    """The gadget bound to a UDC ('' when free)."""
    try:
        return (UDC_CLASS / udc / "function").read_text().strip()
    except FileNotFoundError as exc:
        raise GuestError(f"no UDC named {udc}") from exc


def free_udc(count: int = 2) -> str:
    """A dummy UDC with no gadget bound (loading dummy_hcd with `count` controllers if needed)."""
    for udc in dummy_udcs(count):
        if not udc_function(udc):
            return udc
    raise GuestError("every dummy UDC has a gadget bound")


def hcd_of_udc(udc: str) -> str:
    """The host-side platform device that sees what is bound to `udc` (`dummy_udc.N` -> `dummy_hcd.N`)."""
    m = re.fullmatch(r"dummy_udc\.(\d+)", udc)
    if not m:
        raise GuestError(f"{udc!r} is not a dummy_hcd UDC")
    return f"dummy_hcd.{m.group(1)}"


# ---- configfs gadgets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gadget:
    name: str
    path: Path
    udc: str
    vendor_id: int
    product_id: int
    serial: str


@contextlib.contextmanager
def mass_storage_gadget(
    backing: str | Path,
    udc: str,
    *,
    name: str = "vusb_ms",
    vendor_id: int = 0x1D6B,
    product_id: int = 0x0104,
    serial: str = "vusb0001",
    removable: bool = False,
    read_only: bool = False,
) -> Iterator[Gadget]:
    """A configfs gadget with one f_mass_storage LUN on `backing`, bound to `udc`; torn down on exit.

    Teardown (always, in reverse order of what was done): unbind UDC, unlink the function from the config,
    rmdir config strings, config, function, gadget strings, gadget. A teardown failure is raised unless the
    body already failed.
    """
    backing = Path(backing)
    if not backing.is_file() or backing.stat().st_size < 512:
        raise GuestError(f"backing file {backing} must exist and hold at least one 512-byte block")
    modprobe("libcomposite", "usb_f_mass_storage")
    if not CONFIGFS_GADGETS.is_dir():
        raise GuestError(f"{CONFIGFS_GADGETS} is missing: configfs is not mounted or libcomposite is absent")
    gadget = CONFIGFS_GADGETS / name
    if gadget.exists():
        raise GuestError(f"a gadget named {name} already exists in configfs")
    undo: list[Callable[[], None]] = []

    def mkdir(path: Path) -> None:
        try:
            path.mkdir()
        except OSError as exc:
            raise GuestError(f"mkdir {path} failed: {exc.strerror or exc}") from exc
        undo.append(path.rmdir)

    try:
        mkdir(gadget)
        write_attr(gadget / "idVendor", f"0x{vendor_id:04x}")
        write_attr(gadget / "idProduct", f"0x{product_id:04x}")
        mkdir(gadget / "strings" / "0x409")
        write_attr(gadget / "strings" / "0x409" / "manufacturer", "vusb")
        write_attr(gadget / "strings" / "0x409" / "product", "vusb test mass storage")
        write_attr(gadget / "strings" / "0x409" / "serialnumber", serial)
        config = gadget / "configs" / "c.1"
        mkdir(config)
        mkdir(config / "strings" / "0x409")
        write_attr(config / "strings" / "0x409" / "configuration", "mass storage")
        function = gadget / "functions" / "mass_storage.0"
        mkdir(function)
        lun = function / "lun.0"
        write_attr(lun / "removable", "1" if removable else "0")
        write_attr(lun / "ro", "1" if read_only else "0")
        write_attr(lun / "file", str(backing.resolve()))
        link = config / "mass_storage.0"
        link.symlink_to(function)
        undo.append(link.unlink)
        write_attr(gadget / "UDC", udc)

        def unbind() -> None:
            if udc_function(udc) == name:
                write_attr(gadget / "UDC", "\n")

        undo.append(unbind)
        yield Gadget(name, gadget, udc, vendor_id, product_id, serial)
    except BaseException:
        _undo_all(undo, raise_errors=False)
        raise
    _undo_all(undo, raise_errors=True)


def _undo_all(undo: list[Callable[[], None]], *, raise_errors: bool) -> None:
    errors: list[BaseException] = []
    for step in reversed(undo):
        try:
            step()
        except (OSError, GuestError) as exc:
            errors.append(exc)
    undo.clear()
    if errors and raise_errors:
        raise GuestError(f"gadget teardown failed: {'; '.join(map(str, errors))}")


# ---- USB devices and disks ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UsbDevice:
    busid: str
    sysfs_path: str
    vendor_id: int
    product_id: int


def usb_devices(under: str | None = None) -> list[UsbDevice]:
    """USB devices (not interfaces, not root hubs) whose resolved sysfs path contains `under`."""
    found = []
    for entry in sorted(USB_DEVICES.glob("*")) if USB_DEVICES.is_dir() else []:
        if ":" in entry.name or entry.name.startswith("usb"):
            continue
        real = os.path.realpath(entry)
        if under is not None and under not in real:
            continue
        try:
            vid = int((entry / "idVendor").read_text(), 16)
            pid = int((entry / "idProduct").read_text(), 16)
        except (OSError, ValueError):
            continue  # vanished or half-registered: the next poll sees it settled
        found.append(UsbDevice(entry.name, real, vid, pid))
    return found


def wait_for_usb_device(vendor_id: int, product_id: int, *, under: str, timeout: float = 20) -> UsbDevice:
    """The device `vendor_id:product_id` below `under` (e.g. `dummy_hcd.0`), once it is enumerated."""

    def find() -> UsbDevice | None:
        return next(
            (d for d in usb_devices(under) if (d.vendor_id, d.product_id) == (vendor_id, product_id)), None
        )

    return poll(find, timeout=timeout, what=f"USB device {vendor_id:04x}:{product_id:04x} under {under}")


@dataclass(frozen=True)
class Disk:
    name: str
    dev: Path
    sysfs_path: str
    size_bytes: int


def block_disks() -> list[Disk]:
    """Whole-disk block devices with a device node, a non-zero size, and their resolved sysfs paths."""
    disks = []
    for entry in sorted(Path("/sys/block").iterdir()):
        try:
            size = int((entry / "size").read_text()) * 512
            major, minor = map(int, (entry / "dev").read_text().split(":"))
            node = os.stat(f"/dev/{entry.name}")
        except (OSError, ValueError):
            continue
        if size and stat.S_ISBLK(node.st_mode) and node.st_rdev == os.makedev(major, minor):
            disks.append(Disk(entry.name, Path("/dev", entry.name), os.path.realpath(entry), size))
    return disks


DiskMatch = str | Callable[[Disk], bool]


def _matcher(match: DiskMatch) -> Callable[[Disk], bool]:
    return (lambda d: match in d.sysfs_path) if isinstance(match, str) else match


def wait_for_disk(match: DiskMatch, *, timeout: float = 30) -> Disk:
    """The disk whose sysfs path contains `match` (e.g. `dummy_hcd.0`, `vhci_hcd`), or that satisfies it."""
    pred = _matcher(match)
    return poll(
        lambda: next((d for d in block_disks() if pred(d)), None), timeout=timeout, what=f"a disk {match}"
    )


def wait_for_disk_gone(match: DiskMatch, *, timeout: float = 30) -> None:
    pred = _matcher(match)
    poll(lambda: not any(pred(d) for d in block_disks()), timeout=timeout, what=f"disk {match} to go away")


# ---- data ----------------------------------------------------------------------------------------


_INPUT_EVENT = struct.Struct("llHHi")  # struct input_event on 64-bit
_EV_KEY = 1


def keys_typed(node: Path, type_them: Callable[[], None], count: int, *, timeout: float = 30) -> list[int]:
    """Key codes of the first `count` presses on evdev `node` after `type_them()` (fewer on timeout). The node is
    opened first: the console's keyboard handler keeps usbhid polling, so keys typed before a reader has the
    node open never reach that reader."""
    fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
    pressed: list[int] = []
    pending = b""
    try:
        type_them()
        deadline = time.monotonic() + timeout
        while len(pressed) < count and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.5)[0]:
                pending += os.read(fd, 4096)
            while len(pending) >= _INPUT_EVENT.size:
                _sec, _usec, kind, code, value = _INPUT_EVENT.unpack_from(pending)
                pending = pending[_INPUT_EVENT.size:]
                if kind == _EV_KEY and value == 1:
                    pressed.append(code)
    finally:
        os.close(fd)
    return pressed


def make_backing_file(path: str | Path, size_bytes: int) -> Path:
    """A file of `size_bytes` random bytes (a multiple of 512), e.g. in /tmp (a tmpfs overlay in the guest)."""
    if size_bytes <= 0 or size_bytes % 512:
        raise GuestError(f"backing size {size_bytes} must be a positive multiple of 512")
    path = Path(path)
    with path.open("wb") as f:
        left = size_bytes
        while left:
            chunk = min(left, 1 << 20)
            f.write(os.urandom(chunk))
            left -= chunk
    return path


def drop_caches() -> None:
    os.sync()
    write_attr(Path("/proc/sys/vm/drop_caches"), "3")


def sha256_of(path: str | Path, *, direct: bool = False, length: int | None = None) -> str:
    """sha256 of a file or device (the first `length` bytes if given); `direct` reads with O_DIRECT, so a
    block device's answer comes from the device, not the page cache."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    digest = hashlib.sha256()
    block = 1 << 20
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT requires
    fd = os.open(path, flags)
    try:
        left = length
        while left is None or left > 0:
            n = os.readv(fd, [buf])
            if n == 0:
                break
            take = n if left is None else min(n, left)
            digest.update(buf[:take])
            if left is not None:
                left -= take
    finally:
        os.close(fd)
        buf.close()
    if left:
        raise GuestError(f"{path} ended {left} bytes before the requested {length}")
    return digest.hexdigest()


# ---- usbip (Linux's own tools) ------------------------------------------------------------------------


def wait_for_tcp(host: str, port: int, *, timeout: float = 20) -> None:
    def connects() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex((host, port)) == 0

    poll(connects, timeout=timeout, what=f"TCP {host}:{port} to accept connections")


@dataclass(frozen=True)
class Usbipd:
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path


@contextlib.contextmanager
def usbipd(port: int = USBIP_PORT, *, timeout: float = 20) -> Iterator[Usbipd]:
    """Linux's `usbipd` in the foreground (loads usbip-host), ready on 127.0.0.1:`port`; killed by PID on exit.

    Its log goes to a file (`log_path`), so a chatty daemon never blocks on a full pipe.
    """
    modprobe("usbip-host")
    fd, log_name = tempfile.mkstemp(prefix="usbipd-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        proc = subprocess.Popen(["usbipd", "-4", "--tcp-port", str(port)], stdout=log, stderr=log)
    try:

        def ready() -> bool:
            if proc.poll() is not None:
                raise GuestError(f"usbipd exited {proc.returncode}: {log_path.read_text()[-1000:]}")
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", port)) == 0

        poll(ready, timeout=timeout, what=f"usbipd to listen on port {port}")
        yield Usbipd(proc, port, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def usbip(*args: str, port: int = USBIP_PORT, timeout: float = 60) -> str:
    """Run `usbip --tcp-port PORT ARGS...`; returns stdout+stderr (usbip logs to stderr)."""
    res = run(["usbip", "--tcp-port", str(port), *args], timeout=timeout)
    return res.stdout + res.stderr


def usbip_bind(busid: str) -> None:
    usbip("bind", "-b", busid)


def usbip_unbind(busid: str) -> None:
    usbip("unbind", "-b", busid)


@contextlib.contextmanager
def usbip_bound(busid: str) -> Iterator[str]:
    """`usbip bind -b BUSID` for the block; unbound on exit if still bound."""
    usbip_bind(busid)
    try:
        yield busid
    finally:
        if Path(f"/sys/bus/usb/drivers/usbip-host/{busid}").exists():
            usbip_unbind(busid)


_PORT_RE = re.compile(r"^Port (\d+): <Port in Use>", re.M)
_URL_RE = re.compile(r"->\s+usbip://([^/\s]+)/(\S+)")


def imported_ports(timeout: float = 10) -> dict[int, str]:
    """vhci ports in use, from `usbip port`: {port: 'host:tcpport/busid'}. `usbip port` fails now and then
    while a vhci port changes state ("open vhci_driver": a device still enumerating has no sysfs node yet),
    so a failure is retried for up to `timeout` s before it is raised."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return parse_usbip_port(run(["usbip", "port"]).stdout)
        except GuestError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _imported_ports_or_none() -> dict[int, str] | None:
    # For polls, which retry themselves: one try.
    try:
        return imported_ports(timeout=0)
    except GuestError:
        return None


def parse_usbip_port(out: str) -> dict[int, str]:
    """`usbip port` output -> {vhci port: 'host:tcpport/remote busid'}."""
    ports: dict[int, str] = {}
    current: int | None = None
    for line in out.splitlines():
        m = _PORT_RE.match(line)
        if m:
            current = int(m.group(1))
            continue
        u = _URL_RE.search(line)
        if u and current is not None:
            ports[current] = f"{u.group(1)}/{u.group(2)}"
            current = None
    return ports


def usbip_attach(host: str, busid: str, *, port: int = USBIP_PORT, timeout: float = 30) -> int:
    """`usbip attach -r HOST -b BUSID`; returns the vhci port the device landed on."""
    modprobe("vhci-hcd")
    usbip("attach", "-r", host, "-b", busid, port=port, timeout=timeout)
    want = f"{host}:{port}/{busid}"

    def landed() -> int | None:
        try:
            ports = imported_ports(timeout=0)
        except GuestError:  # `usbip port` fails while the new device is still enumerating (no sysfs node yet)
            return None
        return next((p for p, url in ports.items() if url == want), None)

    return poll(
        landed,
        timeout=timeout,
        what=f"{want} to show in `usbip port`",
    )


def usbip_detach(vhci_port: int) -> None:
    usbip("detach", "-p", str(vhci_port))
    poll(
        lambda: (ports := _imported_ports_or_none()) is not None and vhci_port not in ports,
        timeout=20,
        what=f"vhci port {vhci_port} to be released",
    )


@contextlib.contextmanager
def usbip_attached(host: str, busid: str, *, port: int = USBIP_PORT) -> Iterator[int]:
    """The remote device imported through vhci_hcd for the block; detached on exit."""
    vhci_port = usbip_attach(host, busid, port=port)
    try:
        yield vhci_port
    finally:
        ports = poll(_imported_ports_or_none, timeout=20, what="`usbip port` to answer")
        if vhci_port in ports:
            usbip_detach(vhci_port)
