"""Unmodified pyusb code against devices imported from vusb's server through `emulator.pyusb_backend`."""

from __future__ import annotations

import errno
import time

import pytest
import usb.core
import usb.util

from emulator.devices.cdc_acm import cdc_acm_device
from emulator.devices.hid import Keyboard, Led, hid_keyboard_device
from emulator.host import ImportRefused
from emulator.pyusb_backend import get_backend
from tests.host_helpers import server_thread


@pytest.fixture
def keyboard_and_serial():  # type: ignore[no-untyped-def]
    keyboard = Keyboard()
    with server_thread([hid_keyboard_device(keyboard), cdc_acm_device()]) as running:
        backend = get_backend("127.0.0.1", None, running.port)  # every exported device
        try:
            yield keyboard, backend, running
        finally:
            backend.close()


def test_find_sees_every_imported_device_with_its_descriptor_fields(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    _, backend, _ = keyboard_and_serial
    devices = list(usb.core.find(find_all=True, backend=backend))
    assert sorted(d.idProduct for d in devices) == [0x0001, 0x0003]
    keyboard = usb.core.find(backend=backend, idVendor=0x1209, idProduct=0x0001)
    assert keyboard is not None
    assert (keyboard.bus, keyboard.address, keyboard.port_numbers) == (1, 2, (1,))
    assert keyboard.bNumConfigurations == 1 and keyboard.bMaxPacketSize0 == 64
    interface = keyboard[0][(0, 0)]
    assert (interface.bInterfaceClass, interface.bNumEndpoints) == (0x03, 2)
    assert list(interface.extra_descriptors)[:2] == [9, 0x21]  # the HID class descriptor follows it


def test_set_configuration_and_get_string_read_the_device(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    _, backend, _ = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0001)
    with pytest.raises(usb.core.USBError, match="Configuration not set"):
        dev.get_active_configuration()  # GET_CONFIGURATION says 0: unconfigured after import
    dev.set_configuration()
    assert dev.get_active_configuration().bConfigurationValue == 1
    assert usb.util.get_string(dev, dev.iProduct) == "vusb keyboard"
    assert dev.serial_number == "vusb-kbd-0001"
    assert dev.langids == (0x0409,)


def test_ctrl_transfer_in_returns_data_and_out_reaches_the_device(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    keyboard, backend, _ = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0001)
    dev.set_configuration()
    descriptor = dev.ctrl_transfer(0x80, 0x06, 0x0100, 0, 18)
    assert bytes(descriptor[8:12]) == bytes.fromhex("09120100")  # idVendor 1209, idProduct 0001
    # HID SET_REPORT(Output): the LED byte (HID 1.11 §7.2.2)
    written = dev.ctrl_transfer(0x21, 0x09, 0x0200, 0, bytes([int(Led.CAPS_LOCK)]))
    assert written == 1
    assert keyboard.leds == Led.CAPS_LOCK


def test_interrupt_read_returns_the_report_of_typed_text(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    keyboard, backend, _ = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0001)
    dev.set_configuration()
    endpoint = usb.util.find_descriptor(dev.get_active_configuration()[(0, 0)],
                                        custom_match=lambda e: usb.util.endpoint_direction(e.bEndpointAddress)
                                        == usb.util.ENDPOINT_IN)
    keyboard.type_text("A")  # shift + a, then release
    assert bytes(endpoint.read(8, timeout=2000)) == Keyboard.report([0x04], 0x02)
    assert bytes(endpoint.read(8, timeout=2000)) == Keyboard.report()


def test_stall_raises_usb_error_with_epipe_like_libusb(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    _, backend, _ = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0001)
    with pytest.raises(usb.core.USBError) as info:
        dev.ctrl_transfer(0x80, 0x06, 0x0900, 0, 18)  # no OTG descriptor
    assert info.value.errno == errno.EPIPE
    assert info.value.backend_error_code == -9  # LIBUSB_ERROR_PIPE


def test_read_timeout_raises_usb_timeout_error(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    _, backend, _ = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0001)
    dev.set_configuration()
    start = time.monotonic()
    with pytest.raises(usb.core.USBTimeoutError) as info:
        dev.read(0x81, 8, timeout=200)  # nobody types
    assert info.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - start < 2


def test_bulk_write_and_read_round_trip_through_cdc_acm_loopback(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    _, backend, _ = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0003)
    dev.set_configuration()
    data_interface = usb.util.find_descriptor(dev.get_active_configuration(), bInterfaceClass=0x0A)
    out = usb.util.find_descriptor(data_interface, custom_match=lambda e: not e.bEndpointAddress & 0x80)
    in_ = usb.util.find_descriptor(data_interface, custom_match=lambda e: e.bEndpointAddress & 0x80)
    assert usb.util.endpoint_type(out.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK
    payload = bytes(range(256)) * 12  # 3072 bytes, several packets
    assert out.write(payload, timeout=2000) == len(payload)
    received = bytearray()
    while len(received) < len(payload):
        received += bytes(in_.read(4096, timeout=2000))
    assert bytes(received) == payload


def test_server_gone_maps_to_enodev(keyboard_and_serial) -> None:  # type: ignore[no-untyped-def]
    _, backend, running = keyboard_and_serial
    dev = usb.core.find(backend=backend, idProduct=0x0001)
    running.loop.run(running.server.close(), 10)
    deadline = time.monotonic() + 5
    while True:
        try:
            dev.ctrl_transfer(0x80, 0x06, 0x0100, 0, 18)
        except usb.core.USBError as exc:
            assert exc.errno == errno.ENODEV and exc.backend_error_code == -4
            break
        assert time.monotonic() < deadline, "the lost connection was never reported"
        time.sleep(0.02)


def test_get_backend_with_an_unknown_busid_raises_import_refused() -> None:
    with server_thread([hid_keyboard_device()]) as running, pytest.raises(ImportRefused, match="ST_NODEV"):
        get_backend("127.0.0.1", "3-3", running.port)
