"""USB descriptors as dataclasses: parse them from bytes, build them back byte for byte.

One frozen dataclass per descriptor layout (USB 2.0 §9.6, USB 3.2 §9.6, the IAD ECN, HID 1.11 §6.2.1,
CDC 1.2 §5.2.3). Field names are the spec's without the type prefix (`bDeviceClass` → `device_class`),
except `id_`, `bcd_` and `i_` which say what the number is (an ID, a BCD version, a string index).
bLength and bDescriptorType are never stored: they follow from the class and its contents. Bytes past the
fields a layout defines (a 9-byte audio endpoint, a newer spec revision) are kept in `extra`, and
descriptors this module has no layout for become `UnknownDescriptor`, so nothing read is ever lost.

A full configuration (what GET_DESCRIPTOR(CONFIGURATION, wLength=wTotalLength) returns) parses into a
`Configuration` tree: configuration → `Interface` (grouped by bInterfaceNumber) → `AlternateSetting` →
`Endpoint`, each node keeping the class-specific and unknown descriptors that follow it, in order.
`Configuration.to_bytes()` writes wTotalLength, bNumInterfaces and bNumEndpoints from the tree. The
meaning of a class-specific descriptor type depends on the interface it follows (0x21 is HID only inside
a HID interface; 0x24 is a CDC functional descriptor only inside a CDC communication interface), so the
parser tracks the current interface class.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import ClassVar, Self

from emulator.usb.errors import DescriptorError
from emulator.usb.setup import ClassCode, DescriptorType, Direction, TransferType

__all__ = [
    "AlternateSetting",
    "BosDescriptor",
    "CdcAcmDescriptor",
    "CdcCallManagementDescriptor",
    "CdcHeaderDescriptor",
    "CdcUnionDescriptor",
    "Configuration",
    "ConfigurationDescriptor",
    "Descriptor",
    "DeviceDescriptor",
    "DeviceQualifierDescriptor",
    "Endpoint",
    "EndpointDescriptor",
    "HidDescriptor",
    "Interface",
    "InterfaceAssociationDescriptor",
    "InterfaceDescriptor",
    "LanguageDescriptor",
    "OtherSpeedConfigurationDescriptor",
    "SsEndpointCompanionDescriptor",
    "StringDescriptor",
    "SuperSpeedUsbCapability",
    "UnknownCapability",
    "UnknownDescriptor",
    "Usb20ExtensionCapability",
    "parse_bos",
    "parse_configuration",
    "parse_descriptor",
    "parse_descriptors",
    "parse_string",
]

# CDC 1.2 table 13 bDescriptorSubtype values (kernel USB_CDC_*_TYPE)
CDC_HEADER_TYPE = 0x00
CDC_CALL_MANAGEMENT_TYPE = 0x01
CDC_ACM_TYPE = 0x02
CDC_UNION_TYPE = 0x06

# USB 3.2 table 9-14 bDevCapabilityType values (kernel USB_*_CAP_TYPE)
USB_2_0_EXTENSION = 0x02
SUPERSPEED_USB = 0x03


def _frame(descriptor_type: int, payload: bytes, what: str) -> bytes:
    """Prefix bLength and bDescriptorType; a descriptor is at most 255 bytes long."""
    length = 2 + len(payload)
    if length > 0xFF:
        raise DescriptorError(f"{what} would be {length} bytes, more than bLength can say (255)")
    return bytes((length, descriptor_type)) + payload


def _pack(layout: struct.Struct, values: Iterable[int], what: str) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise DescriptorError(f"{what}: a field does not fit its wire width ({exc})") from None


class Descriptor:
    """Base of every descriptor: it knows its type and how to write itself."""

    __slots__ = ()
    DESCRIPTOR_TYPE: ClassVar[int] = 0

    @property
    def descriptor_type(self) -> int:
        return self.DESCRIPTOR_TYPE

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    @property
    def length(self) -> int:
        """bLength."""
        return len(self.to_bytes())

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        """Decode one descriptor; `raw` is exactly bLength bytes, `offset` where it sits (for errors)."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        """Decode exactly one descriptor of this class (bLength must equal len(data))."""
        data = bytes(data)
        if len(data) < 2:
            raise DescriptorError(f"{cls.__name__}: {len(data)} bytes, a descriptor has at least 2", 0)
        if data[0] != len(data):
            raise DescriptorError(f"{cls.__name__}: bLength {data[0]} but {len(data)} bytes given", 0)
        if not cls._accepts_type(data[1]):
            raise DescriptorError(f"{cls.__name__}: bDescriptorType {data[1]:#04x} is not "
                                  f"{cls.DESCRIPTOR_TYPE:#04x}", 1)
        return cls._decode(data, 0)

    @classmethod
    def _accepts_type(cls, descriptor_type: int) -> bool:
        return descriptor_type == cls.DESCRIPTOR_TYPE


class _Fixed(Descriptor):
    """A descriptor with a fixed layout: header, an optional constant prefix (a subtype), then `_BODY`."""

    __slots__ = ()
    _PREFIX: ClassVar[bytes] = b""
    _BODY: ClassVar[struct.Struct]
    _FIELDS: ClassVar[tuple[str, ...]]
    extra: bytes

    def to_bytes(self) -> bytes:
        name = type(self).__name__
        body = _pack(self._BODY, (getattr(self, n) for n in self._FIELDS), name)
        return _frame(self.DESCRIPTOR_TYPE, self._PREFIX + body + bytes(self.extra), name)

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        need = 2 + len(cls._PREFIX) + cls._BODY.size
        if len(raw) < need:
            raise DescriptorError(f"{cls.__name__}: bLength {len(raw)} is shorter than its {need} bytes",
                                  offset)
        if raw[2:2 + len(cls._PREFIX)] != cls._PREFIX:
            raise DescriptorError(f"{cls.__name__}: expected subtype bytes {cls._PREFIX.hex()}", offset + 2)
        fields: dict[str, object] = dict(zip(cls._FIELDS, cls._BODY.unpack_from(raw, 2 + len(cls._PREFIX)),
                                             strict=True))
        fields["extra"] = raw[need:]
        return cls(**fields)


# --- standard descriptors ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceDescriptor(_Fixed):
    """USB 2.0 table 9-8 (18 bytes)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.DEVICE
    _BODY: ClassVar[struct.Struct] = struct.Struct("<HBBBBHHHBBBB")
    _FIELDS: ClassVar[tuple[str, ...]] = (
        "bcd_usb", "device_class", "device_subclass", "device_protocol", "max_packet_size0", "id_vendor",
        "id_product", "bcd_device", "i_manufacturer", "i_product", "i_serial_number", "num_configurations")

    bcd_usb: int = 0x0200
    device_class: int = 0
    device_subclass: int = 0
    device_protocol: int = 0
    max_packet_size0: int = 64
    id_vendor: int = 0
    id_product: int = 0
    bcd_device: int = 0
    i_manufacturer: int = 0
    i_product: int = 0
    i_serial_number: int = 0
    num_configurations: int = 1
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceQualifierDescriptor(_Fixed):
    """USB 2.0 table 9-9 (10 bytes): how a high-speed capable device looks at its other speed."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.DEVICE_QUALIFIER
    _BODY: ClassVar[struct.Struct] = struct.Struct("<HBBBBBB")
    _FIELDS: ClassVar[tuple[str, ...]] = ("bcd_usb", "device_class", "device_subclass", "device_protocol",
                                          "max_packet_size0", "num_configurations", "reserved")

    bcd_usb: int = 0x0200
    device_class: int = 0
    device_subclass: int = 0
    device_protocol: int = 0
    max_packet_size0: int = 64
    num_configurations: int = 1
    reserved: int = 0
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigurationDescriptor(_Fixed):
    """USB 2.0 table 9-10 (9 bytes), the header of a configuration. `total_length` and `num_interfaces`
    are what was read; `Configuration.to_bytes()` recomputes both."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.CONFIGURATION
    _BODY: ClassVar[struct.Struct] = struct.Struct("<HBBBBB")
    _FIELDS: ClassVar[tuple[str, ...]] = ("total_length", "num_interfaces", "configuration_value",
                                          "i_configuration", "attributes", "max_power")

    total_length: int = 9
    num_interfaces: int = 0
    configuration_value: int = 1
    i_configuration: int = 0
    attributes: int = 0x80  # bit 7 reserved (set to one), bit 6 self-powered, bit 5 remote wakeup
    max_power: int = 50  # units of 2 mA (8 mA at SuperSpeed)
    extra: bytes = b""

    @property
    def self_powered(self) -> bool:
        return bool(self.attributes & 0x40)

    @property
    def remote_wakeup(self) -> bool:
        return bool(self.attributes & 0x20)


@dataclass(frozen=True, slots=True, kw_only=True)
class OtherSpeedConfigurationDescriptor(ConfigurationDescriptor):
    """USB 2.0 table 9-11: the same layout, describing the configuration at the other speed."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.OTHER_SPEED_CONFIGURATION


@dataclass(frozen=True, slots=True, kw_only=True)
class InterfaceDescriptor(_Fixed):
    """USB 2.0 table 9-12 (9 bytes)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.INTERFACE
    _BODY: ClassVar[struct.Struct] = struct.Struct("<BBBBBBB")
    _FIELDS: ClassVar[tuple[str, ...]] = ("interface_number", "alternate_setting", "num_endpoints",
                                          "interface_class", "interface_subclass", "interface_protocol",
                                          "i_interface")

    interface_number: int = 0
    alternate_setting: int = 0
    num_endpoints: int = 0
    interface_class: int = 0
    interface_subclass: int = 0
    interface_protocol: int = 0
    i_interface: int = 0
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class EndpointDescriptor(_Fixed):
    """USB 2.0 table 9-13 (7 bytes; audio class endpoints add bRefresh, bSynchAddress in `extra`)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.ENDPOINT
    _BODY: ClassVar[struct.Struct] = struct.Struct("<BBHB")
    _FIELDS: ClassVar[tuple[str, ...]] = ("endpoint_address", "attributes", "max_packet_size", "interval")

    endpoint_address: int = 0x81
    attributes: int = TransferType.BULK
    max_packet_size: int = 64  # bits 10..0 size, bits 12..11 additional transactions per microframe
    interval: int = 0
    extra: bytes = b""

    @property
    def number(self) -> int:
        return self.endpoint_address & 0x0F

    @property
    def direction(self) -> Direction:
        return Direction(self.endpoint_address & 0x80)

    @property
    def transfer_type(self) -> TransferType:
        return TransferType(self.attributes & 0x03)


@dataclass(frozen=True, slots=True, kw_only=True)
class InterfaceAssociationDescriptor(_Fixed):
    """The IAD ECN table 9-Z (8 bytes): groups the interfaces of one function (e.g. CDC-ACM's two)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.INTERFACE_ASSOCIATION
    _BODY: ClassVar[struct.Struct] = struct.Struct("<BBBBBB")
    _FIELDS: ClassVar[tuple[str, ...]] = ("first_interface", "interface_count", "function_class",
                                          "function_subclass", "function_protocol", "i_function")

    first_interface: int = 0
    interface_count: int = 1
    function_class: int = 0
    function_subclass: int = 0
    function_protocol: int = 0
    i_function: int = 0
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class SsEndpointCompanionDescriptor(_Fixed):
    """USB 3.2 table 9-27 (6 bytes): follows each endpoint descriptor at SuperSpeed."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.SS_ENDPOINT_COMPANION
    _BODY: ClassVar[struct.Struct] = struct.Struct("<BBH")
    _FIELDS: ClassVar[tuple[str, ...]] = ("max_burst", "attributes", "bytes_per_interval")

    max_burst: int = 0
    attributes: int = 0
    bytes_per_interval: int = 0
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class UnknownDescriptor(Descriptor):
    """Any descriptor without a layout here (or out of its context): its type and the bytes after the
    two-byte header, kept verbatim."""

    type_code: int
    payload: bytes = b""

    @property
    def descriptor_type(self) -> int:
        return self.type_code

    def to_bytes(self) -> bytes:
        if not 0 <= self.type_code <= 0xFF:
            raise DescriptorError(f"UnknownDescriptor: type {self.type_code} does not fit one byte")
        return _frame(self.type_code, bytes(self.payload), "UnknownDescriptor")

    @classmethod
    def _accepts_type(cls, descriptor_type: int) -> bool:
        return True

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        return cls(raw[1], raw[2:])


# --- strings -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringDescriptor(Descriptor):
    """USB 2.0 table 9-16: a UNICODE string, UTF-16LE on the wire, not NUL-terminated."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.STRING
    string: str = ""

    def to_bytes(self) -> bytes:
        return _frame(self.DESCRIPTOR_TYPE, self.string.encode("utf-16-le", "surrogatepass"),
                      f"string descriptor {self.string[:20]!r}…")

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        if len(raw) % 2:
            raise DescriptorError(f"string descriptor has odd bLength {len(raw)}: not UTF-16", offset)
        return cls(raw[2:].decode("utf-16-le", "surrogatepass"))


@dataclass(frozen=True, slots=True)
class LanguageDescriptor(Descriptor):
    """USB 2.0 table 9-15: string descriptor 0, the LANGIDs the device supports (0x0409 = US English)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.STRING
    langids: tuple[int, ...] = (0x0409,)

    def to_bytes(self) -> bytes:
        payload = _pack(struct.Struct(f"<{len(self.langids)}H"), self.langids, "LanguageDescriptor")
        return _frame(self.DESCRIPTOR_TYPE, payload, "LanguageDescriptor")

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        if len(raw) % 2:
            raise DescriptorError(f"LANGID list has odd bLength {len(raw)}", offset)
        return cls(struct.unpack_from(f"<{(len(raw) - 2) // 2}H", raw, 2))


def parse_string(data: bytes, index: int) -> StringDescriptor | LanguageDescriptor:
    """Decode the answer to GET_DESCRIPTOR(STRING, index): index 0 is the LANGID list."""
    cls: type[StringDescriptor | LanguageDescriptor] = LanguageDescriptor if index == 0 else StringDescriptor
    return cls.from_bytes(data)


# --- HID and CDC class descriptors -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HidDescriptor(Descriptor):
    """HID 1.11 §6.2.1: follows a HID interface descriptor and lists the class descriptors (type, length)
    the host may fetch with GET_DESCRIPTOR, at least the REPORT descriptor."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.HID
    bcd_hid: int = 0x0111
    country_code: int = 0
    descriptors: tuple[tuple[int, int], ...] = ((DescriptorType.REPORT, 0),)
    extra: bytes = b""

    def to_bytes(self) -> bytes:
        head = _pack(struct.Struct("<HBB"), (self.bcd_hid, self.country_code, len(self.descriptors)),
                     "HidDescriptor")
        items = b"".join(_pack(struct.Struct("<BH"), item, "HidDescriptor class descriptor")
                         for item in self.descriptors)
        return _frame(self.DESCRIPTOR_TYPE, head + items + bytes(self.extra), "HidDescriptor")

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        if len(raw) < 6:
            raise DescriptorError(f"HID descriptor bLength {len(raw)} is shorter than 6", offset)
        bcd_hid, country_code, count = struct.unpack_from("<HBB", raw, 2)
        end = 6 + 3 * count
        if end > len(raw):
            raise DescriptorError(f"HID descriptor lists {count} class descriptors, needing {end} bytes, "
                                  f"but bLength is {len(raw)}", offset + 5)
        items = tuple(struct.unpack_from("<BH", raw, 6 + 3 * i) for i in range(count))
        return cls(bcd_hid=bcd_hid, country_code=country_code, descriptors=items, extra=raw[end:])

    def class_descriptor_length(self, descriptor_type: int) -> int | None:
        """wDescriptorLength of the first listed class descriptor of `descriptor_type`, if any."""
        return next((length for kind, length in self.descriptors if kind == descriptor_type), None)


@dataclass(frozen=True, slots=True, kw_only=True)
class CdcHeaderDescriptor(_Fixed):
    """CDC 1.2 §5.2.3.1 Header Functional Descriptor: starts the functional descriptors."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.CS_INTERFACE
    _PREFIX: ClassVar[bytes] = bytes((CDC_HEADER_TYPE,))
    _BODY: ClassVar[struct.Struct] = struct.Struct("<H")
    _FIELDS: ClassVar[tuple[str, ...]] = ("bcd_cdc",)

    bcd_cdc: int = 0x0110
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class CdcCallManagementDescriptor(_Fixed):
    """CDC PSTN 1.2 §5.3.1 Call Management Functional Descriptor."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.CS_INTERFACE
    _PREFIX: ClassVar[bytes] = bytes((CDC_CALL_MANAGEMENT_TYPE,))
    _BODY: ClassVar[struct.Struct] = struct.Struct("<BB")
    _FIELDS: ClassVar[tuple[str, ...]] = ("capabilities", "data_interface")

    capabilities: int = 0
    data_interface: int = 1
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class CdcAcmDescriptor(_Fixed):
    """CDC PSTN 1.2 §5.3.2 Abstract Control Management Functional Descriptor. bmCapabilities bit 1:
    line coding and serial state requests; bit 2: SEND_BREAK."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.CS_INTERFACE
    _PREFIX: ClassVar[bytes] = bytes((CDC_ACM_TYPE,))
    _BODY: ClassVar[struct.Struct] = struct.Struct("<B")
    _FIELDS: ClassVar[tuple[str, ...]] = ("capabilities",)

    capabilities: int = 0x02
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class CdcUnionDescriptor(Descriptor):
    """CDC 1.2 §5.2.3.2 Union Functional Descriptor: the controlling interface and its subordinates."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.CS_INTERFACE
    control_interface: int = 0
    subordinate_interfaces: tuple[int, ...] = (1,)

    def to_bytes(self) -> bytes:
        if not self.subordinate_interfaces:
            raise DescriptorError("CDC union descriptor needs at least one subordinate interface")
        body = _pack(struct.Struct(f"<{1 + len(self.subordinate_interfaces)}B"),
                     (self.control_interface, *self.subordinate_interfaces), "CdcUnionDescriptor")
        return _frame(self.DESCRIPTOR_TYPE, bytes((CDC_UNION_TYPE,)) + body, "CdcUnionDescriptor")

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        if len(raw) < 5 or raw[2] != CDC_UNION_TYPE:
            raise DescriptorError(f"CDC union descriptor needs subtype 0x06 and bLength >= 5, got "
                                  f"bLength {len(raw)}", offset)
        return cls(control_interface=raw[3], subordinate_interfaces=tuple(raw[4:]))


# --- BOS and device capabilities ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Usb20ExtensionCapability(_Fixed):
    """USB 3.2 table 9-15 (7 bytes). bmAttributes bit 1: LPM supported (required for bcdUSB 0x0201+)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.DEVICE_CAPABILITY
    _PREFIX: ClassVar[bytes] = bytes((USB_2_0_EXTENSION,))
    _BODY: ClassVar[struct.Struct] = struct.Struct("<I")
    _FIELDS: ClassVar[tuple[str, ...]] = ("attributes",)

    attributes: int = 0x02
    extra: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class SuperSpeedUsbCapability(_Fixed):
    """USB 3.2 table 9-16 (10 bytes)."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.DEVICE_CAPABILITY
    _PREFIX: ClassVar[bytes] = bytes((SUPERSPEED_USB,))
    _BODY: ClassVar[struct.Struct] = struct.Struct("<BHBBH")
    _FIELDS: ClassVar[tuple[str, ...]] = ("attributes", "speeds_supported", "functionality_support",
                                          "u1_dev_exit_lat", "u2_dev_exit_lat")

    attributes: int = 0
    speeds_supported: int = 0x000E  # full, high and SuperSpeed
    functionality_support: int = 1  # lowest speed with full functionality: full speed
    u1_dev_exit_lat: int = 0x0A  # µs
    u2_dev_exit_lat: int = 0x07FF  # µs
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class UnknownCapability(Descriptor):
    """A device capability without a layout here (container ID, platform, ...), kept verbatim."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.DEVICE_CAPABILITY
    capability_type: int
    payload: bytes = b""

    def to_bytes(self) -> bytes:
        if not 0 <= self.capability_type <= 0xFF:
            raise DescriptorError(f"capability type {self.capability_type} does not fit one byte")
        return _frame(self.DESCRIPTOR_TYPE, bytes((self.capability_type,)) + bytes(self.payload),
                      "UnknownCapability")

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        if len(raw) < 3:
            raise DescriptorError("device capability descriptor shorter than 3 bytes", offset)
        return cls(raw[2], raw[3:])


_CAPABILITIES: dict[int, type[Descriptor]] = {
    USB_2_0_EXTENSION: Usb20ExtensionCapability,
    SUPERSPEED_USB: SuperSpeedUsbCapability,
}


@dataclass(frozen=True, slots=True)
class BosDescriptor(Descriptor):
    """USB 3.2 table 9-12: the Binary device Object Store header and the capabilities it carries.
    `to_bytes()` writes wTotalLength and bNumDeviceCaps; parse with `parse_bos`."""

    DESCRIPTOR_TYPE: ClassVar[int] = DescriptorType.BOS
    capabilities: tuple[Descriptor, ...] = ()

    def to_bytes(self) -> bytes:
        body = b"".join(cap.to_bytes() for cap in self.capabilities)
        if len(self.capabilities) > 0xFF or 5 + len(body) > 0xFFFF:
            raise DescriptorError("BOS descriptor too large for wTotalLength / bNumDeviceCaps")
        return bytes((5, self.DESCRIPTOR_TYPE)) + struct.pack("<HB", 5 + len(body),
                                                                len(self.capabilities)) + body

    @classmethod
    def _decode(cls, raw: bytes, offset: int) -> Self:
        raise DescriptorError("a BOS descriptor spans its capabilities: use parse_bos()", offset)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        return cls(parse_bos(data).capabilities)


def parse_bos(data: bytes) -> BosDescriptor:
    """Decode the full answer to GET_DESCRIPTOR(BOS, wLength=wTotalLength)."""
    data = bytes(data)
    if len(data) < 5:
        raise DescriptorError(f"BOS descriptor truncated: {len(data)} bytes, the header alone is 5", 0)
    if data[1] != DescriptorType.BOS:
        raise DescriptorError(f"bDescriptorType {data[1]:#04x} is not BOS (0x0f)", 1)
    if data[0] < 5:
        raise DescriptorError(f"BOS bLength {data[0]} is shorter than 5", 0)
    total, count = struct.unpack_from("<HB", data, 2)
    if total != len(data):
        raise DescriptorError(f"BOS wTotalLength {total} but {len(data)} bytes given", 2)
    caps = parse_descriptors(data[data[0]:], offset=data[0])
    position = data[0]
    for cap in caps:
        if cap.descriptor_type != DescriptorType.DEVICE_CAPABILITY:
            raise DescriptorError(f"BOS carries a non-capability descriptor type {cap.descriptor_type:#04x}",
                                  position + 1)
        position += data[position]
    if len(caps) != count:
        raise DescriptorError(f"BOS bNumDeviceCaps {count} but {len(caps)} capabilities follow", 4)
    return BosDescriptor(tuple(caps))


# --- decoding a stream of descriptors ----------------------------------------------------------------------

_STANDARD: dict[int, type[Descriptor]] = {
    DescriptorType.DEVICE: DeviceDescriptor,
    DescriptorType.CONFIGURATION: ConfigurationDescriptor,
    DescriptorType.OTHER_SPEED_CONFIGURATION: OtherSpeedConfigurationDescriptor,
    DescriptorType.INTERFACE: InterfaceDescriptor,
    DescriptorType.ENDPOINT: EndpointDescriptor,
    DescriptorType.DEVICE_QUALIFIER: DeviceQualifierDescriptor,
    DescriptorType.INTERFACE_ASSOCIATION: InterfaceAssociationDescriptor,
    DescriptorType.SS_ENDPOINT_COMPANION: SsEndpointCompanionDescriptor,
}

_CDC: dict[int, type[Descriptor]] = {
    CDC_HEADER_TYPE: CdcHeaderDescriptor,
    CDC_CALL_MANAGEMENT_TYPE: CdcCallManagementDescriptor,
    CDC_ACM_TYPE: CdcAcmDescriptor,
    CDC_UNION_TYPE: CdcUnionDescriptor,
}


def _layout_for(raw: bytes, interface_class: int | None) -> type[Descriptor]:
    kind = raw[1]
    if kind == DescriptorType.HID and interface_class == ClassCode.HID:
        return HidDescriptor
    if kind == DescriptorType.CS_INTERFACE and interface_class == ClassCode.COMM and len(raw) >= 3:
        return _CDC.get(raw[2], UnknownDescriptor)
    if kind == DescriptorType.DEVICE_CAPABILITY and len(raw) >= 3:
        return _CAPABILITIES.get(raw[2], UnknownCapability)
    return _STANDARD.get(kind, UnknownDescriptor)


def parse_descriptor(data: bytes, offset: int = 0, interface_class: int | None = None) -> Descriptor:
    """Decode the one descriptor that starts at `offset` in `data`. `interface_class` is the class of
    the interface it follows, which decides what class-specific types mean."""
    if offset + 2 > len(data):
        raise DescriptorError(f"truncated descriptor header: {len(data) - offset} byte(s) left", offset)
    length = data[offset]
    if length < 2:
        raise DescriptorError(f"bLength {length} is less than 2", offset)
    if offset + length > len(data):
        raise DescriptorError(f"bLength {length} runs past the end of the data "
                              f"({len(data) - offset} bytes left)", offset)
    raw = bytes(data[offset:offset + length])
    return _layout_for(raw, interface_class)._decode(raw, offset)


def parse_descriptors(data: bytes, offset: int = 0) -> list[Descriptor]:
    """Split a buffer into descriptors, decoding class-specific ones in the context of the last
    interface descriptor seen. `offset` is only added to error positions (where `data` sits in a
    larger buffer)."""
    data = bytes(data)
    out: list[Descriptor] = []
    interface_class: int | None = None
    position = 0
    while position < len(data):
        try:
            descriptor = parse_descriptor(data, position, interface_class)
        except DescriptorError as exc:
            if not offset:
                raise
            raise DescriptorError(exc.reason, None if exc.offset is None else exc.offset + offset) from None
        if isinstance(descriptor, InterfaceDescriptor):
            interface_class = descriptor.interface_class
        out.append(descriptor)
        position += data[position]
    return out


# --- the configuration tree --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An endpoint descriptor and what follows it (SuperSpeed companion, class-specific endpoint
    descriptors)."""

    descriptor: EndpointDescriptor
    descriptors: tuple[Descriptor, ...] = ()

    @property
    def address(self) -> int:
        return self.descriptor.endpoint_address

    @property
    def companion(self) -> SsEndpointCompanionDescriptor | None:
        return next((d for d in self.descriptors if isinstance(d, SsEndpointCompanionDescriptor)), None)


@dataclass(frozen=True, slots=True)
class AlternateSetting:
    """One interface descriptor, the class descriptors after it (HID, CDC functional), its endpoints.
    `leading` holds an interface association descriptor (and anything after it) that comes right before
    this interface descriptor: the IAD opens the function this interface starts."""

    descriptor: InterfaceDescriptor
    descriptors: tuple[Descriptor, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    leading: tuple[Descriptor, ...] = ()

    def walk(self) -> Iterator[Descriptor]:
        yield from self.leading
        yield replace(self.descriptor, num_endpoints=len(self.endpoints))
        yield from self.descriptors
        for endpoint in self.endpoints:
            yield endpoint.descriptor
            yield from endpoint.descriptors

    def class_descriptor(self, kind: type[Descriptor]) -> Descriptor | None:
        return next((d for d in self.descriptors if isinstance(d, kind)), None)


@dataclass(frozen=True, slots=True)
class Interface:
    """All alternate settings of one bInterfaceNumber, in the order they were described."""

    alternates: tuple[AlternateSetting, ...]

    def __post_init__(self) -> None:
        if not self.alternates:
            raise DescriptorError("an interface needs at least one alternate setting")
        numbers = {alt.descriptor.interface_number for alt in self.alternates}
        if len(numbers) != 1:
            raise DescriptorError(f"alternate settings of one interface carry numbers {sorted(numbers)}")

    @property
    def number(self) -> int:
        return self.alternates[0].descriptor.interface_number

    @property
    def association(self) -> InterfaceAssociationDescriptor | None:
        lead = self.alternates[0].leading
        return next((d for d in lead if isinstance(d, InterfaceAssociationDescriptor)), None)

    def alternate(self, setting: int) -> AlternateSetting | None:
        return next((a for a in self.alternates if a.descriptor.alternate_setting == setting), None)


@dataclass(frozen=True, slots=True)
class Configuration:
    """A whole configuration: its header, descriptors before the first interface (OTG, ...), the
    interfaces. `to_bytes()` recomputes wTotalLength, bNumInterfaces and each bNumEndpoints."""

    descriptor: ConfigurationDescriptor = field(default_factory=ConfigurationDescriptor)
    descriptors: tuple[Descriptor, ...] = ()
    interfaces: tuple[Interface, ...] = ()

    def walk(self) -> Iterator[Descriptor]:
        """Every descriptor in wire order, the header and counts as `to_bytes()` writes them."""
        body = [d for interface in self.interfaces for alt in interface.alternates for d in alt.walk()]
        tail = b"".join(d.to_bytes() for d in (*self.descriptors, *body))
        header = replace(self.descriptor, num_interfaces=len(self.interfaces), total_length=0)
        total = len(header.to_bytes()) + len(tail)
        if total > 0xFFFF:
            raise DescriptorError(f"configuration is {total} bytes, more than wTotalLength can say")
        yield replace(header, total_length=total)
        yield from self.descriptors
        yield from body

    def to_bytes(self) -> bytes:
        return b"".join(d.to_bytes() for d in self.walk())

    @classmethod
    def from_bytes(cls, data: bytes) -> Configuration:
        return parse_configuration(data)

    @classmethod
    def from_descriptors(cls, descriptors: Iterable[Descriptor]) -> Configuration:
        """Build the tree from a flat list that starts with the configuration header (counts in the
        header and interface descriptors are not checked here: `to_bytes()` recomputes them)."""
        items = list(descriptors)
        if not items or not isinstance(items[0], ConfigurationDescriptor):
            raise DescriptorError("a configuration starts with a configuration descriptor")
        top: list[Descriptor] = []
        groups: dict[int, list[AlternateSetting]] = {}
        alt: _AltBuilder | None = None
        trailing = top  # where class-specific descriptors go: after the header, an interface, an endpoint
        leading: list[Descriptor] | None = None
        builders: list[_AltBuilder] = []
        for descriptor in items[1:]:
            if isinstance(descriptor, InterfaceAssociationDescriptor) and leading is None:
                leading = [descriptor]
            elif isinstance(descriptor, InterfaceDescriptor):
                alt = _AltBuilder(descriptor, tuple(leading or ()))
                builders.append(alt)
                leading = None
                trailing = alt.descriptors
            elif leading is not None:
                leading.append(descriptor)
            elif isinstance(descriptor, EndpointDescriptor):
                if alt is None:
                    raise DescriptorError("endpoint descriptor before any interface descriptor")
                alt.endpoints.append((descriptor, []))
                trailing = alt.endpoints[-1][1]
            elif isinstance(descriptor, ConfigurationDescriptor):
                raise DescriptorError("a second configuration descriptor inside a configuration")
            else:
                trailing.append(descriptor)
        if leading:
            trailing.extend(leading)  # an IAD with no interface after it stays where it was
        for builder in builders:
            groups.setdefault(builder.descriptor.interface_number, []).append(builder.build())
        return cls(items[0], tuple(top), tuple(Interface(tuple(alts)) for alts in groups.values()))

    @property
    def associations(self) -> tuple[InterfaceAssociationDescriptor, ...]:
        return tuple(d for d in self.walk() if isinstance(d, InterfaceAssociationDescriptor))

    def interface(self, number: int) -> Interface | None:
        return next((i for i in self.interfaces if i.number == number), None)


class _AltBuilder:
    __slots__ = ("descriptor", "descriptors", "endpoints", "leading")

    def __init__(self, descriptor: InterfaceDescriptor, leading: tuple[Descriptor, ...]) -> None:
        self.descriptor = descriptor
        self.leading = leading
        self.descriptors: list[Descriptor] = []
        self.endpoints: list[tuple[EndpointDescriptor, list[Descriptor]]] = []

    def build(self) -> AlternateSetting:
        endpoints = tuple(Endpoint(d, tuple(extra)) for d, extra in self.endpoints)
        return AlternateSetting(self.descriptor, tuple(self.descriptors), endpoints, self.leading)


def parse_configuration(data: bytes) -> Configuration:
    """Decode a full configuration (or other-speed configuration) descriptor set into a tree.

    Strict, so that what parses builds back byte for byte: wTotalLength must equal len(data),
    bNumInterfaces the number of distinct interfaces, each bNumEndpoints the endpoints that follow it.
    """
    data = bytes(data)
    if len(data) < 9:
        raise DescriptorError(f"configuration descriptor truncated: {len(data)} bytes, the header alone "
                              f"is 9", 0)
    if data[1] not in (DescriptorType.CONFIGURATION, DescriptorType.OTHER_SPEED_CONFIGURATION):
        raise DescriptorError(f"bDescriptorType {data[1]:#04x} is not a configuration", 1)
    if data[0] < 9:
        raise DescriptorError(f"configuration bLength {data[0]} is shorter than 9", 0)
    (total,) = struct.unpack_from("<H", data, 2)
    if total != len(data):
        raise DescriptorError(f"wTotalLength {total} but {len(data)} bytes given", 2)
    flat = parse_descriptors(data)
    offsets = []
    position = 0
    for _ in flat:
        offsets.append(position)
        position += data[position]
    tree = Configuration.from_descriptors(flat)
    if tree.descriptor.num_interfaces != len(tree.interfaces):
        raise DescriptorError(f"bNumInterfaces {tree.descriptor.num_interfaces} but "
                              f"{len(tree.interfaces)} interfaces follow", 4)
    for descriptor, where in zip(flat, offsets, strict=True):
        if isinstance(descriptor, InterfaceDescriptor):
            interface = tree.interface(descriptor.interface_number)
            assert interface is not None
            alt = next(a for a in interface.alternates if a.descriptor is descriptor)
            if descriptor.num_endpoints != len(alt.endpoints):
                raise DescriptorError(f"interface {descriptor.interface_number} alt "
                                      f"{descriptor.alternate_setting}: bNumEndpoints "
                                      f"{descriptor.num_endpoints} but {len(alt.endpoints)} endpoints follow",
                                      where + 4)
    return tree
