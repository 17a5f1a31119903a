"""The SETUP packet of a control transfer and the chapter-9 names that go with it (USB 2.0 §9.3, §9.4).

Constants carry the spec's names (`GET_DESCRIPTOR`, `ENDPOINT_HALT`) and the values of the kernel's
`include/uapi/linux/usb/ch9.h`, so a reader can grep either. The helpers at the bottom build the standard
requests a host sends, so tests and the userspace host never hand-assemble bmRequestType bits.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from emulator.usb.errors import SetupError

SETUP_SIZE = 8
_SETUP = struct.Struct("<BBHHH")


class Direction(enum.IntEnum):
    """Bit 7 of bmRequestType and of bEndpointAddress (`USB_DIR_OUT`, `USB_DIR_IN`)."""

    OUT = 0x00
    IN = 0x80


class RequestType(enum.IntEnum):
    """Bits 6..5 of bmRequestType (`USB_TYPE_*`)."""

    STANDARD = 0x00
    CLASS = 0x20
    VENDOR = 0x40
    RESERVED = 0x60


class Recipient(enum.IntEnum):
    """Bits 4..0 of bmRequestType (`USB_RECIP_*`); values 4..31 are reserved."""

    DEVICE = 0x00
    INTERFACE = 0x01
    ENDPOINT = 0x02
    OTHER = 0x03


class StandardRequest(enum.IntEnum):
    """bRequest codes of the standard device requests (USB 2.0 table 9-4)."""

    GET_STATUS = 0
    CLEAR_FEATURE = 1
    SET_FEATURE = 3
    SET_ADDRESS = 5
    GET_DESCRIPTOR = 6
    SET_DESCRIPTOR = 7
    GET_CONFIGURATION = 8
    SET_CONFIGURATION = 9
    GET_INTERFACE = 10
    SET_INTERFACE = 11
    SYNCH_FRAME = 12
    SET_SEL = 48  # USB 3.x
    SET_ISOCH_DELAY = 49  # USB 3.x


class DescriptorType(enum.IntEnum):
    """bDescriptorType values (USB 2.0 table 9-5, USB 3.2 table 9-6, HID 1.11 §7.1, CDC 1.2 table 12)."""

    DEVICE = 0x01
    CONFIGURATION = 0x02
    STRING = 0x03
    INTERFACE = 0x04
    ENDPOINT = 0x05
    DEVICE_QUALIFIER = 0x06
    OTHER_SPEED_CONFIGURATION = 0x07
    INTERFACE_POWER = 0x08
    OTG = 0x09
    DEBUG = 0x0A
    INTERFACE_ASSOCIATION = 0x0B
    BOS = 0x0F
    DEVICE_CAPABILITY = 0x10
    HID = 0x21  # also CS_DEVICE (class-specific device), e.g. DFU functional: meaning depends on the class
    REPORT = 0x22
    PHYSICAL = 0x23
    CS_INTERFACE = 0x24
    CS_ENDPOINT = 0x25
    SS_ENDPOINT_COMPANION = 0x30
    SSP_ISOC_ENDPOINT_COMPANION = 0x31


class FeatureSelector(enum.IntEnum):
    """wValue of SET_FEATURE / CLEAR_FEATURE (USB 2.0 table 9-6)."""

    ENDPOINT_HALT = 0
    DEVICE_REMOTE_WAKEUP = 1
    TEST_MODE = 2


class ClassCode(enum.IntEnum):
    """bDeviceClass / bInterfaceClass codes (usb.org "Defined Class Codes"; kernel `USB_CLASS_*`)."""

    PER_INTERFACE = 0x00
    AUDIO = 0x01
    COMM = 0x02
    HID = 0x03
    PHYSICAL = 0x05
    STILL_IMAGE = 0x06
    PRINTER = 0x07
    MASS_STORAGE = 0x08
    HUB = 0x09
    CDC_DATA = 0x0A
    CSCID = 0x0B
    CONTENT_SEC = 0x0D
    VIDEO = 0x0E
    PERSONAL_HEALTHCARE = 0x0F
    AUDIO_VIDEO = 0x10
    BILLBOARD = 0x11
    USB_TYPE_C_BRIDGE = 0x12
    DIAGNOSTIC = 0xDC
    WIRELESS_CONTROLLER = 0xE0
    MISC = 0xEF
    APP_SPEC = 0xFE
    VENDOR_SPEC = 0xFF


class TransferType(enum.IntEnum):
    """Bits 1..0 of an endpoint's bmAttributes (`USB_ENDPOINT_XFER_*`)."""

    CONTROL = 0
    ISOCHRONOUS = 1
    BULK = 2
    INTERRUPT = 3


class Speed(enum.IntEnum):
    """`enum usb_device_speed` from ch9.h; USB/IP's `speed` field carries these values."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6


def bm_request_type(direction: Direction, type_: RequestType, recipient: Recipient) -> int:
    """Compose bmRequestType from its three parts."""
    return int(direction) | int(type_) | int(recipient)


@dataclass(frozen=True, slots=True)
class SetupPacket:
    """The 8-byte SETUP packet (USB 2.0 table 9-2): bmRequestType, bRequest, wValue, wIndex, wLength."""

    request_type: int
    request: int
    value: int = 0
    index: int = 0
    length: int = 0

    def __post_init__(self) -> None:
        for name, limit in (("request_type", 0xFF), ("request", 0xFF), ("value", 0xFFFF),
                            ("index", 0xFFFF), ("length", 0xFFFF)):
            field = getattr(self, name)
            if not isinstance(field, int) or not 0 <= field <= limit:
                raise SetupError(f"SETUP {name} must be an integer in 0..{limit:#x}, got {field!r}")

    @classmethod
    def from_bytes(cls, data: bytes) -> SetupPacket:
        if len(data) != SETUP_SIZE:
            raise SetupError(f"a SETUP packet is {SETUP_SIZE} bytes, got {len(data)}")
        return cls(*_SETUP.unpack(data))

    def to_bytes(self) -> bytes:
        return _SETUP.pack(self.request_type, self.request, self.value, self.index, self.length)

    @property
    def direction(self) -> Direction:
        return Direction(self.request_type & 0x80)

    @property
    def type(self) -> RequestType:
        return RequestType(self.request_type & 0x60)

    @property
    def recipient(self) -> Recipient | int:
        """A `Recipient`, or the raw 5-bit value when it is one of the reserved codes 4..31."""
        bits = self.request_type & 0x1F
        return Recipient(bits) if bits <= Recipient.OTHER else bits

    @property
    def is_in(self) -> bool:
        return self.direction is Direction.IN

    @property
    def descriptor_type(self) -> int:
        """High byte of wValue in GET_DESCRIPTOR / SET_DESCRIPTOR."""
        return self.value >> 8

    @property
    def descriptor_index(self) -> int:
        """Low byte of wValue in GET_DESCRIPTOR / SET_DESCRIPTOR."""
        return self.value & 0xFF

    def __str__(self) -> str:
        try:
            name = StandardRequest(self.request).name if self.type is RequestType.STANDARD else None
        except ValueError:
            name = None
        label = name or f"{self.type.name}#{self.request:#04x}"
        return (f"{label}(bmRequestType={self.request_type:#04x}, wValue={self.value:#06x}, "
                f"wIndex={self.index:#06x}, wLength={self.length})")


# --- standard requests, as a host would send them -------------------------------------------------------

_IN, _OUT, _STD = Direction.IN, Direction.OUT, RequestType.STANDARD


def get_status(recipient: Recipient = Recipient.DEVICE, index: int = 0) -> SetupPacket:
    return SetupPacket(bm_request_type(_IN, _STD, recipient), StandardRequest.GET_STATUS, 0, index, 2)


def clear_feature(feature: FeatureSelector, recipient: Recipient = Recipient.DEVICE,
                  index: int = 0) -> SetupPacket:
    return SetupPacket(bm_request_type(_OUT, _STD, recipient), StandardRequest.CLEAR_FEATURE, feature, index, 0)


def set_feature(feature: FeatureSelector, recipient: Recipient = Recipient.DEVICE,
                index: int = 0) -> SetupPacket:
    return SetupPacket(bm_request_type(_OUT, _STD, recipient), StandardRequest.SET_FEATURE, feature, index, 0)


def clear_halt(endpoint: int) -> SetupPacket:
    """CLEAR_FEATURE(ENDPOINT_HALT) on `endpoint` (an address with its direction bit)."""
    return clear_feature(FeatureSelector.ENDPOINT_HALT, Recipient.ENDPOINT, endpoint)


def set_address(address: int) -> SetupPacket:
    return SetupPacket(bm_request_type(_OUT, _STD, Recipient.DEVICE), StandardRequest.SET_ADDRESS, address, 0, 0)


def get_descriptor(descriptor_type: int, index: int = 0, length: int = 0xFF, language: int = 0,
                   recipient: Recipient = Recipient.DEVICE) -> SetupPacket:
    """GET_DESCRIPTOR; `language` goes in wIndex for strings, the interface number for class descriptors."""
    if not 0 <= descriptor_type <= 0xFF or not 0 <= index <= 0xFF:
        raise SetupError(f"descriptor type and index are one byte each, got {descriptor_type}, {index}")
    return SetupPacket(bm_request_type(_IN, _STD, recipient), StandardRequest.GET_DESCRIPTOR,
                       (descriptor_type << 8) | index, language, length)


def set_descriptor(descriptor_type: int, index: int, length: int, language: int = 0) -> SetupPacket:
    if not 0 <= descriptor_type <= 0xFF or not 0 <= index <= 0xFF:
        raise SetupError(f"descriptor type and index are one byte each, got {descriptor_type}, {index}")
    return SetupPacket(bm_request_type(_OUT, _STD, Recipient.DEVICE), StandardRequest.SET_DESCRIPTOR,
                       (descriptor_type << 8) | index, language, length)


def get_configuration() -> SetupPacket:
    return SetupPacket(bm_request_type(_IN, _STD, Recipient.DEVICE), StandardRequest.GET_CONFIGURATION, 0, 0, 1)


def set_configuration(value: int) -> SetupPacket:
    return SetupPacket(bm_request_type(_OUT, _STD, Recipient.DEVICE), StandardRequest.SET_CONFIGURATION,
                       value, 0, 0)


def get_interface(interface: int) -> SetupPacket:
    return SetupPacket(bm_request_type(_IN, _STD, Recipient.INTERFACE), StandardRequest.GET_INTERFACE,
                       0, interface, 1)


def set_interface(interface: int, alternate: int) -> SetupPacket:
    return SetupPacket(bm_request_type(_OUT, _STD, Recipient.INTERFACE), StandardRequest.SET_INTERFACE,
                       alternate, interface, 0)


def synch_frame(endpoint: int) -> SetupPacket:
    return SetupPacket(bm_request_type(_IN, _STD, Recipient.ENDPOINT), StandardRequest.SYNCH_FRAME,
                       0, endpoint, 2)
