"""captures.layers.usbmon: struct usbmon_packet as LINKTYPE_USB_LINUX (189) and _MMAPPED (220).

Records are written by captures.synth (plain struct, following Documentation/usb/usbmon.rst) and read back
through scapy's rdpcap, which must pick these layers from the link type alone.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from scapy.packet import Raw
from scapy.utils import rdpcap

from captures import synth
from captures.layers import read_packets
from captures.layers.bot_scsi import BOT_CBW, BOT_CSW, SCSI_ReadCapacity10Data
from captures.layers.usb import USB_ConfigurationDescriptor, USB_EndpointDescriptor, USB_Setup
from captures.layers.usbmon import (
    URB_COMPLETE,
    URB_SUBMIT,
    XFER_BULK,
    XFER_CONTROL,
    XFER_ISO,
    USBmon,
    USBmon_IsoDescriptor,
    USBmonMmapped,
    reset_state,
)
from captures.reader import LINKTYPE_USB_LINUX, LINKTYPE_USB_LINUX_MMAPPED

SETUP_GET_CONFIG = bytes.fromhex("8006000200002000")
CONFIG = bytes(
    USB_ConfigurationDescriptor()
    / USB_EndpointDescriptor(bEndpointAddress=0x81)
    / USB_EndpointDescriptor(bEndpointAddress=0x02)
)


def _write(path: Path, records: list[bytes], mmapped: bool) -> Path:
    linktype = LINKTYPE_USB_LINUX_MMAPPED if mmapped else LINKTYPE_USB_LINUX
    path.write_bytes(synth.pcap([(1.0 + i, r) for i, r in enumerate(records)], linktype))
    return path


@pytest.mark.parametrize("mmapped", [False, True])
def test_rdpcap_yields_usbmon_layers_with_every_header_field(tmp_path: Path, mmapped: bool) -> None:
    rec = synth.usbmon_record(
        urb_id=0xFFFF8880DEADBEEF, event="C", xfer_type=XFER_BULK, epnum=0x81, devnum=5, busnum=3,
        ts=1700000000.123456, status=-32, length=512, data=b"\xaa" * 16, mmapped=mmapped, interval=0,
        start_frame=0, xfer_flags=0x201,
    )  # fmt: skip
    (pkt,) = rdpcap(str(_write(tmp_path / "r.pcap", [rec], mmapped)))
    assert type(pkt) is (USBmonMmapped if mmapped else USBmon)
    assert (pkt.id, pkt.type, pkt.xfer_type, pkt.epnum, pkt.devnum, pkt.busnum) == (
        0xFFFF8880DEADBEEF, URB_COMPLETE, XFER_BULK, 0x81, 5, 3,
    )  # fmt: skip
    assert (pkt.flag_setup, pkt.flag_data) == (ord("-"), 0)
    assert (pkt.ts_sec, pkt.ts_usec, pkt.status, pkt.length, pkt.len_cap) == (
        1700000000,
        123456,
        -32,
        512,
        16,
    )
    assert pkt.setup is None and pkt.s == bytes(8)
    assert bytes(pkt.payload) == b"\xaa" * 16
    if mmapped:
        assert (pkt.interval, pkt.start_frame, pkt.xfer_flags, pkt.ndesc) == (0, 0, 0x201, 0)
    assert bytes(pkt) == rec


@pytest.mark.parametrize("mmapped", [False, True])
def test_setup_union_holds_the_setup_packet_when_flag_setup_is_zero(tmp_path: Path, mmapped: bool) -> None:
    rec = synth.usbmon_record(
        urb_id=1, event="S", xfer_type=XFER_CONTROL, epnum=0x80, devnum=2, length=32, setup=SETUP_GET_CONFIG,
        status=-115, mmapped=mmapped,
    )  # fmt: skip
    (pkt,) = rdpcap(str(_write(tmp_path / "s.pcap", [rec], mmapped)))
    assert pkt.flag_setup == 0 and pkt.flag_data == ord("<")
    assert isinstance(pkt.setup, USB_Setup)
    assert (pkt.setup.bmRequestType, pkt.setup.bRequest, pkt.setup.wValue, pkt.setup.wLength) == (
        0x80,
        6,
        0x200,
        32,
    )


def test_iso_union_and_mmapped_iso_descriptors_come_before_the_data(tmp_path: Path) -> None:
    rec = synth.usbmon_record(
        urb_id=2, event="C", xfer_type=XFER_ISO, epnum=0x83, devnum=2, length=6, data=b"abcdef", mmapped=True,
        iso_descriptors=[(0, 0, 3), (-18, 3, 3)], error_count=1, interval=1, start_frame=77,
    )  # fmt: skip
    (pkt,) = rdpcap(str(_write(tmp_path / "i.pcap", [rec], True)))
    assert (pkt.error_count, pkt.numdesc, pkt.ndesc, pkt.start_frame) == (1, 2, 2, 77)
    assert [(d.iso_status, d.iso_off, d.iso_len) for d in pkt.iso_descriptors] == [(0, 0, 3), (-18, 3, 3)]
    assert bytes(pkt.payload) == b"abcdef"


def test_building_a_record_with_scapy_matches_the_struct_layout() -> None:
    built = bytes(
        USBmonMmapped(
            id=7, type=URB_SUBMIT, xfer_type=XFER_ISO, epnum=0x01, devnum=4, busnum=2, flag_data=0, ts_sec=10,
            ts_usec=20, status=-115, length=4, error_count=0, numdesc=1, interval=1, start_frame=5,
            iso_descriptors=[USBmon_IsoDescriptor(iso_status=0, iso_off=0, iso_len=4)],
        )
        / b"wxyz"
    )  # fmt: skip
    expected = synth.usbmon_record(
        urb_id=7, event="S", xfer_type=XFER_ISO, epnum=0x01, devnum=4, busnum=2, ts=10.00002, status=-115,
        length=4, data=b"wxyz", mmapped=True, iso_descriptors=[(0, 0, 4)], interval=1, start_frame=5,
    )  # fmt: skip
    assert built == expected
    assert struct.unpack_from("<I", built, 36) == (4,)  # len_cap counts data only, not the descriptors


def test_control_completion_is_decoded_with_the_setup_of_its_submission(tmp_path: Path) -> None:
    records = [
        synth.usbmon_record(urb_id=9, event="S", xfer_type=XFER_CONTROL, epnum=0x80, devnum=2, length=32,
                            setup=SETUP_GET_CONFIG, status=-115),
        synth.usbmon_record(urb_id=9, event="C", xfer_type=XFER_CONTROL, epnum=0x80, devnum=2, data=CONFIG),
    ]  # fmt: skip
    pkts = read_packets(_write(tmp_path / "c.pcap", records, False))
    assert pkts[1][USB_ConfigurationDescriptor].wTotalLength == len(CONFIG)
    assert [e.bEndpointAddress for e in pkts[1].getlayer(USB_EndpointDescriptor, nb=1).iterpayloads()
            if isinstance(e, USB_EndpointDescriptor)] == [0x81, 0x02]  # fmt: skip
    # without the submission the data stays bytes: a completion alone does not say what was asked
    reset_state()
    (alone,) = rdpcap(str(_write(tmp_path / "d.pcap", records[1:], False)))
    assert isinstance(alone.payload, Raw)


def test_bulk_records_carry_cbw_then_scsi_data_then_csw(tmp_path: Path) -> None:
    cbw = bytes(
        BOT_CBW(dCBWTag=3, dCBWDataTransferLength=8, bmCBWFlags=0x80, CBWCB=bytes.fromhex("25" + "00" * 9))
    )
    records = [
        synth.usbmon_record(urb_id=1, event="S", xfer_type=XFER_BULK, epnum=0x02, devnum=2, data=cbw, status=-115),
        synth.usbmon_record(urb_id=1, event="C", xfer_type=XFER_BULK, epnum=0x02, devnum=2, length=31),
        synth.usbmon_record(urb_id=2, event="S", xfer_type=XFER_BULK, epnum=0x81, devnum=2, length=8, status=-115),
        synth.usbmon_record(urb_id=2, event="C", xfer_type=XFER_BULK, epnum=0x81, devnum=2,
                            data=struct.pack(">II", 2047, 512)),
        synth.usbmon_record(urb_id=3, event="S", xfer_type=XFER_BULK, epnum=0x81, devnum=2, length=13, status=-115),
        synth.usbmon_record(urb_id=3, event="C", xfer_type=XFER_BULK, epnum=0x81, devnum=2,
                            data=bytes(BOT_CSW(dCSWTag=3))),
    ]  # fmt: skip
    pkts = read_packets(_write(tmp_path / "b.pcap", records, False))
    assert pkts[0][BOT_CBW].cdb.operation == "READ_CAPACITY_10"
    data = pkts[3][SCSI_ReadCapacity10Data]
    assert (data.returned_logical_block_address, data.logical_block_length) == (2047, 512)
    assert pkts[5][BOT_CSW].dCSWTag == 3


def test_truncated_data_is_what_len_cap_says(tmp_path: Path) -> None:
    rec = synth.usbmon_record(urb_id=4, event="C", xfer_type=XFER_BULK, epnum=0x81, devnum=2, length=4096,
                              data=b"\x11" * 32)  # fmt: skip
    (pkt,) = rdpcap(str(_write(tmp_path / "t.pcap", [rec], False)))
    assert (pkt.length, pkt.len_cap, len(bytes(pkt.payload))) == (4096, 32, 32)
