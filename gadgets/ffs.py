"""FunctionFS: one USB function whose descriptors, ep0 requests and endpoint data live in this process.

Two layers. The pure one turns a configuration (a `Configuration` tree from `emulator.usb.descriptors`, at
the speed its device runs) into what f_fs takes: full-, high- and SuperSpeed descriptor lists with the
interfaces renumbered from 0, the function's own string table, and the table of endpoint files
(`FfsLayout`). It says what it had to leave out, because f_fs (drivers/usb/gadget/function/f_fs.c,
`ffs_do_single_desc`) accepts only interface, endpoint, interface-association and SuperSpeed-companion
descriptors, plus the 9-byte HID descriptor inside a HID interface (and CCID's): CDC functional descriptors
(CS_INTERFACE, 0x24) and any other class-specific descriptor are refused with EINVAL. Alternate settings
other than 0 are left out too: libcomposite sends SET_INTERFACE(alt != 0) to a function only if it has a
`get_alt`, which f_fs lacks on the kernels we run (6.1), and f_fs's ENABLE event would not say which
setting was chosen anyway. Isochronous endpoints are refused outright.

The edge is `FunctionFs`, built on python-functionfs (`functionfs.Function`), which writes the descriptors
and strings to ep0 and opens the endpoint files. The rest is ours: the event loop (ep0 events and AIO
completions on one eventfd, plus a wake-up fd other threads use; on a thread of its own, or inside an
asyncio loop), SETUP requests answered through a `FunctionFsHandler` at once or later (`PendingReply`), and
endpoint data moved with several AIO transfers queued per endpoint (`gadgets.aio`). `FunctionFsGadget`
puts it together with a configfs gadget (`gadgets.configfs`) and tears it down in the order the kernel needs.

What the host sees is not all ours: libcomposite (and on dummy_hcd the UDC driver itself) answers the
device, configuration, string, BOS and qualifier descriptors, SET_ADDRESS, SET/GET_CONFIGURATION,
SET/GET_INTERFACE (alternate setting 0 only), GET_STATUS and SET/CLEAR_FEATURE (endpoint halt, remote
wakeup), and renumbers interfaces, endpoints and strings. f_fs tells us SET_CONFIGURATION and
SET_INTERFACE only as ENABLE/DISABLE events, and rewrites wIndex of the requests it forwards: an
interface request carries our interface number (its high byte is lost), an endpoint request the number of
the endpoint file (ep1 = 1). `FunctionFs` maps both back before the handler sees the request.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import fcntl
import functools
import logging
import math
import os
import select
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from emulator.devices.base import Reply, TransferStatus
from emulator.usb.descriptors import (
    Configuration,
    Descriptor,
    EndpointDescriptor,
    InterfaceAssociationDescriptor,
    SsEndpointCompanionDescriptor,
)
from emulator.usb.setup import (
    ClassCode,
    DescriptorType,
    Direction,
    FeatureSelector,
    Recipient,
    SetupPacket,
    Speed,
    StandardRequest,
    TransferType,
)
from gadgets.configfs import Gadget, GadgetError, GadgetSpec

log = logging.getLogger(__name__)

LANG_EN_US = 0x0409
LOCK_DIR = Path("/run/vusb")
FFS_MAX_EPS_COUNT = 31  # f_fs.c: endpoint files per function
ESHUTDOWN = errno.ESHUTDOWN  # what f_fs completes transfers with when the host or the UDC goes away
SPEEDS = (Speed.FULL, Speed.HIGH, Speed.SUPER)
_BULK_MAX = {Speed.FULL: 64, Speed.HIGH: 512, Speed.SUPER: 1024}
_INTERRUPT_MAX = {Speed.FULL: 64, Speed.HIGH: 1024, Speed.SUPER: 1024}
USB_CLASS_CSCID = ClassCode.CSCID  # smart card (CCID)
_HID_DESCRIPTOR_LENGTH = 9  # sizeof(struct hid_descriptor): one class descriptor entry
_CCID_DESCRIPTOR_LENGTH = 54  # sizeof(struct ccid_descriptor)


class FunctionFsError(GadgetError):
    """A FunctionFS function that cannot be built or run (a descriptor f_fs refuses, an isochronous
    endpoint, an ep0 already open in another process, a kernel without usb_f_fs)."""


# --- pure: what f_fs accepts and how descriptors change with speed ------------------------------------------


def ffs_rejects(raw: bytes, interface_class: int | None) -> str | None:
    """Why f_fs would refuse this descriptor (the rules of `ffs_do_single_desc` in 6.1), or None.

    `interface_class` is bInterfaceClass of the interface the descriptor follows (None before any)."""
    if len(raw) < 2 or raw[0] != len(raw):
        return "malformed descriptor"
    kind, length = raw[1], len(raw)
    if kind in (DescriptorType.DEVICE, DescriptorType.CONFIGURATION, DescriptorType.STRING,
                DescriptorType.DEVICE_QUALIFIER):
        return "reserved for the gadget (libcomposite writes it)"
    expected: dict[int, tuple[int, ...]] = {DescriptorType.INTERFACE: (9,), DescriptorType.ENDPOINT: (7, 9),
                DescriptorType.INTERFACE_ASSOCIATION: (8,), DescriptorType.SS_ENDPOINT_COMPANION: (6,),
                DescriptorType.OTG: (3,)}
    if kind in expected:
        return None if length in expected[kind] else f"f_fs wants {expected[kind]} bytes, got {length}"
    if kind == DescriptorType.HID:  # USB_TYPE_CLASS | 0x01
        if interface_class == ClassCode.HID:
            return None if length == _HID_DESCRIPTOR_LENGTH else (
                f"f_fs takes a HID descriptor of exactly {_HID_DESCRIPTOR_LENGTH} bytes (one class descriptor), "
                f"got {length}")
        if interface_class == USB_CLASS_CSCID:
            return None if length == _CCID_DESCRIPTOR_LENGTH else f"CCID descriptor of {length} bytes"
        return f"class descriptor 0x21 is accepted only in HID and CCID interfaces (class {interface_class})"
    if kind in (DescriptorType.CS_INTERFACE, DescriptorType.CS_ENDPOINT):
        return "f_fs refuses class-specific (CS_INTERFACE/CS_ENDPOINT) descriptors"
    return f"f_fs has no rule for descriptor type {kind:#04x}"


def interval_us(descriptor: EndpointDescriptor, speed: Speed) -> int:
    """The polling period an interrupt endpoint asks for, in microseconds (USB 2.0 §9.6.6)."""
    b = max(1, descriptor.interval)
    if speed in (Speed.LOW, Speed.FULL):
        return b * 1000
    return (1 << (min(b, 16) - 1)) * 125


def interval_for(period_us: int, speed: Speed) -> int:
    """bInterval for an interrupt endpoint polled at least every `period_us` at `speed`."""
    if speed in (Speed.LOW, Speed.FULL):
        return max(1, min(255, period_us // 1000))
    frames = max(1, period_us // 125)
    return max(1, min(16, int(math.log2(frames)) + 1))


def endpoint_for_speed(
    descriptor: EndpointDescriptor,
    companion: SsEndpointCompanionDescriptor | None,
    source: Speed,
    target: Speed,
) -> tuple[EndpointDescriptor, SsEndpointCompanionDescriptor | None]:
    """The same endpoint as a `target`-speed device would declare it: bulk packets are the speed's only
    legal size (64 at full speed if the source's was at least that), interrupt packets are capped at what
    the speed allows, polling periods are kept (rounded to what `target` can say), and SuperSpeed gets its
    companion descriptor."""
    kind = descriptor.transfer_type
    if kind not in (TransferType.BULK, TransferType.INTERRUPT):
        raise FunctionFsError(f"endpoint {descriptor.endpoint_address:#04x}: only bulk and interrupt endpoints "
                              f"can be carried ({kind.name.lower()} is not)")
    size = descriptor.max_packet_size & 0x7FF
    mult = (descriptor.max_packet_size >> 11) & 0x3
    interval = 0
    if kind is TransferType.BULK:
        if target is Speed.FULL:
            size = 64 if size >= 64 else max(8, 1 << max(0, (size - 1).bit_length()))
        else:
            size = _BULK_MAX[target]
        if target is Speed.HIGH and source is Speed.HIGH:
            interval = descriptor.interval  # bulk OUT NAK rate, meaningful at high speed only
    else:
        size = min(max(size, 1), _INTERRUPT_MAX[target])
        interval = interval_for(interval_us(descriptor, source), target)
    wire_size = size | (mult << 11 if target is Speed.HIGH and source is Speed.HIGH else 0)
    converted = replace(descriptor, max_packet_size=wire_size, interval=interval, extra=descriptor.extra[:2])
    if target is not Speed.SUPER:
        return converted, None
    burst = companion.max_burst if companion is not None and source is Speed.SUPER else 0
    attributes = companion.attributes if companion is not None and source is Speed.SUPER else 0
    per_interval = size * (burst + 1) if kind is TransferType.INTERRUPT else 0
    return converted, SsEndpointCompanionDescriptor(max_burst=burst, attributes=attributes,
                                                    bytes_per_interval=per_interval)


@dataclass(frozen=True)
class DroppedDescriptor:
    """Something the device declares that the FunctionFS function cannot carry, and why."""

    where: str
    descriptor_type: int
    length: int
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: descriptor type {self.descriptor_type:#04x} ({self.length} bytes): {self.reason}"


@dataclass(frozen=True)
class FfsEndpoint:
    """One endpoint file: `index` is its number (file `ep<index>`, in descriptor order), `address` the
    address the device declared (the UDC may show the host another: see `FunctionFs.host_addresses`)."""

    index: int
    address: int
    transfer_type: TransferType
    interface: int  # the device's interface number
    max_packet_size: Mapping[Speed, int]  # wMaxPacketSize & 0x7ff at each speed offered

    @property
    def is_in(self) -> bool:
        return bool(self.address & Direction.IN)

    def packet_size(self, speed: Speed) -> int:
        return self.max_packet_size.get(speed) or self.max_packet_size[max(self.max_packet_size)]


@dataclass(frozen=True)
class FfsInterface:
    """One interface as f_fs sees it: `local` is its number in our descriptors (0, 1, ...), `number` the
    device's."""

    local: int
    number: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int


@dataclass(frozen=True)
class FfsLayout:
    """Everything f_fs needs, and the maps back to the device's numbers."""

    descriptors: Mapping[Speed, tuple[bytes, ...]]
    strings: tuple[str, ...]  # the function's strings, index 1, 2, ...
    interfaces: tuple[FfsInterface, ...]
    endpoints: tuple[FfsEndpoint, ...]
    source_speed: Speed
    dropped: tuple[DroppedDescriptor, ...] = ()

    def endpoint(self, index: int) -> FfsEndpoint | None:
        return self.endpoints[index - 1] if 1 <= index <= len(self.endpoints) else None

    def endpoint_by_address(self, address: int) -> FfsEndpoint | None:
        return next((ep for ep in self.endpoints if ep.address == address), None)

    def interface_number(self, local: int) -> int | None:
        """The device's interface number for f_fs's (local) one."""
        return self.interfaces[local].number if 0 <= local < len(self.interfaces) else None

    def interface_for(self, number: int) -> FfsInterface | None:
        return next((i for i in self.interfaces if i.number == number), None)


def ffs_layout(
    configuration: Configuration,
    speed: Speed,
    strings: Mapping[int, str] | None = None,
    *,
    speeds: Iterable[Speed] = SPEEDS,
) -> FfsLayout:
    """Turn a device's configuration (as it reads at `speed`) into a FunctionFS function.

    Alternate setting 0 of every interface is carried; interfaces are renumbered from 0 in order (f_fs
    wants them dense) and so are the strings they name. What f_fs would refuse is left out and listed in
    `dropped`; an isochronous endpoint raises `FunctionFsError`.
    """
    strings = strings or {}
    speeds = tuple(dict.fromkeys(speeds))
    if not speeds or any(s not in SPEEDS for s in speeds):
        raise FunctionFsError(f"speeds must be among {[s.name for s in SPEEDS]}, got {speeds}")
    source = Speed.FULL if speed is Speed.LOW else speed
    if source not in SPEEDS:
        raise FunctionFsError(f"a {speed.name} device cannot be carried by FunctionFS")
    local_strings: dict[int, int] = {}

    def string(index: int) -> int:
        if not index:
            return 0
        if index not in local_strings:
            local_strings[index] = len(local_strings) + 1
        return local_strings[index]

    dropped: list[DroppedDescriptor] = []
    interfaces: list[FfsInterface] = []
    local_of = {iface.number: n for n, iface in enumerate(configuration.interfaces)}
    for descriptor in configuration.descriptors:
        raw = descriptor.to_bytes()
        dropped.append(DroppedDescriptor("configuration", raw[1], len(raw),
                                         "descriptors before the first interface belong to the gadget"))
    per_speed: dict[Speed, list[bytes]] = {s: [] for s in speeds}
    endpoints: list[FfsEndpoint] = []
    for local, interface in enumerate(configuration.interfaces):
        alt = interface.alternate(0) or interface.alternates[0]
        where = f"interface {interface.number}"
        for other in interface.alternates:
            if other is not alt:
                dropped.append(DroppedDescriptor(
                    f"{where} alt {other.descriptor.alternate_setting}", DescriptorType.INTERFACE, 9,
                    "only alternate setting 0 can be selected through FunctionFS (no get_alt in f_fs)"))
        head = alt.descriptor
        klass = head.interface_class
        interfaces.append(FfsInterface(local, interface.number, klass, head.interface_subclass,
                                       head.interface_protocol))
        common: list[bytes] = []
        for lead in alt.leading:
            if isinstance(lead, InterfaceAssociationDescriptor):
                first = local_of.get(lead.first_interface, lead.first_interface)
                common.append(replace(lead, first_interface=first, i_function=string(lead.i_function)).to_bytes())
                continue
            _keep_or_drop(lead, None, where, common, dropped)
        common.append(replace(head, interface_number=local, alternate_setting=0, num_endpoints=len(alt.endpoints),
                              i_interface=string(head.i_interface), extra=b"").to_bytes())
        for extra in alt.descriptors:
            _keep_or_drop(extra, klass, where, common, dropped)
        for s in speeds:
            per_speed[s].extend(common)
        for endpoint in alt.endpoints:
            desc = endpoint.descriptor
            ep_where = f"{where} endpoint {desc.endpoint_address:#04x}"
            sizes: dict[Speed, int] = {}
            trailing: list[bytes] = []
            for extra in endpoint.descriptors:
                if not isinstance(extra, SsEndpointCompanionDescriptor):
                    _keep_or_drop(extra, klass, ep_where, trailing, dropped)
            for s in speeds:
                converted, companion = endpoint_for_speed(desc, endpoint.companion, source, s)
                sizes[s] = converted.max_packet_size & 0x7FF
                per_speed[s].append(converted.to_bytes())
                if companion is not None:
                    per_speed[s].append(companion.to_bytes())
                per_speed[s].extend(trailing)
            endpoints.append(FfsEndpoint(len(endpoints) + 1, desc.endpoint_address, desc.transfer_type,
                                         interface.number, sizes))
    if len(endpoints) > FFS_MAX_EPS_COUNT:
        raise FunctionFsError(f"{len(endpoints)} endpoints: a FunctionFS function has at most {FFS_MAX_EPS_COUNT}")
    addresses = [ep.address for ep in endpoints]
    duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
    if duplicates:
        raise FunctionFsError(f"endpoint addresses {[hex(a) for a in duplicates]} are declared twice")
    names = tuple(strings.get(index, "") for index, _ in sorted(local_strings.items(), key=lambda kv: kv[1]))
    return FfsLayout({s: tuple(per_speed[s]) for s in speeds}, names, tuple(interfaces), tuple(endpoints),
                     source, tuple(dropped))


def _keep_or_drop(descriptor: Descriptor, interface_class: int | None, where: str, keep: list[bytes],
                  dropped: list[DroppedDescriptor]) -> None:
    raw = descriptor.to_bytes()
    reason = ffs_rejects(raw, interface_class)
    if reason is None:
        keep.append(raw)
    else:
        dropped.append(DroppedDescriptor(where, raw[1], len(raw), reason))


# --- python-functionfs glue (ctypes descriptors) -------------------------------------------------------------


def _functionfs() -> Any:
    """Import python-functionfs lazily: it needs Debian's libaio1 at import time, the pure layer does not."""
    try:
        import functionfs
    except (ImportError, OSError) as exc:
        raise FunctionFsError(f"python-functionfs cannot be loaded ({exc}); install `functionfs` and the "
                              "system's libaio (Debian: libaio1)") from exc
    return functionfs


_RAW_CLASSES: dict[int, type] = {}


def ctypes_descriptor(raw: bytes) -> Any:
    """One descriptor as the ctypes structure python-functionfs serialises (endpoints as its endpoint
    classes, so it can size buffers and open files from them)."""
    ffs = _functionfs()
    ch9 = ffs.ch9
    known: dict[tuple[int, int], Any] = {(DescriptorType.INTERFACE, 9): ch9.USBInterfaceDescriptor,
             (DescriptorType.ENDPOINT, 7): ch9.USBEndpointDescriptorNoAudio,
             (DescriptorType.ENDPOINT, 9): ch9.USBEndpointDescriptor,
             (DescriptorType.SS_ENDPOINT_COMPANION, 6): ch9.USBSSEPCompDescriptor,
             (DescriptorType.INTERFACE_ASSOCIATION, 8): ch9.USBInterfaceAssocDescriptor}
    klass: Any = known.get((raw[1], len(raw)))
    if klass is None:
        klass = _RAW_CLASSES.get(len(raw))
        if klass is None:
            header = ffs.common.USBDescriptorHeader
            klass = type(f"RawDescriptor{len(raw)}", (header,),
                         {"_pack_": 1, "_fields_": [("payload", ctypes.c_uint8 * (len(raw) - 2))]})
            _RAW_CLASSES[len(raw)] = klass
    return klass.from_buffer_copy(raw)


FUNCTIONFS_STRINGS_MAGIC = 2


def strings_blob(strings: Iterable[str], lang: int = LANG_EN_US) -> bytes:
    """The strings block f_fs reads from ep0 after the descriptors (include/uapi/linux/usb/functionfs.h:
    magic, length, str_count, lang_count, then per language its code and NUL-terminated UTF-8 strings).

    Built here because python-functionfs 0.9.2 stores the strings in a ctypes char array, which stops at
    the first NUL: every string after the first arrives empty and f_fs refuses the block (EINVAL)."""
    texts = [text.encode() for text in strings]
    for text in texts:
        if b"\0" in text:
            raise FunctionFsError(f"string {text!r} contains a NUL byte")
    if not texts:
        return struct.pack("<IIII", FUNCTIONFS_STRINGS_MAGIC, 16, 0, 0)
    body = struct.pack("<H", lang) + b"".join(text + b"\0" for text in texts)
    return struct.pack("<IIII", FUNCTIONFS_STRINGS_MAGIC, 16 + len(body), len(texts), 1) + body


def descriptors_blob(layout: FfsLayout, flags: int) -> bytes:
    """The descriptors as python-functionfs writes them to ep0 (FUNCTIONFS_DESCRIPTORS_MAGIC_V2)."""
    ffs = _functionfs()
    lists = {s: [ctypes_descriptor(raw) for raw in layout.descriptors.get(s, ())] for s in SPEEDS}
    blob = ffs.getDescsV2(flags, fs_list=lists[Speed.FULL], hs_list=lists[Speed.HIGH],
                          ss_list=lists[Speed.SUPER])
    return bytes(ffs.serialise(blob))


def map_setup(layout: FfsLayout, setup: SetupPacket) -> SetupPacket | None:
    """The request as the device would have received it. f_fs rewrites wIndex before userspace sees it
    (f_fs.c, ffs_func_setup): for an interface request to our (local) interface number, for an endpoint
    request to the number of the endpoint file. Map both back to the device's interface number and
    endpoint address; None when there is no such interface or endpoint."""
    recipient = setup.request_type & 0x1F  # (plain bits: this runs for every request)
    if recipient == Recipient.INTERFACE:
        number = layout.interface_number(setup.index & 0xFF)
        if number is None:
            return None
        return setup if number == setup.index else replace(setup, index=number)
    if recipient == Recipient.ENDPOINT:
        if setup.index == 0:
            return setup  # ep0 itself (f_fs would not forward it, but a UDC might)
        ep = layout.endpoint(setup.index)
        return None if ep is None else replace(setup, index=ep.address)
    return setup


# --- the handler contract -------------------------------------------------------------------------------------


class FfsEvent(enum.Enum):
    """f_fs's ep0 events (include/uapi/linux/usb/functionfs.h, enum usb_functionfs_event_type)."""

    BIND = "bind"
    UNBIND = "unbind"
    ENABLE = "enable"  # SET_CONFIGURATION or SET_INTERFACE: endpoints are (re)enabled
    DISABLE = "disable"  # SET_CONFIGURATION(0), a bus reset, a disconnect
    SUSPEND = "suspend"
    RESUME = "resume"


class PendingReply:
    """A control reply that comes later: a handler that must ask elsewhere first (the bridge asks the remote
    device) returns one from `control` and calls `resolve` on the loop's thread when it knows. Until then
    `FunctionFs` reads no ep0 event: f_fs would take a read of ep0 as the answer (a STALL, for an IN request)."""

    __slots__ = ("_callback", "reply")

    def __init__(self) -> None:
        self.reply: Reply | None = None
        self._callback: Callable[[Reply], None] | None = None

    def resolve(self, reply: Reply) -> None:
        if self.reply is None:
            self.reply = reply
            if self._callback is not None:
                self._callback(reply)

    def on_resolved(self, callback: Callable[[Reply], None]) -> None:
        if self.reply is not None:
            callback(self.reply)
        else:
            self._callback = callback


class FunctionFsHandler(Protocol):
    """What sits behind a `FunctionFs`: a device model (gadgets.model) or a remote device (gadgets.bridge).

    Every method runs on the function's event-loop thread; `control` answers at once (a `Reply`) or later
    (a `PendingReply`); the host's control transfer waits for it either way."""

    def attach(self, ffs: FunctionFs) -> None: ...

    def event(self, event: FfsEvent) -> None: ...

    def control(self, setup: SetupPacket, data: bytes) -> Reply | PendingReply: ...

    def pump(self) -> None: ...

    def poll_timeout(self) -> float | None: ...


# --- the edge ----------------------------------------------------------------------------------------------------


class _Transfer:
    """One AIO transfer on an endpoint file; completions are handed on in submission order. A read's
    callback takes (data, status), a write's (status)."""

    __slots__ = ("callback", "data", "done", "is_read", "status")

    def __init__(self, callback: Callable[..., None], is_read: bool) -> None:
        self.callback = callback
        self.is_read = is_read
        self.data: bytes | None = None
        self.done = False
        self.status = 0


# include/uapi/linux/usb/functionfs.h: struct usb_functionfs_event (a usb_ctrlrequest, the type, 3 pad bytes)
_EVENT = struct.Struct("<BBHHHB3x")
_EVENT_TYPES = {0: FfsEvent.BIND, 1: FfsEvent.UNBIND, 2: FfsEvent.ENABLE, 3: FfsEvent.DISABLE,
                5: FfsEvent.SUSPEND, 6: FfsEvent.RESUME}
FUNCTIONFS_SETUP = 4
_STANDARD_OUT_TO_ENDPOINT = 0x02  # bmRequestType of SET/CLEAR_FEATURE(ENDPOINT_HALT)


def ep0_users(mount: Path) -> list[tuple[int, str]]:
    """(pid, command) of other processes holding ep0 or an endpoint file of this FunctionFS mount open."""
    users = []
    prefix = str(mount).rstrip("/") + "/ep"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).startswith(prefix):
                        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        users.append((int(proc.name), cmd.strip()))
                        break
    return users


class FunctionFs:
    """A FunctionFS function in this process: descriptors on ep0, the event loop, endpoint AIO.

    Use as a context manager, then drive it either with `serve()` on a thread of its own or with
    `run_on(loop)` inside an asyncio loop (the bridge: its remote device lives on that loop, so a URB's
    completion and the gadget transfer it feeds meet without a thread hop). `stop()`, `call_soon()` and
    `wake()` are the only methods other threads may call. Endpoint transfers (`write`, `read`, `halt`) are
    for the handler, on the loop's thread.
    """

    def __init__(
        self,
        mount: Path,
        layout: FfsLayout,
        handler: FunctionFsHandler,
        *,
        all_ctrl_recip: bool = True,
        config0_setup: bool = True,
        in_depth: int = 8,
        out_depth: int = 8,
    ) -> None:
        ffs = _functionfs()
        if ffs.Function.quirks_ffs_unsafe_eventfd:
            raise FunctionFsError("this kernel's f_fs cannot signal ep0 events on an eventfd safely (before "
                                  "Linux 5.16): vusb's gadgets need a newer kernel")
        self.mount = Path(mount)
        self.layout = layout
        self.handler = handler
        self.in_depth, self.out_depth = in_depth, out_depth
        self.enabled = False
        self.bound = False
        self.speed: Speed | None = None
        self.udc: str | None = None  # set by whoever binds the gadget; tells the link speed
        self.host_addresses: dict[int, int] = {}  # declared address -> what the host sees
        self.host_interfaces: dict[int, int] = {}  # device interface number -> what the host sees
        self._calls: deque[Callable[[], None]] = deque()
        self._calls_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._control_pending = False  # a PendingReply is out: leave ep0 alone
        self._ep0_signalled = False  # ep0's eventfd fired while a reply was pending: read ep0 after it
        self._queues: dict[int, deque[_Transfer]] = {ep.index: deque() for ep in layout.endpoints}
        self._fds: dict[int, int] = {}
        self._loop: Any = None  # the asyncio loop of run_on()
        self._timer: Any = None
        self._finished: Callable[[BaseException | None], None] | None = None
        lists = {s: [ctypes_descriptor(raw) for raw in layout.descriptors.get(s, ())] for s in SPEEDS}
        n_in = sum(1 for ep in layout.endpoints if ep.is_in)
        n_out = len(layout.endpoints) - n_in
        # python-functionfs writes the descriptors and strings and opens the endpoint files; ep0 events
        # and endpoint transfers are ours (its processEvents would read ep0 while a reply is pending, and its
        # onEnable would queue OUT reads of its own)
        self._function = ffs.Function(
            str(self.mount),
            fs_list=lists[Speed.FULL], hs_list=lists[Speed.HIGH], ss_list=lists[Speed.SUPER],
            lang_dict={},
            all_ctrl_recip=all_ctrl_recip, config0_setup=config0_setup,
            in_aio_blocks_max=1, out_aio_blocks_per_endpoint=1, out_aio_blocks_max_packet_count=1,
        )
        blob = strings_blob(layout.strings)
        self._function._function_strings = (ctypes.c_char * len(blob)).from_buffer_copy(blob)  # see strings_blob
        from gadgets.aio import AioQueue

        # Two eventfds, so a wake-up says what to do: f_fs signals ep0 events on the library's (it is in the
        # descriptors), AIO completions on ours (IOCB_FLAG_RESFD).
        self._ep0_fd = self._function.eventfd.fileno()
        self._aio_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._aio = AioQueue(max(1, in_depth * n_in + out_depth * n_out), self._aio_fd)
        self._opened = False

    # -- life cycle ------------------------------------------------------------------------------------------

    def __enter__(self) -> FunctionFs:
        """Refuse a mount another process uses, write descriptors and strings to ep0, open the endpoint files."""
        users = ep0_users(self.mount)
        if users:
            raise FunctionFsError(f"{self.mount}/ep0 is already open in another process: "
                                  + ", ".join(f"PID {pid} ({cmd[:60]})" for pid, cmd in users)
                                  + "; stop it first, a second reader would steal its events")
        try:
            self._function.__enter__()
        except OSError as exc:
            hint = " (f_fs refused the descriptors: see dmesg)" if exc.errno == errno.EINVAL else ""
            raise FunctionFsError(f"cannot start the FunctionFS function at {self.mount}: "
                                  f"{exc.strerror or exc}{hint}") from exc
        for index in range(1, len(self.layout.endpoints) + 1):
            fd = self._function.getEndpoint(index).fileno()
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            self._fds[index] = fd
        self._ep0 = self._function.ep0.fileno()
        self._opened = True
        self.handler.attach(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what is in flight and close every file (the UDC should be unbound first)."""
        if self._opened:
            self._opened = False
            self._aio.close()
            self._function.__exit__(None, None, None)
        for fd in (self._wake_fd, self._aio_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def stop(self) -> None:
        """Make `serve()` return, or `run_on()` let go of its loop (from any thread)."""
        self._stopping = True
        self.wake()

    def wake(self) -> None:
        """Have the loop call the handler's `pump()` soon (from any thread: a device's wake-up hook)."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake_fd, 1)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the loop thread (from any thread)."""
        with self._calls_lock:
            self._calls.append(fn)
        self.wake()

    def serve(self) -> None:
        """The event loop on the calling thread: ep0 events, AIO completions, calls from other threads;
        returns after `stop()`."""
        with select.epoll(3) as poller:
            for fd in (self._ep0_fd, self._aio_fd, self._wake_fd):
                poller.register(fd, select.EPOLLIN)
            while not self._stopping:
                timeout = self.handler.poll_timeout()
                try:
                    ready = poller.poll(-1 if timeout is None else timeout)
                except InterruptedError:
                    continue
                fds = {fd for fd, _ in ready}
                self._step(self._wake_fd in fds, self._aio_fd in fds, self._ep0_fd in fds)

    def run_on(self, loop: Any, finished: Callable[[BaseException | None], None]) -> None:
        """Serve from `loop` (an asyncio loop; call this on its thread) until `stop()`; then, or when the
        handling fails, the loop lets go of our files and `finished(error)` is called there."""
        self._loop = loop
        self._finished = finished
        loop.add_reader(self._wake_fd, self._loop_step, True, False, False)
        loop.add_reader(self._aio_fd, self._loop_step, False, True, False)
        loop.add_reader(self._ep0_fd, self._loop_step, False, False, True)
        loop.call_soon(self._loop_step, True, True, True)

    def _loop_step(self, woken: bool, completed: bool, events: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error: BaseException | None = None
        if not self._stopping:
            try:
                self._step(woken, completed, events)
            except Exception as exc:  # the same as an exception ending serve(): the owner sees it
                log.exception("FunctionFS handling at %s failed", self.mount)
                error = exc
        if self._stopping or error is not None:
            loop, self._loop = self._loop, None
            if loop is not None:
                for fd in (self._wake_fd, self._aio_fd, self._ep0_fd):
                    loop.remove_reader(fd)
                if self._finished is not None:
                    self._finished(error)
            return
        timeout = self.handler.poll_timeout()
        if timeout is not None:
            self._timer = self._loop.call_later(timeout, self._loop_step, True, True, True)

    def _step(self, woken: bool, completed: bool, events: bool) -> None:
        """One turn for what is ready: calls from other threads, AIO completions, ep0 events; then the
        handler's pump."""
        if woken:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._wake_fd)
            self._run_calls()
        if completed:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._aio_fd)
            self._aio.reap()
        if events:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._ep0_fd)
            if self._control_pending:
                self._ep0_signalled = True
            else:
                self._ep0_events()
        if not self._stopping:
            self.handler.pump()

    def _run_calls(self) -> None:
        while self._calls:
            with self._calls_lock:
                fn = self._calls.popleft()
            fn()

    # -- ep0 ------------------------------------------------------------------------------------------------

    def _ep0_events(self) -> None:
        """Read and handle what ep0 has queued (non-blocking), until a request is left pending."""
        while not self._control_pending:
            try:
                raw = os.read(self._ep0, _EVENT.size * 8)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EIDRM:  # a request the host gave up on: f_fs reports it once
                    continue
                raise
            if not raw:
                return
            for offset in range(0, len(raw) - _EVENT.size + 1, _EVENT.size):
                request_type, request, value, index, length, kind = _EVENT.unpack_from(raw, offset)
                if kind == FUNCTIONFS_SETUP:
                    self._setup(request_type, request, value, index, length)
                elif kind in _EVENT_TYPES:
                    self._event(_EVENT_TYPES[kind])
                else:
                    log.debug("unknown FunctionFS event type %d", kind)

    def _event(self, event: FfsEvent) -> None:
        log.debug("FunctionFS event %s", event.value)
        if event is FfsEvent.BIND:
            self.bound = True
        elif event is FfsEvent.UNBIND:
            self.bound = self.enabled = False
        elif event is FfsEvent.ENABLE:
            self.enabled = True
            self._learn_host_numbers()
        elif event is FfsEvent.DISABLE:
            self.enabled = False
        try:
            self.handler.event(event)
        except Exception:
            log.exception("handler failed on the %s event", event.value)

    def _learn_host_numbers(self) -> None:
        """After ENABLE: the speed the link runs at and the numbers libcomposite gave the host."""
        self.speed = udc_speed(self.udc) if self.udc else None
        for ep in self.layout.endpoints:
            with contextlib.suppress(OSError, ValueError):
                seen = self._function.getEndpoint(ep.index).getDescriptor()
                self.host_addresses[ep.address] = seen.bEndpointAddress
                if self.speed is None and ep.transfer_type is TransferType.BULK:
                    size = seen.wMaxPacketSize & 0x7FF
                    self.speed = next((s for s in SPEEDS if ep.max_packet_size.get(s) == size), None)
        for interface in self.layout.interfaces:
            with contextlib.suppress(OSError):
                host = self._function.ep0.getRealInterfaceNumber(interface.local)
                if host is not None:
                    self.host_interfaces[interface.number] = host

    def _setup(self, request_type: int, request: int, value: int, index: int, length: int) -> None:
        """One SETUP request: never lets an exception out (it would halt ep0 and end the event loop)."""
        try:
            self._answer(SetupPacket(request_type, request, value, index, length))
        except Exception:
            log.exception("SETUP %02x %02x %04x %04x %04x failed; stalling it", request_type, request, value,
                          index, length)
            self._control_pending = False
            self._stall_ep0(request_type)

    def _answer(self, raw: SetupPacket) -> None:
        setup = map_setup(self.layout, raw)
        ep0 = self._function.ep0
        if setup is None:
            log.debug("SETUP %s names no interface/endpoint of ours: STALL", raw)
            self._stall_ep0(raw.request_type)
            return
        if not setup.request_type & 0x80 and setup.length:
            data = self._ep0_io(lambda: ep0.read(setup.length))  # the status stage is the UDC's now
            answer = self.handler.control(replace(setup, length=len(data)), data)
            if isinstance(answer, PendingReply):
                answer.on_resolved(lambda reply: self._after_data_out(setup, reply))
            else:
                self._after_data_out(setup, answer)
            return
        answer = self.handler.control(setup, b"")
        if isinstance(answer, PendingReply):
            self._control_pending = True
            answer.on_resolved(lambda reply: self._complete(setup, reply, pending=True))
        else:
            self._complete(setup, answer)

    def _after_data_out(self, setup: SetupPacket, reply: Reply) -> None:
        if reply.status is not TransferStatus.OK:
            log.warning("%s: the device refused it, but its data stage is already acknowledged "
                        "(f_fs cannot stall after the data stage)", setup)
        self._after_control(setup, reply)

    def _complete(self, setup: SetupPacket, reply: Reply, *, pending: bool = False) -> None:
        """Answer the SETUP request on ep0: its data, a status-stage acknowledgement, or a STALL."""
        ep0 = self._function.ep0
        try:
            if reply.status is not TransferStatus.OK:
                self._stall_ep0(setup.request_type)
            elif setup.request_type & 0x80:
                self._ep0_io(lambda: ep0.write(bytes(reply.data)[: setup.length]))
            else:
                self._ep0_io(lambda: ep0.read(0))
        except OSError as exc:  # EIDRM: the host gave up (or reset) meanwhile; nobody waits for it
            log.debug("%s: answer not taken (%s)", setup, exc)
        self._after_control(setup, reply)
        if pending:
            self._control_pending = False
            if self._ep0_signalled and self._opened and not self._stopping:
                self._ep0_signalled = False
                self._ep0_events()  # what arrived meanwhile (its eventfd signal is gone)

    def _after_control(self, setup: SetupPacket, reply: Reply) -> None:
        """A SET/CLEAR_FEATURE(ENDPOINT_HALT) that reached us (UDCs other than dummy_hcd pass them on)
        must change the endpoint at the UDC too."""
        if (setup.request_type == _STANDARD_OUT_TO_ENDPOINT and reply.status is TransferStatus.OK
                and setup.value == FeatureSelector.ENDPOINT_HALT
                and setup.request in (StandardRequest.SET_FEATURE, StandardRequest.CLEAR_FEATURE)):
            ep = self.layout.endpoint_by_address(setup.index)
            if ep is not None:
                (self.halt if setup.request == StandardRequest.SET_FEATURE else self.clear_halt)(ep.index)

    @staticmethod
    def _ep0_io(op: Callable[[], bytes | int | None]) -> bytes:
        """ep0 is non-blocking for events; its data stages still wait for the host (EAGAIN only when the
        f_fs mutex is busy, so retry)."""
        for _ in range(1000):
            result = op()
            if result is not None:
                return result if isinstance(result, bytes) else b""
            threading.Event().wait(0.001)
        raise FunctionFsError("ep0 stayed busy for a second")

    def _stall_ep0(self, request_type: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._function.ep0.halt(request_type)

    # -- endpoint transfers (loop thread) -------------------------------------------------------------------

    def write(self, index: int, data: bytes | memoryview, callback: Callable[[int], None]) -> bool:
        """Queue `data` on IN endpoint file `index` (b"" sends a zero-length packet; a writable view is sent
        without a copy, its buffer left alone until the callback); `callback(status)` gets the bytes sent
        or -errno, in order. False if f_fs refused to queue it (not enabled)."""
        entry = _Transfer(callback, False)
        queue = self._queues[index]
        queue.append(entry)
        try:
            self._aio.write(self._fds[index], data, functools.partial(self._completed, index, entry))
        except OSError as exc:
            queue.remove(entry)
            log.debug("ep%d: write of %d bytes not queued: %s", index, len(data), exc)
            return False
        return True

    def read(self, index: int, size: int, callback: Callable[[bytes | None, int], None]) -> bool:
        """Queue a read of up to `size` bytes (a multiple of wMaxPacketSize: f_fs cannot take a full packet
        into less) on OUT endpoint file `index`. It completes when full or on a short packet;
        `callback(data, status)` in order. False if it could not be queued."""
        entry = _Transfer(callback, True)
        queue = self._queues[index]
        queue.append(entry)
        try:
            self._aio.read(self._fds[index], size, functools.partial(self._completed, index, entry))
        except OSError as exc:
            queue.remove(entry)
            log.debug("ep%d: read of %d bytes not queued: %s", index, size, exc)
            return False
        return True

    def _completed(self, index: int, entry: _Transfer, data: bytes | None, status: int) -> None:
        entry.done, entry.data, entry.status = True, data, status
        queue = self._queues[index]
        while queue and queue[0].done:
            head = queue.popleft()
            if head.is_read:
                head.callback(head.data, head.status)
            else:
                head.callback(head.status)

    def in_flight(self, index: int) -> int:
        return len(self._queues[index])

    def halt(self, index: int) -> bool:
        """Halt endpoint file `index` at the UDC (the host sees STALL until it clears the halt; on IN
        endpoints dummy_hcd refuses while transfers are queued, so halt once they are done)."""
        try:
            self._function.getEndpoint(index).halt()
        except ValueError:
            # python-functionfs's "halt did not return EBADMSG": the read(0) that halts an IN endpoint file got
            # EAGAIN (our files are non-blocking), which f_fs returns when the endpoint is not enabled (the host
            # disabled, reset or unbound the function and its event is not read yet: nothing left to halt) or
            # when the UDC refuses (dummy_hcd: IN transfers still queued).
            if self._queues[index] and self.enabled:
                log.warning("ep%d: cannot halt: the UDC refused while transfers are queued", index)
            else:
                log.debug("ep%d: not halted: the endpoint is not enabled (function disabled or unbound)", index)
            return False
        except OSError as exc:
            log.warning("ep%d: cannot halt: %s", index, exc)
            return False
        return True

    def clear_halt(self, index: int) -> None:
        with contextlib.suppress(OSError):
            self._function.getEndpoint(index).clearHalt()


# --- putting it together with configfs ---------------------------------------------------------------------------


class FunctionFsGadget:
    """A configfs gadget with one FunctionFS function served by `handler`, bound to a UDC.

    `with FunctionFsGadget(spec, layout, handler, udc="dummy_udc.0") as g:` creates the gadget, mounts
    FunctionFS, writes the descriptors, starts the event loop on a thread and binds the UDC; leaving the
    block (also by Ctrl-C) unbinds the UDC, stops the loop, closes the files, unmounts and removes the
    gadget (unbind first, then the files, then configfs). `wait()` blocks until the loop ends and re-raises
    its error. With `loop` (a running asyncio loop on another thread) the function is served there instead
    of on a thread of its own.
    """

    def __init__(self, spec: GadgetSpec, layout: FfsLayout, handler: FunctionFsHandler, *,
                 udc: str | None = None, ffs_options: Mapping[str, Any] | None = None,
                 loop: Any = None) -> None:
        if not any(f.kind == "ffs" for f in spec.functions):
            raise FunctionFsError(f"gadget {spec.name} has no ffs.* function")
        self.spec = spec
        self.layout = layout
        self.handler = handler
        self.requested_udc = udc
        self.udc: str | None = None
        self.gadget = Gadget(spec)
        self.ffs: FunctionFs | None = None
        self._thread: threading.Thread | None = None
        # Set by the loop thread as it ends. Waiting on it, not on Thread.join: in Python 3.11 a Ctrl-C that
        # interrupts join() releases the running thread's state lock and marks it stopped (the bpo-45274
        # fix), after which join() returns at once while the loop still uses the AIO contexts.
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._ffs_options = dict(ffs_options or {})
        self._lock_fd: int | None = None
        self._loop = loop
        self._started = False

    def __enter__(self) -> FunctionFsGadget:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        require_functionfs()
        self._lock()
        self.gadget.create()
        fn = next(f for f in self.spec.functions if f.kind == "ffs")
        mount = self.gadget.mount_ffs(fn)
        self.ffs = FunctionFs(mount, self.layout, self.handler, **self._ffs_options)
        self.ffs.__enter__()
        self._started = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.ffs.run_on, self._loop, self._finished)
        else:
            self._thread = threading.Thread(target=self._serve, name=f"ffs-{self.spec.name}", daemon=True)
            self._thread.start()
        self.udc = self.ffs.udc = self.gadget.bind(self.requested_udc)
        log.info("gadget %s bound to %s", self.spec.name, self.udc)

    def _lock(self) -> None:
        """One process per gadget name (FUNCTIONFS.md pitfall 12): `create()` would otherwise tear down a
        gadget another vusb process is serving, and two readers of one ep0 steal each other's events."""
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        path = LOCK_DIR / f"gadget-{self.spec.name}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FunctionFsError(f"gadget {self.spec.name} is served by another vusb process (it holds {path}); "
                                  "stop it first or choose another name") from None
        self._lock_fd = fd

    def _serve(self) -> None:
        assert self.ffs is not None
        try:
            self.ffs.serve()
        except BaseException as exc:  # surfaced by wait()/close() on the owner's thread
            log.exception("FunctionFS event loop of %s failed", self.spec.name)
            self._error = exc
        finally:
            self._done.set()

    def _finished(self, error: BaseException | None) -> None:
        """The end of `FunctionFs.run_on` (on the loop's thread)."""
        self._error = error
        self._done.set()

    @property
    def running(self) -> bool:
        return self._started and not self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the event loop ends (True) or `timeout` passes (False); re-raise the loop's error."""
        if self._started:
            self._done.wait(timeout)
        if self._error is not None:
            error, self._error = self._error, None
            raise FunctionFsError(f"the FunctionFS event loop stopped: {error}") from error
        return not self.running

    def close(self) -> None:
        """Unbind, stop the loop, close the files, remove the gadget; safe to call twice. Without the
        gadget's lock nothing here is ours to touch (another process may be serving that gadget)."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(GadgetError):
            self.gadget.unbind()
        if self.ffs is not None:
            self.ffs.stop()
        if self._started:
            deadline = time.monotonic() + 30
            while not self._done.wait(0.5) and time.monotonic() < deadline:
                pass
            if not self._done.is_set():
                # Closing the AIO contexts under a running loop would crash the process; leave them.
                log.error("the FunctionFS event loop of %s did not stop within 30 s; leaving its files open",
                          self.spec.name)
                self.ffs = None
            self._thread = None
            self._started = False
        if self.ffs is not None:
            self.ffs.close()
            self.ffs = None
        try:
            self.gadget.remove()
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None


_SPEED_NAMES = {"full-speed": Speed.FULL, "high-speed": Speed.HIGH, "super-speed": Speed.SUPER,
                "super-speed-plus": Speed.SUPER_PLUS, "low-speed": Speed.LOW}


def udc_speed(udc: str) -> Speed | None:
    """The speed a UDC's link runs at now (/sys/class/udc/UDC/current_speed), None when not connected."""
    try:
        return _SPEED_NAMES.get(Path("/sys/class/udc", udc, "current_speed").read_text().strip())
    except OSError:
        return None


def require_functionfs() -> None:
    """Load usb_f_fs if it can be, or say in one line what is missing."""
    import subprocess

    if not Path("/sys/module/usb_f_fs").exists():
        subprocess.run(["modprobe", "usb_f_fs"], capture_output=True, check=False)
    if not Path("/sys/module/usb_f_fs").exists() and "functionfs" not in Path("/proc/filesystems").read_text():
        raise FunctionFsError("this kernel has no FunctionFS (usb_f_fs): `modprobe usb_f_fs`, or run inside the "
                              "vusb VM (python -m tools.vm run -- ...)")


def report_lines(layout: FfsLayout, ffs: FunctionFs | None = None) -> list[str]:
    """What the host will see that is not the device's own doing: libcomposite's answers, the numbers it
    gave, what could not be carried."""
    lines = [
        "libcomposite answers: device/configuration/string/BOS/qualifier descriptors, SET_ADDRESS, "
        "SET/GET_CONFIGURATION, SET/GET_INTERFACE (alt 0 only), GET_STATUS, SET/CLEAR_FEATURE; "
        "SET_CONFIGURATION reaches the device as an ENABLE event",
    ]
    for item in layout.dropped:
        lines.append(f"not carried: {item}")
    if ffs is not None:
        for interface in layout.interfaces:
            host = ffs.host_interfaces.get(interface.number)
            if host is not None:
                lines.append(f"interface {interface.number} -> host interface {host}")
        for ep in layout.endpoints:
            host = ffs.host_addresses.get(ep.address)
            if host is not None:
                note = "" if host == ep.address else " (reassigned by the UDC)"
                lines.append(f"endpoint {ep.address:#04x} (ep{ep.index}) -> host endpoint {host:#04x}{note}")
        if ffs.speed is not None:
            lines.append(f"link speed: {ffs.speed.name.lower()}")
    return lines


__all__ = [
    "DroppedDescriptor",
    "FfsEndpoint",
    "FfsEvent",
    "FfsInterface",
    "FfsLayout",
    "FunctionFs",
    "FunctionFsError",
    "FunctionFsGadget",
    "FunctionFsHandler",
    "ctypes_descriptor",
    "descriptors_blob",
    "endpoint_for_speed",
    "ffs_layout",
    "ffs_rejects",
    "interval_for",
    "interval_us",
    "map_setup",
    "report_lines",
    "require_functionfs",
    "strings_blob",
    "udc_speed",
]
