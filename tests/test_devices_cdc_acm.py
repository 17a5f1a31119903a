"""CDC-ACM serial model: descriptors, class requests, loopback/stream/callback data paths, backpressure."""

import threading

import pytest

from emulator.devices.base import STALL, Device, Reply, TransferStatus
from emulator.devices.cdc_acm import (
    CdcAcmError,
    CdcAcmFunction,
    CdcRequest,
    LineCoding,
    SerialState,
    cdc_acm_device,
)
from emulator.devices.hid import Keyboard
from emulator.usb import setup as ch9
from emulator.usb.descriptors import (
    CdcAcmDescriptor,
    CdcCallManagementDescriptor,
    CdcHeaderDescriptor,
    CdcUnionDescriptor,
    parse_configuration,
    parse_string,
)
from emulator.usb.setup import ClassCode, DescriptorType, SetupPacket, Speed

NOTIFY, BULK_IN, BULK_OUT = 0x81, 0x82, 0x01

# What the kernel's f_acm high-speed descriptors (acm_hs_function) look like with this device's string
# indices and endpoint numbers; ACM bmCapabilities is 0x06 here because SEND_BREAK is supported too.
EXPECTED_HS_CONFIG = bytes.fromhex("""
09 02 4b 00 02 01 00 80 32
08 0b 00 02 02 02 01 04
09 04 00 00 01 02 02 01 05
05 24 00 10 01
05 24 01 00 01
04 24 02 06
05 24 06 00 01
07 05 81 03 0a 00 09
09 04 01 00 02 0a 00 00 06
07 05 82 02 00 02 00
07 05 01 02 00 02 00
""")


def acm(**kwargs):
    function = CdcAcmFunction(**kwargs)
    device = cdc_acm_device(function)
    device.control(ch9.set_configuration(1))
    return device, function


def class_out(request, value=0, length=0, interface=0):
    return SetupPacket(0x21, request, value, interface, length)


def class_in(request, value=0, length=7, interface=0):
    return SetupPacket(0xA1, request, value, interface, length)


def test_configuration_matches_the_kernel_f_acm_layout_byte_for_byte():
    device = cdc_acm_device()
    raw = device.control(ch9.get_descriptor(DescriptorType.CONFIGURATION, length=0xFF)).data
    assert raw == EXPECTED_HS_CONFIG
    config = parse_configuration(raw)
    control, data = config.interfaces
    assert control.alternates[0].descriptors == (
        CdcHeaderDescriptor(bcd_cdc=0x0110), CdcCallManagementDescriptor(capabilities=0, data_interface=1),
        CdcAcmDescriptor(capabilities=0x06), CdcUnionDescriptor(control_interface=0, subordinate_interfaces=(1,)))
    iad = control.association
    strings = {i: parse_string(device.control(ch9.get_descriptor(DescriptorType.STRING, i)).data, i).string
               for i in (iad.i_function, control.alternates[0].descriptor.i_interface,
                         data.alternates[0].descriptor.i_interface)}
    assert list(strings.values()) == ["CDC Serial", "CDC Abstract Control Model (ACM)", "CDC ACM Data"]


def test_cdc_acm_device_defaults_are_a_high_speed_misc_class_device_with_test_ids():
    device = cdc_acm_device()
    d = device.device_descriptor
    assert (d.id_vendor, d.id_product, device.speed) == (0x1209, 0x0003, Speed.HIGH)
    assert (d.device_class, d.device_subclass, d.device_protocol) == (ClassCode.MISC, 2, 1)
    summary = device.summary()
    assert [(i.interface_class, i.interface_subclass, i.interface_protocol) for i in summary.interfaces] == [
        (2, 2, 1), (0x0A, 0, 0)]


def test_full_speed_acm_uses_64_byte_bulk_and_a_32_frame_notify_interval():
    device = cdc_acm_device(speed=Speed.FULL)
    config = parse_configuration(device.configuration.to_bytes())
    endpoints = [e.descriptor for i in config.interfaces for e in i.alternates[0].endpoints]
    assert [(e.max_packet_size, e.interval) for e in endpoints] == [(10, 32), (64, 0), (64, 0)]


def test_loopback_returns_host_writes_on_bulk_in_and_wakes_the_edge():
    device, _ = acm()
    woken = []
    device.set_wakeup(lambda: woken.append(1))
    assert device.transfer(BULK_IN, None, 512) is None
    assert device.transfer(BULK_OUT, b"hello", 5) == Reply(actual_length=5)
    assert woken == [1]
    assert device.transfer(BULK_IN, None, 2) == Reply(data=b"he")
    assert device.transfer(BULK_IN, None, 512) == Reply(data=b"llo")
    assert device.transfer(BULK_IN, None, 512) is None


def test_python_write_goes_to_bulk_in():
    device, function = acm(loopback=False)
    assert function.write(b"AT\r\n") == 4
    assert device.transfer(BULK_IN, None, 512).data == b"AT\r\n"


def test_stream_mode_read_returns_what_the_host_wrote_and_times_out_empty():
    device, function = acm(loopback=False)
    assert function.read(timeout=0) == b""
    device.transfer(BULK_OUT, b"abc", 3)
    device.transfer(BULK_OUT, b"def", 3)
    assert function.read(4) == b"abcd"
    assert function.read() == b"ef"
    assert device.transfer(BULK_IN, None, 512) is None  # no loopback


def test_blocking_read_wakes_when_the_host_writes_from_another_thread():
    device, function = acm(loopback=False)
    got = []
    reader = threading.Thread(target=lambda: got.append(function.read(timeout=5)))
    reader.start()
    device.transfer(BULK_OUT, b"ping", 4)
    reader.join(5)
    assert got == [b"ping"]


def test_callback_mode_hands_host_bytes_to_the_callback_and_read_is_refused():
    seen = []
    device, function = acm(on_receive=seen.append)
    device.transfer(BULK_OUT, b"xyz", 3)
    assert seen == [b"xyz"]
    assert device.transfer(BULK_IN, None, 512) is None
    with pytest.raises(CdcAcmError, match="stream mode"):
        function.read()
    with pytest.raises(CdcAcmError, match="stream mode"):
        CdcAcmFunction().read()


def test_full_loopback_buffer_naks_bulk_out_until_bulk_in_drains_it():
    device, _ = acm(buffer_size=4)
    woken = []
    device.set_wakeup(lambda: woken.append(1))
    assert device.transfer(BULK_OUT, b"abc", 3).status is TransferStatus.OK
    woken.clear()
    assert device.transfer(BULK_OUT, b"de", 2) is None  # NAK: no room
    assert device.transfer(BULK_IN, None, 512).data == b"abc"
    assert woken == [1]  # room again: the edge retries the OUT
    assert device.transfer(BULK_OUT, b"de", 2) == Reply(actual_length=2)


def test_full_stream_buffer_naks_until_read_makes_room():
    device, function = acm(loopback=False, buffer_size=3)
    woken = []
    device.set_wakeup(lambda: woken.append(1))
    device.transfer(BULK_OUT, b"123", 3)
    assert device.transfer(BULK_OUT, b"4", 1) is None
    assert function.read(1) == b"1"
    assert woken == [1]
    assert device.transfer(BULK_OUT, b"4", 1).status is TransferStatus.OK
    assert function.read() == b"234"


def test_write_takes_only_what_fits():
    _, function = acm(loopback=False, buffer_size=4)
    assert function.write(b"123456") == 4
    assert function.write(b"7") == 0


def test_line_coding_defaults_to_9600_8n1_and_set_line_coding_is_read_back():
    device, function = acm()
    assert device.control(class_in(CdcRequest.GET_LINE_CODING)).data == bytes.fromhex("80250000000008")
    coding = LineCoding(115200, 2, 2, 7)
    assert device.control(class_out(CdcRequest.SET_LINE_CODING, 0, 7), coding.to_bytes()).status is \
        TransferStatus.OK
    assert function.line_coding == coding
    assert device.control(class_in(CdcRequest.GET_LINE_CODING)).data == bytes.fromhex("00c20100020207")


@pytest.mark.parametrize("payload", [bytes.fromhex("00c201000000"), bytes.fromhex("00c20100000009"),
                                     bytes.fromhex("00c20100030008"), bytes.fromhex("00c20100000508")])
def test_malformed_line_coding_stalls_and_keeps_the_old_one(payload):
    device, function = acm()
    assert device.control(class_out(CdcRequest.SET_LINE_CODING, 0, len(payload)), payload) == STALL
    assert function.line_coding == LineCoding()


def test_control_line_state_sets_dtr_and_rts():
    device, function = acm()
    assert device.control(class_out(CdcRequest.SET_CONTROL_LINE_STATE, 0x03)).status is TransferStatus.OK
    assert function.dtr and function.rts
    device.control(class_out(CdcRequest.SET_CONTROL_LINE_STATE, 0x01))
    assert function.dtr and not function.rts


def test_send_break_records_its_duration():
    device, function = acm()
    assert device.control(class_out(CdcRequest.SEND_BREAK, 250)).status is TransferStatus.OK
    device.control(class_out(CdcRequest.SEND_BREAK, 0xFFFF))
    assert (function.break_duration, function.breaks_sent) == (0xFFFF, 2)


@pytest.mark.parametrize(
    ("setup", "data"),
    [
        (class_out(CdcRequest.SEND_ENCAPSULATED_COMMAND, 0, 4), b"AT\r\n"),
        (class_in(CdcRequest.GET_ENCAPSULATED_RESPONSE, 0, 64), b""),
        (class_in(CdcRequest.GET_LINE_CODING, interface=1), b""),  # the data interface has no requests
        (class_out(CdcRequest.SET_CONTROL_LINE_STATE, 3, 0, interface=1), b""),
        (class_out(0x7F), b""),
        (SetupPacket(0x41, CdcRequest.SET_CONTROL_LINE_STATE, 3, 0, 0), b""),  # vendor, not class
    ],
)
def test_unsupported_or_misaddressed_requests_stall(setup, data):
    device, _ = acm()
    assert device.control(setup, data) == STALL


def test_serial_state_notification_is_queued_on_the_interrupt_endpoint():
    device, function = acm()
    assert device.transfer(NOTIFY, None, 10) is None
    function.notify_serial_state(SerialState.DCD | SerialState.DSR)
    assert device.transfer(NOTIFY, None, 10).data == bytes.fromhex("a1200000000002000300")
    assert device.transfer(NOTIFY, None, 10) is None
    with pytest.raises(CdcAcmError):
        function.notify_serial_state(0x10000)


def test_reset_drops_in_flight_bytes_and_line_settings():
    device, function = acm()
    device.transfer(BULK_OUT, b"pending", 7)
    device.control(class_out(CdcRequest.SET_CONTROL_LINE_STATE, 1))
    device.reset()
    device.control(ch9.set_configuration(1))
    assert device.transfer(BULK_IN, None, 512) is None
    assert not function.dtr and function.line_coding == LineCoding()


def test_line_coding_rejects_bad_fields():
    with pytest.raises(CdcAcmError, match="bDataBits"):
        LineCoding(data_bits=9)
    with pytest.raises(CdcAcmError, match="7 bytes"):
        LineCoding.from_bytes(b"\x00")


def test_acm_composes_with_a_keyboard_and_names_its_own_interface_numbers():
    keyboard, serial = Keyboard(), CdcAcmFunction()
    device = Device([keyboard, serial], id_vendor=0x1209, id_product=0x0004, speed=Speed.FULL)
    config = parse_configuration(device.configuration.to_bytes())
    assert [i.number for i in config.interfaces] == [0, 1, 2]
    control = config.interface(1)
    assert control.association.first_interface == 1 and control.association.interface_count == 2
    union = control.alternates[0].descriptors[3]
    assert union == CdcUnionDescriptor(control_interface=1, subordinate_interfaces=(2,))
    assert control.alternates[0].descriptors[1].data_interface == 2
    device.control(ch9.set_configuration(1))
    assert device.control(class_in(CdcRequest.GET_LINE_CODING, interface=1)).data[:4] == bytes.fromhex(
        "80250000")
    assert device.control(class_in(CdcRequest.GET_LINE_CODING, interface=0)) == STALL  # the keyboard's
    device.transfer(serial.endpoint_address("out"), b"ok", 2)
    assert device.transfer(serial.endpoint_address("in"), None, 64).data == b"ok"
