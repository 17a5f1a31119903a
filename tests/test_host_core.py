"""The asyncio userspace host against vusb's own server on loopback (real sockets), and against scripted
fake servers for the failure cases: refused imports, unlink, timeouts, cancellation, a dying or lying
server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

import emulator.host as host_module
from emulator.devices.hid import Keyboard, Mouse, hid_keyboard_device, hid_mouse_device
from emulator.host import (
    DeviceGone,
    HostConnectError,
    HostError,
    ImportRefused,
    StallError,
    TransferTimeout,
    UnsupportedTransfer,
    import_device,
    list_devices,
)
from emulator.server import UsbipServer, make_exports
from emulator.usb.descriptors import DeviceDescriptor
from emulator.usb.setup import (
    DescriptorType,
    FeatureSelector,
    Recipient,
    SetupPacket,
    get_descriptor,
    set_feature,
)
from emulator.usbip import (
    NEED_DATA,
    CmdSubmit,
    ConnectionClosed,
    OpRepImport,
    OpReqImport,
    ProtocolError,
    RetSubmit,
    ServerConnection,
)
from emulator.usbip.constants import ECONNRESET, EPIPE, ST_DEV_BUSY, ST_NODEV, ST_OK
from tests.host_helpers import fake_server

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a test coroutine with an overall deadline: a hang is a failure, not a stuck CI job."""
    return asyncio.run(asyncio.wait_for(coro, 30))


def keyboard_server(keyboard: Keyboard | None = None, **kwargs: Any) -> UsbipServer:
    return UsbipServer([hid_keyboard_device(keyboard or Keyboard())], host="127.0.0.1", port=0, **kwargs)


# -- devlist and import --------------------------------------------------------------------------------------


def test_list_devices_reports_every_exported_device() -> None:
    async def main() -> None:
        async with UsbipServer([hid_keyboard_device(Keyboard()), hid_mouse_device(Mouse())], port=0) as server:
            devices = await list_devices("127.0.0.1", server.port)
        assert [d.udev.busid for d in devices] == ["1-1", "1-2"]
        assert [d.udev.idProduct for d in devices] == [0x0001, 0x0002]
        assert devices[0].uinf[0].bInterfaceClass == 0x03

    run(main())


def test_import_reads_descriptors_with_real_get_descriptor_requests() -> None:
    sent = bytearray()

    def tap(cid: int, to_server: bool, data: bytes) -> None:
        if to_server:
            sent.extend(data)

    async def main() -> None:
        keyboard_device = hid_keyboard_device(Keyboard())
        async with UsbipServer([keyboard_device], port=0, tap=tap) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            expected = keyboard_device.control(get_descriptor(DescriptorType.DEVICE, 0, 18)).data
            assert device.device_descriptor == DeviceDescriptor.from_bytes(expected)
            config = keyboard_device.control(get_descriptor(DescriptorType.CONFIGURATION, 0, 0xFFFF)).data
            assert device.raw_configurations == (config,)
            assert device.configurations[0].interfaces[0].alternates[0].endpoints[0].address == 0x81
        # The setup packets themselves went over the wire: descriptor, config header, whole config.
        assert get_descriptor(DescriptorType.DEVICE, 0, 18).to_bytes() in sent
        assert get_descriptor(DescriptorType.CONFIGURATION, 0, 9).to_bytes() in sent
        assert get_descriptor(DescriptorType.CONFIGURATION, 0, len(config)).to_bytes() in sent

    run(main())


def test_get_string_returns_the_product_name_in_the_first_langid() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            assert await device.langids() == (0x0409,)
            assert await device.get_string(device.device_descriptor.i_product) == "vusb keyboard"
            assert await device.get_string(0) is None

    run(main())


def test_unknown_busid_is_refused_with_st_nodev() -> None:
    async def main() -> None:
        async with keyboard_server() as server:
            with pytest.raises(ImportRefused, match="ST_NODEV") as info:
                await import_device("127.0.0.1", "9-9", server.port)
            assert info.value.status == ST_NODEV

    run(main())


def test_second_importer_gets_st_dev_busy_until_the_first_closes() -> None:
    async def main() -> None:
        async with keyboard_server() as server:
            first = await import_device("127.0.0.1", "1-1", server.port)
            with pytest.raises(ImportRefused, match="ST_DEV_BUSY") as info:
                await import_device("127.0.0.1", "1-1", server.port)
            assert info.value.status == ST_DEV_BUSY
            await first.close()
            deadline = time.monotonic() + 5
            while True:  # the server frees the device when it reads our EOF
                try:
                    second = await import_device("127.0.0.1", "1-1", server.port)
                    break
                except ImportRefused:
                    assert time.monotonic() < deadline, "closing the first import did not release the device"
                    await asyncio.sleep(0.02)
            assert second.udev.busid == "1-1"
            await second.close()

    run(main())


def test_unreachable_server_raises_host_connect_error() -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now

    async def main() -> None:
        with pytest.raises(HostConnectError, match=f"127.0.0.1:{port}"):
            await list_devices("127.0.0.1", port, timeout=2)
        with pytest.raises(HostConnectError):
            await import_device("127.0.0.1", "1-1", port, timeout=2)

    run(main())


# -- transfers -----------------------------------------------------------------------------------------------


def test_control_request_the_device_refuses_raises_stall_error_with_epipe() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            with pytest.raises(StallError) as info:
                await device.get_descriptor(0x09, 0, 18)  # OTG descriptor: the keyboard has none
            assert info.value.status == -EPIPE
            # ep0 recovers by itself after a protocol stall (USB 2.0 §8.5.3.4)
            assert len(await device.get_descriptor(DescriptorType.DEVICE, 0, 18)) == 18

    run(main())


def test_interrupt_in_returns_the_report_of_a_typed_key() -> None:
    async def main() -> None:
        keyboard = Keyboard()
        async with keyboard_server(keyboard) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            read = asyncio.ensure_future(device.interrupt_in(0x81, 8, timeout=5))
            await asyncio.sleep(0.05)
            assert not read.done()  # NAK'd: nothing typed yet
            keyboard.type_text("a")
            assert await read == Keyboard.report([0x04])

    run(main())


def test_many_urbs_in_flight_are_answered_by_seqnum() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            idle = device.submit(0x81, 8, timeout=None)  # stays pending on the server meanwhile
            urbs = [device.submit(0x80, n, setup=get_descriptor(DescriptorType.DEVICE, 0, n)) for n in range(1, 65)]
            assert device.pending == 65
            results = [await device.wait(urb) for urb in urbs]
            descriptor = device.device_descriptor.to_bytes()
            assert [r.data for r in results] == [descriptor[:n] for n in range(1, 65)]
            assert not idle.done()
            result = await device.unlink(idle)
            assert result.unlinked

    run(main())


def test_unlink_of_pending_interrupt_in_is_answered_with_econnreset() -> None:
    async def main() -> None:
        keyboard = Keyboard()
        async with keyboard_server(keyboard) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            urb = device.submit(0x81, 8, timeout=None)
            await asyncio.sleep(0.05)
            result = await device.unlink(urb)
            assert result.unlinked and result.status == -ECONNRESET
            assert device.pending == 0
            keyboard.type_text("b")  # the endpoint still works, and the cancelled URB took nothing
            assert await device.interrupt_in(0x81, 8) == Keyboard.report([0x05])

    run(main())


def test_submit_into_puts_the_in_data_in_the_callers_buffer() -> None:
    async def main() -> None:
        keyboard = Keyboard()
        async with keyboard_server(keyboard) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            buffer = bytearray(12)
            keyboard.type_text("b")
            result = await device.submit(0x81, 8, into=memoryview(buffer)[2:10])
            assert result.status == 0 and result.data == b""
            assert bytes(buffer[2:2 + result.actual_length]) == Keyboard.report([0x05])[:result.actual_length]
            with pytest.raises(UnsupportedTransfer, match="into"):
                device.submit(0x81, 16, into=memoryview(buffer))  # shorter than the transfer
            with pytest.raises(UnsupportedTransfer, match="into"):
                device.submit(0x01, b"ab", into=memoryview(buffer))  # OUT

    run(main())


def test_transfer_timeout_unlinks_the_urb_and_raises_transfer_timeout() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            start = time.monotonic()
            with pytest.raises(TransferTimeout, match="timed out"):
                await device.interrupt_in(0x81, 8, timeout=0.2)
            assert 0.2 <= time.monotonic() - start < 2
            assert device.pending == 0

    run(main())


def test_cancelling_a_waiting_task_unlinks_its_urb() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            task = asyncio.ensure_future(device.interrupt_in(0x81, 8, timeout=None))
            await asyncio.sleep(0.05)
            assert device.pending == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 2
            while device.pending:  # RET_UNLINK arrives shortly
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)

    run(main())


def test_iso_urb_is_refused_by_the_server_and_on_a_non_iso_endpoint_locally() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            with pytest.raises(UnsupportedTransfer, match="not isochronous"):
                await device.iso_in(0x81, [8, 8])
            urb = device.submit(0x81, 16, iso_packets=[8, 8])  # raw: the server has no iso endpoint
            result = await device.wait(urb)
            assert result.status == -EPIPE

    run(main())


def test_wrong_transfer_type_or_direction_is_refused_before_sending() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            with pytest.raises(UnsupportedTransfer, match="interrupt, not bulk"):
                await device.bulk_in(0x81, 8)
            with pytest.raises(UnsupportedTransfer, match="IN endpoint"):
                await device.interrupt_out(0x81, b"x")
            with pytest.raises(UnsupportedTransfer, match="takes a length"):
                device.submit(0x81, b"data")
            with pytest.raises(UnsupportedTransfer, match="needs a SETUP"):
                device.submit(0x80, 8)
            assert device.pending == 0

    run(main())


# -- a dying or lying server ------------------------------------------------------------------------------


def test_server_shutdown_fails_every_pending_urb_with_device_gone() -> None:
    async def main() -> None:
        server = keyboard_server()
        await server.start()
        device = await import_device("127.0.0.1", "1-1", server.port)
        await device.set_configuration(1)
        urbs = [device.submit(0x81, 8, timeout=None) for _ in range(3)]
        await asyncio.sleep(0.05)
        await server.close()
        for urb in urbs:
            with pytest.raises(DeviceGone, match="closed the connection"):
                await device.wait(urb)
        with pytest.raises(DeviceGone):
            device.submit(0x81, 8)
        await device.close()

    run(main())


def _scripted_device_server(garbage: bytes | None = None):  # type: ignore[no-untyped-def]
    """A fake usbipd: imports a keyboard model and answers ep0 from it, but never answers a URB on another
    endpoint, nor any CMD_UNLINK; with `garbage`, sends those bytes instead of every RET_SUBMIT."""
    model = hid_keyboard_device(Keyboard())

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ServerConnection()
        try:
            while True:
                data = await reader.read(65536)
                conn.receive_data(data)
                while (event := conn.next_event()) is not NEED_DATA:
                    if isinstance(event, ConnectionClosed):
                        return
                    if isinstance(event, OpReqImport):
                        udev = make_exports([model])["1-1"].usb_device()
                        writer.write(conn.send(OpRepImport(status=ST_OK, udev=udev)))
                    elif isinstance(event, CmdSubmit):
                        if garbage is not None:
                            writer.write(garbage)
                            continue
                        if event.ep != 0:
                            continue  # never answered
                        reply = model.control(SetupPacket.from_bytes(event.setup), event.transfer_buffer)
                        body = reply.data[:event.transfer_buffer_length] if event.direction else b""
                        writer.write(conn.send(RetSubmit(seqnum=event.seqnum, status=int(reply.status),
                                                         actual_length=len(body) if event.direction else
                                                         reply.length, transfer_buffer=body)))
                if not data:
                    break
        except Exception:
            pass
        finally:
            writer.close()

    return handler


def test_malformed_reply_closes_the_connection_with_a_protocol_error() -> None:
    async def main() -> None:
        # 48 bytes claiming to be command 0x99: no such USB/IP command
        bogus = (0x99).to_bytes(4, "big") + bytes(44)
        server, port = await fake_server(_scripted_device_server(garbage=bogus))
        async with server:
            with pytest.raises(DeviceGone, match="broke the USB/IP protocol"):
                await import_device("127.0.0.1", "1-1", port)

    run(main())


def test_server_that_ignores_unlink_is_declared_dead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host_module, "UNLINK_TIMEOUT", 0.3)

    async def main() -> None:
        server, port = await fake_server(_scripted_device_server())
        async with server:
            device = await import_device("127.0.0.1", "1-1", port)
            start = time.monotonic()
            with pytest.raises(DeviceGone, match="did not answer the CMD_UNLINK"):
                await device.interrupt_in(0x81, 8, timeout=0.2)
            assert time.monotonic() - start < 2
            assert device.closed
            await device.close()

    run(main())


def test_halted_endpoint_stalls_until_clear_halt() -> None:
    async def main() -> None:
        keyboard = Keyboard()
        async with keyboard_server(keyboard) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            await device.request(set_feature(FeatureSelector.ENDPOINT_HALT, Recipient.ENDPOINT, 0x81))
            keyboard.type_text("c")
            with pytest.raises(StallError, match="interrupt IN 0x81 failed: stall"):
                await device.interrupt_in(0x81, 8)
            await device.clear_halt(0x81)
            assert await device.interrupt_in(0x81, 8) == Keyboard.report([0x06])

    run(main())


def test_set_interface_and_port_reset_change_the_device_state() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            assert await device.get_configuration() == 0  # the import leaves it unconfigured
            await device.set_configuration(1)
            assert await device.get_configuration() == 1
            await device.set_interface(0, 0)
            assert device.alternate_settings == {0: 0}
            with pytest.raises(StallError):
                await device.set_interface(0, 1)  # the keyboard has no alternate setting 1
            with pytest.raises(HostError, match="no configuration 7"):
                await device.set_configuration(7)
            await device.reset()  # SET_FEATURE(PORT_RESET), which the stub turns into usb_reset_device()
            assert await device.get_configuration() == 0

    run(main())


def test_server_hanging_up_before_answering_is_reported_as_no_answer() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)
        writer.close()

    async def main() -> None:
        server, port = await fake_server(hang_up)
        async with server:
            with pytest.raises(DeviceGone, match="no answer to OP_REQ_DEVLIST"):
                await list_devices("127.0.0.1", port)
            with pytest.raises(DeviceGone, match="no answer to OP_REQ_IMPORT"):
                await import_device("127.0.0.1", "1-1", port)

    run(main())


def test_a_peer_that_is_not_a_usbip_server_is_a_protocol_error() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(8)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server, port = await fake_server(http)
        async with server:
            with pytest.raises(DeviceGone, match="broke the USB/IP protocol") as info:
                await list_devices("127.0.0.1", port, timeout=3)
            assert isinstance(info.value.__cause__, ProtocolError)

    run(main())


def test_on_done_runs_once_as_the_answer_is_decoded_and_can_submit_the_next_urb_at_once() -> None:
    async def main() -> None:
        async with keyboard_server() as server, await import_device("127.0.0.1", "1-1", server.port) as device:
            await device.set_configuration(1)
            seen: list[tuple[int, bytes]] = []
            follow_ups = []
            setup = get_descriptor(DescriptorType.DEVICE, 0, 18)

            def done(urb: host_module.Urb) -> None:
                assert urb.done()  # the result is there when the callback runs
                seen.append((urb.seqnum, urb.future.result().data))
                if len(follow_ups) < 2:  # a URB submitted from the callback leaves without waiting a turn
                    follow_ups.append(device.submit(0x80, 18, setup=setup, on_done=done))

            first = device.submit(0x80, 18, setup=setup, on_done=done)
            await device.wait(first)
            for urb in follow_ups:
                await device.wait(urb)
            await asyncio.sleep(0.01)
            descriptor = device.device_descriptor.to_bytes()
            assert seen == [(first.seqnum, descriptor)] + [(urb.seqnum, descriptor) for urb in follow_ups]

    run(main())


def test_on_done_sees_device_gone_and_a_failing_callback_does_not_break_the_connection() -> None:
    async def main() -> None:
        server = keyboard_server()
        await server.start()
        device = await import_device("127.0.0.1", "1-1", server.port)
        await device.set_configuration(1)
        errors: list[BaseException | None] = []

        def broken(urb: host_module.Urb) -> None:
            raise RuntimeError("a bug in the caller")

        urb = device.submit(0x80, 18, setup=get_descriptor(DescriptorType.DEVICE, 0, 18), on_done=broken)
        assert (await device.wait(urb)).status == 0
        assert (await device.get_descriptor(DescriptorType.DEVICE, 0, 18)) == device.device_descriptor.to_bytes()
        pending = device.submit(0x81, 8, timeout=None, on_done=lambda u: errors.append(u.future.exception()))
        await asyncio.sleep(0.05)
        await server.close()
        await asyncio.sleep(0.05)
        assert len(errors) == 1 and isinstance(errors[0], DeviceGone)
        assert pending.done()
        await device.close()

    run(main())
