"""gadgets.aio against the real kernel AIO of the machine running the tests (a regular file stands in for an
endpoint file): completions come through `reap()` with the bytes and counts, signalled on the eventfd, slots
are reused, and a full queue refuses more instead of growing."""

from __future__ import annotations

import errno
import os
import select

import pytest

from gadgets.aio import AioQueue


@pytest.fixture
def queue_and_file(tmp_path):
    eventfd = os.eventfd(0, os.EFD_NONBLOCK)
    fd = os.open(tmp_path / "ep", os.O_RDWR | os.O_CREAT)
    queue = AioQueue(2, eventfd)
    yield queue, fd, eventfd
    queue.close()
    os.close(fd)
    os.close(eventfd)


def _wait_and_reap(queue: AioQueue, eventfd: int) -> int:
    assert select.select([eventfd], [], [], 5)[0], "no completion signalled on the eventfd"
    os.eventfd_read(eventfd)
    return queue.reap()


def test_write_then_read_complete_through_reap_with_their_bytes_and_counts(queue_and_file):
    queue, fd, eventfd = queue_and_file
    done: list[tuple[bytes | None, int]] = []
    queue.write(fd, b"CBW and data", lambda data, status: done.append((data, status)))
    assert queue.in_flight == 1
    assert _wait_and_reap(queue, eventfd) == 1
    queue.read(fd, 64, lambda data, status: done.append((data, status)))
    assert _wait_and_reap(queue, eventfd) == 1
    assert done == [(None, 12), (b"CBW and data", 12)] and queue.in_flight == 0


def test_slots_are_reused_and_a_full_queue_refuses_with_eagain(queue_and_file):
    queue, fd, eventfd = queue_and_file
    statuses: list[int] = []
    for round_ in range(3):  # more transfers than slots, over time
        queue.write(fd, bytes([round_]) * 10, lambda _data, status: statuses.append(status))
        queue.write(fd, b"", lambda _data, status: statuses.append(status))
        with pytest.raises(BlockingIOError):
            queue.write(fd, b"x", lambda _data, status: statuses.append(status))
        while queue.in_flight:
            _wait_and_reap(queue, eventfd)
    assert statuses == [10, 0] * 3


def test_a_refused_transfer_reports_the_kernels_error_and_frees_its_slot(queue_and_file):
    queue, _fd, _eventfd = queue_and_file
    for _ in range(3):  # more refusals than slots: each slot came back, so it is the kernel's error, not EAGAIN
        with pytest.raises(OSError) as refused:
            queue.read(-1, 16, lambda data, status: None)
        assert refused.value.errno == errno.EBADF
    assert queue.in_flight == 0


def test_a_write_from_a_bytearray_view_sends_its_bytes_and_other_views_are_copied(queue_and_file):
    queue, fd, eventfd = queue_and_file
    buffer = bytearray(b"x" * 8192)
    buffer[:5] = b"chunk"
    statuses: list[int] = []
    queue.write(fd, memoryview(buffer)[:4096], lambda _data, status: statuses.append(status))
    _wait_and_reap(queue, eventfd)
    assert statuses == [4096] and os.pread(fd, 8192, 0) == b"chunk" + b"x" * 4091
    queue.write(fd, memoryview(b"read-only view"), lambda _data, status: statuses.append(status))
    _wait_and_reap(queue, eventfd)
    assert statuses == [4096, 14] and os.pread(fd, 14, 0) == b"read-only view"
