"""The contract every emulated device model follows: pure request in, reply out.

A `Device` is data (descriptors, strings) plus `Function`s (one per interface group, like the kernel's
configfs functions: mass storage, HID, CDC-ACM). It never touches a socket, a file descriptor of the edge,
or an event loop. Edges (the USB/IP server, the FunctionFS gadget, replay) call:

- `Device.control(setup, data) -> Reply`: a control transfer on ep0. `data` is the OUT data stage
  (b"" for IN or no-data requests). Chapter-9 standard requests are answered by `Device` itself; class and
  vendor requests go to the `Function` owning the interface (recipient interface) or endpoint.
- `Device.transfer(endpoint, data, length) -> Reply | None`: a bulk or interrupt transfer. `endpoint` is the
  address with its direction bit (0x81 = IN 1, 0x02 = OUT 2). For OUT, `data` is what the host sent; for IN,
  `data` is None and `length` is the host's buffer size. `None` means "nothing to send yet" (a NAK): the edge
  keeps the transfer pending and retries it after the device calls the wake-up callback.
- `Device.set_wakeup(callback)`: the edge's hook; a device calls it (from any thread) when a NAK'd IN
  transfer may now complete (a key was typed, serial bytes arrived).
- `Device.reset()`: USB port reset; `Device.close()`: flush and sync backing stores (called on shutdown).

Replies carry a `TransferStatus`, which the edges map to the kernel's URB status (0, -EPIPE, ...).

Declaring a device is declaring data: a `Function` lists its interfaces (`InterfaceSpec`, with endpoints
named by the function, `EndpointSpec`) and answers only what is its own; `Device` numbers interfaces and
endpoints, adds an interface association descriptor for multi-interface functions, builds every
descriptor for its speed and answers chapter 9 itself::

    class Echo(Function):
        # Bytes the host writes to bulk OUT come back on bulk IN.

        def __init__(self) -> None:
            super().__init__()
            self.pending = bytearray()

        def interfaces(self) -> list[InterfaceSpec]:
            return [InterfaceSpec(ClassCode.VENDOR_SPEC, endpoints=(
                EndpointSpec("out", Direction.OUT), EndpointSpec("in", Direction.IN)))]

        def transfer(self, endpoint: str, data: bytes | None, length: int) -> Reply | None:
            if endpoint == "out":
                self.pending += data
                self.wakeup()                      # a NAK'd IN transfer can complete now
                return Reply(actual_length=len(data))
            if not self.pending:
                return None                        # NAK: nothing to send yet
            chunk, self.pending = bytes(self.pending[:length]), self.pending[length:]
            return Reply(data=chunk)

    device = Device([Echo()], id_vendor=0x1209, id_product=0x0001, product="Echo")
    device.control(set_configuration(1), b"")
    device.transfer(0x01, b"hi", 2)
    device.transfer(0x81, None, 512)  # Reply(data=b"hi")
"""

from __future__ import annotations

import enum
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from emulator.errors import VusbError
from emulator.usb.descriptors import (
    AlternateSetting,
    BosDescriptor,
    Configuration,
    ConfigurationDescriptor,
    Descriptor,
    DeviceDescriptor,
    DeviceQualifierDescriptor,
    Endpoint,
    EndpointDescriptor,
    Interface,
    InterfaceAssociationDescriptor,
    InterfaceDescriptor,
    LanguageDescriptor,
    OtherSpeedConfigurationDescriptor,
    SsEndpointCompanionDescriptor,
    StringDescriptor,
    SuperSpeedUsbCapability,
    Usb20ExtensionCapability,
)
from emulator.usb.errors import UsbError
from emulator.usb.setup import (
    ClassCode,
    DescriptorType,
    Direction,
    FeatureSelector,
    Recipient,
    RequestType,
    SetupPacket,
    Speed,
    StandardRequest,
    TransferType,
)

log = logging.getLogger(__name__)


class TransferStatus(enum.IntEnum):
    """How a transfer ended, as the negative errno the Linux URB status (and USB/IP's `status`) carries."""

    OK = 0
    STALL = -32  # -EPIPE: the endpoint (or ep0 for this request) is halted
    NO_DEVICE = -108  # -ESHUTDOWN: the device went away
    OVERFLOW = -75  # -EOVERFLOW: babble, the device sent more than the buffer holds
    SHORT = -121  # -EREMOTEIO: short packet with URB_SHORT_NOT_OK
    PROTOCOL = -71  # -EPROTO: bit-stuff / protocol error


class FileRegion:
    """IN data that is `length` bytes of an open file at `offset`, not read yet. An edge that can move file
    bytes to its peer without copying them through Python (sendfile(2) to a TCP socket: the page cache pages
    go into the socket as they are) sends it as it is; anything else reads it with `bytes(region)`. Models
    hand one out only when the edge asked for it (`Device.file_regions`), so code that wants bytes never
    meets one. Stores give regions only of bytes nothing here will rewrite (a read-only image, an overlay's
    untouched base): sendfile queues the page cache pages themselves, not a copy. The file must not shrink
    before the region is sent: `bytes()` raises OSError if it did."""

    __slots__ = ("fd", "length", "offset")

    # A plain class, not a frozen dataclass: one is made per READ, and a frozen one sets each field
    # through object.__setattr__.
    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __eq__(self, other: object) -> bool:
        if type(other) is not FileRegion:
            return NotImplemented
        return (self.fd, self.offset, self.length) == (other.fd, other.offset, other.length)

    def __hash__(self) -> int:
        return hash((self.fd, self.offset, self.length))

    def __repr__(self) -> str:
        return f"FileRegion(fd={self.fd}, offset={self.offset}, length={self.length})"

    def __bytes__(self) -> bytes:
        parts: list[bytes] = []
        got = 0
        while got < self.length:
            more = os.pread(self.fd, self.length - got, self.offset + got)
            if not more:
                raise OSError(f"file ended {self.length - got} bytes short of a region at offset {self.offset}")
            parts.append(more)
            got += len(more)
        return parts[0] if len(parts) == 1 else b"".join(parts)


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one transfer. `data` is IN data; `actual_length` defaults to len(data) for IN and
    must be set by the model for OUT (bytes it accepted)."""

    status: TransferStatus = TransferStatus.OK
    data: bytes | FileRegion = b""  # a FileRegion only for a device whose edge set `file_regions`
    actual_length: int | None = None

    @property
    def length(self) -> int:
        return len(self.data) if self.actual_length is None else self.actual_length


STALL = Reply(TransferStatus.STALL)
# Members as module names for the per-transfer tests: `TransferStatus.OK` goes through EnumType.__getattr__
# on Python 3.11, ten times the cost of a global.
_OK = TransferStatus.OK
_STALL = TransferStatus.STALL

WakeupCallback = Callable[[], None]


class DeviceError(VusbError):
    """A device or function that cannot be built as declared (too many endpoints, a packet size the
    speed forbids, a string too long for a descriptor, a function bound twice)."""


# --- what a function declares ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One endpoint, named by its function; `Device` assigns the address.

    `max_packet_size` None means the largest the speed allows for bulk (64 / 512 / 1024) and 64 for
    interrupt. `interval_ms` is the polling period of an interrupt endpoint, written as bInterval in
    frames at full speed and as 2^(bInterval-1) microframes at high and SuperSpeed."""

    name: str
    direction: Direction
    transfer_type: TransferType = TransferType.BULK
    max_packet_size: int | None = None
    interval_ms: int = 10
    max_burst: int = 0
    descriptors: tuple[Descriptor, ...] = ()


@dataclass(frozen=True, slots=True)
class AltSettingSpec:
    """Alternate setting 1, 2, ... of an interface (setting 0 is the `InterfaceSpec` itself)."""

    endpoints: tuple[EndpointSpec, ...] = ()
    descriptors: tuple[Descriptor, ...] = ()
    name: str | None = None


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    """One interface: its class triple, alternate setting 0 (endpoints, class-specific descriptors that
    follow the interface descriptor, an optional iInterface string) and any further settings."""

    interface_class: int
    interface_subclass: int = 0
    interface_protocol: int = 0
    endpoints: tuple[EndpointSpec, ...] = ()
    descriptors: tuple[Descriptor, ...] = ()
    name: str | None = None
    alternates: tuple[AltSettingSpec, ...] = ()

    def settings(self) -> tuple[AltSettingSpec, ...]:
        """All alternate settings, index = bAlternateSetting."""
        return (AltSettingSpec(self.endpoints, self.descriptors, self.name), *self.alternates)


# --- what the device reports to a USB/IP devlist ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InterfaceSummary:
    """`struct usbip_usb_interface`: the class triple of alternate setting 0."""

    interface_class: int
    interface_subclass: int
    interface_protocol: int


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """The `struct usbip_usb_device` facts a device owns (path, busid, busnum and devnum are the
    server's). `configuration_value` and `num_interfaces` describe the configuration as an exporting
    Linux host shows it, configured, whatever the importing host has set since."""

    id_vendor: int
    id_product: int
    bcd_device: int
    device_class: int
    device_subclass: int
    device_protocol: int
    configuration_value: int
    num_configurations: int
    num_interfaces: int
    speed: Speed
    interfaces: tuple[InterfaceSummary, ...]


# --- functions ----------------------------------------------------------------------------------------------


class Function:
    """One interface group of a device (kernel: `struct usb_function`). Subclasses declare
    `interfaces()` and override the handlers they need; every default answers STALL or does nothing.

    Interface numbers passed to the hooks are the device's (absolute) numbers; `interface_number(i)`
    maps the function's i-th interface to it. Endpoints are known by the names the function gave them.
    """

    name = "function"
    function_class: tuple[int, int, int] | None = None  # IAD triple; default: the first interface's
    function_name: str | None = None  # IAD iFunction string

    def __init__(self) -> None:
        self._device: Device | None = None
        self._first_interface = 0
        self._addresses: dict[str, int] = {}

    # declarations

    def interfaces(self) -> Sequence[InterfaceSpec]:
        """The interfaces of this function, in order. Called once, when the device is built, after
        `interface_number()` is valid (so class descriptors such as CDC's union can name interfaces)."""
        raise NotImplementedError(f"{type(self).__name__} must declare interfaces()")

    # handlers (pure: request in, reply out)

    def control(self, setup: SetupPacket, data: bytes) -> Reply:
        """A class or vendor request addressed to one of this function's interfaces or endpoints."""
        return STALL

    def get_descriptor(self, setup: SetupPacket) -> bytes | None:
        """GET_DESCRIPTOR addressed to an interface of this function (HID: HID, REPORT). None: STALL."""
        return None

    def transfer(self, endpoint: str, data: bytes | None, length: int) -> Reply | None:
        """A bulk or interrupt transfer on the endpoint named `endpoint` (see the module docstring).
        Returning a STALL reply halts the endpoint until the host clears it."""
        return STALL

    # hooks

    def set_alt(self, interface: int, alternate: int) -> None:
        """The host selected `alternate` on `interface` (also after SET_CONFIGURATION, with 0):
        endpoint state of that interface starts afresh (data toggle DATA0, halt cleared)."""

    def disable(self) -> None:
        """The configuration went away (SET_CONFIGURATION(0), a new SET_CONFIGURATION, a reset)."""

    def clear_halt(self, endpoint: str) -> None:
        """The host cleared ENDPOINT_HALT on `endpoint` (data toggle back to DATA0). A function that must
        stay halted (BOT after an invalid CBW) calls `self.halt(endpoint)` again here."""

    def reset(self) -> None:
        """USB port reset: drop per-connection state."""

    def close(self) -> None:
        """Shutdown: flush and release what the function holds."""

    # services for subclasses

    @property
    def device(self) -> Device:
        if self._device is None:
            raise DeviceError(f"{self.name}: not part of a device yet")
        return self._device

    @property
    def speed(self) -> Speed:
        return self.device.speed

    def interface_number(self, index: int = 0) -> int:
        """The device's number for this function's `index`-th interface."""
        return self._first_interface + index

    def endpoint_address(self, endpoint: str) -> int:
        try:
            return self._addresses[endpoint]
        except KeyError:
            raise DeviceError(f"{self.name}: no endpoint named {endpoint!r}") from None

    def max_packet_size(self, endpoint: str) -> int:
        return self.device.max_packet_size(self.endpoint_address(endpoint))

    def halt(self, endpoint: str) -> None:
        """Halt one of this function's endpoints (a functional stall): transfers STALL until the host
        sends CLEAR_FEATURE(ENDPOINT_HALT)."""
        self.device.halted.add(self.endpoint_address(endpoint))

    def unhalt(self, endpoint: str) -> None:
        self.device.halted.discard(self.endpoint_address(endpoint))

    def is_halted(self, endpoint: str) -> bool:
        return self.endpoint_address(endpoint) in self.device.halted

    def wakeup(self) -> None:
        """Tell the edge a NAK'd transfer may now complete. Safe from any thread; a no-op before the
        function is part of a device or before the edge set a callback."""
        if self._device is not None:
            self._device.wakeup()


# --- the device ---------------------------------------------------------------------------------------------

_BULK_MAX = {Speed.FULL: 64, Speed.HIGH: 512, Speed.SUPER: 1024}
_INTERRUPT_MAX = {Speed.FULL: 64, Speed.HIGH: 1024, Speed.SUPER: 1024}
_EP0_DEFAULT = {Speed.FULL: 64, Speed.HIGH: 64, Speed.SUPER: 9}  # SuperSpeed: exponent, 2^9 = 512
_BCD_USB_DEFAULT = {Speed.FULL: 0x0200, Speed.HIGH: 0x0200, Speed.SUPER: 0x0320}


@dataclass(slots=True)
class _EndpointSlot:
    function: Function
    spec: EndpointSpec
    address: int
    interface: int


@dataclass(slots=True)
class _InterfaceSlot:
    function: Function
    spec: InterfaceSpec
    endpoints: list[list[_EndpointSlot]] = field(default_factory=list)  # per alternate setting


class Device:
    """A USB device with one configuration made of `Function`s (see the module docstring).

    State (address, configuration, alternate settings, halted endpoints) lives here and changes only
    through `control`, `transfer` and `reset`; the descriptors are built once, in the constructor.
    """

    def __init__(
        self,
        functions: Sequence[Function],
        *,
        id_vendor: int,
        id_product: int,
        bcd_device: int = 0x0100,
        manufacturer: str | None = None,
        product: str | None = None,
        serial: str | None = None,
        speed: Speed = Speed.HIGH,
        device_class: int | None = None,
        device_subclass: int = 0,
        device_protocol: int = 0,
        bcd_usb: int | None = None,
        max_packet_size0: int | None = None,
        configuration_value: int = 1,
        configuration_name: str | None = None,
        self_powered: bool = False,
        remote_wakeup: bool = False,
        max_power_ma: int = 100,
        langid: int = 0x0409,
    ) -> None:
        if speed not in _BULK_MAX:
            raise DeviceError(f"speed {speed!r} is not modelled: use FULL, HIGH or SUPER")
        if not 1 <= configuration_value <= 0xFF:
            raise DeviceError(f"bConfigurationValue must be 1..255 (0 means unconfigured), got "
                              f"{configuration_value}")
        self.speed = Speed(speed)
        # Set by an edge that can send a `FileRegion` (the USB/IP server, with sendfile): functions may then
        # answer bulk IN with one instead of bytes read into Python.
        self.file_regions = False
        self.functions: tuple[Function, ...] = tuple(functions)
        self.langid = langid
        self.bcd_usb = _BCD_USB_DEFAULT[self.speed] if bcd_usb is None else bcd_usb
        if self.speed is Speed.SUPER and self.bcd_usb < 0x0300:
            raise DeviceError(f"a SuperSpeed device reports bcdUSB 3.0 or later, not {self.bcd_usb:#06x}")
        ep0 = _EP0_DEFAULT[self.speed] if max_packet_size0 is None else max_packet_size0
        allowed0 = {Speed.FULL: (8, 16, 32, 64), Speed.HIGH: (64,), Speed.SUPER: (9,)}[self.speed]
        if ep0 not in allowed0:
            raise DeviceError(f"bMaxPacketSize0 {ep0} is not allowed at {self.speed.name} speed "
                              f"(allowed: {allowed0})")
        self.remote_wakeup_capable = remote_wakeup
        self.self_powered = self_powered
        self._configuration_value = configuration_value

        self._strings: dict[str, int] = {}
        i_manufacturer, i_product, i_serial = (self._string(s) for s in (manufacturer, product, serial))
        i_configuration = self._string(configuration_name)

        self._interfaces: dict[int, _InterfaceSlot] = {}
        self._endpoints: dict[int, _EndpointSlot] = {}
        self._bind(self.functions)
        has_iad = any(len(self._function_interfaces(f)) > 1 for f in self.functions)
        if device_class is None:  # the IAD ECN asks multi-function devices to say so in the class triple
            device_class, device_subclass, device_protocol = (
                (ClassCode.MISC, 0x02, 0x01) if has_iad else (ClassCode.PER_INTERFACE, 0, 0))

        unit = 8 if self.speed is Speed.SUPER else 2
        max_power = math.ceil(max_power_ma / unit)
        if not 0 <= max_power <= 0xFF:
            raise DeviceError(f"{max_power_ma} mA does not fit bMaxPower at {self.speed.name} speed")
        self._header = ConfigurationDescriptor(
            configuration_value=configuration_value, i_configuration=i_configuration,
            attributes=0x80 | (0x40 if self_powered else 0) | (0x20 if remote_wakeup else 0),
            max_power=max_power)
        self._max_power_ma = max_power_ma
        try:
            self.device_descriptor = DeviceDescriptor(
                bcd_usb=self.bcd_usb, device_class=device_class, device_subclass=device_subclass,
                device_protocol=device_protocol, max_packet_size0=ep0, id_vendor=id_vendor,
                id_product=id_product, bcd_device=bcd_device, i_manufacturer=i_manufacturer,
                i_product=i_product, i_serial_number=i_serial, num_configurations=1)
            self._device_bytes = self.device_descriptor.to_bytes()
            self.configuration = self._configuration(self.speed)
            self._configuration_bytes = self.configuration.to_bytes()
            self._other_speed_bytes: bytes | None = None
            self._qualifier_bytes: bytes | None = None
            if self.speed is Speed.HIGH:  # USB 2.0 9.6.2: only high-speed capable devices answer these
                self._other_speed_bytes = self._configuration(Speed.FULL, other_speed=True).to_bytes()
                self._qualifier_bytes = DeviceQualifierDescriptor(
                    bcd_usb=self.bcd_usb, device_class=device_class, device_subclass=device_subclass,
                    device_protocol=device_protocol, max_packet_size0=64, num_configurations=1).to_bytes()
            self.bos: BosDescriptor | None = None
            if self.bcd_usb >= 0x0201:  # USB 2.0 LPM ECN / USB 3.x: a BOS must be there
                caps: tuple[Descriptor, ...] = (Usb20ExtensionCapability(attributes=0x02),)
                if self.speed is Speed.SUPER:
                    caps += (SuperSpeedUsbCapability(),)
                self.bos = BosDescriptor(caps)
            self._bos_bytes = None if self.bos is None else self.bos.to_bytes()
            self._string_bytes = {0: LanguageDescriptor((langid,)).to_bytes()}
            self._string_bytes.update((i, StringDescriptor(s).to_bytes()) for s, i in self._strings.items())
        except UsbError as exc:
            raise DeviceError(f"cannot build descriptors: {exc}") from exc

        self.address = 0
        self.configuration_current = 0  # bConfigurationValue set by the host; 0 = unconfigured
        self.alternates: dict[int, int] = {}
        self.halted: set[int] = set()
        self.remote_wakeup_enabled = False
        self._active: dict[int, _EndpointSlot] = {}
        self._wakeup: WakeupCallback | None = None

    # --- building ------------------------------------------------------------------------------------

    def _string(self, text: str | None) -> int:
        if text is None:
            return 0
        if text not in self._strings:
            if len(self._strings) >= 0xFF:
                raise DeviceError("more than 255 distinct strings")
            self._strings[text] = len(self._strings) + 1
        return self._strings[text]

    def _function_interfaces(self, function: Function) -> list[int]:
        return [n for n, slot in self._interfaces.items() if slot.function is function]

    def _bind(self, functions: Sequence[Function]) -> None:
        next_in, next_out = 1, 1
        for function in functions:
            if function._device is not None:
                raise DeviceError(f"{function.name}: a function can be part of only one device")
            function._device = self
            function._first_interface = len(self._interfaces)
            specs = list(function.interfaces())
            if not specs:
                raise DeviceError(f"{function.name}: declares no interface")
            addresses: dict[str, int] = {}
            for index, spec in enumerate(specs):
                number = function._first_interface + index
                slot = _InterfaceSlot(function, spec)
                for alt in spec.settings():
                    slots = []
                    for ep in alt.endpoints:
                        if ep.transfer_type not in (TransferType.BULK, TransferType.INTERRUPT):
                            raise DeviceError(f"{function.name}: endpoint {ep.name!r}: only bulk and "
                                              f"interrupt endpoints are modelled")
                        if ep.name not in addresses:
                            if ep.direction is Direction.IN:
                                addresses[ep.name], next_in = 0x80 | next_in, next_in + 1
                            else:
                                addresses[ep.name], next_out = next_out, next_out + 1
                        if max(next_in, next_out) > 16:
                            raise DeviceError("more than 15 endpoints in one direction")
                        self._max_packet(ep, self.speed)  # validate for the operating speed now
                        slots.append(_EndpointSlot(function, ep, addresses[ep.name], number))
                    slot.endpoints.append(slots)
                self._interfaces[number] = slot
                if number > 0xFF:
                    raise DeviceError("more than 256 interfaces")
            function._addresses = addresses
        for slot in self._interfaces.values():
            for alt_slots in slot.endpoints:
                for ep_slot in alt_slots:
                    self._endpoints.setdefault(ep_slot.address, ep_slot)

    def _max_packet(self, ep: EndpointSpec, speed: Speed, *, clamp: bool = False) -> int:
        if ep.transfer_type is TransferType.BULK:
            if ep.max_packet_size is None or clamp:
                return _BULK_MAX[speed]
            legal = (8, 16, 32, 64) if speed is Speed.FULL else (_BULK_MAX[speed],)
            if ep.max_packet_size not in legal:
                raise DeviceError(f"bulk endpoint {ep.name!r}: wMaxPacketSize {ep.max_packet_size} is not "
                                  f"allowed at {speed.name} speed (allowed: {legal})")
            return ep.max_packet_size
        size = 64 if ep.max_packet_size is None else ep.max_packet_size
        if clamp:
            return min(size, _INTERRUPT_MAX[speed])
        if not 1 <= size <= _INTERRUPT_MAX[speed]:
            raise DeviceError(f"interrupt endpoint {ep.name!r}: wMaxPacketSize {size} is more than "
                              f"{speed.name} speed allows ({_INTERRUPT_MAX[speed]})")
        return size

    @staticmethod
    def _interval(ep: EndpointSpec, speed: Speed) -> int:
        if ep.transfer_type is not TransferType.INTERRUPT:
            return 0
        ms = max(1, ep.interval_ms)
        if speed is Speed.FULL:
            return min(ms, 255)
        return min(16, (ms * 8).bit_length())  # kernel USB_MS_TO_HS_INTERVAL: ilog2(ms * 8) + 1

    def _configuration(self, speed: Speed, *, other_speed: bool = False) -> Configuration:
        interfaces: list[Interface] = []
        for function in self.functions:
            numbers = self._function_interfaces(function)
            leading: tuple[Descriptor, ...] = ()
            if len(numbers) > 1:
                first = self._interfaces[numbers[0]].spec
                klass = function.function_class or (first.interface_class, first.interface_subclass,
                                                     first.interface_protocol)
                leading = (InterfaceAssociationDescriptor(
                    first_interface=numbers[0], interface_count=len(numbers), function_class=klass[0],
                    function_subclass=klass[1], function_protocol=klass[2],
                    i_function=self._string(function.function_name)),)
            for number in numbers:
                slot = self._interfaces[number]
                alternates = []
                for setting, (alt, ep_slots) in enumerate(zip(slot.spec.settings(), slot.endpoints,
                                                              strict=True)):
                    endpoints = []
                    for ep_slot in ep_slots:
                        ep = ep_slot.spec
                        size = self._max_packet(ep, speed, clamp=other_speed)
                        extra: tuple[Descriptor, ...] = ()
                        if speed is Speed.SUPER:
                            extra = (SsEndpointCompanionDescriptor(
                                max_burst=ep.max_burst,
                                bytes_per_interval=size if ep.transfer_type is TransferType.INTERRUPT else 0),)
                        endpoints.append(Endpoint(EndpointDescriptor(
                            endpoint_address=ep_slot.address, attributes=ep.transfer_type,
                            max_packet_size=size, interval=self._interval(ep, speed)),
                            extra + ep.descriptors))
                    alternates.append(AlternateSetting(
                        InterfaceDescriptor(
                            interface_number=number, alternate_setting=setting,
                            num_endpoints=len(endpoints), interface_class=slot.spec.interface_class,
                            interface_subclass=slot.spec.interface_subclass,
                            interface_protocol=slot.spec.interface_protocol,
                            i_interface=self._string(alt.name)),
                        alt.descriptors, tuple(endpoints), leading if setting == 0 else ()))
                leading = ()
                interfaces.append(Interface(tuple(alternates)))
        header = self._header
        if other_speed:
            header = OtherSpeedConfigurationDescriptor(
                configuration_value=header.configuration_value, i_configuration=header.i_configuration,
                attributes=header.attributes, max_power=math.ceil(self._max_power_ma / 2))
        return Configuration(header, (), tuple(interfaces))

    # --- facts ---------------------------------------------------------------------------------------

    @property
    def configured(self) -> bool:
        return self.configuration_current != 0

    @property
    def strings(self) -> dict[int, str]:
        """String descriptor index → text."""
        return {index: text for text, index in self._strings.items()}

    def max_packet_size(self, address: int) -> int:
        slot = self._endpoints.get(address)
        if slot is None:
            raise DeviceError(f"no endpoint {address:#04x}")
        return self._max_packet(slot.spec, self.speed)

    def function_for_interface(self, number: int) -> Function | None:
        slot = self._interfaces.get(number)
        return None if slot is None else slot.function

    def summary(self) -> DeviceSummary:
        d = self.device_descriptor
        return DeviceSummary(
            id_vendor=d.id_vendor, id_product=d.id_product, bcd_device=d.bcd_device,
            device_class=d.device_class, device_subclass=d.device_subclass,
            device_protocol=d.device_protocol, configuration_value=self._configuration_value,
            num_configurations=1, num_interfaces=len(self._interfaces), speed=self.speed,
            interfaces=tuple(InterfaceSummary(s.spec.interface_class, s.spec.interface_subclass,
                                              s.spec.interface_protocol) for s in self._interfaces.values()))

    def __repr__(self) -> str:
        d = self.device_descriptor
        names = ", ".join(f.name for f in self.functions)
        return f"<Device {d.id_vendor:04x}:{d.id_product:04x} {self.speed.name} [{names}]>"

    # --- the edge's entry points ---------------------------------------------------------------------

    def set_wakeup(self, callback: WakeupCallback | None) -> None:
        self._wakeup = callback

    def wakeup(self) -> None:
        callback = self._wakeup
        if callback is not None:
            callback()

    def control(self, setup: SetupPacket, data: bytes = b"") -> Reply:
        """A control transfer on ep0. Never raises: whatever cannot be answered is a STALL."""
        data = bytes(data)
        if not setup.is_in and len(data) != setup.length:
            return _stall(setup, f"OUT data stage is {len(data)} bytes, wLength says {setup.length}")
        try:
            reply = self._control(setup, data)
        except Exception:  # a model bug must not take the edge down: the host sees a STALL
            log.exception("control request %s failed inside the device model", setup)
            return STALL
        if reply.status is not TransferStatus.OK:
            return reply
        if setup.is_in:
            return replace(reply, data=bytes(reply.data)[:setup.length]) if len(reply.data) > setup.length else reply
        # an OUT request has no IN data stage; what the host sent was taken whole unless the model says
        return Reply(reply.status, b"", len(data) if reply.actual_length is None else reply.actual_length)

    def transfer(self, endpoint: int, data: bytes | None, length: int) -> Reply | None:
        """A bulk or interrupt transfer; None is a NAK (see the module docstring)."""
        slot = self._active.get(endpoint)
        if slot is None:
            log.debug("transfer to inactive or unknown endpoint %#04x: STALL", endpoint)
            return STALL
        if ((endpoint & 0x80) == 0) is (data is None):  # IN takes no data, OUT must bring some
            log.debug("transfer to %#04x with the wrong direction of data: STALL", endpoint)
            return STALL
        if endpoint in self.halted:
            return STALL
        try:
            reply = slot.function.transfer(slot.spec.name, None if data is None else bytes(data), length)
        except Exception:
            log.exception("transfer on %s/%s failed inside the device model", slot.function.name,
                          slot.spec.name)
            self.halted.add(endpoint)
            return STALL
        if reply is None:
            return None
        status = reply.status
        if status is _STALL:
            self.halted.add(endpoint)
            return reply
        if data is None:
            got = reply.data
            if type(got) is FileRegion:  # its length without FileRegion.__len__ (a Python call per READ)
                if got.length > length:
                    return Reply(TransferStatus.OVERFLOW, bytes(got)[:length])
            elif len(got) > length:
                return Reply(TransferStatus.OVERFLOW, bytes(got)[:length])
        elif reply.actual_length is None and status is _OK:
            return replace(reply, actual_length=len(data))
        return reply

    def reset(self) -> None:
        """USB port reset: back to the Default state (address 0, unconfigured)."""
        if self.configured:
            for function in self.functions:
                function.disable()
        self._deconfigure()
        self.address = 0
        self.remote_wakeup_enabled = False
        for function in self.functions:
            function.reset()

    def close(self) -> None:
        for function in self.functions:
            function.close()

    # --- chapter 9 -----------------------------------------------------------------------------------

    def _control(self, setup: SetupPacket, data: bytes) -> Reply:
        if setup.type is RequestType.STANDARD:
            return self._standard(setup, data)
        if setup.recipient == Recipient.INTERFACE:
            slot = self._interfaces.get(setup.index & 0xFF)
            if slot is None or not self.configured:
                return _stall(setup, "no such interface, or not configured")
            return slot.function.control(setup, data)
        if setup.recipient == Recipient.ENDPOINT:
            ep = self._active.get(setup.index & 0xFF)
            if ep is None:
                return _stall(setup, "no such active endpoint")
            return ep.function.control(setup, data)
        if setup.recipient == Recipient.DEVICE:
            return self.device_request(setup, data)
        return _stall(setup, "unsupported recipient")

    def device_request(self, setup: SetupPacket, data: bytes) -> Reply:
        """Class or vendor requests addressed to the device as a whole; override to answer them."""
        return _stall(setup, "no class/vendor device requests")

    def _standard(self, setup: SetupPacket, data: bytes) -> Reply:
        request = setup.request
        wants_in = request in (StandardRequest.GET_STATUS, StandardRequest.GET_DESCRIPTOR,
                               StandardRequest.GET_CONFIGURATION, StandardRequest.GET_INTERFACE,
                               StandardRequest.SYNCH_FRAME)
        if setup.is_in != wants_in:
            return _stall(setup, "wrong direction for this request")
        recipient = setup.recipient
        if request == StandardRequest.GET_DESCRIPTOR:
            if recipient == Recipient.DEVICE:
                return self._get_descriptor(setup)
            if recipient == Recipient.INTERFACE:
                slot = self._interfaces.get(setup.index & 0xFF)
                if slot is None or not self.configured:
                    return _stall(setup, "no such interface, or not configured")
                answer = slot.function.get_descriptor(setup)
                return _stall(setup, "function has no such descriptor") if answer is None else Reply(data=answer)
            return _stall(setup, "GET_DESCRIPTOR to this recipient")
        if request == StandardRequest.GET_STATUS:
            return self._get_status(setup)
        if request in (StandardRequest.CLEAR_FEATURE, StandardRequest.SET_FEATURE):
            return self._feature(setup, request == StandardRequest.SET_FEATURE)
        if recipient == Recipient.DEVICE:
            if request == StandardRequest.SET_ADDRESS:
                if setup.value > 127 or setup.index or setup.length:
                    return _stall(setup, "bad SET_ADDRESS")
                self.address = setup.value
                return Reply()
            if request == StandardRequest.GET_CONFIGURATION:
                return Reply(data=bytes((self.configuration_current,)))
            if request == StandardRequest.SET_CONFIGURATION:
                return self._set_configuration(setup)
        if recipient == Recipient.INTERFACE and request in (StandardRequest.GET_INTERFACE,
                                                            StandardRequest.SET_INTERFACE):
            number = setup.index & 0xFF
            slot = self._interfaces.get(number)
            if slot is None or not self.configured or setup.index > 0xFF:
                return _stall(setup, "no such interface, or not configured")
            if request == StandardRequest.GET_INTERFACE:
                return Reply(data=bytes((self.alternates[number],)))
            if setup.value >= len(slot.endpoints):
                return _stall(setup, f"interface {number} has no alternate setting {setup.value}")
            self._select_alternate(number, setup.value)
            slot.function.set_alt(number, setup.value)
            return Reply()
        return _stall(setup, "unsupported standard request")  # SET_DESCRIPTOR, SYNCH_FRAME (no isochronous)

    def _get_descriptor(self, setup: SetupPacket) -> Reply:
        kind, index = setup.descriptor_type, setup.descriptor_index
        answer: bytes | None = None
        if kind == DescriptorType.DEVICE and index == 0:
            answer = self._device_bytes
        elif kind == DescriptorType.CONFIGURATION and index == 0:
            answer = self._configuration_bytes
        elif kind == DescriptorType.STRING:
            answer = self._string_bytes.get(index)  # any LANGID: hosts differ in what they ask for
        elif kind == DescriptorType.DEVICE_QUALIFIER and index == 0:
            answer = self._qualifier_bytes
        elif kind == DescriptorType.OTHER_SPEED_CONFIGURATION and index == 0:
            answer = self._other_speed_bytes
        elif kind == DescriptorType.BOS and index == 0:
            answer = self._bos_bytes
        if answer is None:
            return _stall(setup, "no such descriptor")
        return Reply(data=answer)

    def _get_status(self, setup: SetupPacket) -> Reply:
        if setup.value != 0:
            return _stall(setup, "GET_STATUS wValue must be 0")
        recipient = setup.recipient
        if recipient == Recipient.DEVICE and setup.index == 0:
            bits = (1 if self.self_powered else 0) | (2 if self.remote_wakeup_enabled else 0)
            return Reply(data=bits.to_bytes(2, "little"))
        if recipient == Recipient.INTERFACE:
            if self.configured and setup.index in self._interfaces:
                return Reply(data=b"\x00\x00")
            return _stall(setup, "no such interface, or not configured")
        if recipient == Recipient.ENDPOINT:
            if setup.index in (0x00, 0x80):
                return Reply(data=b"\x00\x00")
            if setup.index in self._active:
                return Reply(data=(1 if setup.index in self.halted else 0).to_bytes(2, "little"))
            return _stall(setup, "no such active endpoint")
        return _stall(setup, "GET_STATUS to this recipient")

    def _feature(self, setup: SetupPacket, on: bool) -> Reply:
        recipient, feature = setup.recipient, setup.value
        if setup.length:
            return _stall(setup, "feature requests carry no data")
        if recipient == Recipient.DEVICE and feature == FeatureSelector.DEVICE_REMOTE_WAKEUP:
            if not self.remote_wakeup_capable:
                return _stall(setup, "remote wakeup is not supported")
            self.remote_wakeup_enabled = on
            return Reply()
        if recipient == Recipient.ENDPOINT and feature == FeatureSelector.ENDPOINT_HALT:
            address = setup.index & 0xFF
            if setup.index > 0xFF:
                return _stall(setup, "bad endpoint")
            if address in (0x00, 0x80):
                return Reply()  # USB 2.0 9.4.5: ep0 halt is not required; nothing to do
            slot = self._active.get(address)
            if slot is None:
                return _stall(setup, "no such active endpoint")
            if on:
                self.halted.add(address)
            else:
                self.halted.discard(address)
                slot.function.clear_halt(slot.spec.name)  # data toggle back to DATA0
            return Reply()
        return _stall(setup, "unsupported feature")  # TEST_MODE, interface features

    def _set_configuration(self, setup: SetupPacket) -> Reply:
        value = setup.value
        if setup.index or setup.length or value not in (0, self._configuration_value):
            return _stall(setup, f"no configuration {value}")
        if self.configured:
            for function in self.functions:
                function.disable()
        self._deconfigure()
        if value:
            self.configuration_current = value
            for number, slot in self._interfaces.items():
                self._select_alternate(number, 0)
                slot.function.set_alt(number, 0)
        return Reply()

    def _deconfigure(self) -> None:
        self.configuration_current = 0
        self.alternates.clear()
        self.halted.clear()
        self._active.clear()

    def _select_alternate(self, number: int, setting: int) -> None:
        slot = self._interfaces[number]
        for address in [a for a, ep in self._active.items() if ep.interface == number]:
            del self._active[address]
            self.halted.discard(address)
        self.alternates[number] = setting
        for ep_slot in slot.endpoints[setting]:
            self._active[ep_slot.address] = ep_slot
            self.halted.discard(ep_slot.address)


def _stall(setup: SetupPacket, why: str) -> Reply:
    log.debug("STALL %s: %s", setup, why)
    return STALL
