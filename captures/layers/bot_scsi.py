"""scapy layers for USB Mass Storage Bulk-Only Transport (BOT 1.0) and the SCSI commands vusb's disk speaks.

A bulk transfer is recognised by its content, the way the BOT spec lets a device do it (BOT 6.2, 6.3): 31 bytes
starting with the CBW signature 'USBC' are a Command Block Wrapper, 13 bytes starting with 'USBS' a Command Status
Wrapper. The CDB inside a CBW is dispatched on its operation code (SPC-4 / SBC-3 layouts, big-endian). The data
phase between them can only be understood knowing the command it belongs to: `scsi_data_class` maps a command to
the layer of its data-in (INQUIRY data, READ CAPACITY data, sense data, mode parameter header ...); the transports
call it when they have followed the CBW.

Field names are the BOT / SPC / SBC names; `WIRESHARK_FIELDS` maps them onto Wireshark's `usbms.*` and `scsi.*`.
"""

from __future__ import annotations

import struct
from typing import Any

from scapy.config import conf
from scapy.fields import (
    BitField,
    BitFieldLenField,
    ByteEnumField,
    ByteField,
    IntField,
    LEIntField,
    LongField,
    PacketListField,
    ShortField,
    StrField,
    StrFixedLenField,
    StrLenField,
    ThreeBytesField,
    XByteField,
    XIntField,
    XLEIntField,
)
from scapy.packet import Packet

from captures.names import (  # SCSI and BOT names live there, scapy-free
    CBW_FLAGS_DATA_IN,
    CBW_SIGNATURE,
    CBW_SIZE,
    CSW_SIGNATURE,
    CSW_SIZE,
    CSW_STATUS,
    INQUIRY,
    MODE_SENSE_6,
    MODE_SENSE_10,
    PREVENT_ALLOW_MEDIUM_REMOVAL,
    READ_10,
    READ_12,
    READ_16,
    READ_CAPACITY_10,
    READ_FORMAT_CAPACITIES,
    REQUEST_SENSE,
    SAI_READ_CAPACITY_16,
    SCSI_OPCODES,
    SENSE_KEYS,
    SERVICE_ACTION_IN_16,
    START_STOP_UNIT,
    SYNCHRONIZE_CACHE_10,
    TEST_UNIT_READY,
    VERIFY_10,
    WRITE_10,
    WRITE_12,
    WRITE_16,
    opcode_name,
)

# scapy field name -> Wireshark field, for `tshark -T fields` comparisons.
WIRESHARK_FIELDS = {
    "dCBWSignature": "usbms.dCBWSignature",
    "dCBWTag": "usbms.dCBWTag",
    "dCBWDataTransferLength": "usbms.dCBWDataTransferLength",
    "bmCBWFlags": "usbms.dCBWFlags",
    "bCBWLUN": "usbms.dCBWLUN",
    "bCBWCBLength": "usbms.dCBWCBLength",
    "dCSWSignature": "usbms.dCSWSignature",
    "dCSWTag": "usbms.dCBWTag",  # Wireshark reuses the CBW tag field for the CSW
    "dCSWDataResidue": "usbms.dCSWDataResidue",
    "bCSWStatus": "usbms.dCSWStatus",
    "opcode": "scsi.spc.opcode / scsi_sbc.opcode",
    "logical_block_address": "scsi_sbc.rdwr10.lba",
    "transfer_length": "scsi_sbc.rdwr10.xferlen",
}


def is_cbw(data: bytes) -> bool:
    """BOT 6.2.1: a CBW is exactly 31 bytes and starts with 'USBC'."""
    return len(data) == CBW_SIZE and data[:4] == b"USBC"


def is_csw(data: bytes) -> bool:
    """BOT 6.3: a CSW is 13 bytes starting with 'USBS' (hosts accept it that way before checking the tag)."""
    return len(data) == CSW_SIZE and data[:4] == b"USBS"


# --- SCSI command descriptor blocks --------------------------------------------------------------------------


class SCSI_CDB(Packet):
    """Any CDB: opcode plus the rest; `SCSI_CDB(data)` dispatches on the opcode to the specific class."""

    name = "SCSI CDB"
    match_subclass = True
    fields_desc = [ByteEnumField("opcode", 0, SCSI_OPCODES), StrField("parameters", b"")]

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> type[Packet]:
        if cls is not SCSI_CDB or not _pkt:
            return cls
        if _pkt[0] == SERVICE_ACTION_IN_16 and len(_pkt) > 1 and _pkt[1] & 0x1F == SAI_READ_CAPACITY_16:
            return SCSI_ReadCapacity16
        return _CDB_CLASSES.get(_pkt[0], SCSI_CDB)

    @property
    def operation(self) -> str:
        return opcode_name(self.opcode, getattr(self, "service_action", None))

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    def mysummary(self) -> str:
        return self.operation


def _cdb(opcode: int, *fields: Any) -> list[Any]:
    return [ByteEnumField("opcode", opcode, SCSI_OPCODES), *fields]


class SCSI_TestUnitReady(SCSI_CDB):
    name = "SCSI TEST UNIT READY"
    fields_desc = _cdb(TEST_UNIT_READY, StrFixedLenField("reserved", b"\0" * 4, 4), XByteField("control", 0))


class SCSI_RequestSense(SCSI_CDB):
    name = "SCSI REQUEST SENSE"
    fields_desc = _cdb(
        REQUEST_SENSE,
        BitField("reserved1", 0, 7),
        BitField("desc", 0, 1),
        ShortField("reserved2", 0),
        ByteField("allocation_length", 18),
        XByteField("control", 0),
    )


class SCSI_Inquiry(SCSI_CDB):
    name = "SCSI INQUIRY"
    fields_desc = _cdb(
        INQUIRY,
        BitField("reserved", 0, 7),
        BitField("evpd", 0, 1),
        XByteField("page_code", 0),
        ShortField("allocation_length", 36),
        XByteField("control", 0),
    )


class SCSI_ModeSense6(SCSI_CDB):
    name = "SCSI MODE SENSE(6)"
    fields_desc = _cdb(
        MODE_SENSE_6,
        BitField("reserved", 0, 4),
        BitField("dbd", 0, 1),
        BitField("reserved2", 0, 3),
        BitField("pc", 0, 2),
        BitField("page_code", 0x3F, 6),
        XByteField("subpage_code", 0),
        ByteField("allocation_length", 192),
        XByteField("control", 0),
    )


class SCSI_ModeSense10(SCSI_CDB):
    name = "SCSI MODE SENSE(10)"
    fields_desc = _cdb(
        MODE_SENSE_10,
        BitField("reserved", 0, 3),
        BitField("llbaa", 0, 1),
        BitField("dbd", 0, 1),
        BitField("reserved2", 0, 3),
        BitField("pc", 0, 2),
        BitField("page_code", 0x3F, 6),
        XByteField("subpage_code", 0),
        StrFixedLenField("reserved3", b"\0" * 3, 3),
        ShortField("allocation_length", 192),
        XByteField("control", 0),
    )


class SCSI_StartStopUnit(SCSI_CDB):
    name = "SCSI START STOP UNIT"
    fields_desc = _cdb(
        START_STOP_UNIT,
        BitField("reserved", 0, 7),
        BitField("immed", 0, 1),
        ByteField("reserved2", 0),
        BitField("reserved3", 0, 4),
        BitField("power_condition_modifier", 0, 4),
        BitField("power_condition", 0, 4),
        BitField("reserved4", 0, 1),
        BitField("no_flush", 0, 1),
        BitField("loej", 0, 1),
        BitField("start", 1, 1),
        XByteField("control", 0),
    )


class SCSI_PreventAllowMediumRemoval(SCSI_CDB):
    name = "SCSI PREVENT ALLOW MEDIUM REMOVAL"
    fields_desc = _cdb(
        PREVENT_ALLOW_MEDIUM_REMOVAL,
        StrFixedLenField("reserved", b"\0" * 3, 3),
        BitField("reserved2", 0, 6),
        BitField("prevent", 0, 2),
        XByteField("control", 0),
    )


class SCSI_ReadFormatCapacities(SCSI_CDB):
    """READ FORMAT CAPACITIES (MMC/UFI 0x23), sent by Windows and some Linux tools to USB disks."""

    name = "SCSI READ FORMAT CAPACITIES"
    fields_desc = _cdb(
        READ_FORMAT_CAPACITIES,
        StrFixedLenField("reserved", b"\0" * 6, 6),
        ShortField("allocation_length", 252),
        XByteField("control", 0),
    )


class SCSI_ReadCapacity10(SCSI_CDB):
    name = "SCSI READ CAPACITY(10)"
    fields_desc = _cdb(
        READ_CAPACITY_10,
        ByteField("reserved", 0),
        IntField("logical_block_address", 0),
        ShortField("reserved2", 0),
        BitField("reserved3", 0, 7),
        BitField("pmi", 0, 1),
        XByteField("control", 0),
    )


class SCSI_ReadCapacity16(SCSI_CDB):
    name = "SCSI READ CAPACITY(16)"
    fields_desc = _cdb(
        SERVICE_ACTION_IN_16,
        BitField("reserved", 0, 3),
        BitField("service_action", SAI_READ_CAPACITY_16, 5),
        LongField("logical_block_address", 0),
        IntField("allocation_length", 32),
        BitField("reserved2", 0, 7),
        BitField("pmi", 0, 1),
        XByteField("control", 0),
    )


class _Rw10(SCSI_CDB):
    """READ(10)/WRITE(10)/VERIFY(10): opcode, flags, LBA(4), group, length(2), control (SBC-3 5.11, 5.33)."""

    @classmethod
    def _fields(cls, opcode: int, length_name: str = "transfer_length") -> list[Any]:
        return _cdb(
            opcode,
            XByteField("flags", 0),
            IntField("logical_block_address", 0),
            ByteField("group_number", 0),
            ShortField(length_name, 1),
            XByteField("control", 0),
        )

    @property
    def blocks(self) -> int:
        return int(getattr(self, "transfer_length", None) or getattr(self, "verification_length", 0) or 0)


class SCSI_Read10(_Rw10):
    name = "SCSI READ(10)"
    fields_desc = _Rw10._fields(READ_10)


class SCSI_Write10(_Rw10):
    name = "SCSI WRITE(10)"
    fields_desc = _Rw10._fields(WRITE_10)


class SCSI_Verify10(_Rw10):
    name = "SCSI VERIFY(10)"
    fields_desc = _Rw10._fields(VERIFY_10, "verification_length")


class SCSI_SynchronizeCache10(_Rw10):
    name = "SCSI SYNCHRONIZE CACHE(10)"
    fields_desc = _Rw10._fields(SYNCHRONIZE_CACHE_10, "number_of_blocks")

    @property
    def blocks(self) -> int:
        return int(self.number_of_blocks)


class _Rw12(SCSI_CDB):
    @classmethod
    def _fields(cls, opcode: int) -> list[Any]:
        return _cdb(
            opcode,
            XByteField("flags", 0),
            IntField("logical_block_address", 0),
            IntField("transfer_length", 1),
            ByteField("group_number", 0),
            XByteField("control", 0),
        )

    @property
    def blocks(self) -> int:
        return int(self.transfer_length)


class SCSI_Read12(_Rw12):
    name = "SCSI READ(12)"
    fields_desc = _Rw12._fields(READ_12)


class SCSI_Write12(_Rw12):
    name = "SCSI WRITE(12)"
    fields_desc = _Rw12._fields(WRITE_12)


class _Rw16(SCSI_CDB):
    @classmethod
    def _fields(cls, opcode: int) -> list[Any]:
        return _cdb(
            opcode,
            XByteField("flags", 0),
            LongField("logical_block_address", 0),
            IntField("transfer_length", 1),
            ByteField("group_number", 0),
            XByteField("control", 0),
        )

    @property
    def blocks(self) -> int:
        return int(self.transfer_length)


class SCSI_Read16(_Rw16):
    name = "SCSI READ(16)"
    fields_desc = _Rw16._fields(READ_16)


class SCSI_Write16(_Rw16):
    name = "SCSI WRITE(16)"
    fields_desc = _Rw16._fields(WRITE_16)


_CDB_CLASSES: dict[int, type[SCSI_CDB]] = {
    TEST_UNIT_READY: SCSI_TestUnitReady,
    REQUEST_SENSE: SCSI_RequestSense,
    INQUIRY: SCSI_Inquiry,
    MODE_SENSE_6: SCSI_ModeSense6,
    MODE_SENSE_10: SCSI_ModeSense10,
    START_STOP_UNIT: SCSI_StartStopUnit,
    PREVENT_ALLOW_MEDIUM_REMOVAL: SCSI_PreventAllowMediumRemoval,
    READ_FORMAT_CAPACITIES: SCSI_ReadFormatCapacities,
    READ_CAPACITY_10: SCSI_ReadCapacity10,
    READ_10: SCSI_Read10,
    WRITE_10: SCSI_Write10,
    VERIFY_10: SCSI_Verify10,
    SYNCHRONIZE_CACHE_10: SCSI_SynchronizeCache10,
    READ_12: SCSI_Read12,
    WRITE_12: SCSI_Write12,
    READ_16: SCSI_Read16,
    WRITE_16: SCSI_Write16,
}


# --- BOT wrappers ----------------------------------------------------------------------------------------------


class _CDBField(StrLenField):
    """CBWCB's first bCBWCBLength bytes: the CDB, decoded as a SCSI_* layer."""

    holds_packets = 1

    def getfield(self, pkt: Packet, s: bytes) -> tuple[bytes, Any]:
        length = self.length_from(pkt) if self.length_from is not None else 0
        return s[length:], self.m2i(pkt, s[:length])

    def m2i(self, pkt: Packet | None, m: bytes) -> Any:
        if not m:
            return None
        try:
            return SCSI_CDB(m, _parent=pkt)
        except Exception:
            if conf.debug_dissector:
                raise
            return conf.raw_layer(m)

    def any2i(self, pkt: Packet | None, x: Any) -> Any:
        if isinstance(x, bytes | bytearray):
            return SCSI_CDB(bytes(x)) if x else None
        return x

    def i2m(self, pkt: Packet | None, x: Any) -> bytes:
        if x is None:
            return b""
        return bytes(x)

    def i2len(self, pkt: Packet | None, x: Any) -> int:
        return len(self.i2m(pkt, x))


class _CDBPaddingField(StrLenField):
    """The rest of the 16-byte CBWCB after the CDB; built as zeros of the right length when left empty."""

    def addfield(self, pkt: Packet, s: bytes, val: Any) -> bytes:
        cdb_len = len(bytes(pkt.CBWCB or b""))
        want = max(0, 16 - cdb_len)
        raw = bytes(val or b"")[:want]
        return s + raw + b"\0" * (want - len(raw))


class BOT_CBW(Packet):
    """Command Block Wrapper (BOT 5.1): 31 bytes, little-endian, carrying a SCSI CDB."""

    name = "USB Mass Storage CBW"
    fields_desc = [
        XLEIntField("dCBWSignature", CBW_SIGNATURE),
        XLEIntField("dCBWTag", 0),
        LEIntField("dCBWDataTransferLength", 0),
        XByteField("bmCBWFlags", 0),
        BitField("reserved1", 0, 4),
        BitField("bCBWLUN", 0, 4),
        BitField("reserved2", 0, 3),
        BitFieldLenField("bCBWCBLength", None, 5, length_of="CBWCB"),
        _CDBField("CBWCB", None, length_from=lambda p: min(p.bCBWCBLength or 0, 16)),
        _CDBPaddingField("CBWCB_padding", b"", length_from=lambda p: 16 - min(p.bCBWCBLength or 0, 16)),
    ]

    @property
    def data_in(self) -> bool:
        return bool(self.bmCBWFlags & CBW_FLAGS_DATA_IN)

    @property
    def cdb(self) -> SCSI_CDB | None:
        return self.CBWCB if isinstance(self.CBWCB, SCSI_CDB) else None

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    def mysummary(self) -> str:
        cdb = self.cdb
        op = cdb.operation if cdb is not None else "?"
        return f"CBW tag=0x{self.dCBWTag:08x} LUN {self.bCBWLUN} {op} {self.dCBWDataTransferLength} bytes"


class BOT_CSW(Packet):
    """Command Status Wrapper (BOT 5.2): 13 bytes, little-endian."""

    name = "USB Mass Storage CSW"
    fields_desc = [
        XLEIntField("dCSWSignature", CSW_SIGNATURE),
        XLEIntField("dCSWTag", 0),
        LEIntField("dCSWDataResidue", 0),
        ByteEnumField("bCSWStatus", 0, CSW_STATUS),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    def mysummary(self) -> str:
        return f"CSW tag=0x{self.dCSWTag:08x} {CSW_STATUS.get(self.bCSWStatus, self.bCSWStatus)}"


# --- SCSI data-in payloads -------------------------------------------------------------------------------------


class _DataIn(Packet):
    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class SCSI_InquiryData(_DataIn):
    """Standard INQUIRY data (SPC-4 6.4.2)."""

    name = "SCSI INQUIRY data"
    fields_desc = [
        BitField("peripheral_qualifier", 0, 3),
        BitField("peripheral_device_type", 0, 5),
        BitField("rmb", 1, 1),
        BitField("reserved", 0, 7),
        XByteField("version", 0x06),
        XByteField("flags3", 0x02),  # NORMACA, HISUP, RESPONSE DATA FORMAT
        ByteField("additional_length", 31),
        XByteField("flags5", 0),
        XByteField("flags6", 0),
        XByteField("flags7", 0),
        StrFixedLenField("t10_vendor_identification", b"vusb    ", 8),
        StrFixedLenField("product_identification", b"Virtual Disk    ", 16),
        StrFixedLenField("product_revision_level", b"1.0 ", 4),
        StrField("rest", b""),
    ]


class SCSI_ReadCapacity10Data(_DataIn):
    """READ CAPACITY(10) parameter data (SBC-3 5.16.2)."""

    name = "SCSI READ CAPACITY(10) data"
    fields_desc = [IntField("returned_logical_block_address", 0), IntField("logical_block_length", 512)]


class SCSI_ReadCapacity16Data(_DataIn):
    """READ CAPACITY(16) parameter data (SBC-3 5.17.2); the protection and provisioning bytes stay raw."""

    name = "SCSI READ CAPACITY(16) data"
    fields_desc = [
        LongField("returned_logical_block_address", 0),
        IntField("logical_block_length", 512),
        StrField("rest", b"\0" * 20),
    ]


class SCSI_FixedSenseData(_DataIn):
    """Fixed-format sense data (SPC-4 4.5.3), returned by REQUEST SENSE."""

    name = "SCSI sense data"
    fields_desc = [
        BitField("valid", 0, 1),
        BitField("response_code", 0x70, 7),
        ByteField("obsolete", 0),
        BitField("filemark", 0, 1),
        BitField("eom", 0, 1),
        BitField("ili", 0, 1),
        BitField("sdat_ovfl", 0, 1),
        BitField("sense_key", 0, 4),
        XIntField("information", 0),
        ByteField("additional_sense_length", 10),
        XIntField("command_specific_information", 0),
        XByteField("additional_sense_code", 0),
        XByteField("additional_sense_code_qualifier", 0),
        ByteField("field_replaceable_unit_code", 0),
        ThreeBytesField("sense_key_specific", 0),
        StrField("rest", b""),
    ]

    def mysummary(self) -> str:
        key = SENSE_KEYS.get(self.sense_key, hex(self.sense_key))
        return f"sense {key} ASC/ASCQ {self.additional_sense_code:02x}/{self.additional_sense_code_qualifier:02x}"


class SCSI_ModeParameterHeader6(_DataIn):
    """MODE SENSE(6) data: the 4-byte header (SPC-4 7.5.5), then block descriptors and pages kept as bytes."""

    name = "SCSI mode parameter header(6)"
    fields_desc = [
        ByteField("mode_data_length", 3),
        XByteField("medium_type", 0),
        XByteField("device_specific_parameter", 0),  # bit 7: WP
        ByteField("block_descriptor_length", 0),
        StrField("rest", b""),
    ]


class SCSI_ModeParameterHeader10(_DataIn):
    name = "SCSI mode parameter header(10)"
    fields_desc = [
        ShortField("mode_data_length", 6),
        XByteField("medium_type", 0),
        XByteField("device_specific_parameter", 0),
        XByteField("longlba", 0),
        ByteField("reserved", 0),
        ShortField("block_descriptor_length", 0),
        StrField("rest", b""),
    ]


class SCSI_CapacityDescriptor(Packet):
    name = "capacity descriptor"
    fields_desc = [
        IntField("number_of_blocks", 0),
        BitField("reserved", 0, 6),
        BitField("descriptor_type", 2, 2),
        ThreeBytesField("block_length", 512),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class SCSI_ReadFormatCapacitiesData(_DataIn):
    """READ FORMAT CAPACITIES data (UFI 4.10 / MMC-2): a list header then 8-byte capacity descriptors."""

    name = "SCSI READ FORMAT CAPACITIES data"
    fields_desc = [
        StrFixedLenField("reserved", b"\0" * 3, 3),
        ByteField("capacity_list_length", 8),
        PacketListField(
            "descriptors", [], SCSI_CapacityDescriptor, length_from=lambda p: p.capacity_list_length & ~7
        ),
        StrField("rest", b""),
    ]


def scsi_data_class(opcode: int, service_action: int | None = None) -> type[Packet] | None:
    """The layer of the data-in phase of a command, or None when it is plain bytes (READ data, unknown)."""
    if opcode == SERVICE_ACTION_IN_16:
        return SCSI_ReadCapacity16Data if service_action == SAI_READ_CAPACITY_16 else None
    return {
        INQUIRY: SCSI_InquiryData,
        READ_CAPACITY_10: SCSI_ReadCapacity10Data,
        REQUEST_SENSE: SCSI_FixedSenseData,
        MODE_SENSE_6: SCSI_ModeParameterHeader6,
        MODE_SENSE_10: SCSI_ModeParameterHeader10,
        READ_FORMAT_CAPACITIES: SCSI_ReadFormatCapacitiesData,
    }.get(opcode)


def cbw_command(data: bytes) -> tuple[int, int, int | None]:
    """(dCBWTag, opcode, service action) of a raw CBW, without building a Packet: for the fast pairing path."""
    tag = struct.unpack_from("<I", data, 4)[0]
    opcode = data[15]
    service_action = data[16] & 0x1F if opcode == SERVICE_ACTION_IN_16 else None
    return tag, opcode, service_action


def dissect_bulk(data: bytes, pending: tuple[int, int | None] | None = None) -> Packet:
    """A bulk transfer's data: CBW or CSW by content, else the data-in of `pending` (opcode, service action)."""
    if is_cbw(data):
        return BOT_CBW(data)
    if is_csw(data):
        return BOT_CSW(data)
    if pending is not None and data:
        cls = scsi_data_class(*pending)
        if cls is not None:
            return cls(data)
    return conf.raw_layer(data)
