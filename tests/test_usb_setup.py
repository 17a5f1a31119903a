"""SETUP packets: wire layout, field views, standard-request builders, bad input."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emulator.errors import VusbError
from emulator.usb import setup as ch9
from emulator.usb.errors import SetupError
from emulator.usb.setup import (
    DescriptorType,
    Direction,
    FeatureSelector,
    Recipient,
    RequestType,
    SetupPacket,
    StandardRequest,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)


@given(u8, u8, u16, u16, u16)
def test_setup_packet_round_trips_through_its_8_wire_bytes(rt, req, value, index, length):
    packet = SetupPacket(rt, req, value, index, length)
    raw = packet.to_bytes()
    assert len(raw) == 8
    assert SetupPacket.from_bytes(raw) == packet


def test_get_descriptor_device_matches_the_bytes_every_host_sends_first():
    # Linux's hub_port_init asks for the device descriptor: 80 06 00 01 00 00 40 00
    packet = ch9.get_descriptor(DescriptorType.DEVICE, length=64)
    assert packet.to_bytes() == bytes.fromhex("8006000100004000")
    assert packet.direction is Direction.IN
    assert packet.type is RequestType.STANDARD
    assert packet.recipient is Recipient.DEVICE
    assert packet.descriptor_type == DescriptorType.DEVICE and packet.descriptor_index == 0


def test_fields_are_little_endian_on_the_wire():
    packet = SetupPacket.from_bytes(bytes.fromhex("a1 01 00 01 02 00 08 00"))
    assert (packet.request_type, packet.request, packet.value, packet.index, packet.length) == (
        0xA1, 0x01, 0x0100, 0x0002, 0x0008)
    assert packet.type is RequestType.CLASS and packet.recipient is Recipient.INTERFACE and packet.is_in


def test_reserved_recipient_codes_come_back_as_raw_integers():
    assert SetupPacket(0x1F, 0).recipient == 0x1F
    assert SetupPacket(0x03, 0).recipient is Recipient.OTHER


@pytest.mark.parametrize(
    ("packet", "wire"),
    [
        (ch9.get_status(), "8000000000000200"),
        (ch9.get_status(Recipient.ENDPOINT, 0x81), "8200000081000200"),
        (ch9.clear_halt(0x02), "0201000002000000"),
        (ch9.set_feature(FeatureSelector.DEVICE_REMOTE_WAKEUP), "0003010000000000"),
        (ch9.set_address(5), "0005050000000000"),
        (ch9.get_descriptor(DescriptorType.STRING, 2, 255, 0x0409), "80060203 0904ff00"),
        (ch9.get_descriptor(DescriptorType.REPORT, 0, 63, 0, Recipient.INTERFACE), "8106002200003f00"),
        (ch9.set_descriptor(DescriptorType.STRING, 1, 10), "0007010300000a00"),
        (ch9.get_configuration(), "8008000000000100"),
        (ch9.set_configuration(1), "0009010000000000"),
        (ch9.get_interface(1), "810a000001000100"),
        (ch9.set_interface(1, 2), "010b020001000000"),
        (ch9.synch_frame(0x83), "820c000083000200"),
    ],
)
def test_standard_request_builders_produce_chapter9_bytes(packet, wire):
    assert packet.to_bytes() == bytes.fromhex(wire)


def test_standard_request_codes_carry_their_chapter9_values():
    assert [StandardRequest[n] for n in ("GET_STATUS", "CLEAR_FEATURE", "SET_FEATURE", "SET_ADDRESS",
                                         "GET_DESCRIPTOR", "SET_DESCRIPTOR", "GET_CONFIGURATION",
                                         "SET_CONFIGURATION", "GET_INTERFACE", "SET_INTERFACE",
                                         "SYNCH_FRAME")] == [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12]
    assert DescriptorType.BOS == 0x0F and DescriptorType.SS_ENDPOINT_COMPANION == 0x30
    assert DescriptorType.INTERFACE_ASSOCIATION == 0x0B and DescriptorType.CS_INTERFACE == 0x24


@pytest.mark.parametrize("size", [0, 7, 9, 64])
def test_from_bytes_rejects_anything_but_8_bytes(size):
    with pytest.raises(SetupError, match="8 bytes"):
        SetupPacket.from_bytes(bytes(size))


@pytest.mark.parametrize(
    "kwargs",
    [dict(request_type=256, request=0), dict(request_type=0, request=-1),
     dict(request_type=0, request=0, value=0x10000), dict(request_type=0, request=0, length=-5),
     dict(request_type=0, request=0, index="1")],
)
def test_out_of_range_fields_raise_setup_error_which_is_a_vusb_error(kwargs):
    with pytest.raises(SetupError) as info:
        SetupPacket(**kwargs)
    assert isinstance(info.value, VusbError)


def test_get_descriptor_rejects_a_type_wider_than_one_byte():
    with pytest.raises(SetupError):
        ch9.get_descriptor(0x100)


def test_str_names_standard_requests_and_labels_class_ones():
    assert str(ch9.set_configuration(1)).startswith("SET_CONFIGURATION(")
    assert str(SetupPacket(0x21, 0x20, 0, 0, 7)).startswith("CLASS#0x20(")
