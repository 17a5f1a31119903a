"""`RemoteDevice.submit_group`: URBs submitted and awaited as one (a Bulk-Only command's CBW, data and CSW).
A group that goes as planned keeps the core's tuples; anything else — a stall, a short transfer, a timeout,
cancellation, the server going away — turns it into ordinary `Urb`s with exactly what URBs submitted one by
one would have reported. Against vusb's own server on loopback."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from emulator.devices.hid import Keyboard, hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.devices.storage import create_sparse_image
from emulator.host import (
    DeviceGone,
    RemoteDevice,
    StallError,
    TransferTimeout,
    UnsupportedTransfer,
    import_device,
)
from emulator.server import UsbipServer
from emulator.usbip.constants import EPIPE

T = TypeVar("T")
MIB = 1 << 20
_CBW = struct.Struct("<IIIBBB16s")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def _read10(tag: int, lba: int, blocks: int) -> bytes:
    cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
    return _CBW.pack(0x43425355, tag, blocks * 512, 0x80, 0, len(cdb), cdb)


async def _configured(port: int) -> RemoteDevice:
    device = await import_device("127.0.0.1", "1-1", port)
    await device.set_configuration(1)
    return device


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = create_sparse_image(tmp_path / "disk.img", MIB)
    path.write_bytes(os.urandom(MIB))
    return path


@pytest.mark.parametrize("debug", [False, True])
def test_a_clean_group_gives_each_urbs_answer_and_the_data_in_into(image: Path, debug: bool,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """With debug logging the core decodes every RET_SUBMIT as a message (no tuples): same outcome."""
    if debug:
        caplog.set_level(logging.DEBUG, logger="emulator.usbip.connection")
    original = image.read_bytes()

    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server:
            device = await _configured(server.port)
            try:
                buffers = [bytearray(4096) for _ in range(3)]
                groups = [device.submit_group([(0x01, _read10(tag, 8 * tag, 8), None),
                                               (0x81, 4096, memoryview(buffers[tag])), (0x81, 13, None)])
                          for tag in range(3)]
                assert device.pending == 9
                for tag, group in enumerate(groups):
                    await device.wait_group(group)
                    assert group.clean
                    results = group.results
                    assert [(r[1], r[2]) for r in results if r is not None] == [(0, 31), (0, 4096), (0, 13)]
                    assert results[1] is not None and results[1][5] == b""  # the data went to into
                    assert results[2] is not None and results[2][5] == struct.pack("<IIIB", 0x53425355, tag, 0, 0)
                    assert buffers[tag] == original[8 * tag * 512:(8 * tag + 8) * 512]
                assert device.pending == 0
            finally:
                await device.close()

    run(main())


def test_a_stalled_data_urb_turns_the_group_into_urbs_with_their_results(image: Path) -> None:
    """A READ past the end: the device stalls bulk IN. The group ends not clean; its URBs say what a URB
    submitted alone would (the CBW taken, the data stalled); the halt is cleared and the CSW read."""
    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image), can_stall=True)], port=0) as server:
            device = await _configured(server.port)
            try:
                group = device.submit_group([(0x01, _read10(7, MIB // 512 - 1, 8), None),
                                             (0x81, 4096, memoryview(bytearray(4096))), (0x81, 13, None)])
                await group
                assert not group.clean
                cbw, data, csw = group.urbs()
                assert group.urbs()[1] is data  # once turned, the same Urbs
                assert (await device.wait(cbw)).actual_length == 31
                result = await device.wait(data)
                assert result.status == -EPIPE
                with pytest.raises(StallError):
                    device.check(data, result)
                if not csw.done():  # queued behind the stall: halted too, or unlinked here
                    await device.unlink(csw)
                await device.clear_halt(0x81)
                answer = await device.bulk_in(0x81, 13)
                assert answer[:4] == b"USBS" and answer[12] == 1  # the command failed: CHECK CONDITION
                assert device.pending == 0
            finally:
                await device.close()

    run(main())


def test_on_done_runs_once_as_a_group_ends_clean_or_turns_into_urbs(image: Path) -> None:
    """The callback runs inside the receive path the moment the last answer is decoded (the group's future
    is done by then), and once for a group that goes wrong (a stalled data phase), with `clean` telling
    which; a second group submitted from the callback goes out at once."""
    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image), can_stall=True)], port=0) as server:
            device = await _configured(server.port)
            try:
                seen: list[tuple[int, bool, bool]] = []
                follow: list = []

                def on_done(group) -> None:  # type: ignore[no-untyped-def]
                    seen.append((id(group), group.clean, group.future.done()))
                    if len(seen) == 1:  # submitted from inside the receive path: a READ past the end
                        follow.append(device.submit_group([(0x01, _read10(2, MIB // 512 - 1, 8), None),
                                                           (0x81, 4096, memoryview(bytearray(4096))),
                                                           (0x81, 13, None)]))
                        follow[0].on_done = on_done

                first = device.submit_group([(0x01, _read10(1, 0, 8), None),
                                             (0x81, 4096, memoryview(bytearray(4096))), (0x81, 13, None)])
                first.on_done = on_done
                await device.wait_group(first)
                await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(_until(lambda: len(seen) == 2))), 5)
                assert seen == [(id(first), True, True), (id(follow[0]), False, True)]
                for urb in follow[0].urbs():  # clean up the stalled command
                    if not urb.done():
                        await device.unlink(urb)
            finally:
                await device.close()

    run(main())


async def _until(condition) -> None:  # type: ignore[no-untyped-def]
    while not condition():
        await asyncio.sleep(0.01)


def test_a_group_that_times_out_is_unlinked_and_raises_transfer_timeout() -> None:
    async def main() -> None:
        async with UsbipServer([hid_keyboard_device(Keyboard())], port=0) as server:
            device = await _configured(server.port)
            try:
                start = time.monotonic()
                group = device.submit_group([(0x81, 8, None)], timeout=0.2)
                await device.wait_group(group)
                assert not group.clean
                (urb,) = group.urbs()
                result = await device.wait(urb)
                assert result.unlinked and urb.timed_out
                with pytest.raises(TransferTimeout):
                    device.check(urb, result)
                assert 0.2 <= time.monotonic() - start < 2
                assert device.pending == 0
            finally:
                await device.close()

    run(main())


def test_cancelling_a_task_waiting_for_a_group_unlinks_its_urbs() -> None:
    async def main() -> None:
        async with UsbipServer([hid_keyboard_device(Keyboard())], port=0) as server:
            device = await _configured(server.port)
            try:
                group = device.submit_group([(0x81, 8, None), (0x81, 8, None)], timeout=None)
                task = asyncio.ensure_future(device.wait_group(group))
                await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                for urb in group.urbs():
                    assert (await device.wait(urb)).unlinked
                assert device.pending == 0
            finally:
                await device.close()

    run(main())


def test_the_server_going_away_fails_a_pending_group_with_device_gone() -> None:
    async def main() -> None:
        server = UsbipServer([hid_keyboard_device(Keyboard())], port=0)
        await server.start()
        device = await _configured(server.port)
        group = device.submit_group([(0x81, 8, None), (0x81, 8, None)], timeout=None)
        await asyncio.sleep(0.05)
        await server.close()
        await device.wait_group(group)
        assert not group.clean
        for urb in group.urbs():
            with pytest.raises(DeviceGone):
                await device.wait(urb)
        assert device.pending == 0
        with pytest.raises(DeviceGone):
            device.submit_group([(0x81, 8, None)])
        await device.close()

    run(main())


def test_a_group_of_anything_but_plain_bulk_or_interrupt_is_refused_whole(image: Path) -> None:
    async def main() -> None:
        async with UsbipServer([mass_storage_device(str(image))], port=0) as server:
            device = await _configured(server.port)
            try:
                short = memoryview(bytearray(8))
                for bad in [(0x00, 8, None), (0x81, b"data", None), (0x01, 8, None), (0x81, 16, short),
                            (0x81, -1, None), (0x91, 8, None), (0x81, 1 << 31, None)]:
                    with pytest.raises(UnsupportedTransfer):
                        device.submit_group([(0x81, 13, None), bad])
                assert device.pending == 0  # none of the group was submitted
            finally:
                await device.close()

    run(main())
