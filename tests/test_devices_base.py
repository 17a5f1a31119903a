"""The Device/Function framework: descriptors it builds, every chapter-9 request, transfers, error paths."""

import logging

import pytest

from emulator.devices.base import (
    STALL,
    AltSettingSpec,
    Device,
    DeviceError,
    EndpointSpec,
    Function,
    InterfaceSpec,
    Reply,
    TransferStatus,
)
from emulator.errors import VusbError
from emulator.usb import setup as ch9
from emulator.usb.descriptors import (
    BosDescriptor,
    DeviceDescriptor,
    DeviceQualifierDescriptor,
    InterfaceAssociationDescriptor,
    LanguageDescriptor,
    OtherSpeedConfigurationDescriptor,
    SsEndpointCompanionDescriptor,
    StringDescriptor,
    SuperSpeedUsbCapability,
    Usb20ExtensionCapability,
    parse_bos,
    parse_configuration,
    parse_string,
)
from emulator.usb.setup import (
    ClassCode,
    DescriptorType,
    Direction,
    FeatureSelector,
    Recipient,
    SetupPacket,
    Speed,
    TransferType,
)

IN, OUT = Direction.IN, Direction.OUT


class Echo(Function):
    """The module docstring's example: bytes written to bulk OUT come back on bulk IN; records hooks."""

    name = "echo"

    def __init__(self, *, alternates=(), interrupt=False):
        super().__init__()
        self.pending = bytearray()
        self.calls = []
        self._alternates = alternates
        self._interrupt = interrupt

    def interfaces(self):
        endpoints = (EndpointSpec("out", OUT), EndpointSpec("in", IN))
        if self._interrupt:
            endpoints += (EndpointSpec("irq", IN, TransferType.INTERRUPT, 16, interval_ms=10),)
        return [InterfaceSpec(ClassCode.VENDOR_SPEC, 1, 2, endpoints=endpoints, name="Echo",
                              alternates=self._alternates)]

    def transfer(self, endpoint, data, length):
        self.calls.append(("transfer", endpoint, data, length))
        if endpoint == "out":
            self.pending += data
            self.wakeup()
            return Reply(actual_length=len(data))
        if endpoint == "stall":
            return STALL
        if not self.pending:
            return None
        chunk, self.pending = bytes(self.pending[:length]), self.pending[length:]
        return Reply(data=chunk)

    def control(self, setup, data):
        self.calls.append(("control", setup, data))
        if setup.request == 0x42:
            return Reply(data=b"vendor!")
        return STALL

    def set_alt(self, interface, alternate):
        self.calls.append(("set_alt", interface, alternate))

    def clear_halt(self, endpoint):
        self.calls.append(("clear_halt", endpoint))

    def disable(self):
        self.calls.append(("disable",))

    def reset(self):
        self.calls.append(("reset",))

    def close(self):
        self.calls.append(("close",))


class TwoInterfaces(Function):
    name = "pair"
    function_name = "Pair"

    def interfaces(self):
        return [InterfaceSpec(ClassCode.COMM, 2, 1, endpoints=(EndpointSpec("n", IN, TransferType.INTERRUPT,
                                                                            8),)),
                InterfaceSpec(ClassCode.CDC_DATA, endpoints=(EndpointSpec("i", IN), EndpointSpec("o", OUT)))]


def make(speed=Speed.HIGH, **kwargs):
    function = Echo(**{k: kwargs.pop(k) for k in ("alternates", "interrupt") if k in kwargs})
    options = dict(id_vendor=0x1209, id_product=0x0001, manufacturer="vusb", product="Echo", serial="42",
                   speed=speed)
    options.update(kwargs)
    return Device([function], **options), function


def configured(**kwargs):
    device, function = make(**kwargs)
    assert device.control(ch9.set_configuration(1)).status is TransferStatus.OK
    function.calls.clear()
    return device, function


def get(device, kind, index=0, length=0xFFFF, language=0):
    return device.control(ch9.get_descriptor(kind, index, length, language))


# --- descriptors ---------------------------------------------------------------------------------------------


def test_device_descriptor_carries_the_declared_ids_strings_and_speed_defaults():
    device, _ = make()
    reply = get(device, DescriptorType.DEVICE, length=18)
    descriptor = DeviceDescriptor.from_bytes(reply.data)
    assert (descriptor.id_vendor, descriptor.id_product, descriptor.bcd_device) == (0x1209, 0x0001, 0x0100)
    assert (descriptor.bcd_usb, descriptor.max_packet_size0, descriptor.num_configurations) == (0x0200, 64, 1)
    assert (descriptor.device_class, descriptor.device_subclass, descriptor.device_protocol) == (0, 0, 0)
    strings = {i: parse_string(get(device, DescriptorType.STRING, i, 255, 0x0409).data, i)
               for i in (descriptor.i_manufacturer, descriptor.i_product, descriptor.i_serial_number)}
    assert [s.string for s in strings.values()] == ["vusb", "Echo", "42"]


def test_get_descriptor_with_short_wlength_returns_the_first_bytes_like_linux_first_probe():
    device, _ = make()
    assert get(device, DescriptorType.DEVICE, length=8).data == device.device_descriptor.to_bytes()[:8]
    head = get(device, DescriptorType.CONFIGURATION, length=9).data
    total = int.from_bytes(head[2:4], "little")
    full = get(device, DescriptorType.CONFIGURATION, length=total).data
    assert len(full) == total and full[:9] == head


def test_configuration_descriptor_parses_and_numbers_endpoints_per_direction():
    device, _ = make(interrupt=True)
    config = parse_configuration(get(device, DescriptorType.CONFIGURATION).data)
    alt = config.interfaces[0].alternates[0]
    assert (alt.descriptor.interface_class, alt.descriptor.interface_subclass,
            alt.descriptor.interface_protocol) == (0xFF, 1, 2)
    assert [(e.address, e.descriptor.transfer_type, e.descriptor.max_packet_size, e.descriptor.interval)
            for e in alt.endpoints] == [(0x01, TransferType.BULK, 512, 0), (0x81, TransferType.BULK, 512, 0),
                                       (0x82, TransferType.INTERRUPT, 16, 7)]  # 10 ms = 2^(7-1) microframes
    assert config.descriptor.configuration_value == 1 and config.descriptor.attributes == 0x80
    assert config.descriptor.max_power == 50  # 100 mA in 2 mA units
    assert parse_string(get(device, DescriptorType.STRING, alt.descriptor.i_interface).data, 1) == \
        StringDescriptor("Echo")


def test_full_speed_device_uses_64_byte_bulk_and_interval_in_frames():
    device, _ = make(speed=Speed.FULL, interrupt=True)
    alt = parse_configuration(get(device, DescriptorType.CONFIGURATION).data).interfaces[0].alternates[0]
    assert [(e.descriptor.max_packet_size, e.descriptor.interval) for e in alt.endpoints] == [
        (64, 0), (64, 0), (16, 10)]


def test_string_zero_is_the_langid_list_and_a_missing_index_stalls():
    device, _ = make(langid=0x0407)
    assert parse_string(get(device, DescriptorType.STRING, 0).data, 0) == LanguageDescriptor((0x0407,))
    assert get(device, DescriptorType.STRING, 99).status is TransferStatus.STALL


def test_high_speed_device_answers_qualifier_and_full_speed_other_speed_configuration():
    device, _ = make(speed=Speed.HIGH)
    qualifier = DeviceQualifierDescriptor.from_bytes(get(device, DescriptorType.DEVICE_QUALIFIER).data)
    assert qualifier.bcd_usb == 0x0200 and qualifier.max_packet_size0 == 64
    other = parse_configuration(get(device, DescriptorType.OTHER_SPEED_CONFIGURATION).data)
    assert isinstance(other.descriptor, OtherSpeedConfigurationDescriptor)
    assert [e.descriptor.max_packet_size for e in other.interfaces[0].alternates[0].endpoints] == [64, 64]


@pytest.mark.parametrize("speed", [Speed.FULL, Speed.SUPER])
def test_device_qualifier_stalls_unless_high_speed(speed):
    device, _ = make(speed=speed)
    assert get(device, DescriptorType.DEVICE_QUALIFIER).status is TransferStatus.STALL
    assert get(device, DescriptorType.OTHER_SPEED_CONFIGURATION).status is TransferStatus.STALL


def test_superspeed_device_has_bos_companions_and_ep0_exponent():
    device, _ = make(speed=Speed.SUPER, interrupt=True)
    descriptor = DeviceDescriptor.from_bytes(get(device, DescriptorType.DEVICE).data)
    assert descriptor.bcd_usb == 0x0320 and descriptor.max_packet_size0 == 9
    bos = parse_bos(get(device, DescriptorType.BOS).data)
    assert bos == BosDescriptor((Usb20ExtensionCapability(attributes=2), SuperSpeedUsbCapability()))
    config = parse_configuration(get(device, DescriptorType.CONFIGURATION).data)
    endpoints = config.interfaces[0].alternates[0].endpoints
    assert [e.descriptor.max_packet_size for e in endpoints] == [1024, 1024, 16]
    assert [e.companion for e in endpoints] == [SsEndpointCompanionDescriptor()] * 2 + [
        SsEndpointCompanionDescriptor(bytes_per_interval=16)]
    assert config.descriptor.max_power == 13  # 100 mA in 8 mA units, rounded up


def test_bos_is_answered_from_bcd_usb_0201_and_stalls_below():
    assert get(make()[0], DescriptorType.BOS).status is TransferStatus.STALL
    device, _ = make(bcd_usb=0x0210)
    assert parse_bos(get(device, DescriptorType.BOS).data).capabilities == (
        Usb20ExtensionCapability(attributes=2),)


def test_composite_device_numbers_interfaces_and_adds_an_iad_for_the_multi_interface_function():
    echo, pair = Echo(), TwoInterfaces()
    device = Device([echo, pair], id_vendor=0x1209, id_product=2)
    config = parse_configuration(get(device, DescriptorType.CONFIGURATION).data)
    assert [i.number for i in config.interfaces] == [0, 1, 2]
    assert config.interfaces[0].association is None
    assert config.interfaces[1].association == InterfaceAssociationDescriptor(
        first_interface=1, interface_count=2, function_class=2, function_subclass=2, function_protocol=1,
        i_function=2)
    assert device.strings == {1: "Echo", 2: "Pair"}
    assert pair.interface_number(0) == 1 and pair.interface_number(1) == 2
    assert (echo.endpoint_address("out"), echo.endpoint_address("in")) == (0x01, 0x81)
    assert [pair.endpoint_address(n) for n in ("n", "i", "o")] == [0x82, 0x83, 0x02]
    assert device.device_descriptor.device_class == ClassCode.MISC  # IAD ECN: EF/02/01
    assert (device.device_descriptor.device_subclass, device.device_descriptor.device_protocol) == (2, 1)
    assert device.function_for_interface(2) is pair and device.function_for_interface(3) is None


def test_summary_reports_the_usbip_usb_device_facts():
    device = Device([Echo(), TwoInterfaces()], id_vendor=0x1209, id_product=2, bcd_device=0x0123,
                    speed=Speed.FULL)
    summary = device.summary()
    assert (summary.id_vendor, summary.id_product, summary.bcd_device, summary.speed) == (
        0x1209, 2, 0x0123, Speed.FULL)
    assert (summary.configuration_value, summary.num_configurations, summary.num_interfaces) == (1, 1, 3)
    assert [(i.interface_class, i.interface_subclass, i.interface_protocol) for i in summary.interfaces] == [
        (0xFF, 1, 2), (2, 2, 1), (0x0A, 0, 0)]


# --- configuration, interfaces, transfers ---------------------------------------------------------------------


def test_device_is_unconfigured_until_set_configuration_and_transfers_stall_before():
    device, function = make()
    assert device.control(ch9.get_configuration()).data == b"\x00"
    assert device.transfer(0x01, b"x", 1) == STALL
    assert function.calls == []
    assert device.control(ch9.set_configuration(1)) == Reply(actual_length=0)
    assert device.control(ch9.get_configuration()).data == b"\x01"
    assert ("set_alt", 0, 0) in function.calls
    assert device.transfer(0x01, b"hello", 5) == Reply(actual_length=5)
    assert device.transfer(0x81, None, 3) == Reply(data=b"hel")
    assert device.transfer(0x81, None, 512) == Reply(data=b"lo")


def test_set_configuration_zero_deconfigures_and_calls_disable():
    device, function = configured()
    assert device.control(ch9.set_configuration(0)).status is TransferStatus.OK
    assert function.calls == [("disable",)]
    assert device.control(ch9.get_configuration()).data == b"\x00"
    assert device.transfer(0x01, b"x", 1) == STALL


def test_set_configuration_to_an_unknown_value_stalls():
    device, _ = make()
    assert device.control(ch9.set_configuration(2)) == STALL
    assert not device.configured


def test_empty_in_queue_is_a_nak_and_a_write_wakes_the_edge():
    device, _ = configured()
    woken = []
    device.set_wakeup(lambda: woken.append(True))
    assert device.transfer(0x81, None, 64) is None
    device.transfer(0x01, b"!", 1)
    assert woken == [True]
    assert device.transfer(0x81, None, 64).data == b"!"


def test_transfer_to_missing_endpoint_or_wrong_direction_stalls():
    device, function = configured()
    assert device.transfer(0x05, b"x", 1) == STALL
    assert device.transfer(0x85, None, 1) == STALL
    assert device.transfer(0x81, b"data for an IN endpoint", 23) == STALL
    assert device.transfer(0x01, None, 4) == STALL
    assert function.calls == []


def test_in_reply_longer_than_the_host_buffer_is_an_overflow():
    device, function = configured()
    function.pending += b"abcdef"
    function.transfer = lambda endpoint, data, length: Reply(data=b"abcdef")
    assert device.transfer(0x81, None, 4) == Reply(TransferStatus.OVERFLOW, b"abcd")


def test_get_and_set_interface_switch_endpoints_and_call_set_alt():
    alt1 = AltSettingSpec(endpoints=(EndpointSpec("extra", IN, TransferType.INTERRUPT, 8),), name="alt one")
    device, function = configured(alternates=(alt1,))
    extra = function.endpoint_address("extra")
    assert device.control(ch9.get_interface(0)).data == b"\x00"
    assert device.transfer(extra, None, 8) == STALL  # not in alternate setting 0
    assert device.control(ch9.set_interface(0, 1)).status is TransferStatus.OK
    assert function.calls == [("set_alt", 0, 1)]
    assert device.control(ch9.get_interface(0)).data == b"\x01"
    assert device.transfer(0x01, b"x", 1) == STALL  # "out" is only in setting 0
    assert device.control(ch9.set_interface(0, 2)) == STALL
    assert device.control(ch9.set_interface(7, 0)) == STALL
    config = parse_configuration(get(device, DescriptorType.CONFIGURATION).data)
    assert [a.descriptor.alternate_setting for a in config.interfaces[0].alternates] == [0, 1]


def test_interface_requests_stall_while_unconfigured():
    device, _ = make()
    assert device.control(ch9.get_interface(0)) == STALL
    assert device.control(ch9.set_interface(0, 0)) == STALL
    assert device.control(ch9.get_status(Recipient.INTERFACE, 0)) == STALL


# --- status, features, halt --------------------------------------------------------------------------------


def test_get_status_device_reports_self_powered_and_remote_wakeup_bits():
    device, _ = make(self_powered=True, remote_wakeup=True)
    assert device.control(ch9.get_status()).data == b"\x01\x00"
    assert device.control(ch9.set_feature(FeatureSelector.DEVICE_REMOTE_WAKEUP)).status is TransferStatus.OK
    assert device.control(ch9.get_status()).data == b"\x03\x00"
    device.control(ch9.clear_feature(FeatureSelector.DEVICE_REMOTE_WAKEUP))
    assert device.control(ch9.get_status()).data == b"\x01\x00"


def test_remote_wakeup_feature_stalls_when_the_configuration_does_not_offer_it():
    device, _ = make()
    assert device.control(ch9.set_feature(FeatureSelector.DEVICE_REMOTE_WAKEUP)) == STALL
    assert device.control(ch9.set_feature(FeatureSelector.TEST_MODE)) == STALL


def test_endpoint_halt_is_set_reported_and_cleared_with_the_clear_halt_hook():
    device, function = configured()
    halt = ch9.set_feature(FeatureSelector.ENDPOINT_HALT, Recipient.ENDPOINT, 0x01)
    assert device.control(halt).status is TransferStatus.OK
    assert device.control(ch9.get_status(Recipient.ENDPOINT, 0x01)).data == b"\x01\x00"
    assert device.transfer(0x01, b"x", 1) == STALL
    assert function.calls == []
    assert device.control(ch9.clear_halt(0x01)).status is TransferStatus.OK
    assert function.calls == [("clear_halt", "out")]
    assert device.control(ch9.get_status(Recipient.ENDPOINT, 0x01)).data == b"\x00\x00"
    assert device.transfer(0x01, b"x", 1).status is TransferStatus.OK


def test_a_stall_returned_by_the_function_halts_the_endpoint_until_cleared():
    device, function = configured()
    function.transfer = lambda endpoint, data, length: STALL
    assert device.transfer(0x81, None, 64) == STALL
    assert function.is_halted("in")
    del function.transfer  # back to the class method: the endpoint is still halted
    function.pending += b"x"
    assert device.transfer(0x81, None, 64) == STALL
    device.control(ch9.clear_halt(0x81))
    assert device.transfer(0x81, None, 64).data == b"x"


def test_function_that_rehalts_in_clear_halt_stays_halted():
    device, function = configured()
    function.clear_halt = lambda endpoint: function.halt(endpoint)
    function.halt("in")
    assert device.control(ch9.clear_halt(0x81)).status is TransferStatus.OK
    assert device.transfer(0x81, None, 64) == STALL


def test_set_interface_and_set_configuration_clear_halts():
    device, function = configured()
    function.halt("out")
    device.control(ch9.set_interface(0, 0))
    assert not function.is_halted("out")
    function.halt("out")
    device.control(ch9.set_configuration(1))
    assert not function.is_halted("out")


def test_get_status_and_halt_on_ep0_and_unknown_endpoints():
    device, _ = configured()
    assert device.control(ch9.get_status(Recipient.ENDPOINT, 0x80)).data == b"\x00\x00"
    assert device.control(ch9.clear_halt(0x00)).status is TransferStatus.OK
    assert device.control(ch9.get_status(Recipient.ENDPOINT, 0x8F)) == STALL
    assert device.control(ch9.clear_halt(0x0F)) == STALL
    assert device.control(ch9.get_status(Recipient.OTHER)) == STALL


def test_set_address_is_accepted_up_to_127():
    device, _ = make()
    assert device.control(ch9.set_address(42)).status is TransferStatus.OK
    assert device.address == 42
    assert device.control(SetupPacket(0x00, 5, 128, 0, 0)) == STALL


@pytest.mark.parametrize(
    "setup",
    [
        ch9.set_descriptor(DescriptorType.DEVICE, 0, 0),
        ch9.synch_frame(0x81),
        SetupPacket(0x80, 0x55, 0, 0, 0),  # unknown standard request
        SetupPacket(0x00, 6, 0x0100, 0, 0),  # GET_DESCRIPTOR with an OUT direction
        SetupPacket(0x80, 0, 1, 0, 2),  # GET_STATUS with non-zero wValue
        ch9.get_descriptor(DescriptorType.DEVICE, index=1),
        ch9.get_descriptor(DescriptorType.CONFIGURATION, index=1),
        ch9.get_descriptor(0x42),
        ch9.get_descriptor(DescriptorType.REPORT),  # a class descriptor asked of the device
        SetupPacket(0xC0, 0x01, 0, 0, 4),  # vendor request to the device
        SetupPacket(0x23, 0x03, 0, 0, 0),  # class request to "other" (a hub port)
    ],
)
def test_requests_the_device_cannot_answer_stall_without_raising(setup):
    device, _ = configured()
    assert device.control(setup) == STALL


def test_class_and_vendor_requests_to_an_interface_reach_its_function():
    device, function = configured()
    setup = SetupPacket(0xC1, 0x42, 0, 0, 16)
    assert device.control(setup).data == b"vendor!"
    assert function.calls == [("control", setup, b"")]
    assert device.control(SetupPacket(0xC1, 0x42, 0, 1, 16)) == STALL  # interface 1 does not exist
    assert device.control(SetupPacket(0xC2, 0x42, 0, 0x81, 16)).data == b"vendor!"  # via its endpoint


def test_out_control_data_must_match_wlength():
    device, function = configured()
    assert device.control(SetupPacket(0x41, 0x42, 0, 0, 4), b"12") == STALL
    assert function.calls == []
    # the OUT reply carries no data even if the model returned some, and counts the bytes taken
    assert device.control(SetupPacket(0x41, 0x42, 0, 0, 2), b"12") == Reply(actual_length=2)
    assert function.calls == [("control", SetupPacket(0x41, 0x42, 0, 0, 2), b"12")]


def test_a_model_that_raises_gives_a_stall_not_an_exception(caplog):
    device, function = configured()

    def broken(*args):
        raise ValueError("bug")

    function.control = broken
    function.transfer = broken
    with caplog.at_level(logging.ERROR):
        assert device.control(SetupPacket(0xC1, 0x42, 0, 0, 4)) == STALL
        assert device.transfer(0x81, None, 4) == STALL
    assert "failed inside the device model" in caplog.text


def test_reset_returns_to_default_state_and_calls_hooks():
    device, function = configured()
    device.control(ch9.set_address(3))
    device.reset()
    assert (device.address, device.configured) == (0, False)
    assert function.calls == [("disable",), ("reset",)]
    assert device.transfer(0x01, b"x", 1) == STALL
    device.close()
    assert function.calls[-1] == ("close",)


# --- building errors -------------------------------------------------------------------------------------------


class Many(Function):
    def __init__(self, count):
        super().__init__()
        self.count = count

    def interfaces(self):
        return [InterfaceSpec(0xFF, endpoints=tuple(EndpointSpec(f"e{i}", IN) for i in range(self.count)))]


class Iso(Function):
    def interfaces(self):
        return [InterfaceSpec(0x01, endpoints=(EndpointSpec("iso", IN, TransferType.ISOCHRONOUS),))]


class Sized(Function):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec

    def interfaces(self):
        return [InterfaceSpec(0xFF, endpoints=(self.spec,))]


class Nothing(Function):
    def interfaces(self):
        return []


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Device([Many(16)], id_vendor=1, id_product=1), "more than 15 endpoints"),
        (lambda: Device([Iso()], id_vendor=1, id_product=1), "only bulk and interrupt"),
        (lambda: Device([Sized(EndpointSpec("b", IN, max_packet_size=100))], id_vendor=1, id_product=1,
                        speed=Speed.FULL), "wMaxPacketSize 100 is not allowed"),
        (lambda: Device([Sized(EndpointSpec("b", IN, max_packet_size=64))], id_vendor=1, id_product=1,
                        speed=Speed.HIGH), "wMaxPacketSize 64 is not allowed at HIGH"),
        (lambda: Device([Sized(EndpointSpec("i", IN, TransferType.INTERRUPT, 2000))], id_vendor=1,
                        id_product=1), "more than HIGH speed allows"),
        (lambda: Device([Nothing()], id_vendor=1, id_product=1), "declares no interface"),
        (lambda: Device([Echo()], id_vendor=1, id_product=1, speed=Speed.LOW), "not modelled"),
        (lambda: Device([Echo()], id_vendor=1, id_product=1, speed=Speed.SUPER, bcd_usb=0x0200), "bcdUSB"),
        (lambda: Device([Echo()], id_vendor=1, id_product=1, max_packet_size0=32), "bMaxPacketSize0 32"),
        (lambda: Device([Echo()], id_vendor=1, id_product=1, product="x" * 200), "cannot build descriptors"),
        (lambda: Device([Echo()], id_vendor=0x10000, id_product=1), "cannot build descriptors"),
        (lambda: Device([Echo()], id_vendor=1, id_product=1, max_power_ma=600), "does not fit bMaxPower"),
        (lambda: Device([Echo()], id_vendor=1, id_product=1, configuration_value=0), "bConfigurationValue"),
    ],
)
def test_impossible_declarations_raise_device_error(build, message):
    with pytest.raises(DeviceError, match=message) as info:
        build()
    assert isinstance(info.value, VusbError)


def test_a_function_can_belong_to_only_one_device():
    function = Echo()
    Device([function], id_vendor=1, id_product=1)
    with pytest.raises(DeviceError, match="only one device"):
        Device([function], id_vendor=1, id_product=2)


def test_unbound_function_services_raise_a_clear_error_and_wakeup_is_a_no_op():
    function = Echo()
    function.wakeup()
    with pytest.raises(DeviceError, match="not part of a device"):
        function.halt("in")
    device = Device([function], id_vendor=1, id_product=1)
    with pytest.raises(DeviceError, match="no endpoint named 'nope'"):
        function.endpoint_address("nope")
    assert function.max_packet_size("in") == 512 and device.max_packet_size(0x81) == 512
