"""The bridge's logic on the host: a real vusb USB/IP server (ServerThread) on one side, a fake FunctionFS on
the other (tests/gadget_fakes.py). What the remote looks like, the gadget it becomes, ep0 forwarding with
STALLs, IN/OUT data with URBs in flight, BOT framing, unlinking on disable, the remote going away, and the
refusal of isochronous devices. tests/test_gadget_bridge_kernel.py runs the same with real gadgets."""

from __future__ import annotations

import os
import struct

import pytest

from emulator.devices.base import STALL
from emulator.devices.hid import KEYBOARD_REPORT_DESCRIPTOR, Keyboard, hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.server import ServerThread
from emulator.usb.descriptors import (
    AlternateSetting,
    Configuration,
    ConfigurationDescriptor,
    DeviceDescriptor,
    Endpoint,
    EndpointDescriptor,
    Interface,
    InterfaceDescriptor,
)
from emulator.usb.setup import SetupPacket, Speed, TransferType
from gadgets.bridge import Bridge, BridgeError, BridgeFunction, RemoteImage, RemoteSide, bridge_spec
from gadgets.ffs import FfsEvent, ffs_layout
from tests.gadget_fakes import FakeFfs


@pytest.fixture
def keyboard_server():
    keyboard = Keyboard()
    with ServerThread([hid_keyboard_device(keyboard)]) as server:
        yield server, keyboard


@pytest.fixture
def remote_side():
    side = RemoteSide()
    yield side
    side.close()


def _bridged(side: RemoteSide, port: int, depth: int = 4,
             in_chunk: int | None = 256 * 1024) -> tuple[BridgeFunction, FakeFfs, RemoteImage]:
    image = side.open("127.0.0.1", "1-1", port)
    layout = ffs_layout(image.configuration, image.speed, image.strings)
    handler = BridgeFunction(side, image, layout, depth=depth, in_chunk=in_chunk)
    fake = FakeFfs(speed=image.speed, loop=side.loop)  # the handler lives on the remote's loop
    fake.handler = handler
    handler.attach(fake)  # type: ignore[arg-type]
    fake.on_loop(lambda: handler.event(FfsEvent.ENABLE))
    fake.run_until(lambda: handler.active)
    return handler, fake, image


def test_remote_keyboard_is_described_with_its_identity_strings_and_speed(keyboard_server, remote_side):
    server, _ = keyboard_server
    image = remote_side.open("127.0.0.1", "1-1", server.port)
    assert (image.device.id_vendor, image.device.id_product, image.speed) == (0x1209, 0x0001, Speed.FULL)
    assert image.strings[image.device.i_product] == "vusb keyboard"
    spec = bridge_spec(image, "kbd.bridge")
    assert (spec.product, spec.serialnumber, spec.max_speed) == ("vusb keyboard", "vusb-kbd-0001", "full-speed")
    assert spec.functions[0].instance == "kbd_bridge"
    layout = ffs_layout(image.configuration, image.speed, image.strings)
    assert [ep.address for ep in layout.endpoints] == [0x81, 0x01] and layout.dropped == ()


def test_enable_configures_the_remote_and_keeps_in_urbs_waiting_there(keyboard_server, remote_side):
    server, _ = keyboard_server
    handler, _fake, _ = _bridged(remote_side, server.port, depth=4)
    assert handler.outstanding() == 4  # interrupt IN URBs parked at the remote until a key comes


def test_typed_keys_come_back_as_gadget_writes_in_order(keyboard_server, remote_side):
    server, keyboard = keyboard_server
    _handler, fake, _ = _bridged(remote_side, server.port)
    keyboard.type_text("ab")
    fake.run_until(lambda: len(fake.writes.get(1, [])) >= 4)
    reports = [fake.complete_write(1) for _ in range(4)]
    assert reports == [bytes((0, 0, 4, 0, 0, 0, 0, 0)), bytes(8), bytes((0, 0, 5, 0, 0, 0, 0, 0)), bytes(8)]


def test_led_report_from_the_local_host_reaches_the_remote_keyboard(keyboard_server, remote_side):
    server, keyboard = keyboard_server
    _handler, fake, _ = _bridged(remote_side, server.port)
    fake.deliver(2, b"\x01")  # NUM LOCK on the interrupt OUT endpoint
    fake.run_until(lambda: int(keyboard.leds) == 1)


def test_control_requests_are_answered_from_the_remote_and_stalls_stay_stalls(keyboard_server, remote_side):
    server, _ = keyboard_server
    _handler, fake, _ = _bridged(remote_side, server.port)
    report = fake.control(SetupPacket(0x81, 6, 0x2200, 0, 0xFF))  # GET_DESCRIPTOR(REPORT), interface 0
    assert report.data == KEYBOARD_REPORT_DESCRIPTOR
    assert fake.control(SetupPacket(0x21, 0x0A, 0, 0, 0)).status == 0  # SET_IDLE(0)
    assert fake.control(SetupPacket(0xA1, 0x02, 0, 0, 1)).data == b"\x00"  # GET_IDLE
    assert fake.control(SetupPacket(0xC0, 0x55, 0, 0, 4)) == STALL  # a vendor request it refuses


def test_disable_unlinks_every_urb_at_the_remote(keyboard_server, remote_side):
    server, _ = keyboard_server
    handler, fake, _ = _bridged(remote_side, server.port)
    assert handler.outstanding() > 0
    fake.on_loop(lambda: handler.event(FfsEvent.DISABLE))
    fake.run_until(lambda: handler.outstanding() == 0)
    assert not handler.active and fake.writes.get(1, []) == []


def test_remote_going_away_stops_the_bridge_with_the_reason(remote_side):
    server = ServerThread([hid_keyboard_device()]).start()
    try:
        handler, fake, _ = _bridged(remote_side, server.port)
    finally:
        server.stop()
    fake.run_until(lambda: fake.stopped)
    assert handler.failure is not None and "went away" in handler.failure


def _cbw(tag: int, length: int, cdb: bytes, data_in: bool = True) -> bytes:
    return struct.pack("<IIIBBB16s", 0x43425355, tag, length, 0x80 if data_in else 0, 0, len(cdb), cdb)


def test_bulk_only_disk_through_the_bridge_moves_a_command_its_data_and_status(tmp_path, remote_side):
    image_file = tmp_path / "disk.img"
    image_file.write_bytes(bytes(range(256)) * 2048)
    device = mass_storage_device(str(image_file))
    with ServerThread([device]) as server:
        handler, fake, image = _bridged(remote_side, server.port)
        assert image.speed == Speed.HIGH
        out = next(ep.index for ep in handler.layout.endpoints if not ep.is_in)
        bulk_in = next(ep.index for ep in handler.layout.endpoints if ep.is_in)
        assert handler.outstanding() == 0  # no IN URB before a CBW says what comes
        assert [size for size, _ in fake.reads[out]] == [512]
        fake.deliver(out, _cbw(1, 1024, bytes((0x28, 0, 0, 0, 0, 2, 0, 0, 2, 0))))  # READ(10) LBA 2, 2 blocks
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)
        assert fake.complete_write(bulk_in) == (bytes(range(256)) * 2048)[1024:2048]
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)
        csw = fake.complete_write(bulk_in)
        assert csw[:4] == b"USBS" and struct.unpack_from("<IIB", csw, 4) == (1, 0, 0)
        fake.deliver(out, _cbw(2, 512, bytes((0x2A, 0, 0, 0, 0, 7, 0, 0, 1, 0)), data_in=False))  # WRITE(10)
        fake.run_until(lambda: any(size == 512 for size, _ in fake.reads.get(out, [])))
        fake.deliver(out, b"\xEE" * 512)
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)
        assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (2, 0, 0)
    assert image_file.read_bytes()[7 * 512:8 * 512] == b"\xEE" * 512


def _watch_bulk_in(handler, remote_side) -> tuple[int, int, list[int | bytes]]:
    """The bulk OUT and IN endpoint file indexes, and a list of what the bridge asks of the remote's bulk IN
    (each URB's length), filled as it submits."""
    out = next(ep.index for ep in handler.layout.endpoints if not ep.is_in)
    bulk_in = next(ep.index for ep in handler.layout.endpoints if ep.is_in)
    bulk_in_address = next(ep.address for ep in handler.layout.endpoints if ep.is_in)
    submitted: list[int | bytes] = []
    device = remote_side.remote
    assert device is not None
    real_submit = device.submit

    def counting_submit(endpoint, data_or_length, **kwargs):
        if endpoint == bulk_in_address:
            submitted.append(data_or_length)
        return real_submit(endpoint, data_or_length, **kwargs)

    device.submit = counting_submit
    return out, bulk_in, submitted


def test_a_120_kib_bulk_only_read_is_one_urb_at_the_remote_and_one_gadget_write(tmp_path, remote_side):
    image_file = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image_file.write_bytes(content)
    with ServerThread([mass_storage_device(str(image_file))]) as server:
        handler, fake, _ = _bridged(remote_side, server.port)
        out, bulk_in, submitted = _watch_bulk_in(handler, remote_side)
        # READ(10) LBA 16, 240 blocks: what usb-storage sends for a 1 MiB read on a high-speed disk
        fake.deliver(out, _cbw(9, 240 * 512, bytes((0x28, 0, 0, 0, 0, 16, 0, 0, 240, 0))))
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 2)
        assert submitted == [240 * 512, 13]  # the data-in as one URB, the CSW right behind it
        assert fake.complete_write(bulk_in) == content[16 * 512 : 256 * 512]  # one write to the gadget
        assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (9, 0, 0)


def test_a_long_bulk_only_read_is_asked_of_the_remote_in_chunks_and_arrives_whole(tmp_path, remote_side):
    image_file = tmp_path / "disk.img"
    content = os.urandom(2 << 20)
    image_file.write_bytes(content)
    with ServerThread([mass_storage_device(str(image_file))]) as server:
        handler, fake, _ = _bridged(remote_side, server.port, depth=8, in_chunk=256 * 1024)
        out, bulk_in, submitted = _watch_bulk_in(handler, remote_side)
        for tag in (1, 2):  # READ(10) LBA 8, 2048 blocks (1 MiB), twice
            fake.deliver(out, _cbw(tag, 1 << 20, bytes((0x28, 0, 0, 0, 0, 8, 0, 0x08, 0, 0))))
            fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 5)
            data = b"".join(fake.complete_write(bulk_in) for _ in range(4))
            assert data == content[8 * 512 : 8 * 512 + (1 << 20)]
            assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (tag, 0, 0)
        assert submitted == ([256 * 1024] * 4 + [13]) * 2


@pytest.mark.parametrize("in_chunk", [None, 16 * 1024])
def test_a_data_in_that_ends_short_and_stalls_leaves_no_urb_to_swallow_the_next_command(tmp_path, remote_side,
                                                                                         in_chunk):
    image_file = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image_file.write_bytes(content)
    with ServerThread([mass_storage_device(str(image_file))]) as server:
        handler, fake, _ = _bridged(remote_side, server.port, depth=8, in_chunk=in_chunk)
        out = next(ep.index for ep in handler.layout.endpoints if not ep.is_in)
        bulk_in = next(ep.index for ep in handler.layout.endpoints if ep.is_in)
        # READ CAPACITY(10) with 64 KiB allowed (case 5): the remote sends 8 bytes and STALLs
        fake.deliver(out, _cbw(5, 64 * 1024, bytes((0x25,) + (0,) * 9)))
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)
        assert len(fake.complete_write(bulk_in)) == 8
        fake.run_until(lambda: bulk_in in fake.halts)
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)
        assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (5, 64 * 1024 - 8, 0)
        assert fake.halts.count(bulk_in) == 1
        fake.run_until(lambda: handler.outstanding() == 0)  # nothing left at the remote
        # the next command's data arrives whole and in place
        fake.deliver(out, _cbw(6, 64 * 512, bytes((0x28, 0, 0, 0, 0, 8, 0, 0, 64, 0))))
        parts = 1 if in_chunk is None else 64 * 512 // in_chunk
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= parts + 1)
        data = b"".join(fake.complete_write(bulk_in) for _ in range(parts))
        assert data == content[8 * 512 : 72 * 512]
        assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (6, 0, 0)


def test_a_short_chunk_without_stall_passes_the_csw_on_once_the_urbs_behind_it_are_unlinked(tmp_path, remote_side):
    image_file = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image_file.write_bytes(content)
    with ServerThread([mass_storage_device(str(image_file), can_stall=False)]) as server:
        handler, fake, _ = _bridged(remote_side, server.port, depth=8, in_chunk=16 * 1024)
        out = next(ep.index for ep in handler.layout.endpoints if not ep.is_in)
        bulk_in = next(ep.index for ep in handler.layout.endpoints if ep.is_in)
        # READ CAPACITY(10) with 64 KiB allowed: 8 bytes, a short packet, then the CSW in the second chunk's URB
        fake.deliver(out, _cbw(5, 64 * 1024, bytes((0x25,) + (0,) * 9)))
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 2)
        assert handler.outstanding() == 0  # the CSW was held until the three URBs behind it were unlinked
        assert len(fake.complete_write(bulk_in)) == 8
        assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (5, 64 * 1024 - 8, 0)
        assert fake.halts == []
        fake.deliver(out, _cbw(6, 32 * 1024, bytes((0x28, 0, 0, 0, 0, 8, 0, 0, 64, 0))))
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 3)
        assert b"".join(fake.complete_write(bulk_in) for _ in range(2)) == content[8 * 512 : 72 * 512]
        assert struct.unpack_from("<IIB", fake.complete_write(bulk_in), 4) == (6, 0, 0)


def test_remote_with_an_isochronous_endpoint_is_refused_before_any_gadget_exists(monkeypatch):
    iso = AlternateSetting(InterfaceDescriptor(interface_class=1, interface_subclass=2), (), (
        Endpoint(EndpointDescriptor(endpoint_address=0x81, attributes=TransferType.ISOCHRONOUS,
                                    max_packet_size=192, interval=1)),))
    image = RemoteImage("127.0.0.1", 3240, "1-1", Speed.HIGH, DeviceDescriptor(id_vendor=0x1234, id_product=5),
                        Configuration(ConfigurationDescriptor(), (), (Interface((iso,)),)), {})
    bridge = Bridge("127.0.0.1", "1-1")
    monkeypatch.setattr(bridge.remote, "open", lambda host, busid, port, tap=None: image)
    with pytest.raises(BridgeError, match=r"cannot be bridged: .*isochronous"):
        bridge.start()
    assert bridge.gadget is None
    bridge.close()


def test_unreachable_server_is_a_clear_bridge_error():
    bridge = Bridge("127.0.0.1", "1-1", port=1)
    with pytest.raises(BridgeError, match=r"cannot import 1-1 from 127\.0\.0\.1:1"):
        bridge.start()
    bridge.close()


def test_remote_stall_on_data_in_halts_the_gadget_endpoint_once_and_the_csw_still_follows(tmp_path, remote_side):
    image_file = tmp_path / "disk.img"
    image_file.write_bytes(bytes(1 << 20))
    with ServerThread([mass_storage_device(str(image_file))]) as server:
        handler, fake, _ = _bridged(remote_side, server.port)
        out = next(ep.index for ep in handler.layout.endpoints if not ep.is_in)
        bulk_in = next(ep.index for ep in handler.layout.endpoints if ep.is_in)
        fake.deliver(out, _cbw(4, 512, bytes((0x25,) + (0,) * 9)))  # READ CAPACITY(10), host allows 512 (case 5)
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)
        assert len(fake.complete_write(bulk_in)) == 8  # the data the remote sent before its STALL
        fake.run_until(lambda: bulk_in in fake.halts)
        fake.run_until(lambda: len(fake.writes.get(bulk_in, [])) >= 1)  # remote halt cleared, CSW fetched
        csw = fake.complete_write(bulk_in)
        assert struct.unpack_from("<IIB", csw, 4) == (4, 504, 0)
        assert fake.halts.count(bulk_in) == 1
