"""captures.layers.usb and .bot_scsi: SETUP, descriptors, CBW/CSW and the SCSI CDBs of vusb's disk.

Expected bytes are written out from the spec tables (USB 2.0 ch. 9, BOT 5.1/5.2, SPC-4, SBC-3), not produced
by the layers under test.
"""

from __future__ import annotations

import struct

import pytest
from scapy.packet import Packet, Raw

from captures.layers.bot_scsi import (
    BOT_CBW,
    BOT_CSW,
    SCSI_CDB,
    SCSI_FixedSenseData,
    SCSI_Inquiry,
    SCSI_InquiryData,
    SCSI_ModeParameterHeader6,
    SCSI_ModeSense6,
    SCSI_ModeSense10,
    SCSI_PreventAllowMediumRemoval,
    SCSI_Read10,
    SCSI_Read12,
    SCSI_Read16,
    SCSI_ReadCapacity10,
    SCSI_ReadCapacity16,
    SCSI_ReadCapacity16Data,
    SCSI_ReadFormatCapacities,
    SCSI_ReadFormatCapacitiesData,
    SCSI_RequestSense,
    SCSI_StartStopUnit,
    SCSI_SynchronizeCache10,
    SCSI_TestUnitReady,
    SCSI_Verify10,
    SCSI_Write10,
    SCSI_Write12,
    SCSI_Write16,
    dissect_bulk,
    scsi_data_class,
)
from captures.layers.usb import (
    USB_ConfigurationDescriptor,
    USB_Descriptor,
    USB_DeviceDescriptor,
    USB_EndpointDescriptor,
    USB_HIDDescriptor,
    USB_HIDReportDescriptor,
    USB_InterfaceDescriptor,
    USB_Setup,
    USB_StringDescriptor,
    USB_StringDescriptorZero,
    dissect_control_in,
)
from captures.names import describe_setup, request_name

# A bulk-only mass storage configuration, as USB 2.0 tables 9-10, 9-12, 9-13 lay it out.
MSC_CONFIG = bytes.fromhex(
    "09 02 2000 01 01 00 80 32"  # configuration: wTotalLength 32, 1 interface, value 1, bus powered, 100 mA
    "09 04 00 00 02 08 06 50 00"  # interface 0: 2 endpoints, class 08 SCSI transparent, BOT (0x50)
    "07 05 81 02 0002 00"  # endpoint 0x81 bulk IN, 512
    "07 05 02 02 0002 00"  # endpoint 0x02 bulk OUT, 512
)


def test_setup_packet_is_little_endian_per_table_9_2() -> None:
    raw = bytes(USB_Setup(bmRequestType=0xA1, bRequest=0xFE, wValue=0x1234, wIndex=0x0002, wLength=1))
    assert raw == bytes.fromhex("a1fe341202000100")
    back = USB_Setup(raw)
    assert back.direction_in and back.request_kind == 0x20 and back.recipient == 1
    assert request_name(0xA1, 0xFE) == "GET_MAX_LUN"


def test_describe_setup_reads_standard_requests() -> None:
    assert (
        describe_setup(bytes.fromhex("8006000200002000"))
        == "GET_DESCRIPTOR CONFIGURATION index 0 (wLength 32)"
    )
    assert describe_setup(bytes.fromhex("0009010000000000")) == "SET_CONFIGURATION 1"
    assert describe_setup(bytes.fromhex("010b010000000000")) == "SET_INTERFACE 0 alt 1"
    assert describe_setup(bytes.fromhex("2122030000000000")).startswith("SET_CONTROL_LINE_STATE")


def test_configuration_answer_decodes_as_a_chain_of_descriptors() -> None:
    cfg = dissect_control_in(bytes.fromhex("8006000200002000"), MSC_CONFIG)
    assert isinstance(cfg, USB_ConfigurationDescriptor)
    assert (cfg.wTotalLength, cfg.bNumInterfaces, cfg.bmAttributes, cfg.bMaxPower) == (32, 1, 0x80, 50)
    intf = cfg[USB_InterfaceDescriptor]
    assert (intf.bInterfaceClass, intf.bInterfaceSubClass, intf.bInterfaceProtocol, intf.bNumEndpoints) == (
        8,
        6,
        0x50,
        2,
    )
    eps = [cfg.getlayer(USB_EndpointDescriptor, nb=i) for i in (1, 2)]
    assert [(e.bEndpointAddress, e.transfer_type, e.wMaxPacketSize) for e in eps] == [
        (0x81, "bulk", 512),
        (0x02, "bulk", 512),
    ]
    assert bytes(cfg) == MSC_CONFIG


def test_built_configuration_fills_blength_and_wtotallength() -> None:
    built = (
        USB_ConfigurationDescriptor()
        / USB_InterfaceDescriptor(
            bNumEndpoints=2, bInterfaceClass=8, bInterfaceSubClass=6, bInterfaceProtocol=0x50
        )
        / USB_EndpointDescriptor(bEndpointAddress=0x81)
        / USB_EndpointDescriptor(bEndpointAddress=0x02)
    )
    assert bytes(built) == MSC_CONFIG


def test_descriptor_longer_than_its_standard_size_keeps_the_extra_bytes() -> None:
    audio_ep = bytes.fromhex("09 05 01 09 c800 01 00 00")  # UAC1 endpoint: 9 bytes (bRefresh, bSynchAddress)
    ep = USB_Descriptor(audio_ep)
    assert isinstance(ep, USB_EndpointDescriptor) and ep.extra == b"\x00\x00" and ep.wMaxPacketSize == 200


def test_device_descriptor_fields_per_table_9_8() -> None:
    raw = bytes.fromhex("12 01 0002 00 00 00 40 6b1d 0401 0001 01 02 03 01")
    dev = dissect_control_in(bytes.fromhex("8006000100001200"), raw)
    assert isinstance(dev, USB_DeviceDescriptor)
    assert (dev.bcdUSB, dev.bMaxPacketSize0, dev.idVendor, dev.idProduct, dev.bcdDevice) == (
        0x200,
        64,
        0x1D6B,
        0x104,
        0x100,
    )
    assert (dev.iManufacturer, dev.iProduct, dev.iSerialNumber, dev.bNumConfigurations) == (1, 2, 3, 1)


def test_string_descriptor_zero_is_langids_and_others_are_utf16() -> None:
    zero = dissect_control_in(bytes.fromhex("8006000300000400"), bytes.fromhex("04030904"))
    assert isinstance(zero, USB_StringDescriptorZero) and zero.wLANGID == [0x0409]
    text = dissect_control_in(bytes.fromhex("8006020309040400"), b"\x0a\x03" + "vusb".encode("utf-16-le"))
    assert isinstance(text, USB_StringDescriptor) and text.text == "vusb"


def test_hid_descriptor_and_report_descriptor() -> None:
    hid = USB_Descriptor(bytes.fromhex("09 21 1101 00 01 22 3f00"))
    assert isinstance(hid, USB_HIDDescriptor)
    assert [(d.bDescriptorType, d.wDescriptorLength) for d in hid.descriptors] == [(0x22, 63)]
    report = dissect_control_in(bytes.fromhex("8106002200003f00"), bytes.fromhex("05010906a101"))
    assert isinstance(report, USB_HIDReportDescriptor) and report.items == bytes.fromhex("05010906a101")


def test_non_descriptor_control_answers_stay_bytes() -> None:
    assert isinstance(dissect_control_in(bytes.fromhex("8000000000000200"), b"\x01\x00"), Raw)  # GET_STATUS
    assert isinstance(dissect_control_in(None, MSC_CONFIG), Raw)


# --- BOT -----------------------------------------------------------------------------------------------------------


def test_cbw_is_31_bytes_little_endian_per_bot_5_1() -> None:
    cbw = BOT_CBW(
        dCBWTag=0xDEADBEEF,
        dCBWDataTransferLength=4096,
        bmCBWFlags=0x80,
        bCBWLUN=1,
        CBWCB=SCSI_Read10(logical_block_address=0x1000, transfer_length=8),
    )
    raw = bytes(cbw)
    expected = (
        struct.pack("<IIIBBB", 0x43425355, 0xDEADBEEF, 4096, 0x80, 1, 10)
        + bytes.fromhex("28 00 00001000 00 0008 00")
        + bytes(6)
    )
    assert raw == expected and len(raw) == 31
    back = BOT_CBW(raw)
    assert back.data_in and back.bCBWLUN == 1 and back.bCBWCBLength == 10
    assert isinstance(back.cdb, SCSI_Read10) and back.cdb.logical_block_address == 0x1000


def test_csw_is_13_bytes_per_bot_5_2() -> None:
    raw = bytes(BOT_CSW(dCSWTag=7, dCSWDataResidue=512, bCSWStatus=1))
    assert raw == struct.pack("<IIIB", 0x53425355, 7, 512, 1)


def test_bulk_data_is_recognised_by_signature_and_exact_length() -> None:
    cbw = bytes(BOT_CBW(CBWCB=SCSI_TestUnitReady()))
    csw = bytes(BOT_CSW())
    assert isinstance(dissect_bulk(cbw), BOT_CBW)
    assert isinstance(dissect_bulk(csw), BOT_CSW)
    assert isinstance(dissect_bulk(cbw[:30]), Raw)  # a CBW is exactly 31 bytes
    assert isinstance(dissect_bulk(b"XXXX" + cbw[4:]), Raw)
    assert isinstance(dissect_bulk(cbw + b"\0"), Raw)


# (layer, expected CDB bytes per SPC-4 / SBC-3)
CDBS: list[tuple[Packet, str]] = [
    (SCSI_TestUnitReady(), "00 00 00 00 00 00"),
    (SCSI_RequestSense(allocation_length=18), "03 00 00 00 12 00"),
    (SCSI_Inquiry(evpd=1, page_code=0x80, allocation_length=0xFF), "12 01 80 00ff 00"),
    (SCSI_ModeSense6(dbd=1, pc=0, page_code=0x3F, allocation_length=192), "1a 08 3f 00 c0 00"),
    (SCSI_ModeSense10(page_code=0x08, allocation_length=0x200), "5a 00 08 00 000000 0200 00"),
    (SCSI_StartStopUnit(loej=1, start=0), "1b 00 00 00 02 00"),
    (SCSI_PreventAllowMediumRemoval(prevent=1), "1e 00 00 00 01 00"),
    (SCSI_ReadFormatCapacities(allocation_length=0xFC), "23 00 00 00 00 00 00 00fc 00"),
    (SCSI_ReadCapacity10(), "25 00 00000000 0000 00 00"),
    (SCSI_ReadCapacity16(allocation_length=32), "9e 10 0000000000000000 00000020 00 00"),
    (SCSI_Read10(logical_block_address=0x12345678, transfer_length=0x100), "28 00 12345678 00 0100 00"),
    (SCSI_Write10(logical_block_address=1, transfer_length=2), "2a 00 00000001 00 0002 00"),
    (SCSI_Verify10(logical_block_address=3, verification_length=4), "2f 00 00000003 00 0004 00"),
    (SCSI_SynchronizeCache10(number_of_blocks=0), "35 00 00000000 00 0000 00"),
    (SCSI_Read12(logical_block_address=5, transfer_length=6), "a8 00 00000005 00000006 00 00"),
    (SCSI_Write12(logical_block_address=5, transfer_length=6), "aa 00 00000005 00000006 00 00"),
    (SCSI_Read16(logical_block_address=1 << 33, transfer_length=7), "88 00 0000000200000000 00000007 00 00"),
    (SCSI_Write16(logical_block_address=9, transfer_length=1), "8a 00 0000000000000009 00000001 00 00"),
]


@pytest.mark.parametrize(("layer", "expected"), CDBS, ids=[type(c[0]).__name__ for c in CDBS])
def test_cdb_layout_and_dispatch_on_the_opcode(layer: Packet, expected: str) -> None:
    raw = bytes.fromhex(expected)
    assert bytes(layer) == raw
    back = SCSI_CDB(raw)
    assert type(back) is type(layer)
    cbw = BOT_CBW(bytes(BOT_CBW(CBWCB=layer)))
    assert cbw.bCBWCBLength == len(raw) and type(cbw.cdb) is type(layer)


def test_unknown_opcode_is_a_generic_cdb() -> None:
    cdb = SCSI_CDB(bytes.fromhex("a0 00 00 00 00 00 00 00 10 00 00 00"))
    assert type(cdb) is SCSI_CDB and cdb.operation == "REPORT_LUNS"


def test_data_in_layers_follow_spc_and_sbc() -> None:
    inq = SCSI_InquiryData(
        bytes.fromhex("00 80 06 02 1f 00 00 00") + b"vusb    " + b"Virtual Disk    " + b"1.0 "
    )
    assert (inq.peripheral_device_type, inq.rmb, inq.version) == (0, 1, 6)
    assert inq.product_identification == b"Virtual Disk    "
    sense = SCSI_FixedSenseData(bytes.fromhex("70 00 05 00000000 0a 00000000 24 00 00 000000"))
    assert (sense.response_code, sense.sense_key, sense.additional_sense_code) == (0x70, 5, 0x24)
    rc16 = SCSI_ReadCapacity16Data(struct.pack(">QI", 0x1FFFFF, 4096) + bytes(20))
    assert (rc16.returned_logical_block_address, rc16.logical_block_length) == (0x1FFFFF, 4096)
    mode = SCSI_ModeParameterHeader6(bytes.fromhex("03 00 80 00"))
    assert mode.device_specific_parameter == 0x80
    rfc = SCSI_ReadFormatCapacitiesData(bytes.fromhex("000000 08 00001000 02 000200"))
    assert [(d.number_of_blocks, d.descriptor_type, d.block_length) for d in rfc.descriptors] == [
        (0x1000, 2, 512)
    ]
    assert scsi_data_class(0x9E, 0x10) is SCSI_ReadCapacity16Data
    assert scsi_data_class(0x28) is None
