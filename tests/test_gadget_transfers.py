"""Transfer sizing for gadget endpoints: one packet per read by default, BOT framing learnt from CBWs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gadgets.transfers import BotPhase, BulkOnlySizer, PacketSizer, is_bulk_only, parse_cbw


def cbw(length: int, data_in: bool, tag: int = 1) -> bytes:
    return struct.pack("<IIIBBB16s", 0x43425355, tag, length, 0x80 if data_in else 0, 0, 6, bytes(16))


def drain_reads(sizer: BulkOnlySizer, queued: int = 0) -> list[int]:
    sizes = []
    while (size := sizer.next_read(queued + len(sizes))) is not None:
        sizes.append(size)
    return sizes


def test_packet_sizer_reads_one_packet_at_a_time_up_to_its_depth():
    sizer = PacketSizer(64, in_size=4096, depth=3)
    assert [sizer.next_read(n) for n in range(4)] == [64, 64, 64, None]
    assert [sizer.next_in(n) for n in (0, 2, 3)] == [4096, 4096, None]
    with pytest.raises(ValueError):
        PacketSizer(0)


def test_bot_sizer_reads_one_packet_for_the_cbw_and_nothing_more():
    sizer = BulkOnlySizer(512)
    assert drain_reads(sizer) == [512]
    assert sizer.next_in(0) is None  # nothing to fetch before a command


def test_bot_sizer_reads_exactly_the_data_out_in_large_pieces_then_the_next_cbw():
    sizer = BulkOnlySizer(512, chunk=64 * 1024, depth=4)
    sizer.out_done(cbw(150_000, data_in=False))
    assert sizer.phase is BotPhase.DATA_OUT
    sizes = drain_reads(sizer)
    assert sizes == [65536, 65536, 18944]  # 18928 rounded up to whole packets
    assert sum(sizes) >= 150_000 and all(s % 512 == 0 for s in sizes)
    for chunk in (65536, 65536, 18928):
        sizer.out_done(bytes(chunk))
    assert sizer.phase is BotPhase.STATUS
    assert drain_reads(sizer) == [512]
    assert sizer.next_in(0) == 13


def test_bot_sizer_plans_the_data_in_then_the_csw_and_returns_to_command_on_the_csw():
    sizer = BulkOnlySizer(512)
    sizer.out_done(cbw(36, data_in=True, tag=9))
    assert (sizer.phase, sizer.tag, sizer.expected) == (BotPhase.DATA_IN, 9, 36)
    assert [sizer.next_in(0), sizer.next_in(1), sizer.next_in(2)] == [36, 13, None]
    sizer.in_done(bytes(36))
    assert sizer.phase is BotPhase.STATUS
    sizer.in_done(b"USBS" + bytes(9))
    assert sizer.phase is BotPhase.COMMAND


def test_bot_sizer_treats_a_short_data_out_packet_as_the_end_of_the_data():
    sizer = BulkOnlySizer(512)
    sizer.out_done(cbw(4096, data_in=False))
    drain_reads(sizer)
    sizer.out_done(bytes(1000))  # not a whole number of packets: the host stopped early
    assert sizer.phase is BotPhase.STATUS


def test_bot_sizer_ignores_garbage_and_starts_over_on_reset():
    sizer = BulkOnlySizer(64)
    sizer.out_done(b"junk" * 8)
    assert sizer.phase is BotPhase.COMMAND
    sizer.out_done(cbw(1 << 20, data_in=False))
    sizer.reset()
    assert sizer.phase is BotPhase.COMMAND and drain_reads(sizer) == [64]


def test_parse_cbw_needs_31_bytes_and_the_usbc_signature():
    assert parse_cbw(cbw(512, True, tag=3)) == (3, 512, 0x80)
    assert parse_cbw(cbw(512, True)[:30]) is None
    assert parse_cbw(b"USBS" + cbw(0, True)[4:]) is None
    assert is_bulk_only(8, 6, 0x50) and not is_bulk_only(8, 6, 0x01) and not is_bulk_only(3, 0, 0x50)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4 << 20), st.sampled_from([64, 512, 1024]))
def test_bot_data_out_reads_cover_the_transfer_and_are_whole_packets(length, packet):
    sizer = BulkOnlySizer(packet, chunk=64 * 1024, depth=1 << 12)
    sizer.out_done(cbw(length, data_in=False))
    sizes = drain_reads(sizer)
    assert all(s % packet == 0 for s in sizes)
    assert sum(sizes) - length < packet <= sum(sizes) - length + packet


def drain_in(sizer: BulkOnlySizer) -> list[int]:
    sizes = []
    while (size := sizer.next_in(len(sizes))) is not None:
        sizes.append(size)
    return sizes


def test_bot_sizer_asks_for_a_long_data_in_in_chunks_then_the_csw():
    sizer = BulkOnlySizer(1024, in_chunk=256 * 1024, depth=8)
    sizer.out_done(cbw(1 << 20, data_in=True))
    assert drain_in(sizer) == [256 * 1024] * 4 + [13]
    for _ in range(3):
        assert sizer.in_done(bytes(256 * 1024)) == 0
        assert sizer.phase is BotPhase.DATA_IN
    assert sizer.in_done(bytes(256 * 1024)) == 0 and sizer.phase is BotPhase.STATUS
    assert sizer.in_done(b"USBS" + bytes(9)) == 0 and sizer.phase is BotPhase.COMMAND


def test_bot_sizer_a_short_chunk_leaves_the_next_urb_for_the_csw_and_the_rest_stale():
    sizer = BulkOnlySizer(512, in_chunk=64 * 1024, depth=8)
    sizer.out_done(cbw(256 * 1024, data_in=True))
    assert drain_in(sizer) == [65536] * 4 + [13]
    assert sizer.in_done(bytes(1000)) == 3  # chunks 3 and 4 and the CSW transfer: chunk 2 gets the CSW
    assert sizer.phase is BotPhase.STATUS and sizer.next_in(0) is None
    assert sizer.in_done(b"USBS" + bytes(9)) == 0 and sizer.phase is BotPhase.COMMAND
    sizer.out_done(cbw(512, data_in=True, tag=2))  # the next command starts clean
    assert drain_in(sizer) == [512, 13]


def test_bot_sizer_a_tail_too_small_for_a_csw_joins_the_last_chunk():
    sizer = BulkOnlySizer(64, in_chunk=4096, depth=8)
    sizer.out_done(cbw(8192 + 40, data_in=True))
    assert drain_in(sizer) == [4096, 4096 + 40, 13]


def test_bot_sizer_a_short_chunk_with_nothing_asked_after_it_keeps_the_planned_csw():
    sizer = BulkOnlySizer(512, in_chunk=64 * 1024, depth=1)
    sizer.out_done(cbw(256 * 1024, data_in=True))
    assert sizer.next_in(0) == 65536 and sizer.next_in(1) is None
    assert sizer.in_done(bytes(512 * 3)) == 0  # whole packets but fewer than asked: short all the same
    assert sizer.next_in(0) == 13 and sizer.next_in(0) is None


def test_bot_sizer_a_stalled_chunk_makes_the_rest_stale_and_asks_for_one_csw():
    sizer = BulkOnlySizer(512, in_chunk=64 * 1024, depth=8)
    sizer.out_done(cbw(200 * 1024, data_in=True))
    assert drain_in(sizer) == [65536, 65536, 65536, 8192, 13]
    assert sizer.in_stalled(65536) == 4
    assert drain_in(sizer) == [13]
    assert sizer.in_done(b"USBS" + bytes(9)) == 0 and sizer.phase is BotPhase.COMMAND


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 4 << 20), st.sampled_from([64, 512, 1024]), st.sampled_from([None, 4096, 65536, 262144]))
def test_bot_data_in_transfers_add_up_to_exactly_the_data_in(length, packet, in_chunk):
    sizer = BulkOnlySizer(packet, in_chunk=in_chunk, depth=1 << 12)
    sizer.out_done(cbw(length, data_in=True))
    *data, csw = drain_in(sizer)
    assert csw == 13 and sum(data) == length
    assert all(s % packet == 0 for s in data[:-1]) and (len(data) == 1 or data[-1] >= 64)


def test_bot_sizer_asks_again_for_an_in_transfer_a_stall_ended():
    sizer = BulkOnlySizer(512)
    sizer.out_done(cbw(512, data_in=True))
    assert [sizer.next_in(0), sizer.next_in(1)] == [512, 13]
    sizer.in_done(bytes(8))  # short data-in: the device then stalls the CSW read
    sizer.in_stalled(13)
    assert sizer.next_in(0) == 13 and sizer.next_in(0) is None
