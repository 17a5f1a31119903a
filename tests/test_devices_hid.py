"""HID keyboard and mouse models: descriptors, class requests, report queueing, typing, idle repeats."""

import threading

import pytest

from emulator.devices.base import STALL, Reply, TransferStatus
from emulator.devices.hid import (
    KEYBOARD_REPORT_DESCRIPTOR,
    MOUSE_REPORT_DESCRIPTOR,
    US_LAYOUT,
    HidError,
    HidProtocol,
    HidRequest,
    Key,
    Keyboard,
    Led,
    Modifier,
    Mouse,
    MouseButton,
    ReportType,
    hid_keyboard_device,
    hid_mouse_device,
)
from emulator.usb import setup as ch9
from emulator.usb.descriptors import HidDescriptor, parse_configuration
from emulator.usb.setup import DescriptorType, Recipient, SetupPacket, Speed, TransferType

# HID 1.11 appendix E.6 "Report Descriptor (Keyboard)" and E.10 "Report Descriptor (Mouse)", byte for byte.
APPENDIX_E6 = bytes.fromhex(
    "05010906a101050719e029e71500250175019508810295017508810195057501050819012905910295017503"
    "9101950675081500256505071900296581 00c0".replace(" ", ""))
APPENDIX_E10 = bytes.fromhex(
    "05010902a1010901a100050919012903150025019503750181029501750581010501093009311581257f"
    "750895028106c0c0")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def keyboard_device(**kwargs):
    keyboard = Keyboard(**kwargs)
    device = hid_keyboard_device(keyboard)
    device.control(ch9.set_configuration(1))
    return device, keyboard


def drain(device, endpoint=0x81, length=8):
    reports = []
    while (reply := device.transfer(endpoint, None, length)) is not None:
        reports.append(reply.data)
    return reports


def class_in(request, value=0, length=8, interface=0):
    return SetupPacket(0xA1, request, value, interface, length)


def class_out(request, value=0, length=0, interface=0):
    return SetupPacket(0x21, request, value, interface, length)


def test_report_descriptors_are_the_hid_spec_appendix_bytes():
    assert KEYBOARD_REPORT_DESCRIPTOR == APPENDIX_E6 and len(APPENDIX_E6) == 63
    assert MOUSE_REPORT_DESCRIPTOR == APPENDIX_E10 and len(APPENDIX_E10) == 50


def test_keyboard_device_describes_a_boot_keyboard_with_hid_descriptor_and_interrupt_endpoints():
    device = hid_keyboard_device()
    assert (device.device_descriptor.id_vendor, device.device_descriptor.id_product) == (0x1209, 0x0001)
    assert device.speed is Speed.FULL
    config = parse_configuration(device.control(ch9.get_descriptor(DescriptorType.CONFIGURATION,
                                                                   length=255)).data)
    assert config.descriptor.remote_wakeup
    alt = config.interfaces[0].alternates[0]
    assert (alt.descriptor.interface_class, alt.descriptor.interface_subclass,
            alt.descriptor.interface_protocol) == (3, 1, 1)
    assert alt.descriptors == (HidDescriptor(bcd_hid=0x0111, descriptors=((DescriptorType.REPORT, 63),)),)
    assert [(e.address, e.descriptor.transfer_type, e.descriptor.max_packet_size, e.descriptor.interval)
            for e in alt.endpoints] == [(0x81, TransferType.INTERRUPT, 8, 10), (0x01, TransferType.INTERRUPT, 8, 10)]


def test_report_and_hid_descriptors_are_served_to_the_interface_once_configured():
    device = hid_keyboard_device()
    report = ch9.get_descriptor(DescriptorType.REPORT, 0, 63, 0, Recipient.INTERFACE)
    assert device.control(report) == STALL  # unconfigured
    device.control(ch9.set_configuration(1))
    assert device.control(report).data == KEYBOARD_REPORT_DESCRIPTOR
    hid = device.control(ch9.get_descriptor(DescriptorType.HID, 0, 9, 0, Recipient.INTERFACE)).data
    assert HidDescriptor.from_bytes(hid).class_descriptor_length(DescriptorType.REPORT) == 63
    assert device.control(ch9.get_descriptor(DescriptorType.REPORT, 0, 63, 1, Recipient.INTERFACE)) == STALL
    assert device.control(ch9.get_descriptor(DescriptorType.PHYSICAL, 0, 63, 0, Recipient.INTERFACE)) == STALL


def test_type_text_queues_key_down_and_key_up_per_character_with_shift():
    device, keyboard = keyboard_device()
    keyboard.type_text("hI!\n")
    shift = Modifier.LEFT_SHIFT
    up = bytes(8)
    assert drain(device) == [
        bytes([0, 0, 0x0B, 0, 0, 0, 0, 0]), up,  # h
        bytes([shift, 0, 0x0C, 0, 0, 0, 0, 0]), up,  # I
        bytes([shift, 0, 0x1E, 0, 0, 0, 0, 0]), up,  # ! = shift 1
        bytes([0, 0, Key.ENTER, 0, 0, 0, 0, 0]), up,
    ]


def test_repeated_letters_are_released_between_presses():
    device, keyboard = keyboard_device()
    keyboard.type_text("oo")
    reports = drain(device)
    assert reports[0] == reports[2] and reports[1] == reports[3] == bytes(8)


def test_interrupt_in_naks_until_a_report_is_queued_and_queueing_wakes_the_edge():
    device, keyboard = keyboard_device()
    keyboard.idle_rate = 0
    woken = []
    device.set_wakeup(lambda: woken.append(1))
    assert device.transfer(0x81, None, 8) is None
    keyboard.press([0x04], Modifier.LEFT_CTRL)
    assert woken == [1]
    assert device.transfer(0x81, None, 8) == Reply(data=bytes([1, 0, 4, 0, 0, 0, 0, 0]))
    assert device.transfer(0x81, None, 8) == Reply(data=bytes(8))
    assert device.transfer(0x81, None, 8) is None


def test_press_without_release_holds_the_keys_until_release():
    device, keyboard = keyboard_device()
    keyboard.press([0x04, 0x05], release=False)
    assert drain(device) == [bytes([0, 0, 4, 5, 0, 0, 0, 0])]
    assert device.control(class_in(HidRequest.GET_REPORT, ReportType.INPUT << 8)).data == bytes(
        [0, 0, 4, 5, 0, 0, 0, 0])
    keyboard.release()
    assert drain(device) == [bytes(8)]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda k: k.type_text("ok\N{SNOWMAN}"), "no key for '☃'"),
        (lambda k: k.press(range(4, 11)), "holds 6 keys"),
        (lambda k: k.press([0xE1]), "is a modifier"),
        (lambda k: k.press([0x66]), "outside this keyboard's range"),
        (lambda k: k.press([4], 0x100), "do not fit"),
        (lambda k: k.queue_reports([b"\x00" * 7]), "7 bytes"),
    ],
)
def test_keyboard_misuse_raises_hid_error_and_queues_nothing(call, message):
    keyboard = Keyboard()
    with pytest.raises(HidError, match=message):
        call(keyboard)
    assert keyboard.pending == 0


def test_set_report_output_sets_the_leds_and_calls_back():
    seen = []
    device, keyboard = keyboard_device(on_leds=seen.append)
    setup = class_out(HidRequest.SET_REPORT, ReportType.OUTPUT << 8, 1)
    assert device.control(setup, bytes([Led.CAPS_LOCK | Led.NUM_LOCK])).status is TransferStatus.OK
    assert keyboard.leds == Led.CAPS_LOCK | Led.NUM_LOCK and seen == [Led.CAPS_LOCK | Led.NUM_LOCK]
    assert device.control(class_in(HidRequest.GET_REPORT, ReportType.OUTPUT << 8, 1)).data == b"\x03"
    assert device.control(class_out(HidRequest.SET_REPORT, ReportType.OUTPUT << 8, 2), b"\x01\x02") == STALL
    assert device.control(class_out(HidRequest.SET_REPORT, ReportType.FEATURE << 8, 1), b"\x01") == STALL


def test_interrupt_out_sets_the_leds_and_a_wrong_length_stalls():
    seen = []
    device, keyboard = keyboard_device(on_leds=seen.append)
    assert device.transfer(0x01, bytes([Led.SCROLL_LOCK]), 1) == Reply(actual_length=1)
    assert keyboard.leds == Led.SCROLL_LOCK and seen == [Led.SCROLL_LOCK]
    device.transfer(0x01, bytes([Led.SCROLL_LOCK]), 1)
    assert seen == [Led.SCROLL_LOCK]  # unchanged LEDs do not call back again
    assert device.transfer(0x01, b"\x01\x02", 2) == STALL


def test_get_report_input_is_the_current_state_and_feature_reports_stall():
    device, _ = keyboard_device()
    assert device.control(class_in(HidRequest.GET_REPORT, ReportType.INPUT << 8)).data == bytes(8)
    assert device.control(class_in(HidRequest.GET_REPORT, ReportType.FEATURE << 8)) == STALL
    assert device.control(class_in(HidRequest.GET_REPORT, (ReportType.INPUT << 8) | 1)) == STALL  # ID 1


def test_idle_rate_defaults_to_500ms_and_set_idle_changes_it():
    device, _ = keyboard_device()
    assert device.control(class_in(HidRequest.GET_IDLE, 0, 1)).data == bytes([125])
    assert device.control(class_out(HidRequest.SET_IDLE, 0)).status is TransferStatus.OK
    assert device.control(class_in(HidRequest.GET_IDLE, 0, 1)).data == b"\x00"


def test_idle_rate_repeats_the_current_report_once_the_period_has_passed():
    clock = Clock()
    device, keyboard = keyboard_device(clock=clock)
    device.control(class_out(HidRequest.SET_IDLE, 25 << 8))  # 25 * 4 ms = 100 ms
    keyboard.press([0x04], release=False)
    assert device.transfer(0x81, None, 8).data[2] == 0x04
    clock.now += 0.05
    assert device.transfer(0x81, None, 8) is None
    clock.now += 0.05
    assert device.transfer(0x81, None, 8).data[2] == 0x04  # the same state again
    assert device.transfer(0x81, None, 8) is None
    device.control(class_out(HidRequest.SET_IDLE, 0))
    clock.now += 10
    assert device.transfer(0x81, None, 8) is None  # idle 0: only on change


def test_protocol_starts_as_report_switches_to_boot_and_resets():
    device, _ = keyboard_device()
    assert device.control(class_in(HidRequest.GET_PROTOCOL, 0, 1)).data == bytes([HidProtocol.REPORT])
    assert device.control(class_out(HidRequest.SET_PROTOCOL, HidProtocol.BOOT)).status is TransferStatus.OK
    assert device.control(class_in(HidRequest.GET_PROTOCOL, 0, 1)).data == bytes([HidProtocol.BOOT])
    assert device.control(class_out(HidRequest.SET_PROTOCOL, 2)) == STALL
    device.reset()
    device.control(ch9.set_configuration(1))
    assert device.control(class_in(HidRequest.GET_PROTOCOL, 0, 1)).data == bytes([HidProtocol.REPORT])


@pytest.mark.parametrize(
    "setup",
    [class_in(0x07), class_out(0x07), class_in(HidRequest.GET_IDLE, 1, 1),
     class_in(HidRequest.GET_REPORT, ReportType.INPUT << 8, 8, interface=1),
     SetupPacket(0xC1, HidRequest.GET_REPORT, ReportType.INPUT << 8, 0, 8)],  # vendor, not class
)
def test_unknown_or_misaddressed_hid_requests_stall(setup):
    device, _ = keyboard_device()
    assert device.control(setup) == STALL


def test_reports_queued_from_many_threads_all_arrive_with_each_character_intact():
    device, keyboard = keyboard_device()
    keyboard.idle_rate = 0
    texts = ["abc", "xyz", "123", "QWE"]
    threads = [threading.Thread(target=keyboard.type_text, args=(t * 5,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reports = drain(device)
    assert len(reports) == 2 * 3 * 5 * len(texts)
    assert all(r == bytes(8) for r in reports[1::2])  # every key-down is followed by its key-up
    typed = sorted(r[2] for r in reports[0::2])
    assert typed == sorted(US_LAYOUT[c][0] for t in texts for c in t * 5)


# --- mouse ------------------------------------------------------------------------------------------------------


def mouse_device(**kwargs):
    mouse = Mouse(**kwargs)
    device = hid_mouse_device(mouse)
    device.control(ch9.set_configuration(1))
    return device, mouse


def test_mouse_device_describes_a_boot_mouse_with_a_3_byte_report():
    device = hid_mouse_device()
    assert device.device_descriptor.id_product == 0x0002
    alt = parse_configuration(device.configuration.to_bytes()).interfaces[0].alternates[0]
    assert (alt.descriptor.interface_subclass, alt.descriptor.interface_protocol) == (1, 2)
    assert alt.descriptors[0].class_descriptor_length(DescriptorType.REPORT) == 50
    assert [e.address for e in alt.endpoints] == [0x81]  # no OUT endpoint


def test_mouse_move_splits_large_moves_into_127_count_steps():
    device, mouse = mouse_device()
    mouse.move(300, -10)
    assert drain(device, length=4) == [bytes([0, 127, 0xF6]), bytes([0, 127, 0]), bytes([0, 46, 0])]


def test_mouse_buttons_are_held_across_moves_and_click_presses_and_releases():
    device, mouse = mouse_device()
    mouse.move(1, 1, MouseButton.LEFT)
    mouse.move(-1, 0)
    mouse.move(0, 0, 0)
    mouse.click(MouseButton.RIGHT)
    assert drain(device, length=4) == [bytes([1, 1, 1]), bytes([1, 0xFF, 0]), bytes([0, 0, 0]),
                                       bytes([2, 0, 0]), bytes([0, 0, 0])]


def test_mouse_idle_repeat_keeps_buttons_but_never_moves_again():
    clock = Clock()
    device, mouse = mouse_device(clock=clock)
    device.control(class_out(HidRequest.SET_IDLE, 1 << 8))
    mouse.move(5, 5, MouseButton.LEFT)
    assert device.transfer(0x81, None, 4).data == bytes([1, 5, 5])
    clock.now += 1
    assert device.transfer(0x81, None, 4).data == bytes([1, 0, 0])
    assert device.control(class_in(HidRequest.GET_REPORT, ReportType.INPUT << 8, 3)).data == bytes([1, 0, 0])
    assert device.control(class_in(HidRequest.GET_REPORT, ReportType.OUTPUT << 8, 1)) == STALL


def test_mouse_report_out_of_range_raises():
    with pytest.raises(HidError, match=r"-127\.\.127"):
        Mouse.report(128, 0)
    with pytest.raises(HidError, match="3 buttons"):
        Mouse().move(0, 0, 0x08)
