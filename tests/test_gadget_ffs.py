"""The pure parts of the FunctionFS gadget, on the host: what f_fs accepts, descriptors per speed, the
function's layout and string block, wIndex mapping, and the model adapter driven through a fake FunctionFS
(so halts, NAKs and the BOT framing are checked without a kernel; tests/test_gadget_kernel.py runs the
real thing)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.devices.base import AltSettingSpec, Device, EndpointSpec, Function, InterfaceSpec, Reply
from emulator.devices.cdc_acm import cdc_acm_device
from emulator.devices.hid import Keyboard, hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.errors import VusbError
from emulator.usb.descriptors import (
    Configuration,
    ConfigurationDescriptor,
    Endpoint,
    EndpointDescriptor,
    Interface,
    InterfaceAssociationDescriptor,
    InterfaceDescriptor,
    SsEndpointCompanionDescriptor,
    UnknownDescriptor,
    parse_descriptors,
)
from emulator.usb.setup import (
    ClassCode,
    DescriptorType,
    Direction,
    SetupPacket,
    Speed,
    TransferType,
)
from gadgets.ffs import (
    ESHUTDOWN,
    FfsEvent,
    FunctionFsError,
    descriptors_blob,
    endpoint_for_speed,
    ffs_layout,
    ffs_rejects,
    interval_for,
    interval_us,
    map_setup,
    strings_blob,
)
from gadgets.model import ModelFunction, gadget_spec_for
from tests.gadget_fakes import FakeFfs

# --- what f_fs accepts -----------------------------------------------------------------------------------------


def test_ffs_rejects_cdc_functional_descriptors_and_keeps_standard_ones():
    assert ffs_rejects(bytes((5, 0x24, 0, 0x10, 1)), ClassCode.COMM) is not None
    assert ffs_rejects(bytes((7, 0x25, 1, 0, 0, 0, 0)), ClassCode.AUDIO) is not None
    assert ffs_rejects(bytes((9, 4, 0, 0, 1, 8, 6, 0x50, 0)), None) is None
    assert ffs_rejects(bytes((7, 5, 0x81, 2, 0, 2, 0)), 8) is None
    assert ffs_rejects(bytes((9, 5, 0x81, 1, 0, 2, 1, 0, 0)), 1) is None  # audio endpoint, 9 bytes
    assert ffs_rejects(bytes((8, 5, 0x81, 2, 0, 2, 0, 0)), 8) is not None
    assert ffs_rejects(bytes((8, 0x0B, 0, 2, 2, 2, 1, 0)), None) is None
    assert ffs_rejects(bytes((6, 0x30, 0, 0, 0, 0)), 8) is None


def test_ffs_rejects_hid_descriptor_outside_hid_interfaces_or_with_two_class_descriptors():
    one = bytes((9, 0x21, 0x11, 0x01, 0, 1, 0x22, 0x3F, 0))
    two = bytes((12, 0x21, 0x11, 0x01, 0, 2, 0x22, 0x3F, 0, 0x23, 0x10, 0))
    assert ffs_rejects(one, ClassCode.HID) is None
    assert ffs_rejects(one, ClassCode.VENDOR_SPEC) is not None
    assert ffs_rejects(two, ClassCode.HID) is not None


def test_ffs_rejects_descriptors_that_belong_to_the_gadget_and_malformed_ones():
    assert "gadget" in ffs_rejects(bytes(18 * [0]).replace(b"\0\0", bytes((18, 1)), 1), None)
    assert ffs_rejects(bytes((9, 2, 0, 0, 0, 0, 0, 0, 0)), None) is not None
    assert ffs_rejects(bytes((5, 4, 0)), None) == "malformed descriptor"


# --- endpoints and intervals per speed ---------------------------------------------------------------------------


def test_bulk_endpoint_takes_each_speeds_only_legal_packet_size_and_a_companion_at_superspeed():
    hs = EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.BULK, max_packet_size=512)
    fs, none = endpoint_for_speed(hs, None, Speed.HIGH, Speed.FULL)
    assert (fs.max_packet_size, fs.interval, none) == (64, 0, None)
    ss, companion = endpoint_for_speed(hs, None, Speed.HIGH, Speed.SUPER)
    assert ss.max_packet_size == 1024
    assert companion == SsEndpointCompanionDescriptor(max_burst=0, attributes=0, bytes_per_interval=0)
    small = EndpointDescriptor(endpoint_address=0x02, attributes=TransferType.BULK, max_packet_size=16)
    assert endpoint_for_speed(small, None, Speed.FULL, Speed.FULL)[0].max_packet_size == 16
    assert endpoint_for_speed(small, None, Speed.FULL, Speed.HIGH)[0].max_packet_size == 512


def test_interrupt_endpoint_keeps_its_polling_period_across_speeds():
    fs = EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.INTERRUPT, max_packet_size=8,
                            interval=10)
    hs, _ = endpoint_for_speed(fs, None, Speed.FULL, Speed.HIGH)
    assert hs.max_packet_size == 8
    assert hs.interval == 7  # 2^6 microframes = 8 ms, the longest period not over 10 ms
    back, _ = endpoint_for_speed(hs, None, Speed.HIGH, Speed.FULL)
    assert back.interval == 8
    _ss, companion = endpoint_for_speed(fs, None, Speed.FULL, Speed.SUPER)
    assert companion is not None and companion.bytes_per_interval == 8
    big = EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.INTERRUPT, max_packet_size=1024,
                             interval=1)
    assert endpoint_for_speed(big, None, Speed.HIGH, Speed.FULL)[0].max_packet_size == 64


def test_isochronous_endpoint_is_refused_with_a_clear_error():
    iso = EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.ISOCHRONOUS, max_packet_size=192,
                             interval=1)
    with pytest.raises(FunctionFsError, match="isochronous"):
        endpoint_for_speed(iso, None, Speed.HIGH, Speed.HIGH)
    assert issubclass(FunctionFsError, VusbError)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 255))
def test_full_speed_interval_becomes_largest_high_speed_period_not_longer(ms):
    fs = EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.INTERRUPT, max_packet_size=8,
                            interval=ms)
    hs, _ = endpoint_for_speed(fs, None, Speed.FULL, Speed.HIGH)
    period = interval_us(hs, Speed.HIGH)
    assert period <= ms * 1000 < 2 * period or hs.interval == 16
    assert interval_for(period, Speed.HIGH) == hs.interval


# --- the function's layout ---------------------------------------------------------------------------------------


def test_mass_storage_layout_has_three_speeds_two_endpoint_files_and_its_interface_string(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    device = mass_storage_device(str(image))
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    assert layout.dropped == ()
    assert [(ep.index, ep.address, ep.transfer_type) for ep in layout.endpoints] == [
        (1, 0x81, TransferType.BULK), (2, 0x01, TransferType.BULK)]
    assert [layout.endpoints[0].max_packet_size[s] for s in (Speed.FULL, Speed.HIGH, Speed.SUPER)] == [64, 512, 1024]
    assert layout.strings == ("Mass Storage",)
    hs = parse_descriptors(b"".join(layout.descriptors[Speed.HIGH]))
    assert isinstance(hs[0], InterfaceDescriptor) and hs[0].i_interface == 1 and hs[0].num_endpoints == 2
    ss = parse_descriptors(b"".join(layout.descriptors[Speed.SUPER]))
    assert [type(d).__name__ for d in ss] == ["InterfaceDescriptor", "EndpointDescriptor",
                                              "SsEndpointCompanionDescriptor", "EndpointDescriptor",
                                              "SsEndpointCompanionDescriptor"]
    device.close()


def test_cdc_acm_layout_drops_the_functional_descriptors_and_keeps_the_association():
    device = cdc_acm_device()
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    assert [d.descriptor_type for d in layout.dropped] == [DescriptorType.CS_INTERFACE] * 4
    assert all("class-specific" in d.reason for d in layout.dropped)
    fs = parse_descriptors(b"".join(layout.descriptors[Speed.FULL]))
    iad = fs[0]
    assert isinstance(iad, InterfaceAssociationDescriptor)
    assert (iad.first_interface, iad.interface_count) == (0, 2)
    assert layout.strings[iad.i_function - 1] == "CDC Serial"
    assert len(layout.strings) == 3
    assert not any(d.descriptor_type == DescriptorType.CS_INTERFACE for d in fs)


def test_hid_keyboard_layout_keeps_the_hid_descriptor():
    device = hid_keyboard_device()
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    assert layout.dropped == ()
    fs = b"".join(layout.descriptors[Speed.FULL])
    assert bytes((9, 0x21)) in fs


def _config(*interfaces: Interface) -> Configuration:
    return Configuration(ConfigurationDescriptor(), (), interfaces)


def _alt(number: int, alt: int, *eps: int, leading=(), klass=0xFF) -> object:
    from emulator.usb.descriptors import AlternateSetting

    endpoints = tuple(Endpoint(EndpointDescriptor(endpoint_address=a, attributes=TransferType.BULK,
                                                  max_packet_size=512)) for a in eps)
    return AlternateSetting(InterfaceDescriptor(interface_number=number, alternate_setting=alt,
                                                interface_class=klass), (), endpoints, tuple(leading))


def test_layout_renumbers_sparse_interfaces_from_zero_and_maps_them_back():
    iad = InterfaceAssociationDescriptor(first_interface=2, interface_count=1, function_class=0xFF)
    config = _config(Interface((_alt(0, 0, 0x81),)), Interface((_alt(2, 0, 0x02, leading=(iad,)),)))
    layout = ffs_layout(config, Speed.HIGH)
    assert [(i.local, i.number) for i in layout.interfaces] == [(0, 0), (1, 2)]
    hs = parse_descriptors(b"".join(layout.descriptors[Speed.HIGH]))
    assert [d.interface_number for d in hs if isinstance(d, InterfaceDescriptor)] == [0, 1]
    assert next(d for d in hs if isinstance(d, InterfaceAssociationDescriptor)).first_interface == 1
    assert layout.interface_number(1) == 2 and layout.interface_number(5) is None
    assert layout.endpoints[1].interface == 2


def test_layout_carries_alternate_setting_zero_only_and_says_so():
    config = _config(Interface((_alt(0, 0), _alt(0, 1, 0x81, 0x02))))
    layout = ffs_layout(config, Speed.HIGH)
    assert layout.endpoints == ()
    assert len(layout.dropped) == 1 and "alternate setting 0" in layout.dropped[0].reason


def test_layout_refuses_isochronous_endpoints_and_duplicate_addresses():
    from emulator.usb.descriptors import AlternateSetting

    iso = AlternateSetting(InterfaceDescriptor(interface_class=1, interface_subclass=2), (), (
        Endpoint(EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.ISOCHRONOUS,
                                    max_packet_size=192, interval=1)),))
    with pytest.raises(FunctionFsError, match="isochronous"):
        ffs_layout(_config(Interface((iso,))), Speed.HIGH)
    twice = _config(Interface((_alt(0, 0, 0x81),)), Interface((_alt(1, 0, 0x81),)))
    with pytest.raises(FunctionFsError, match="declared twice"):
        ffs_layout(twice, Speed.HIGH)


def test_layout_drops_unknown_class_descriptors_after_an_endpoint():
    from emulator.usb.descriptors import AlternateSetting

    alt = AlternateSetting(InterfaceDescriptor(interface_class=0xFF), (), (
        Endpoint(EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.BULK, max_packet_size=512),
                 (UnknownDescriptor(0x25, b"\x01\x00"),)),))
    layout = ffs_layout(_config(Interface((alt,))), Speed.HIGH)
    assert [d.descriptor_type for d in layout.dropped] == [0x25]
    assert "endpoint 0x81" in layout.dropped[0].where


# --- blobs ------------------------------------------------------------------------------------------------------


def test_strings_blob_holds_every_string_nul_terminated():
    blob = strings_blob(["a", "bc"], 0x0409)
    assert blob == struct.pack("<IIII", 2, 16 + 2 + 2 + 3, 2, 1) + b"\x09\x04a\0bc\0"
    assert strings_blob([]) == struct.pack("<IIII", 2, 16, 0, 0)
    with pytest.raises(FunctionFsError, match="NUL"):
        strings_blob(["a\0b"])


def test_descriptors_blob_is_the_v2_layout_with_the_raw_descriptors_per_speed():
    device = hid_keyboard_device()
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    flags = 64 | 128  # ALL_CTRL_RECIP | CONFIG0_SETUP
    blob = descriptors_blob(layout, flags)
    raw = [b"".join(layout.descriptors[s]) for s in (Speed.FULL, Speed.HIGH, Speed.SUPER)]
    counts = [len(layout.descriptors[s]) for s in (Speed.FULL, Speed.HIGH, Speed.SUPER)]
    expected_head = struct.pack("<III", 3, len(blob), flags | 1 | 2 | 4) + struct.pack("<III", *counts)
    assert blob == expected_head + b"".join(raw)


# --- wIndex mapping ---------------------------------------------------------------------------------------------


def test_map_setup_turns_ffs_indexes_back_into_device_numbers():
    config = _config(Interface((_alt(0, 0, 0x81),)), Interface((_alt(3, 0, 0x02),)))
    layout = ffs_layout(config, Speed.HIGH)
    class_to_local_1 = SetupPacket(0x21, 0x22, 0, 1, 0)
    assert map_setup(layout, class_to_local_1).index == 3
    assert map_setup(layout, SetupPacket(0x21, 0x22, 0, 7, 0)) is None
    assert map_setup(layout, SetupPacket(0x02, 1, 0, 2, 0)).index == 0x02  # ep file 2 = address 0x02
    assert map_setup(layout, SetupPacket(0x82, 0, 0, 1, 2)).index == 0x81
    assert map_setup(layout, SetupPacket(0x02, 1, 0, 9, 0)) is None
    vendor = SetupPacket(0xC0, 0x01, 0x1234, 0x5678, 4)
    assert map_setup(layout, vendor) == vendor


# --- gadget identity -------------------------------------------------------------------------------------------


def test_gadget_spec_takes_the_models_identity_speed_and_power():
    device = hid_keyboard_device()
    spec = gadget_spec_for(device, "kbd-1")
    assert (spec.idVendor, spec.idProduct, spec.product, spec.serialnumber) == (
        0x1209, 0x0001, "vusb keyboard", "vusb-kbd-0001")
    assert spec.max_speed == "full-speed"
    assert spec.bmAttributes == 0xA0 and spec.MaxPower == 100
    assert spec.functions[0].kind == "ffs" and spec.functions[0].instance == "kbd_1"


# --- the model adapter through a fake FunctionFS ------------------------------------------------------------------


def _cbw(tag: int, length: int, cdb: bytes, data_in: bool = True) -> bytes:
    return struct.pack("<IIIBBB16s", 0x43425355, tag, length, 0x80 if data_in else 0, 0, len(cdb), cdb)


def _enabled(device: Device) -> tuple[ModelFunction, FakeFfs]:
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    handler = ModelFunction(device, layout, depth=4)
    fake = FakeFfs()
    fake.handler = handler
    handler.attach(fake)  # type: ignore[arg-type]
    handler.event(FfsEvent.ENABLE)
    return handler, fake


@pytest.fixture
def disk(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    device = mass_storage_device(str(image))
    yield device, image
    device.close()


def test_enable_configures_the_model_and_queues_one_cbw_sized_read(disk):
    device, _ = disk
    _handler, fake = _enabled(device)
    assert device.configured
    assert [size for size, _ in fake.reads[2]] == [512]
    assert 1 not in fake.writes  # nothing to send before a command


def test_inquiry_cbw_brings_data_then_the_csw_on_bulk_in(disk):
    device, _ = disk
    _handler, fake = _enabled(device)
    fake.deliver(2, _cbw(7, 36, bytes((0x12, 0, 0, 0, 36, 0))))
    data = fake.complete_write(1)
    assert len(data) == 36 and data[8:12] == b"vusb"
    csw = fake.complete_write(1)
    assert csw[:4] == b"USBS" and struct.unpack_from("<IIB", csw, 4) == (7, 0, 0)
    assert [size for size, _ in fake.reads[2]] == [512]  # ready for the next CBW


def test_write_10_data_out_is_read_in_one_piece_and_reaches_the_image(disk):
    device, image = disk
    _handler, fake = _enabled(device)
    fake.deliver(2, _cbw(9, 4096, bytes((0x2A, 0, 0, 0, 0, 16, 0, 0, 8, 0)), data_in=False))
    assert [size for size, _ in fake.reads[2]] == [4096]
    fake.deliver(2, b"\xAB" * 4096)
    csw = fake.complete_write(1)
    assert struct.unpack_from("<IIB", csw, 4) == (9, 0, 0)
    device.close()
    assert image.read_bytes()[16 * 512:24 * 512] == b"\xAB" * 4096


def test_short_data_in_is_followed_by_a_halt_then_the_csw(disk):
    device, _ = disk
    _handler, fake = _enabled(device)
    read_capacity = bytes((0x25,) + (0,) * 9)
    fake.deliver(2, _cbw(3, 512, read_capacity))  # the host allows 512, the device has 8 (BOT case 5)
    assert fake.halts == []  # the data has to go before the stall
    data = fake.complete_write(1)
    assert len(data) == 8
    assert fake.halts == [1]
    csw = fake.complete_write(1)
    assert struct.unpack_from("<IIB", csw, 4) == (3, 504, 0)
    assert not device.halted  # the UDC owns the halt now; the host's CLEAR_FEATURE goes there


def test_invalid_cbw_halts_both_endpoints_once_until_bulk_only_reset(disk):
    device, _ = disk
    handler, fake = _enabled(device)
    fake.deliver(2, b"\x00" * 31)
    assert sorted(fake.halts) == [1, 2]
    handler.pump()
    handler.pump()
    assert sorted(fake.halts) == [1, 2]  # wedged: not halted again and again
    assert 1 not in fake.writes or not fake.writes[1]
    reset = SetupPacket(0x21, 0xFF, 0, 0, 0)
    assert handler.control(reset, b"").status == 0
    assert not device.halted
    handler.pump()
    fake.deliver(2, _cbw(5, 0, bytes((0x00,) * 6)))  # TEST UNIT READY works again
    csw = fake.complete_write(1)
    assert struct.unpack_from("<IIB", csw, 4) == (5, 0, 0)


def test_keyboard_naks_until_a_key_is_typed_then_sends_press_and_release():
    keyboard = Keyboard()
    device = hid_keyboard_device(keyboard)
    handler, fake = _enabled(device)
    fake.speed = Speed.FULL
    assert 1 not in fake.writes
    assert handler.poll_timeout() is not None  # an interrupt IN waits on the model: poll it
    wakes = fake.wakes
    keyboard.type_text("a")
    assert fake.wakes > wakes
    handler.pump()
    assert [w[0] for w in fake.writes[1]] == [bytes((0, 0, 4, 0, 0, 0, 0, 0)), bytes(8)]
    assert [size for size, _ in fake.reads[2]] == [8] * 4  # LED output reports, one packet each


def test_keyboard_led_report_on_interrupt_out_reaches_the_model():
    seen = []
    keyboard = Keyboard(on_leds=seen.append)
    _handler, fake = _enabled(hid_keyboard_device(keyboard))
    fake.deliver(2, b"\x02")
    assert int(keyboard.leds) == 2 and seen


def test_disable_resets_the_model_and_stops_asking_for_data(disk):
    device, _ = disk
    handler, fake = _enabled(device)
    handler.event(FfsEvent.DISABLE)
    assert not device.configured
    _size, callback = fake.reads[2].pop(0)
    callback(None, -ESHUTDOWN)
    handler.pump()
    assert fake.reads[2] == []


def test_class_request_goes_to_the_model_with_the_devices_interface_number(disk):
    device, _ = disk
    handler, _fake = _enabled(device)
    reply = handler.control(SetupPacket(0xA1, 0xFE, 0, 0, 1), b"")  # GET_MAX_LUN
    assert reply == Reply(data=b"\x00")


class _Alts(Function):
    def interfaces(self):
        return [InterfaceSpec(ClassCode.VENDOR_SPEC, alternates=(AltSettingSpec(
            (EndpointSpec("in", Direction.IN),)),))]


def test_model_with_alternate_settings_becomes_a_layout_without_them():
    device = Device([_Alts()], id_vendor=0x1209, id_product=0x0010)
    layout = ffs_layout(device.configuration, device.speed, device.strings)
    assert layout.endpoints == () and len(layout.dropped) == 1


class _RefusingEndpoint:
    def halt(self) -> None:  # python-functionfs, when f_fs answers the halting read(0) with EAGAIN
        raise ValueError("halt did not return EBADMSG ?")


class _Function:
    def getEndpoint(self, index: int) -> _RefusingEndpoint:  # python-functionfs's name
        return _RefusingEndpoint()


def test_halting_an_endpoint_the_host_disabled_is_no_warning(caplog):
    from collections import deque

    from gadgets.ffs import FunctionFs

    ffs = FunctionFs.__new__(FunctionFs)  # no mount: only what halt() looks at
    ffs._function, ffs._queues, ffs.enabled = _Function(), {1: deque()}, False
    with caplog.at_level("DEBUG", logger="gadgets.ffs"):
        assert ffs.halt(1) is False
    assert [r.levelname for r in caplog.records] == ["DEBUG"] and "not enabled" in caplog.text
    caplog.clear()
    ffs.enabled, ffs._queues[1] = True, deque([object()])
    assert ffs.halt(1) is False
    assert [r.levelname for r in caplog.records] == ["WARNING"]
