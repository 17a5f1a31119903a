"""The userspace mass-storage host (BOT + SCSI initiator) against vusb's emulated thumb drive over real
loopback sockets: data round trips checked against the backing image file, sense reporting, the BOT
error cases of §6.7 (short data, stalls, phase error → reset recovery), >2 TiB addressing, the file view,
and a server killed mid-transfer."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from emulator.devices.hid import hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.devices.storage import Store, create_sparse_image
from emulator.host import DeviceGone, HostError, import_device
from emulator.msc_host import (
    BotTransportError,
    Capacity,
    MassStorage,
    MscError,
    NotMassStorage,
    ScsiCheckCondition,
    SyncMassStorage,
    _cdb_rw,
    open_disk,
    parse_sense,
)
from emulator.server import UsbipServer
from emulator.sync_host import SyncRemoteDevice
from tests.host_helpers import server_process, server_thread

T = TypeVar("T")
MIB = 1 << 20


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return create_sparse_image(tmp_path / "disk.img", 16 * MIB)


def _tap_into(sent: bytearray):  # type: ignore[no-untyped-def]
    def tap(cid: int, to_server: bool, data: bytes) -> None:
        if to_server:
            sent.extend(data)
    return tap


@pytest.mark.parametrize(("pipeline", "urbs"), [(False, 1), (True, 1), (True, 4)])
def test_write_then_read_round_trip_lands_in_the_image_file(image: Path, pipeline: bool, urbs: int) -> None:
    data = os.urandom(3 * MIB + 4096)

    async def main() -> bytes:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device, pipeline=pipeline, urbs_per_command=urbs).open()
            assert msc.capacity is not None and msc.capacity.size == 16 * MIB
            await msc.write_blocks(1000, data)
            await msc.synchronize_cache()
            return await msc.read_blocks(1000, len(data) // 512)

    back = run(main())
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    with image.open("rb") as f:  # independent of the host: the bytes are where the LBA says
        f.seek(1000 * 512)
        assert f.read(len(data)) == data


def test_inquiry_and_capacity_describe_the_emulated_drive(image: Path) -> None:
    async def main() -> None:
        device_model = mass_storage_device(str(image), vendor="ACME", product="Stick", revision="1.2a")
        async with UsbipServer([device_model], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device).open()
            assert msc.inquiry_data is not None
            assert (msc.inquiry_data.vendor, msc.inquiry_data.product, msc.inquiry_data.revision) == (
                "ACME", "Stick", "1.2a")
            assert msc.inquiry_data.removable and msc.inquiry_data.device_type == 0
            assert msc.capacity is not None
            assert (msc.capacity.block_count, msc.capacity.block_size) == (16 * MIB // 512, 512)

    run(main())


def test_check_condition_is_reported_with_sense_key_asc_and_ascq(image: Path) -> None:
    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device).open()
            beyond = 16 * MIB // 512
            with pytest.raises(ScsiCheckCondition) as info:
                await msc.command(_cdb_rw(0x28, 0x88, beyond, 1), data_in=512)
            sense = info.value.sense
            assert (sense.key, sense.asc, sense.ascq) == (0x5, 0x21, 0x00)
            assert "ILLEGAL REQUEST: LOGICAL BLOCK ADDRESS OUT OF RANGE (ASC 21h, ASCQ 00h)" in str(info.value)
            with pytest.raises(ScsiCheckCondition, match="INVALID COMMAND OPERATION CODE"):
                await msc.command(bytes([0xEE, 0, 0, 0, 0, 0]))
            with pytest.raises(MscError, match="outside the disk"):
                await msc.read_blocks(beyond - 1, 2)  # refused locally, nothing sent
            assert len(await msc.read_blocks(beyond - 1, 1)) == 512

    run(main())


def test_unit_attention_after_a_reset_is_waited_through(image: Path) -> None:
    async def main() -> None:
        model = mass_storage_device(str(image), unit_attention_on_reset=True)
        async with UsbipServer([model], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device).open()  # the import reset raised one: open() got past it
            await device.reset()
            await device.set_configuration(1)
            with pytest.raises(ScsiCheckCondition, match="UNIT ATTENTION: POWER ON, RESET"):
                await msc.test_unit_ready()
            await device.reset()
            await device.set_configuration(1)
            await msc.wait_ready()
            await msc.test_unit_ready()

    run(main())


@pytest.mark.parametrize("can_stall", [True, False])
@pytest.mark.parametrize("urbs", [1, 4])
def test_short_data_in_ends_the_data_phase_and_the_residue_is_reported(image: Path, can_stall: bool,
                                                                      urbs: int) -> None:
    """BOT §6.7.2 case 5 (Hi > Di): INQUIRY allocating 36 bytes inside a 2048-byte data-in. A stalling
    device halts bulk IN (cleared, CSW read again); a non-stalling one ends with a short packet and the CSW
    lands in one of the pipelined data URBs."""

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image), can_stall=can_stall)], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device, urbs_per_command=urbs).open()
            result = await msc.command(bytes([0x12, 0, 0, 0, 36, 0]), data_in=2048)
            assert len(result.data) == 36 and result.residue == 2048 - 36
            assert result.data[8:12] == b"vusb"
            assert len(await msc.read_blocks(0, 64)) == 64 * 512  # the transport is still in step
            assert device.pending == 0

    run(main())


def test_phase_error_triggers_reset_recovery_and_the_disk_keeps_working(image: Path) -> None:
    sent = bytearray()

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0, tap=_tap_into(sent)) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device).open()
            await msc.write_blocks(0, b"\xaa" * 4096)
            with pytest.raises(BotTransportError, match=r"phase error.*reset recovery done"):
                await msc.command(_cdb_rw(0x28, 0x88, 0, 8), data_in=512)  # case 7: Hi < Di
            assert await msc.read_blocks(0, 8) == b"\xaa" * 4096

    run(main())
    # Bulk-Only Mass Storage Reset: class, interface 0, bRequest FFh (BOT §3.1)
    assert bytes.fromhex("21ff000000000000") in sent
    # then CLEAR_FEATURE(ENDPOINT_HALT) on bulk IN (0x81), then bulk OUT (0x01)
    reset = sent.index(bytes.fromhex("21ff000000000000"))
    clear_in = sent.index(bytes.fromhex("0201000081000000"), reset)
    assert sent.index(bytes.fromhex("0201000001000000"), reset) > clear_in


def test_refused_data_out_stalls_bulk_out_and_the_failure_is_sensed(image: Path) -> None:
    """BOT §6.7.3 case 9 (Ho > Dn): an unknown command with data-out. The device halts bulk OUT; the host
    clears it, reads the CSW (FAIL), and REQUEST SENSE names the reason."""

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device, urbs_per_command=2).open()
            with pytest.raises(ScsiCheckCondition, match="INVALID COMMAND OPERATION CODE"):
                await msc.command(bytes([0xEE, 0, 0, 0, 0, 0]), data_out=bytes(4096))
            await msc.write_blocks(8, b"\x55" * 512)
            assert await msc.read_blocks(8, 1) == b"\x55" * 512

    run(main())


class _SparseMemoryStore(Store):
    """A 3 TiB disk that only remembers the blocks written: enough to need 64-bit LBAs."""

    def __init__(self, size: int) -> None:
        self.size, self.block_size, self.read_only, self.name = size, 512, False, "sparse-3TiB"
        self.blocks: dict[int, bytes] = {}

    def pread(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return b"".join(self.blocks.get(b, bytes(512)) for b in range(offset // 512, (offset + length) // 512))

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        for i in range(len(data) // 512):
            self.blocks[offset // 512 + i] = bytes(data[i * 512:(i + 1) * 512])

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_disk_beyond_2_tib_uses_read_capacity_16_and_16_byte_cdbs() -> None:
    store = _SparseMemoryStore(3 << 40)
    sent = bytearray()

    async def main() -> None:
        async with UsbipServer([mass_storage_device(store)], port=0, tap=_tap_into(sent)) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device).open()
            assert msc.capacity is not None and msc.capacity.block_count == (3 << 40) // 512
            lba = (1 << 32) + 5
            await msc.write_blocks(lba, b"\x42" * 1024)
            assert await msc.read_blocks(lba, 2) == b"\x42" * 1024

    run(main())
    assert store.blocks[(1 << 32) + 5] == b"\x42" * 512
    assert bytes([0x9E, 0x10]) in sent  # SERVICE ACTION IN(16) / READ CAPACITY(16)
    assert bytes([0x8A, 0x00, 0x00, 0x00, 0x00, 0x01]) in sent and bytes([0x88, 0x00, 0x00, 0x00, 0x00, 0x01]) in sent


def test_each_lun_reaches_its_own_image(tmp_path: Path) -> None:
    first = create_sparse_image(tmp_path / "a.img", MIB)
    second = create_sparse_image(tmp_path / "b.img", 2 * MIB)

    async def main() -> None:
        async with UsbipServer([mass_storage_device([str(first), str(second)])], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device, lun=1).open()
            assert msc.max_lun == 1
            assert msc.capacity is not None and msc.capacity.size == 2 * MIB
            await msc.write_blocks(2, b"\x11" * 512)

    run(main())
    assert second.read_bytes()[1024:1536] == b"\x11" * 512
    assert first.read_bytes() == bytes(MIB)


def test_a_device_without_mass_storage_interface_is_refused() -> None:
    async def main() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            with pytest.raises(NotMassStorage, match="no mass-storage interface"):
                await MassStorage(device).open()

    run(main())


def test_block_device_reads_and_writes_unaligned_ranges(image: Path) -> None:
    original = os.urandom(64 * 1024)
    with image.open("r+b") as f:
        f.write(original)
    with server_thread([mass_storage_device(str(image))]) as running:
        disk = open_disk("127.0.0.1", "1-1", running.port)
        try:
            assert disk.seek(0, os.SEEK_END) == 16 * MIB
            disk.seek(1000)
            assert disk.read(3000) == original[1000:4000]
            disk.seek(700)
            assert disk.write(b"\x77" * 1500) == 1500  # starts and ends inside blocks
            buffer = bytearray(2000)
            disk.seek(500)
            assert disk.readinto(buffer) == 2000
            assert bytes(buffer) == original[500:700] + b"\x77" * 1500 + original[2200:2500]
            disk.seek(16 * MIB)
            with pytest.raises(OSError, match="no space left"):
                disk.write(b"x")
            assert disk.read(10) == b""
        finally:
            disk.close()  # flush (SYNCHRONIZE CACHE) and release
    content = image.read_bytes()[:4096]
    assert content == original[:700] + b"\x77" * 1500 + original[2200:4096]


@pytest.mark.parametrize("commands_in_flight", [1, 8])
def test_server_killed_mid_read_fails_with_device_gone_without_hanging(
    tmp_path: Path, commands_in_flight: int
) -> None:
    image = create_sparse_image(tmp_path / "big.img", 64 * MIB)
    with server_process(image) as (process, port):
        async def main() -> None:
            async with await import_device("127.0.0.1", "1-1", port) as device:
                msc = await MassStorage(device, commands_in_flight=commands_in_flight).open()
                reading = asyncio.ensure_future(msc.read_blocks(0, 64 * MIB // 512))
                await asyncio.sleep(0.05)
                assert not reading.done(), "the read finished before the server could be killed"
                process.send_signal(signal.SIGKILL)
                start = time.monotonic()
                with pytest.raises(DeviceGone):
                    await reading
                assert time.monotonic() - start < 5
                assert device.pending == 0
                with pytest.raises(HostError):
                    await msc.read_blocks(0, 1)

        run(main())


def test_parse_sense_reads_fixed_and_descriptor_formats() -> None:
    fixed = bytes([0xF0, 0, 0x03, 0, 0, 0x12, 0x34, 10, 0, 0, 0, 0, 0x11, 0x00, 0, 0, 0, 0])
    sense = parse_sense(fixed)
    assert (sense.key, sense.asc, sense.ascq, sense.information) == (3, 0x11, 0, 0x1234)
    assert str(sense) == "MEDIUM ERROR: UNRECOVERED READ ERROR (ASC 11h, ASCQ 00h, information 0x1234)"
    descriptor = bytes([0x72, 0x05, 0x24, 0x00, 0, 0, 0, 12, 0x00, 0x0A, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0x07])
    sense = parse_sense(descriptor)
    assert (sense.key, sense.asc, sense.ascq, sense.information) == (5, 0x24, 0, 7)
    with pytest.raises(MscError, match="response code"):
        parse_sense(bytes([0x05, 0, 0]))


# -- several READ commands in flight (commands_in_flight > 1, for servers that serialize a device's URBs) ----


@pytest.mark.parametrize(("urbs", "tapped"), [(1, False), (4, False), (1, True)])
def test_reads_with_several_commands_in_flight_return_the_image_bytes(image: Path, urbs: int,
                                                                      tapped: bool) -> None:
    """Payloads go straight into the caller's buffer (the host reads the socket into each URB's `into`),
    or, with a tap on the host that must see every byte, through the tap's buffer."""
    original = os.urandom(16 * MIB)
    image.write_bytes(original)
    received = [0]

    def tap(cid: int, from_client: bool, data: bytes) -> None:
        if not from_client:
            received[0] += len(data)

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port, tap=tap if tapped else None) as device:
            msc = await MassStorage(device, commands_in_flight=8, urbs_per_command=urbs).open()
            assert await msc.read_blocks(0, 16 * MIB // 512) == original
            assert await msc.read_blocks(3, 1000) == original[3 * 512:1003 * 512]  # last command short
            buffer = bytearray(300 * 512)
            await msc.readinto_blocks(77, memoryview(buffer))
            assert buffer == original[77 * 512:377 * 512]
            assert device.pending == 0

    run(main())
    assert (received[0] > 16 * MIB) == tapped


@pytest.mark.parametrize("can_stall", [True, False])
def test_a_failing_read_in_the_middle_of_a_pipelined_stream_raises_its_own_sense(image: Path,
                                                                                 can_stall: bool) -> None:
    """The host believes the disk is larger than it is: the command that crosses the real end fails with
    LOGICAL BLOCK ADDRESS OUT OF RANGE while seven more are queued behind it. Those are withdrawn, the
    failure is raised with its sense, and the transport stays in step for what follows."""
    original = os.urandom(16 * MIB)
    image.write_bytes(original)
    blocks = 16 * MIB // 512

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image), can_stall=can_stall)], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device, commands_in_flight=8).open()
            msc.capacity = Capacity(blocks + 4096, 512)
            with pytest.raises(ScsiCheckCondition) as info:
                await msc.read_blocks(blocks - 5 * 128, 20 * 128)
            assert (info.value.sense.key, info.value.sense.asc) == (0x5, 0x21)
            assert device.pending == 0
            assert await msc.read_blocks(blocks - 5 * 128, 5 * 128) == original[-5 * 128 * 512:]
            assert await msc.read_blocks(0, 64) == original[:64 * 512]
            assert device.pending == 0

    run(main())


def test_cancelling_a_pipelined_read_mid_stream_unlinks_its_urbs_and_the_disk_reads_on(image: Path) -> None:
    """The clean stream runs in completion callbacks; cancelling the task that waits for it stops the
    stream, unlinks what is queued, and the next command starts with reset recovery."""
    original = os.urandom(16 * MIB)
    image.write_bytes(original)

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            msc = await MassStorage(device, commands_in_flight=8, max_transfer=64 * 1024).open()
            buffer = bytearray(16 * MIB)
            task = asyncio.ensure_future(msc.readinto_blocks(0, memoryview(buffer)))
            while device.pending == 0:
                await asyncio.sleep(0)
            await asyncio.sleep(0.002)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            deadline = time.monotonic() + 5
            while device.pending and time.monotonic() < deadline:  # the unlinks are answered
                await asyncio.sleep(0.01)
            assert device.pending == 0
            assert await msc.read_blocks(100, 300) == original[100 * 512:400 * 512]

    run(main())


def test_commands_in_flight_below_one_is_refused(image: Path) -> None:
    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server, \
                await import_device("127.0.0.1", "1-1", server.port) as device:
            with pytest.raises(MscError, match="commands_in_flight"):
                MassStorage(device, commands_in_flight=0)

    run(main())


def test_blocking_facade_reads_with_several_commands_in_flight(image: Path) -> None:
    original = os.urandom(MIB)
    with image.open("r+b") as f:
        f.write(original)
    with server_thread([mass_storage_device(str(image))]) as running:
        remote = SyncRemoteDevice.open("127.0.0.1", "1-1", running.port)
        try:
            disk = SyncMassStorage(remote, commands_in_flight=4)
            assert disk.read_blocks(1, MIB // 512 - 1) == original[512:]
        finally:
            remote.close()
