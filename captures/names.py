"""Names of USB and SCSI things, as the specs spell them: one table for the scapy layers and the fast paths.

Pure data and lookups, no scapy, so `vusb dissect` can name requests and opcodes without importing scapy.
"""

from __future__ import annotations

import errno

# bmRequestType bits (USB 2.0 table 9-2)
USB_DIR_OUT = 0x00
USB_DIR_IN = 0x80
USB_TYPE_STANDARD = 0x00
USB_TYPE_CLASS = 0x20
USB_TYPE_VENDOR = 0x40
USB_RECIP_DEVICE = 0x00
USB_RECIP_INTERFACE = 0x01
USB_RECIP_ENDPOINT = 0x02
USB_RECIP_OTHER = 0x03

# Standard request codes (USB 2.0 table 9-4, USB 3.x additions)
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
SET_SEL = 48
SET_ISOCH_DELAY = 49

STANDARD_REQUESTS = {
    GET_STATUS: "GET_STATUS",
    CLEAR_FEATURE: "CLEAR_FEATURE",
    SET_FEATURE: "SET_FEATURE",
    SET_ADDRESS: "SET_ADDRESS",
    GET_DESCRIPTOR: "GET_DESCRIPTOR",
    SET_DESCRIPTOR: "SET_DESCRIPTOR",
    GET_CONFIGURATION: "GET_CONFIGURATION",
    SET_CONFIGURATION: "SET_CONFIGURATION",
    GET_INTERFACE: "GET_INTERFACE",
    SET_INTERFACE: "SET_INTERFACE",
    SYNCH_FRAME: "SYNCH_FRAME",
    SET_SEL: "SET_SEL",
    SET_ISOCH_DELAY: "SET_ISOCH_DELAY",
}

# Class requests whose code is unambiguous across the classes vusb emulates (BOT 3.1/3.2, CDC PSTN 6.3).
# HID codes 0x01-0x0B collide with CDC's, so they are only named when the caller knows the class.
CLASS_REQUESTS = {
    0xFE: "GET_MAX_LUN",
    0xFF: "BULK_ONLY_MASS_STORAGE_RESET",
    0x20: "SET_LINE_CODING",
    0x21: "GET_LINE_CODING",
    0x22: "SET_CONTROL_LINE_STATE",
    0x23: "SEND_BREAK",
}

# Descriptor types (USB 2.0 table 9-5, ECN IAD, USB 3.x, HID 1.11 7.1, CDC 1.2 5.2.3)
USB_DT_DEVICE = 0x01
USB_DT_CONFIG = 0x02
USB_DT_STRING = 0x03
USB_DT_INTERFACE = 0x04
USB_DT_ENDPOINT = 0x05
USB_DT_DEVICE_QUALIFIER = 0x06
USB_DT_OTHER_SPEED_CONFIG = 0x07
USB_DT_INTERFACE_POWER = 0x08
USB_DT_OTG = 0x09
USB_DT_DEBUG = 0x0A
USB_DT_INTERFACE_ASSOCIATION = 0x0B
USB_DT_BOS = 0x0F
USB_DT_DEVICE_CAPABILITY = 0x10
USB_DT_HID = 0x21
USB_DT_REPORT = 0x22
USB_DT_PHYSICAL = 0x23
USB_DT_CS_INTERFACE = 0x24
USB_DT_CS_ENDPOINT = 0x25
USB_DT_SS_ENDPOINT_COMP = 0x30

DESCRIPTOR_TYPES = {
    USB_DT_DEVICE: "DEVICE",
    USB_DT_CONFIG: "CONFIGURATION",
    USB_DT_STRING: "STRING",
    USB_DT_INTERFACE: "INTERFACE",
    USB_DT_ENDPOINT: "ENDPOINT",
    USB_DT_DEVICE_QUALIFIER: "DEVICE_QUALIFIER",
    USB_DT_OTHER_SPEED_CONFIG: "OTHER_SPEED_CONFIGURATION",
    USB_DT_INTERFACE_POWER: "INTERFACE_POWER",
    USB_DT_OTG: "OTG",
    USB_DT_DEBUG: "DEBUG",
    USB_DT_INTERFACE_ASSOCIATION: "INTERFACE_ASSOCIATION",
    USB_DT_BOS: "BOS",
    USB_DT_DEVICE_CAPABILITY: "DEVICE_CAPABILITY",
    USB_DT_HID: "HID",
    USB_DT_REPORT: "REPORT",
    USB_DT_PHYSICAL: "PHYSICAL",
    USB_DT_CS_INTERFACE: "CS_INTERFACE",
    USB_DT_CS_ENDPOINT: "CS_ENDPOINT",
    USB_DT_SS_ENDPOINT_COMP: "SS_ENDPOINT_COMPANION",
}

USB_CLASSES = {
    0x00: "per-interface",
    0x01: "Audio",
    0x02: "CDC",
    0x03: "HID",
    0x07: "Printer",
    0x08: "Mass Storage",
    0x09: "Hub",
    0x0A: "CDC-Data",
    0x0E: "Video",
    0xEF: "Miscellaneous",
    0xFE: "Application Specific",
    0xFF: "Vendor Specific",
}

TRANSFER_TYPES = {0: "control", 1: "isochronous", 2: "bulk", 3: "interrupt"}  # bmAttributes bits 1..0

CBW_SIGNATURE = 0x43425355  # 'USBC' little-endian
CSW_SIGNATURE = 0x53425355  # 'USBS' little-endian
CBW_SIZE = 31
CSW_SIZE = 13
CBW_FLAGS_DATA_IN = 0x80

CSW_STATUS = {0: "COMMAND_PASSED", 1: "COMMAND_FAILED", 2: "PHASE_ERROR"}

# Operation codes (SPC-4 table 3 for the primary commands, SBC-3 table 13 for block commands).
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ_6 = 0x08
WRITE_6 = 0x0A
INQUIRY = 0x12
MODE_SELECT_6 = 0x15
MODE_SENSE_6 = 0x1A
START_STOP_UNIT = 0x1B
SEND_DIAGNOSTIC = 0x1D
PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
READ_FORMAT_CAPACITIES = 0x23
READ_CAPACITY_10 = 0x25
READ_10 = 0x28
WRITE_10 = 0x2A
WRITE_AND_VERIFY_10 = 0x2E
VERIFY_10 = 0x2F
SYNCHRONIZE_CACHE_10 = 0x35
MODE_SELECT_10 = 0x55
MODE_SENSE_10 = 0x5A
READ_16 = 0x88
WRITE_16 = 0x8A
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
REPORT_LUNS = 0xA0
READ_12 = 0xA8
WRITE_12 = 0xAA
SAI_READ_CAPACITY_16 = 0x10  # service action of SERVICE ACTION IN(16)

SCSI_OPCODES = {
    TEST_UNIT_READY: "TEST_UNIT_READY",
    REQUEST_SENSE: "REQUEST_SENSE",
    READ_6: "READ_6",
    WRITE_6: "WRITE_6",
    INQUIRY: "INQUIRY",
    MODE_SELECT_6: "MODE_SELECT_6",
    MODE_SENSE_6: "MODE_SENSE_6",
    START_STOP_UNIT: "START_STOP_UNIT",
    SEND_DIAGNOSTIC: "SEND_DIAGNOSTIC",
    PREVENT_ALLOW_MEDIUM_REMOVAL: "PREVENT_ALLOW_MEDIUM_REMOVAL",
    READ_FORMAT_CAPACITIES: "READ_FORMAT_CAPACITIES",
    READ_CAPACITY_10: "READ_CAPACITY_10",
    READ_10: "READ_10",
    WRITE_10: "WRITE_10",
    WRITE_AND_VERIFY_10: "WRITE_AND_VERIFY_10",
    VERIFY_10: "VERIFY_10",
    SYNCHRONIZE_CACHE_10: "SYNCHRONIZE_CACHE_10",
    MODE_SELECT_10: "MODE_SELECT_10",
    MODE_SENSE_10: "MODE_SENSE_10",
    READ_16: "READ_16",
    WRITE_16: "WRITE_16",
    SYNCHRONIZE_CACHE_16: "SYNCHRONIZE_CACHE_16",
    SERVICE_ACTION_IN_16: "SERVICE_ACTION_IN_16",
    REPORT_LUNS: "REPORT_LUNS",
    READ_12: "READ_12",
    WRITE_12: "WRITE_12",
}
SCSI_OPCODE_VALUES = {name: code for code, name in SCSI_OPCODES.items()}

SENSE_KEYS = {
    0x0: "NO_SENSE",
    0x1: "RECOVERED_ERROR",
    0x2: "NOT_READY",
    0x3: "MEDIUM_ERROR",
    0x4: "HARDWARE_ERROR",
    0x5: "ILLEGAL_REQUEST",
    0x6: "UNIT_ATTENTION",
    0x7: "DATA_PROTECT",
    0x8: "BLANK_CHECK",
    0x9: "VENDOR_SPECIFIC",
    0xA: "COPY_ABORTED",
    0xB: "ABORTED_COMMAND",
    0xD: "VOLUME_OVERFLOW",
    0xE: "MISCOMPARE",
}


def request_name(request_type: int, request: int) -> str:
    """A readable name for bRequest: chapter 9 names for standard requests, BOT/CDC names for class ones."""
    kind = request_type & 0x60
    if kind == USB_TYPE_STANDARD and request in STANDARD_REQUESTS:
        return STANDARD_REQUESTS[request]
    if kind == USB_TYPE_CLASS and request in CLASS_REQUESTS:
        return CLASS_REQUESTS[request]
    return {USB_TYPE_CLASS: "class", USB_TYPE_VENDOR: "vendor"}.get(
        kind, "reserved"
    ) + f" request 0x{request:02x}"


def opcode_name(opcode: int, service_action: int | None = None) -> str:
    if opcode == SERVICE_ACTION_IN_16 and service_action == SAI_READ_CAPACITY_16:
        return "READ_CAPACITY_16"
    return SCSI_OPCODES.get(opcode, f"opcode 0x{opcode:02x}")


def errno_name(status: int | None) -> str:
    """'-EPIPE' for -32: how the kernel, usbmon and USB/IP report a URB status; 'pending' for None."""
    if status is None:
        return "pending"
    if status == 0:
        return "0"
    name = errno.errorcode.get(-status)
    return f"-{name}" if name else str(status)


def describe_setup(setup: bytes) -> str:
    """A one-line reading of a SETUP packet: GET_DESCRIPTOR CONFIGURATION index 0 (wLength 255), ..."""
    if len(setup) < 8:
        return "SETUP?"
    request_type, request = setup[0], setup[1]
    value = setup[2] | setup[3] << 8
    index = setup[4] | setup[5] << 8
    length = setup[6] | setup[7] << 8
    if request_type & 0x60 == USB_TYPE_STANDARD and request == GET_DESCRIPTOR:
        dtype = value >> 8
        kind = DESCRIPTOR_TYPES.get(dtype, f"type 0x{dtype:02x}")
        return f"GET_DESCRIPTOR {kind} index {value & 0xFF} (wLength {length})"
    name = request_name(request_type, request)
    if request_type & 0x60 == USB_TYPE_STANDARD and request in (SET_CONFIGURATION, SET_ADDRESS):
        return f"{name} {value}"
    if request_type & 0x60 == USB_TYPE_STANDARD and request == SET_INTERFACE:
        return f"{name} {index} alt {value}"
    return f"{name} wValue=0x{value:04x} wIndex={index} wLength={length}"
