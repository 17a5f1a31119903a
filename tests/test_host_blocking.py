"""The userspace host on the blocking runtime (`emulator.blocking`, `import_device_blocking`): the asyncio
host's code run to its end in the calling thread, against vusb's own server on loopback (in a server thread
or a child process) and scripted fake servers: descriptors, pipelined disk reads and writes, timeouts with
unlink, several threads on one device, a server that dies, ignores unlinks or sends garbage."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import emulator.host as host_module
from emulator.blocking import BlockingRuntimeError
from emulator.devices.hid import Keyboard, hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.devices.storage import create_sparse_image
from emulator.host import (
    DeviceGone,
    HostConnectError,
    ImportRefused,
    TransferTimeout,
    import_device_blocking,
    list_devices_blocking,
)
from emulator.msc_host import Capacity, MassStorage, MscError, ScsiCheckCondition, SyncMassStorage
from emulator.sync_host import LoopThread, SyncRemoteDevice
from emulator.usbip.constants import ST_NODEV
from tests.host_helpers import fake_server, server_process, server_thread
from tests.test_host_core import _scripted_device_server

MIB = 1 << 20


def no_event_loop_here() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return True
    return False


def test_blocking_import_enumerates_and_reads_strings_in_the_calling_thread() -> None:
    with server_thread([hid_keyboard_device(Keyboard())]) as running:
        (listed,) = list_devices_blocking("127.0.0.1", running.port)
        assert listed.udev.busid == "1-1"
        device = import_device_blocking("127.0.0.1", "1-1", running.port)
        try:
            assert no_event_loop_here()
            descriptor = device.device_descriptor
            assert (descriptor.id_vendor, descriptor.id_product) == (listed.udev.idVendor, listed.udev.idProduct)
            assert device.run(device.get_string(descriptor.i_product)) == "vusb keyboard"
            device.run(device.set_configuration(1))
            assert device.run(device.get_configuration()) == 1
        finally:
            device.run(device.close())
        assert device.closed


def test_blocking_import_errors_are_the_asyncio_hosts() -> None:
    with server_thread([hid_keyboard_device(Keyboard())]) as running:
        with pytest.raises(ImportRefused) as refused:
            import_device_blocking("127.0.0.1", "9-9", running.port)
        assert refused.value.status == ST_NODEV
    with pytest.raises(HostConnectError, match="cannot connect"):
        import_device_blocking("127.0.0.1", "1-1", running.port, timeout=2)


def test_blocking_transfer_timeout_unlinks_the_urb_and_raises_transfer_timeout() -> None:
    with server_thread([hid_keyboard_device(Keyboard())]) as running, \
            SyncRemoteDevice.open("127.0.0.1", "1-1", running.port) as device:
        device.set_configuration(1)
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="timed out"):
            device.interrupt_in(0x81, 8, timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 2
        assert device.device.pending == 0


def test_a_control_transfer_runs_while_another_thread_waits_on_an_interrupt_in() -> None:
    keyboard = Keyboard()
    with server_thread([hid_keyboard_device(keyboard)]) as running, \
            SyncRemoteDevice.open("127.0.0.1", "1-1", running.port) as device:
        device.set_configuration(1)
        report: list[bytes] = []
        reader = threading.Thread(target=lambda: report.append(device.interrupt_in(0x81, 8, timeout=10)))
        reader.start()
        deadline = time.monotonic() + 5
        while device.device.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        for _ in range(20):  # each one submitted while the reader's thread sleeps in poll()
            assert device.get_configuration() == 1
        assert time.monotonic() - start < 5  # not held up by the reader's 10 s timeout
        assert reader.is_alive() and not report
        keyboard.type_text("a")
        reader.join(10)
        assert report == [Keyboard.report([0x04])]


def test_blocking_pipelined_read_and_large_write_round_trip(tmp_path: Path) -> None:
    image = create_sparse_image(tmp_path / "disk.img", 16 * MIB)
    data = os.urandom(12 * MIB)  # more than the socket buffers take at once: writes wait while reads go on
    with server_thread([mass_storage_device(str(image))]) as running, \
            SyncRemoteDevice.open("127.0.0.1", "1-1", running.port) as remote:
        disk = SyncMassStorage(remote, commands_in_flight=8, max_transfer=MIB)
        disk.write_blocks(8, data)
        disk.synchronize_cache()
        back = bytearray(len(data))
        disk.readinto_blocks(8, memoryview(back))
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    assert image.read_bytes()[8 * 512:8 * 512 + len(data)] == data


def test_blocking_pipelined_read_failing_mid_batch_raises_its_own_sense(tmp_path: Path) -> None:
    """The host believes the disk is larger: the sixth READ of a pipelined stream (in the second batch of
    four) crosses the real end; the batch is checked command by command, the rest withdrawn, the failure
    raised with its sense, and the disk reads on."""
    image = tmp_path / "disk.img"
    original = os.urandom(4 * MIB)
    image.write_bytes(original)
    blocks = 4 * MIB // 512
    with server_thread([mass_storage_device(str(image))]) as running, \
            SyncRemoteDevice.open("127.0.0.1", "1-1", running.port) as remote:
        disk = SyncMassStorage(remote, commands_in_flight=8, max_transfer=64 * 1024)
        disk.msc.capacity = Capacity(blocks + 4096, 512)
        with pytest.raises(ScsiCheckCondition) as info:
            disk.read_blocks(blocks - 5 * 128, 20 * 128)
        assert (info.value.sense.key, info.value.sense.asc) == (0x5, 0x21)
        assert remote.device.pending == 0
        assert disk.read_blocks(blocks - 5 * 128, 5 * 128) == original[-5 * 128 * 512:]


def test_server_killed_mid_read_raises_device_gone(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(64 * MIB))
    with server_process(image) as (process, port):
        device = import_device_blocking("127.0.0.1", "1-1", port)
        msc = device.run(MassStorage(device, commands_in_flight=4, max_transfer=64 * 1024).open())
        threading.Timer(0.05, process.send_signal, (signal.SIGKILL,)).start()
        start = time.monotonic()
        with pytest.raises((DeviceGone, MscError)) as info:
            for _ in range(200):  # reads well past the kill
                device.run(msc.read_blocks(0, 64 * MIB // 512))
        assert time.monotonic() - start < 20
        assert isinstance(info.value, DeviceGone) or isinstance(info.value.__cause__, DeviceGone) \
            or "closed the connection" in str(info.value)
        assert device.closed
        with pytest.raises(DeviceGone):
            device.submit(0x81, 8)


async def _cancel_the_rest() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
def fake_loop() -> Iterator[LoopThread]:
    """A loop thread for a scripted fake server; its connections' tasks are ended before it closes."""
    loop = LoopThread("fake-server")
    yield loop
    loop.run(_cancel_the_rest(), 10)
    loop.close()


def test_blocking_host_declares_a_server_that_ignores_unlink_dead(monkeypatch: pytest.MonkeyPatch,
                                                                  fake_loop: LoopThread) -> None:
    monkeypatch.setattr(host_module, "UNLINK_TIMEOUT", 0.3)
    server, port = fake_loop.run(fake_server(_scripted_device_server()), 10)
    device = import_device_blocking("127.0.0.1", "1-1", port)
    start = time.monotonic()
    with pytest.raises(DeviceGone, match="did not answer the CMD_UNLINK"):
        device.run(device.interrupt_in(0x81, 8, timeout=0.2))
    assert time.monotonic() - start < 2
    assert device.closed
    fake_loop.loop.call_soon_threadsafe(server.close)


def test_blocking_host_reports_a_malformed_reply_as_a_protocol_error(fake_loop: LoopThread) -> None:
    bogus = (0x99).to_bytes(4, "big") + bytes(44)  # no such USB/IP command
    server, port = fake_loop.run(fake_server(_scripted_device_server(garbage=bogus)), 10)
    with pytest.raises(DeviceGone, match="broke the USB/IP protocol"):
        import_device_blocking("127.0.0.1", "1-1", port)
    fake_loop.loop.call_soon_threadsafe(server.close)


def test_blocking_run_refuses_a_coroutine_that_needs_an_asyncio_loop() -> None:
    with server_thread([hid_keyboard_device(Keyboard())]) as running:
        device = import_device_blocking("127.0.0.1", "1-1", running.port)
        try:
            with pytest.raises(BlockingRuntimeError, match="needs an asyncio event loop"):
                device.run(asyncio.sleep(0))
            start = time.monotonic()
            device.run(device.sleep(0.05))  # the runtime's own sleep works
            assert time.monotonic() - start >= 0.05
            assert device.run(device.get_configuration()) == 0  # and the device is still fine
        finally:
            device.run(device.close())
