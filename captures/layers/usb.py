"""scapy layers for USB itself (USB 2.0 chapter 9): the SETUP packet and the descriptors of GET_DESCRIPTOR.

They sit on top of both transports vusb dissects: the `setup` field of a USB/IP CMD_SUBMIT and of a usbmon 'S'
record, and the data stage of a control IN transfer. Field names are the spec's, which are also Wireshark's
(`usb.bmRequestType`, `usb.bRequest` ...; see `WIRESHARK_FIELDS`), so a dissection can be compared with
`tshark -T fields` field by field.

Descriptors are self-describing (bLength, bDescriptorType) but not self-identifying: a HID report descriptor or
string descriptor zero look like anything else, so what a data stage holds is decided from the request that
asked for it (`descriptor_class_for`), never guessed from the bytes alone.
"""

from __future__ import annotations

from typing import Any

from scapy.config import conf
from scapy.fields import (
    ByteEnumField,
    ByteField,
    FieldListField,
    LEShortField,
    PacketListField,
    StrField,
    StrLenField,
    XByteField,
    XLEShortField,
)
from scapy.packet import Packet

from captures.names import (  # the chapter 9 names live there, scapy-free
    DESCRIPTOR_TYPES,
    GET_DESCRIPTOR,
    TRANSFER_TYPES,
    USB_CLASSES,
    USB_DIR_IN,
    USB_DT_BOS,
    USB_DT_CONFIG,
    USB_DT_CS_ENDPOINT,
    USB_DT_CS_INTERFACE,
    USB_DT_DEVICE,
    USB_DT_DEVICE_CAPABILITY,
    USB_DT_DEVICE_QUALIFIER,
    USB_DT_ENDPOINT,
    USB_DT_HID,
    USB_DT_INTERFACE,
    USB_DT_INTERFACE_ASSOCIATION,
    USB_DT_OTHER_SPEED_CONFIG,
    USB_DT_REPORT,
    USB_DT_SS_ENDPOINT_COMP,
    USB_DT_STRING,
    USB_TYPE_STANDARD,
    request_name,
)

# scapy field name -> Wireshark display-filter field, for `tshark -T fields` comparisons.
WIRESHARK_FIELDS = {
    "bmRequestType": "usb.bmRequestType",
    "bRequest": "usb.setup.bRequest",
    "wValue": "usb.setup.wValue",
    "wIndex": "usb.setup.wIndex",
    "wLength": "usb.setup.wLength",
    "bLength": "usb.bLength",
    "bDescriptorType": "usb.bDescriptorType",
    "bcdUSB": "usb.bcdUSB",
    "bDeviceClass": "usb.bDeviceClass",
    "bDeviceSubClass": "usb.bDeviceSubClass",
    "bDeviceProtocol": "usb.bDeviceProtocol",
    "bMaxPacketSize0": "usb.bMaxPacketSize0",
    "idVendor": "usb.idVendor",
    "idProduct": "usb.idProduct",
    "bcdDevice": "usb.bcdDevice",
    "iManufacturer": "usb.iManufacturer",
    "iProduct": "usb.iProduct",
    "iSerialNumber": "usb.iSerialNumber",
    "bNumConfigurations": "usb.bNumConfigurations",
    "wTotalLength": "usb.wTotalLength",
    "bNumInterfaces": "usb.bNumInterfaces",
    "bConfigurationValue": "usb.bConfigurationValue",
    "iConfiguration": "usb.iConfiguration",
    "bMaxPower": "usb.bMaxPower",
    "bInterfaceNumber": "usb.bInterfaceNumber",
    "bAlternateSetting": "usb.bAlternateSetting",
    "bNumEndpoints": "usb.bNumEndpoints",
    "bInterfaceClass": "usb.bInterfaceClass",
    "bInterfaceSubClass": "usb.bInterfaceSubClass",
    "bInterfaceProtocol": "usb.bInterfaceProtocol",
    "iInterface": "usb.iInterface",
    "bEndpointAddress": "usb.bEndpointAddress",
    "wMaxPacketSize": "usb.wMaxPacketSize",
    "bInterval": "usb.bInterval",
    "bString": "usb.bString",
    "wLANGID": "usb.wLANGID",
}


class _RequestField(ByteField):
    """bRequest, shown by name when the type bits of bmRequestType make the name unambiguous."""

    def i2repr(self, pkt: Packet | None, x: Any) -> str:
        if x is None:
            return "None"
        request_type = pkt.bmRequestType if pkt is not None and pkt.bmRequestType is not None else 0
        return f"{x} ({request_name(request_type, x)})"


class USB_Setup(Packet):
    """The 8-byte SETUP packet of a control transfer (USB 2.0 9.3), little-endian."""

    name = "USB Setup"
    fields_desc = [
        XByteField("bmRequestType", USB_DIR_IN),
        _RequestField("bRequest", GET_DESCRIPTOR),
        XLEShortField("wValue", 0),
        XLEShortField("wIndex", 0),
        LEShortField("wLength", 0),
    ]

    @property
    def direction_in(self) -> bool:
        return bool(self.bmRequestType & USB_DIR_IN)

    @property
    def request_kind(self) -> int:
        return self.bmRequestType & 0x60

    @property
    def recipient(self) -> int:
        return self.bmRequestType & 0x1F

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    def mysummary(self) -> str:
        text = f"{request_name(self.bmRequestType, self.bRequest)} wValue=0x{self.wValue:04x} "
        text += f"wIndex={self.wIndex} wLength={self.wLength}"
        if self.request_kind == USB_TYPE_STANDARD and self.bRequest == GET_DESCRIPTOR:
            dtype = self.wValue >> 8
            text = f"GET_DESCRIPTOR {DESCRIPTOR_TYPES.get(dtype, hex(dtype))} index {self.wValue & 0xFF} "
            text += f"wLength={self.wLength}"
        return text


# --- descriptors --------------------------------------------------------------------------------------------


def _extra(fixed: int) -> StrLenField:
    """Bytes a descriptor carries beyond the fields its class knows (bLength larger than the standard size)."""
    return StrLenField("extra", b"", length_from=lambda p: max(0, (p.bLength or 0) - fixed))


class USB_Descriptor(Packet):
    """Any descriptor: the generic form, and the dispatcher `USB_Descriptor(data)` to the specific class.

    Descriptors that follow each other (a configuration's interfaces, endpoints, class descriptors) are chained as
    scapy payloads, so `cfg[USB_EndpointDescriptor:2]` is the second endpoint.
    """

    name = "USB Descriptor"
    match_subclass = True
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", 0, DESCRIPTOR_TYPES),
        StrLenField("data", b"", length_from=lambda p: max(0, (p.bLength or 0) - 2)),
    ]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> type[Packet]:
        if cls is not USB_Descriptor or not _pkt or len(_pkt) < 2:
            return cls
        return _DESCRIPTOR_CLASSES.get(_pkt[1], USB_Descriptor)

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        if self.bLength is None:
            p = bytes([len(p) & 0xFF]) + p[1:]
        return p + pay

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        if len(payload) >= 2:
            return USB_Descriptor
        return conf.raw_layer

    def mysummary(self) -> str:
        return f"{DESCRIPTOR_TYPES.get(self.bDescriptorType, hex(self.bDescriptorType))} descriptor"


class USB_DeviceDescriptor(USB_Descriptor):
    name = "USB Device Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_DEVICE, DESCRIPTOR_TYPES),
        XLEShortField("bcdUSB", 0x0200),
        ByteEnumField("bDeviceClass", 0, USB_CLASSES),
        ByteField("bDeviceSubClass", 0),
        ByteField("bDeviceProtocol", 0),
        ByteField("bMaxPacketSize0", 64),
        XLEShortField("idVendor", 0),
        XLEShortField("idProduct", 0),
        XLEShortField("bcdDevice", 0),
        ByteField("iManufacturer", 0),
        ByteField("iProduct", 0),
        ByteField("iSerialNumber", 0),
        ByteField("bNumConfigurations", 1),
        _extra(18),
    ]

    def mysummary(self) -> str:
        return f"DEVICE {self.idVendor:04x}:{self.idProduct:04x} class {self.bDeviceClass:#04x}"


class USB_ConfigurationDescriptor(USB_Descriptor):
    name = "USB Configuration Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_CONFIG, DESCRIPTOR_TYPES),
        LEShortField("wTotalLength", None),
        ByteField("bNumInterfaces", 1),
        ByteField("bConfigurationValue", 1),
        ByteField("iConfiguration", 0),
        XByteField("bmAttributes", 0x80),
        ByteField("bMaxPower", 50),
        _extra(9),
    ]

    def post_build(self, p: bytes, pay: bytes) -> bytes:
        p = super().post_build(p, b"")
        if self.wTotalLength is None:
            total = len(p) + len(pay)
            p = p[:2] + total.to_bytes(2, "little") + p[4:]
        return p + pay

    def mysummary(self) -> str:
        return f"CONFIGURATION {self.bConfigurationValue} ({self.bNumInterfaces} interfaces, {self.wTotalLength} bytes)"


class USB_OtherSpeedConfigurationDescriptor(USB_ConfigurationDescriptor):
    name = "USB Other Speed Configuration Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_OTHER_SPEED_CONFIG, DESCRIPTOR_TYPES),
        *USB_ConfigurationDescriptor.fields_desc[2:],
    ]


class USB_InterfaceDescriptor(USB_Descriptor):
    name = "USB Interface Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_INTERFACE, DESCRIPTOR_TYPES),
        ByteField("bInterfaceNumber", 0),
        ByteField("bAlternateSetting", 0),
        ByteField("bNumEndpoints", 0),
        ByteEnumField("bInterfaceClass", 0, USB_CLASSES),
        ByteField("bInterfaceSubClass", 0),
        ByteField("bInterfaceProtocol", 0),
        ByteField("iInterface", 0),
        _extra(9),
    ]

    def mysummary(self) -> str:
        return (
            f"INTERFACE {self.bInterfaceNumber} alt {self.bAlternateSetting} class "
            f"{self.bInterfaceClass:#04x}/{self.bInterfaceSubClass:#04x}/{self.bInterfaceProtocol:#04x}"
        )


class USB_EndpointDescriptor(USB_Descriptor):
    name = "USB Endpoint Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_ENDPOINT, DESCRIPTOR_TYPES),
        XByteField("bEndpointAddress", 0x81),
        XByteField("bmAttributes", 0x02),
        LEShortField("wMaxPacketSize", 512),
        ByteField("bInterval", 0),
        _extra(7),
    ]

    @property
    def transfer_type(self) -> str:
        return TRANSFER_TYPES[self.bmAttributes & 0x03]

    def mysummary(self) -> str:
        direction = "IN" if self.bEndpointAddress & 0x80 else "OUT"
        return f"ENDPOINT {self.bEndpointAddress:#04x} {direction} {self.transfer_type} {self.wMaxPacketSize}"


class USB_StringDescriptor(USB_Descriptor):
    """A string descriptor with index > 0: bString is UTF-16LE (USB 2.0 9.6.7)."""

    name = "USB String Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_STRING, DESCRIPTOR_TYPES),
        StrLenField("bString", b"", length_from=lambda p: max(0, (p.bLength or 0) - 2)),
    ]

    @property
    def text(self) -> str:
        return bytes(self.bString).decode("utf-16-le", errors="replace")

    def mysummary(self) -> str:
        return f"STRING {self.text!r}"


class USB_StringDescriptorZero(USB_Descriptor):
    """String descriptor zero: the LANGIDs the device supports, not text (USB 2.0 table 9-15)."""

    name = "USB String Descriptor Zero (LANGIDs)"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_STRING, DESCRIPTOR_TYPES),
        FieldListField(
            "wLANGID", [0x0409], XLEShortField("", 0), length_from=lambda p: max(0, (p.bLength or 0) - 2) & ~1
        ),
        StrLenField("extra", b"", length_from=lambda p: max(0, (p.bLength or 0) - 2) & 1),
    ]


class USB_InterfaceAssociationDescriptor(USB_Descriptor):
    name = "USB Interface Association Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_INTERFACE_ASSOCIATION, DESCRIPTOR_TYPES),
        ByteField("bFirstInterface", 0),
        ByteField("bInterfaceCount", 2),
        ByteEnumField("bFunctionClass", 0, USB_CLASSES),
        ByteField("bFunctionSubClass", 0),
        ByteField("bFunctionProtocol", 0),
        ByteField("iFunction", 0),
        _extra(8),
    ]


class USB_DeviceQualifierDescriptor(USB_Descriptor):
    name = "USB Device Qualifier Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_DEVICE_QUALIFIER, DESCRIPTOR_TYPES),
        XLEShortField("bcdUSB", 0x0200),
        ByteEnumField("bDeviceClass", 0, USB_CLASSES),
        ByteField("bDeviceSubClass", 0),
        ByteField("bDeviceProtocol", 0),
        ByteField("bMaxPacketSize0", 64),
        ByteField("bNumConfigurations", 1),
        ByteField("bReserved", 0),
        _extra(10),
    ]


class USB_HIDClassDescriptorRef(Packet):
    """One (bDescriptorType, wDescriptorLength) pair of a HID descriptor (HID 1.11, 6.2.1)."""

    name = "HID class descriptor"
    fields_desc = [
        ByteEnumField("bDescriptorType", USB_DT_REPORT, DESCRIPTOR_TYPES),
        LEShortField("wDescriptorLength", 0),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class USB_HIDDescriptor(USB_Descriptor):
    name = "USB HID Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_HID, DESCRIPTOR_TYPES),
        XLEShortField("bcdHID", 0x0111),
        ByteField("bCountryCode", 0),
        ByteField("bNumDescriptors", 1),
        PacketListField(
            "descriptors",
            [],
            USB_HIDClassDescriptorRef,
            count_from=lambda p: p.bNumDescriptors,
            length_from=lambda p: max(0, (p.bLength or 0) - 6),
        ),
        StrLenField(
            "extra", b"", length_from=lambda p: max(0, (p.bLength or 0) - 6 - 3 * len(p.descriptors or []))
        ),
    ]


class USB_ClassSpecificDescriptor(USB_Descriptor):
    """CS_INTERFACE / CS_ENDPOINT: a subtype byte then class-defined bytes (CDC 1.2 5.2.3, UAC, UVC)."""

    name = "USB Class-specific Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_CS_INTERFACE, DESCRIPTOR_TYPES),
        XByteField("bDescriptorSubtype", 0),
        StrLenField("data", b"", length_from=lambda p: max(0, (p.bLength or 0) - 3)),
    ]


class USB_SSEndpointCompanionDescriptor(USB_Descriptor):
    name = "USB SuperSpeed Endpoint Companion Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_SS_ENDPOINT_COMP, DESCRIPTOR_TYPES),
        ByteField("bMaxBurst", 0),
        XByteField("bmAttributes", 0),
        LEShortField("wBytesPerInterval", 0),
        _extra(6),
    ]


class USB_BOSDescriptor(USB_Descriptor):
    name = "USB BOS Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_BOS, DESCRIPTOR_TYPES),
        LEShortField("wTotalLength", 5),
        ByteField("bNumDeviceCaps", 0),
        _extra(5),
    ]


class USB_DeviceCapabilityDescriptor(USB_Descriptor):
    name = "USB Device Capability Descriptor"
    fields_desc = [
        ByteField("bLength", None),
        ByteEnumField("bDescriptorType", USB_DT_DEVICE_CAPABILITY, DESCRIPTOR_TYPES),
        XByteField("bDevCapabilityType", 0),
        StrLenField("data", b"", length_from=lambda p: max(0, (p.bLength or 0) - 3)),
    ]


class USB_HIDReportDescriptor(Packet):
    """A HID report descriptor: a stream of short items (HID 1.11 6.2.2), kept as bytes; not a TLV descriptor."""

    name = "USB HID Report Descriptor"
    fields_desc = [StrField("items", b"")]


_DESCRIPTOR_CLASSES: dict[int, type[USB_Descriptor]] = {
    USB_DT_DEVICE: USB_DeviceDescriptor,
    USB_DT_CONFIG: USB_ConfigurationDescriptor,
    USB_DT_STRING: USB_StringDescriptor,
    USB_DT_INTERFACE: USB_InterfaceDescriptor,
    USB_DT_ENDPOINT: USB_EndpointDescriptor,
    USB_DT_DEVICE_QUALIFIER: USB_DeviceQualifierDescriptor,
    USB_DT_OTHER_SPEED_CONFIG: USB_OtherSpeedConfigurationDescriptor,
    USB_DT_INTERFACE_ASSOCIATION: USB_InterfaceAssociationDescriptor,
    USB_DT_BOS: USB_BOSDescriptor,
    USB_DT_DEVICE_CAPABILITY: USB_DeviceCapabilityDescriptor,
    USB_DT_HID: USB_HIDDescriptor,
    USB_DT_CS_INTERFACE: USB_ClassSpecificDescriptor,
    USB_DT_CS_ENDPOINT: USB_ClassSpecificDescriptor,
    USB_DT_SS_ENDPOINT_COMP: USB_SSEndpointCompanionDescriptor,
}


def descriptor_class_for(setup: bytes | None) -> type[Packet] | None:
    """The layer for the data stage answering `setup` (8 raw bytes), or None when it is not a descriptor.

    Only a standard GET_DESCRIPTOR, or a GET_DESCRIPTOR to an interface for HID class descriptors, returns
    descriptors; string descriptor zero and HID report descriptors are recognised from wValue.
    """
    if setup is None or len(setup) < 8:
        return None
    request_type, request = setup[0], setup[1]
    if request != GET_DESCRIPTOR or not request_type & USB_DIR_IN or request_type & 0x60 != USB_TYPE_STANDARD:
        return None
    dtype, index = setup[3], setup[2]
    if dtype == USB_DT_STRING and index == 0:
        return USB_StringDescriptorZero
    if dtype == USB_DT_REPORT:
        return USB_HIDReportDescriptor
    if dtype in _DESCRIPTOR_CLASSES or dtype == USB_DT_OTHER_SPEED_CONFIG:
        return USB_Descriptor
    return None


def dissect_control_in(setup: bytes | None, data: bytes) -> Packet:
    """The data stage of a control IN transfer, decoded as descriptors when the request asked for them."""
    cls = descriptor_class_for(setup)
    if cls is None or not data:
        return conf.raw_layer(data)
    return cls(data)
