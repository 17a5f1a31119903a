"""Linux USB gadgets through configfs (libcomposite): create, bind to a UDC, and always tear down.

This is an edge: it writes files under `/sys/kernel/config/usb_gadget/`. A `GadgetSpec` says what the gadget
is (identifiers, strings, one configuration of functions); `Gadget` makes it exist, binds it to a UDC such as
`dummy_udc.0`, and removes it in the order the kernel accepts (unbind, unmount FunctionFS instances, unlink
functions from the configuration, then rmdir leaf to root). A gadget left behind by a crashed run is removed
by name before a new one is created.

Functions are named `<kind>.<instance>` as in configfs (`ffs.vusb0`, `mass_storage.0`, `hid.0`, `acm.GS0`);
their attributes are plain files written from `FunctionSpec.attrs` (nested paths like `lun.0/file` allowed).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from emulator.errors import VusbError

log = logging.getLogger(__name__)

CONFIGFS_ROOT = Path("/sys/kernel/config")
GADGET_ROOT = CONFIGFS_ROOT / "usb_gadget"
UDC_CLASS = Path("/sys/class/udc")
LANG_EN_US = 0x0409
# What the configfs `max_speed` attribute accepts (drivers/usb/gadget/configfs.c, gadget_dev_desc_max_speed_store).
MAX_SPEEDS = ("low-speed", "full-speed", "high-speed", "super-speed", "super-speed-plus")


class GadgetError(VusbError):
    """configfs/UDC/FunctionFS set-up or teardown failed; the message names the path and the fix."""


@dataclass(frozen=True)
class FunctionSpec:
    """One configfs function: `kind` is the usb_f_* name (ffs, mass_storage, hid, acm), `instance` its name."""

    kind: str
    instance: str
    attrs: dict[str, str | bytes] = field(default_factory=dict)

    @property
    def dirname(self) -> str:
        return f"{self.kind}.{self.instance}"


@dataclass(frozen=True)
class GadgetSpec:
    """Everything a gadget needs before it is bound: device descriptor fields, strings, one configuration."""

    name: str
    idVendor: int
    idProduct: int
    bcdDevice: int = 0x0100
    bcdUSB: int = 0x0200
    bDeviceClass: int = 0
    bDeviceSubClass: int = 0
    bDeviceProtocol: int = 0
    bMaxPacketSize0: int = 64
    manufacturer: str = "vusb"
    product: str = "vusb gadget"
    serialnumber: str = ""
    configuration: str = "vusb"
    bmAttributes: int = 0x80
    MaxPower: int = 100
    functions: tuple[FunctionSpec, ...] = ()
    os_desc: bool = False
    # configfs `max_speed` ("full-speed", "high-speed", "super-speed", ...): the UDC links no faster, so a
    # gadget that mirrors a device can run at that device's speed. None leaves the kernel's default.
    max_speed: str | None = None


def _write(path: Path, value: str | bytes) -> None:
    try:
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            path.write_text(value)
    except OSError as exc:
        raise GadgetError(f"cannot write {value!r:.60} to {path}: {exc.strerror or exc}") from exc


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOENT and path.parent.name == "functions":
            hint = " (is the usb_f_* module for this function available? try modprobe)"
        raise GadgetError(f"cannot create {path}: {exc.strerror or exc}{hint}") from exc


def ensure_configfs() -> None:
    """Make sure libcomposite is loaded and configfs is mounted, or say exactly what is missing."""
    if not GADGET_ROOT.is_dir():
        subprocess.run(["modprobe", "libcomposite"], capture_output=True, check=False)
        if not CONFIGFS_ROOT.is_dir() or not any(CONFIGFS_ROOT.iterdir()):
            subprocess.run(
                ["mount", "-t", "configfs", "none", str(CONFIGFS_ROOT)], capture_output=True, check=False
            )
    if not GADGET_ROOT.is_dir():
        raise GadgetError(
            f"{GADGET_ROOT} does not exist: this kernel has no USB gadget configfs "
            "(needs CONFIG_USB_CONFIGFS, modules libcomposite and configfs, and configfs mounted on "
            f"{CONFIGFS_ROOT}); run inside the vusb VM (python -m tools.vm run -- ...) on machines without it"
        )


def list_udcs() -> list[str]:
    """The USB device controllers this kernel has, e.g. ['dummy_udc.0', 'dummy_udc.1']."""
    if not UDC_CLASS.is_dir():
        return []
    return sorted(p.name for p in UDC_CLASS.iterdir())


def udc_in_use(udc: str) -> str | None:
    """The name of the gadget bound to `udc`, if any."""
    if not GADGET_ROOT.is_dir():
        return None
    for g in GADGET_ROOT.iterdir():
        with contextlib.suppress(OSError):
            if (g / "UDC").read_text().strip() == udc:
                return g.name
    return None


def free_udc(prefix: str = "dummy_udc") -> str:
    """The first UDC (by name) with no gadget bound to it."""
    udcs = [u for u in list_udcs() if u.startswith(prefix)]
    for u in udcs:
        if udc_in_use(u) is None:
            return u
    if not udcs:
        raise GadgetError(
            f"no UDC named {prefix}.* in {UDC_CLASS}: load one, e.g. `modprobe dummy_hcd num=2`"
        )
    raise GadgetError(
        f"every UDC is in use ({', '.join(udcs)}): unbind a gadget or `modprobe dummy_hcd num=N`"
    )


def _mountpoints() -> dict[str, str]:
    """mount point → source, for functionfs mounts (the source is the ffs instance name)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "functionfs":
                out[parts[1].replace("\\040", " ")] = parts[0]
    return out


class Gadget:
    """A configfs gadget built from a `GadgetSpec`. Use as a context manager: teardown always runs.

    FunctionFS functions need a userspace process to write descriptors before `bind()`: `mount_ffs()` gives
    the mount directory for each `ffs.*` function; the caller starts its function there, then binds.
    """

    def __init__(self, spec: GadgetSpec, *, ffs_mount_root: Path = Path("/run/vusb/ffs")) -> None:
        self.spec = spec
        self.path = GADGET_ROOT / spec.name
        self.ffs_mount_root = ffs_mount_root
        self.udc: str | None = None
        self._ffs_mounts: list[Path] = []

    # -- creation ---------------------------------------------------------------------------------------
    def create(self) -> Gadget:
        ensure_configfs()
        if self.path.exists():
            log.warning("removing gadget %s left behind by an earlier run", self.spec.name)
            remove_gadget(self.spec.name)
        s = self.spec
        _mkdir(self.path)
        for attr in ("idVendor", "idProduct", "bcdDevice", "bcdUSB"):
            _write(self.path / attr, f"0x{getattr(s, attr):04x}")
        for attr in ("bDeviceClass", "bDeviceSubClass", "bDeviceProtocol", "bMaxPacketSize0"):
            _write(self.path / attr, f"0x{getattr(s, attr):02x}")
        if s.max_speed is not None:
            if s.max_speed not in MAX_SPEEDS:
                raise GadgetError(f"max_speed {s.max_speed!r} is not one of {', '.join(MAX_SPEEDS)}")
            _write(self.path / "max_speed", s.max_speed)
        strings = self.path / "strings" / f"0x{LANG_EN_US:x}"
        _mkdir(strings)
        _write(strings / "manufacturer", s.manufacturer)
        _write(strings / "product", s.product)
        if s.serialnumber:
            _write(strings / "serialnumber", s.serialnumber)
        config = self.path / "configs" / "c.1"
        _mkdir(config)
        _write(config / "bmAttributes", f"0x{s.bmAttributes:02x}")
        _write(config / "MaxPower", str(s.MaxPower))
        cstrings = config / "strings" / f"0x{LANG_EN_US:x}"
        _mkdir(cstrings)
        _write(cstrings / "configuration", s.configuration)
        for fn in s.functions:
            fdir = self.path / "functions" / fn.dirname
            _mkdir(fdir)
            for rel, value in fn.attrs.items():
                target = fdir / rel
                if not target.parent.exists():
                    _mkdir(target.parent)
                _write(target, value)
            link = config / fn.dirname
            if not link.exists():
                try:
                    link.symlink_to(fdir)
                except OSError as exc:
                    raise GadgetError(f"cannot link {fdir} into {config}: {exc.strerror or exc}") from exc
        return self

    def mount_ffs(self, fn: FunctionSpec) -> Path:
        """Mount the FunctionFS instance of `fn` (kind 'ffs') and return its directory (holds ep0)."""
        if fn.kind != "ffs":
            raise GadgetError(f"{fn.dirname} is not a FunctionFS function")
        mnt = self.ffs_mount_root / f"{self.spec.name}.{fn.instance}"
        mnt.mkdir(parents=True, exist_ok=True)
        if str(mnt) not in _mountpoints():
            r = subprocess.run(
                ["mount", "-t", "functionfs", fn.instance, str(mnt)],
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode != 0:
                raise GadgetError(
                    f"cannot mount functionfs {fn.instance} on {mnt}: {r.stderr.strip() or r.returncode} "
                    "(is usb_f_fs loaded?)"
                )
        self._ffs_mounts.append(mnt)
        return mnt

    # -- binding ----------------------------------------------------------------------------------------
    def bind(self, udc: str | None = None) -> str:
        """Bind to `udc` (default: the first free dummy_udc).

        FunctionFS functions must have written their descriptors and strings first (the kernel refuses the
        bind with ENODEV otherwise); the FunctionFS edge knows when that is, so it calls this.
        """
        udc = udc or free_udc()
        if udc not in list_udcs():
            raise GadgetError(f"UDC {udc} does not exist (have: {', '.join(list_udcs()) or 'none'})")
        owner = udc_in_use(udc)
        if owner is not None and owner != self.spec.name:
            raise GadgetError(f"UDC {udc} is already used by gadget {owner}")
        _write(self.path / "UDC", udc)
        self.udc = udc
        return udc

    def unbind(self) -> None:
        if (self.path / "UDC").exists():
            with contextlib.suppress(GadgetError):
                if (self.path / "UDC").read_text().strip():
                    _write(self.path / "UDC", "\n")
        self.udc = None

    def remove(self) -> None:
        """Tear down completely; safe to call twice and after partial creation."""
        self.unbind()
        remove_gadget(self.spec.name, extra_mounts=self._ffs_mounts)
        self._ffs_mounts.clear()

    def __enter__(self) -> Gadget:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _rmdir(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        try:
            path.rmdir()
        except OSError as exc:
            raise GadgetError(f"cannot remove {path}: {exc.strerror or exc}") from exc


def remove_gadget(name: str, *, extra_mounts: list[Path] | None = None) -> None:
    """Remove gadget `name` and everything under it, in the order configfs requires."""
    path = GADGET_ROOT / name
    if not path.exists():
        return
    udc = path / "UDC"
    with contextlib.suppress(OSError):
        if udc.read_text().strip():
            udc.write_text("\n")
    # Unmount the FunctionFS instances of this gadget's ffs functions (the ep files must be closed by now).
    ffs_instances = {p.name.split(".", 1)[1] for p in (path / "functions").glob("ffs.*")}
    for mnt, source in _mountpoints().items():
        if source in ffs_instances or Path(mnt) in (extra_mounts or []):
            r = subprocess.run(["umount", mnt], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise GadgetError(
                    f"cannot unmount FunctionFS at {mnt}: {r.stderr.strip()} (is a process still "
                    "holding its endpoint files?)"
                )
            with contextlib.suppress(OSError):
                os.rmdir(mnt)
    for config in (path / "configs").glob("*"):
        for entry in config.iterdir():
            if entry.is_symlink():
                entry.unlink()
        for s in (config / "strings").glob("*"):
            _rmdir(s)
        _rmdir(config)
    for fn in (path / "functions").glob("*"):
        _rmdir(fn)
    for s in (path / "strings").glob("*"):
        _rmdir(s)
    for os_desc_link in (path / "os_desc").glob("*"):
        if os_desc_link.is_symlink():
            os_desc_link.unlink()
    _rmdir(path)


@contextlib.contextmanager
def gadget(spec: GadgetSpec, udc: str | None = None) -> Iterator[Gadget]:
    """Create, bind (for gadgets without FunctionFS functions), and always remove."""
    with Gadget(spec) as g:
        g.bind(udc)
        yield g
