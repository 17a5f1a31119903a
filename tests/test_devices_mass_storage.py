"""Bulk-Only Transport against BOT 1.0: CBW/CSW bytes, the thirteen cases of §6.7, invalid CBWs and
Reset Recovery, NAKs, chunked data phases, and a host driver that behaves like Linux usb-storage."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_devices_scsi import BS, TUR, MemoryStore, inquiry, request_sense, rw10

from emulator.devices.base import STALL, Device, FileRegion, Reply, TransferStatus
from emulator.devices.mass_storage import (
    US_BULK_CB_SIGN,
    US_BULK_CS_SIGN,
    US_BULK_FLAG_IN,
    US_BULK_STAT_FAIL,
    US_BULK_STAT_OK,
    US_BULK_STAT_PHASE,
    BulkCbWrap,
    BulkCsWrap,
    BulkOnlyTransport,
    MassStorageError,
    Phase,
    mass_storage_device,
)
from emulator.devices.scsi import Opcode, ScsiTarget
from emulator.devices.storage import ImageStore, OverlayStore, StorageError
from emulator.usb import setup as ch9
from emulator.usb.setup import Recipient, SetupPacket, Speed, TransferType

OK, STALLED = TransferStatus.OK, TransferStatus.STALL
IN, OUT = US_BULK_FLAG_IN, 0x00


def cbw(cdb: bytes, length: int, flags: int, *, tag: int = 0x1234, lun: int = 0) -> bytes:
    return BulkCbWrap(tag, length, flags, lun, cdb).pack()


def read_csw(bot: BulkOnlyTransport) -> BulkCsWrap:
    reply = bot.bulk_in(13)
    assert reply is not None and reply.status == OK, reply
    return BulkCsWrap.unpack(reply.data)


def stalled_then_csw(bot: BulkOnlyTransport, *, bulk_in: bool = True) -> BulkCsWrap:
    """The device halted an endpoint: the host sees STALL, clears the halt, then gets the CSW."""
    reply = bot.bulk_in(13) if bulk_in else bot.bulk_out(b"\0" * 512)
    assert reply is not None and reply.status == STALLED
    bot.clear_halt(bulk_in=bulk_in)
    return read_csw(bot)


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore(blocks=256)


@pytest.fixture
def bot(store: MemoryStore) -> BulkOnlyTransport:
    return BulkOnlyTransport(ScsiTarget([store]))


def accepted(reply: Reply | None, n: int) -> None:
    assert reply is not None and reply.status == OK and reply.length == n, reply


# --- the wrappers -----------------------------------------------------------------------------------------


def test_cbw_bytes_match_bot_5_1() -> None:
    raw = BulkCbWrap(0xA1B2C3D4, 0x200, IN, 1, rw10(Opcode.READ_10, 5, 1)).pack()
    assert len(raw) == 31
    assert raw[:4] == b"USBC" and struct.unpack("<I", raw[:4])[0] == US_BULK_CB_SIGN
    assert raw[4:8] == bytes.fromhex("d4c3b2a1")  # dCBWTag, echoed verbatim
    assert raw[8:12] == bytes.fromhex("00020000")  # dCBWDataTransferLength, little-endian
    assert raw[12:15] == bytes([0x80, 0x01, 10])  # bmCBWFlags, bCBWLUN, bCBWCBLength
    assert raw[15:25] == rw10(Opcode.READ_10, 5, 1) and raw[25:] == bytes(6)


def test_csw_bytes_match_bot_5_2() -> None:
    raw = BulkCsWrap(0xA1B2C3D4, 0x10, US_BULK_STAT_FAIL).pack()
    assert raw == b"USBS" + bytes.fromhex("d4c3b2a1") + bytes.fromhex("10000000") + b"\x01"
    assert struct.unpack("<I", raw[:4])[0] == US_BULK_CS_SIGN


@settings(max_examples=50)
@given(
    tag=st.integers(0, 2**32 - 1),
    length=st.integers(0, 2**32 - 1),
    flags=st.sampled_from([IN, OUT]),
    lun=st.integers(0, 15),
    cdb=st.binary(min_size=1, max_size=16),
)
def test_cbw_round_trips(tag: int, length: int, flags: int, lun: int, cdb: bytes) -> None:
    wrap = BulkCbWrap(tag, length, flags, lun, cdb)
    assert BulkCbWrap.unpack(wrap.pack()) == wrap


@pytest.mark.parametrize("raw", [b"", b"USBC" + bytes(26), b"USBC" + bytes(28), b"USBX" + bytes(27)])
def test_cbw_with_bad_size_or_signature_is_refused(raw: bytes) -> None:
    with pytest.raises(MassStorageError):
        BulkCbWrap.unpack(raw)


# --- the thirteen cases (BOT §6.7) ------------------------------------------------------------------------


def test_case_1_hn_eq_dn_is_good(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(TUR, 0, OUT, tag=7)), 31)
    assert read_csw(bot) == BulkCsWrap(7, 0, US_BULK_STAT_OK)
    assert bot.phase is Phase.COMMAND


def test_case_1_with_a_failing_command_reports_failed(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(bytes([0xA1]) + bytes(11), 0, OUT)), 31)
    assert read_csw(bot).status == US_BULK_STAT_FAIL


def test_case_2_hn_lt_di_is_a_phase_error(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(inquiry(alloc=36), 0, IN)), 31)
    assert read_csw(bot) == BulkCsWrap(0x1234, 0, US_BULK_STAT_PHASE)


def test_case_3_hn_lt_do_is_a_phase_error_and_writes_nothing(
    bot: BulkOnlyTransport, store: MemoryStore
) -> None:
    before = bytes(store.data)
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 1), 0, OUT)), 31)
    assert read_csw(bot).status == US_BULK_STAT_PHASE
    assert bytes(store.data) == before


def test_case_4_hi_gt_dn_stalls_bulk_in_and_reports_the_whole_residue(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(TUR, 512, IN)), 31)
    assert bot.in_halted
    assert stalled_then_csw(bot) == BulkCsWrap(0x1234, 512, US_BULK_STAT_OK)


def test_case_4_failed_read_stalls_then_fails(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 10_000, 8), 4096, IN)), 31)
    reply = bot.bulk_in(4096)  # the host's data URB
    assert reply is not None and reply.status == STALLED
    bot.clear_halt(bulk_in=True)
    assert read_csw(bot) == BulkCsWrap(0x1234, 4096, US_BULK_STAT_FAIL)
    accepted(bot.bulk_out(cbw(request_sense(), 18, IN)), 31)
    sense = bot.bulk_in(18)
    assert sense is not None and (sense.data[2], sense.data[12]) == (0x05, 0x21)
    assert read_csw(bot).status == US_BULK_STAT_OK


def test_case_5_hi_gt_di_sends_short_data_then_stalls(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(inquiry(alloc=255), 255, IN)), 31)
    reply = bot.bulk_in(255)
    assert reply is not None and reply.status == OK and len(reply.data) == 74
    assert stalled_then_csw(bot) == BulkCsWrap(0x1234, 255 - 74, US_BULK_STAT_OK)


def test_case_5_device_data_ending_on_a_urb_boundary_still_stalls(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 1), 1024, IN)), 31)
    reply = bot.bulk_in(512)
    assert reply is not None and len(reply.data) == 512
    reply = bot.bulk_in(512)  # the host still wants data: the halt ends the data phase
    assert reply is not None and reply.status == STALLED
    bot.clear_halt(bulk_in=True)
    assert read_csw(bot).residue == 512


def test_case_6_hi_eq_di_read_in_one_urb_costs_one_pread(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 16, 128), 65536, IN)), 31)
    reply = bot.bulk_in(65536)
    assert reply is not None and reply.data == bytes(store.data[16 * BS : 144 * BS])
    assert store.preads == [(16 * BS, 65536)]
    assert read_csw(bot) == BulkCsWrap(0x1234, 0, US_BULK_STAT_OK)


def test_case_6_read_in_host_sized_chunks(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 128), 65536, IN)), 31)
    parts = []
    for size in (16384, 4096, 32768, 12288):
        reply = bot.bulk_in(size)
        assert reply is not None and len(reply.data) == size
        parts.append(reply.data)
    assert b"".join(parts) == bytes(store.data[: 128 * BS])
    assert [length for _, length in store.preads] == [16384, 4096, 32768, 12288]
    assert read_csw(bot).residue == 0


def test_case_7_hi_lt_di_sends_hi_then_phase_error(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 2), 512, IN)), 31)
    reply = bot.bulk_in(512)
    assert reply is not None and reply.data == bytes(store.data[:512])
    assert read_csw(bot) == BulkCsWrap(0x1234, 0, US_BULK_STAT_PHASE)


def test_case_8_hi_ne_do_is_a_phase_error_without_running_the_write(
    bot: BulkOnlyTransport, store: MemoryStore
) -> None:
    before = bytes(store.data)
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 1), 512, IN)), 31)
    assert stalled_then_csw(bot) == BulkCsWrap(0x1234, 512, US_BULK_STAT_PHASE)
    assert bytes(store.data) == before


def test_case_9_ho_gt_dn_stalls_bulk_out(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(TUR, 512, OUT)), 31)
    assert bot.out_halted
    assert stalled_then_csw(bot, bulk_in=False) == BulkCsWrap(0x1234, 512, US_BULK_STAT_OK)


def test_case_9_write_protected_write_refuses_the_data() -> None:
    ro = MemoryStore(read_only=True)
    before = bytes(ro.data)
    bot = BulkOnlyTransport(ScsiTarget([ro]))
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 2), 1024, OUT)), 31)
    assert stalled_then_csw(bot, bulk_in=False) == BulkCsWrap(0x1234, 1024, US_BULK_STAT_FAIL)
    assert bytes(ro.data) == before
    assert bot.target.sense(0).asc == 0x27


def test_case_10_ho_ne_di_is_a_phase_error(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 1), 512, OUT)), 31)
    assert stalled_then_csw(bot, bulk_in=False) == BulkCsWrap(0x1234, 512, US_BULK_STAT_PHASE)


def test_case_11_ho_gt_do_takes_do_then_stalls(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 3, 1), 1024, OUT)), 31)
    accepted(bot.bulk_out(b"\xab" * 512), 512)
    assert stalled_then_csw(bot, bulk_in=False) == BulkCsWrap(0x1234, 512, US_BULK_STAT_OK)
    assert bytes(store.data[3 * BS : 4 * BS]) == b"\xab" * 512


def test_case_11_extra_data_in_the_same_urb_is_stalled_after_do(
    bot: BulkOnlyTransport, store: MemoryStore
) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 3, 1), 2048, OUT)), 31)
    reply = bot.bulk_out(b"\xcd" * 1024)
    assert reply is not None and reply.status == STALLED and reply.actual_length == 512
    bot.clear_halt(bulk_in=False)
    assert read_csw(bot) == BulkCsWrap(0x1234, 1536, US_BULK_STAT_OK)
    assert bytes(store.data[3 * BS : 4 * BS]) == b"\xcd" * 512


def test_case_12_ho_eq_do_writes_the_data(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 8, 4), 2048, OUT)), 31)
    for i in range(4):  # the host may split its data into several URBs
        accepted(bot.bulk_out(bytes([i]) * 512), 512)
    assert read_csw(bot) == BulkCsWrap(0x1234, 0, US_BULK_STAT_OK)
    assert bytes(store.data[8 * BS : 12 * BS]) == b"".join(bytes([i]) * 512 for i in range(4))


def test_case_13_ho_lt_do_takes_ho_then_phase_error(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 2), 512, OUT)), 31)
    accepted(bot.bulk_out(b"\x11" * 512), 512)
    assert read_csw(bot) == BulkCsWrap(0x1234, 0, US_BULK_STAT_PHASE)


def test_short_packet_ending_data_out_early_is_a_phase_error(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 2), 1024, OUT)), 31)
    accepted(bot.bulk_out(b"\x22" * 100), 100)  # not a multiple of wMaxPacketSize: the host is done
    assert read_csw(bot) == BulkCsWrap(0x1234, 924, US_BULK_STAT_PHASE)


def test_medium_error_mid_read_ends_the_data_and_fails(bot: BulkOnlyTransport, store: MemoryStore) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 16), 8192, IN)), 31)
    reply = bot.bulk_in(4096)
    assert reply is not None and len(reply.data) == 4096
    store.fail_reads = True
    reply = bot.bulk_in(4096)
    assert reply is not None and reply.status == OK and reply.data == b""
    assert stalled_then_csw(bot) == BulkCsWrap(0x1234, 4096, US_BULK_STAT_FAIL)
    assert bot.target.sense(0).asc == 0x11


# --- invalid CBWs and Reset Recovery (BOT §6.6.1, §5.3.4) -------------------------------------------------


def reset_recovery(bot: BulkOnlyTransport) -> None:
    bot.mass_storage_reset()
    bot.clear_halt(bulk_in=True)
    bot.clear_halt(bulk_in=False)


@pytest.mark.parametrize(
    "raw",
    [
        cbw(TUR, 0, OUT)[:30],  # too short
        cbw(TUR, 0, OUT) + b"\0",  # too long
        b"USBX" + cbw(TUR, 0, OUT)[4:],  # bad signature
        cbw(TUR, 0, 0x40),  # reserved flag bit
        cbw(TUR, 0, OUT, lun=1),  # a LUN the device does not have
        cbw(TUR, 0, OUT)[:14] + b"\x00" + cbw(TUR, 0, OUT)[15:],  # bCBWCBLength 0
        cbw(TUR, 0, OUT)[:14] + b"\x11" + cbw(TUR, 0, OUT)[15:],  # bCBWCBLength 17
    ],
    ids=["short", "long", "signature", "flags", "lun", "cb-length-0", "cb-length-17"],
)
def test_invalid_cbw_stalls_both_endpoints_until_reset_recovery(bot: BulkOnlyTransport, raw: bytes) -> None:
    accepted(bot.bulk_out(raw), len(raw))
    assert bot.in_halted and bot.out_halted and bot.wedged
    assert bot.bulk_in(13) is not None and bot.bulk_in(13).status == STALLED  # type: ignore[union-attr]
    assert bot.bulk_out(cbw(TUR, 0, OUT)).status == STALLED  # type: ignore[union-attr]
    bot.clear_halt(bulk_in=True)  # CLEAR_FEATURE alone does not recover
    bot.clear_halt(bulk_in=False)
    assert bot.bulk_in(13).status == STALLED  # type: ignore[union-attr]
    bot.mass_storage_reset()  # the reset keeps the halts (§5.3.4) ...
    assert bot.in_halted and bot.out_halted and not bot.wedged
    assert bot.bulk_out(cbw(TUR, 0, OUT)).status == STALLED  # type: ignore[union-attr]
    bot.clear_halt(bulk_in=True)  # ... until the host clears them
    bot.clear_halt(bulk_in=False)
    accepted(bot.bulk_out(cbw(TUR, 0, OUT, tag=99)), 31)
    assert read_csw(bot) == BulkCsWrap(99, 0, US_BULK_STAT_OK)


def test_mass_storage_reset_abandons_a_command_mid_data(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 8), 4096, IN)), 31)
    assert bot.bulk_in(512) is not None
    reset_recovery(bot)
    assert bot.phase is Phase.COMMAND
    assert bot.bulk_in(13) is None  # no CSW of the abandoned command
    accepted(bot.bulk_out(cbw(TUR, 0, OUT, tag=5)), 31)
    assert read_csw(bot).tag == 5


def test_port_reset_clears_halts_and_wedge(bot: BulkOnlyTransport) -> None:
    bot.bulk_out(b"junk")
    bot.reset()
    assert not (bot.in_halted or bot.out_halted or bot.wedged)
    accepted(bot.bulk_out(cbw(TUR, 0, OUT)), 31)
    assert read_csw(bot).status == US_BULK_STAT_OK


def test_host_set_halt_stalls_until_cleared(bot: BulkOnlyTransport) -> None:
    bot.set_halt(bulk_in=False)
    assert bot.bulk_out(cbw(TUR, 0, OUT)).status == STALLED  # type: ignore[union-attr]
    bot.clear_halt(bulk_in=False)
    accepted(bot.bulk_out(cbw(TUR, 0, OUT)), 31)


def test_get_max_lun_counts_the_luns() -> None:
    assert BulkOnlyTransport(ScsiTarget([MemoryStore()])).max_lun == 0
    bot = BulkOnlyTransport(ScsiTarget([MemoryStore(), MemoryStore(), None]))
    assert bot.max_lun == 2
    accepted(bot.bulk_out(cbw(TUR, 0, OUT, lun=2)), 31)
    csw = read_csw(bot)
    assert csw.status == US_BULK_STAT_FAIL  # LUN 2 exists but has no medium
    accepted(bot.bulk_out(cbw(request_sense(), 18, IN, lun=2)), 31)
    assert bot.bulk_in(18).data[12] == 0x3A  # type: ignore[union-attr]


def test_commands_go_to_the_lun_of_the_cbw() -> None:
    a, b = MemoryStore(), MemoryStore()
    b.data[:512] = b"\x42" * 512
    bot = BulkOnlyTransport(ScsiTarget([a, b]))
    accepted(bot.bulk_out(cbw(rw10(Opcode.READ_10, 0, 1), 512, IN, lun=1)), 31)
    assert bot.bulk_in(512).data == b"\x42" * 512  # type: ignore[union-attr]
    assert read_csw(bot).status == US_BULK_STAT_OK


# --- NAKs and wake-ups ------------------------------------------------------------------------------------


def test_in_before_a_command_is_naked_and_woken_by_the_cbw(store: MemoryStore) -> None:
    wakes: list[int] = []
    bot = BulkOnlyTransport(ScsiTarget([store]), wakeup=lambda: wakes.append(1))
    assert bot.bulk_in(13) is None
    assert wakes == []
    accepted(bot.bulk_out(cbw(TUR, 0, OUT)), 31)
    assert wakes == [1]
    assert read_csw(bot).status == US_BULK_STAT_OK


def test_next_cbw_before_the_csw_is_read_waits_for_it(store: MemoryStore) -> None:
    wakes: list[int] = []
    bot = BulkOnlyTransport(ScsiTarget([store]), wakeup=lambda: wakes.append(1))
    accepted(bot.bulk_out(cbw(TUR, 0, OUT, tag=1)), 31)
    assert bot.bulk_out(cbw(TUR, 0, OUT, tag=2)) is None
    assert read_csw(bot).tag == 1
    assert wakes == [1]
    accepted(bot.bulk_out(cbw(TUR, 0, OUT, tag=2)), 31)
    assert read_csw(bot).tag == 2


def test_csw_read_during_data_out_waits_for_the_data(store: MemoryStore) -> None:
    wakes: list[int] = []
    bot = BulkOnlyTransport(ScsiTarget([store]), wakeup=lambda: wakes.append(1))
    accepted(bot.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 1), 512, OUT)), 31)
    assert bot.bulk_in(13) is None
    accepted(bot.bulk_out(b"\x01" * 512), 512)
    assert wakes == [1]
    assert read_csw(bot).status == US_BULK_STAT_OK


def test_csw_into_a_too_small_buffer_is_babble(bot: BulkOnlyTransport) -> None:
    accepted(bot.bulk_out(cbw(TUR, 0, OUT)), 31)
    reply = bot.bulk_in(8)
    assert reply is not None and reply.status == TransferStatus.OVERFLOW and len(reply.data) == 8


# --- without stalls (f_mass_storage's stall=0) ------------------------------------------------------------


@pytest.fixture
def nostall(store: MemoryStore) -> BulkOnlyTransport:
    return BulkOnlyTransport(ScsiTarget([store]), can_stall=False)


def test_without_stalls_short_data_is_followed_by_the_csw(nostall: BulkOnlyTransport) -> None:
    accepted(nostall.bulk_out(cbw(inquiry(alloc=255), 255, IN)), 31)
    assert len(nostall.bulk_in(255).data) == 74  # type: ignore[union-attr]
    assert read_csw(nostall).residue == 181


def test_without_stalls_no_data_is_a_zero_length_packet(nostall: BulkOnlyTransport) -> None:
    accepted(nostall.bulk_out(cbw(TUR, 512, IN)), 31)
    reply = nostall.bulk_in(512)
    assert reply is not None and reply.status == OK and reply.data == b""
    assert read_csw(nostall).residue == 512


def test_without_stalls_data_ending_on_a_urb_boundary_gets_a_zlp(nostall: BulkOnlyTransport) -> None:
    accepted(nostall.bulk_out(cbw(rw10(Opcode.READ_10, 0, 1), 1024, IN)), 31)
    assert len(nostall.bulk_in(512).data) == 512  # type: ignore[union-attr]
    assert nostall.bulk_in(512).data == b""  # type: ignore[union-attr]
    assert read_csw(nostall).residue == 512


def test_without_stalls_unwanted_data_out_is_discarded(
    nostall: BulkOnlyTransport, store: MemoryStore
) -> None:
    before = bytes(store.data)
    accepted(nostall.bulk_out(cbw(TUR, 1024, OUT)), 31)
    assert nostall.bulk_in(13) is None  # the host has not sent its data yet
    accepted(nostall.bulk_out(b"\x99" * 512), 512)
    accepted(nostall.bulk_out(b"\x99" * 512), 512)
    assert read_csw(nostall) == BulkCsWrap(0x1234, 1024, US_BULK_STAT_OK)
    assert bytes(store.data) == before


def test_without_stalls_extra_data_out_is_discarded_after_do(
    nostall: BulkOnlyTransport, store: MemoryStore
) -> None:
    accepted(nostall.bulk_out(cbw(rw10(Opcode.WRITE_10, 0, 1), 1536, OUT)), 31)
    accepted(nostall.bulk_out(b"\x77" * 1024), 1024)
    accepted(nostall.bulk_out(b"\x66" * 512), 512)
    assert read_csw(nostall) == BulkCsWrap(0x1234, 1024, US_BULK_STAT_OK)
    assert bytes(store.data[:512]) == b"\x77" * 512 and store.data[512:513] != b"\x77"


# --- a host that behaves like Linux usb-storage -----------------------------------------------------------


class LinuxLikeHost:
    """usb_stor_Bulk_transport in miniature: CBW, one or more data URBs (a STALL ends the data, the host
    clears the halt), the CSW (a zero-length or stalled first try is retried), Reset Recovery after a phase
    error or a CBW the device did not take."""

    def __init__(self, bot: BulkOnlyTransport) -> None:
        self.bot = bot
        self.tag = 0

    def command(
        self, cdb: bytes, length: int, flags: int, data_out: bytes = b"", urb: int = 65536, lun: int = 0
    ) -> tuple[BulkCsWrap, bytes]:
        self.tag = (self.tag + 1) & 0xFFFFFFFF
        bot = self.bot
        reply = bot.bulk_out(cbw(cdb, length, flags, tag=self.tag, lun=lun))
        assert reply is not None and reply.status == OK
        data = bytearray()
        left = length
        while left:
            n = min(urb, left)
            if flags & IN:
                reply = bot.bulk_in(n)
                assert reply is not None
                if reply.status == STALLED:
                    bot.clear_halt(bulk_in=True)
                    break
                data += reply.data
                left -= len(reply.data)
                if len(reply.data) < n:
                    break
            else:
                chunk = data_out[length - left : length - left + n].ljust(n, b"\0")
                reply = bot.bulk_out(chunk)
                assert reply is not None
                left -= reply.length
                if reply.status == STALLED:
                    bot.clear_halt(bulk_in=False)
                    break
        reply = bot.bulk_in(13)
        assert reply is not None
        if reply.status == OK and not reply.data:
            reply = bot.bulk_in(13)
            assert reply is not None
        if reply.status == STALLED:
            bot.clear_halt(bulk_in=True)
            reply = bot.bulk_in(13)
            assert reply is not None
        assert reply.status == OK
        csw = BulkCsWrap.unpack(reply.data)
        assert csw.tag == self.tag
        assert csw.residue <= length
        if csw.status == US_BULK_STAT_PHASE:
            reset_recovery(bot)
        return csw, bytes(data)


def test_linux_like_session_reads_back_what_it_wrote(bot: BulkOnlyTransport) -> None:
    host = LinuxLikeHost(bot)
    assert host.command(inquiry(alloc=36), 36, IN)[1][8:12] == b"vusb"
    assert host.command(TUR, 0, OUT)[0].status == US_BULK_STAT_OK
    csw, capacity = host.command(rw10(Opcode.READ_CAPACITY_10, 0, 0), 8, IN)
    assert struct.unpack(">II", capacity) == (255, 512)
    csw, _ = host.command(bytes([0x1A, 0, 0x3F, 0, 192, 0]), 192, IN)  # MODE SENSE(6), sd's 192 bytes
    assert csw.status == US_BULK_STAT_OK and csw.residue == 192 - 44
    payload = bytes(range(256)) * 2 * 240
    assert host.command(rw10(Opcode.WRITE_10, 10, 240), 240 * BS, OUT, payload, urb=16384)[0].residue == 0
    csw, data = host.command(rw10(Opcode.READ_10, 10, 240), 240 * BS, IN)
    assert (csw.status, data) == (US_BULK_STAT_OK, payload)
    csw, _ = host.command(bytes([0x4D]) + bytes(9), 64, IN)  # LOG SENSE: unsupported
    assert csw.status == US_BULK_STAT_FAIL
    assert host.command(request_sense(), 18, IN)[1][12] == 0x20


CDBS = [
    TUR,
    inquiry(alloc=36),
    inquiry(alloc=255),
    inquiry(1, 0x80),
    request_sense(),
    rw10(Opcode.READ_CAPACITY_10, 0, 0),
    bytes([0x1A, 0, 0x3F, 0, 192, 0]),
    rw10(Opcode.READ_10, 0, 4),
    rw10(Opcode.READ_10, 250, 8),
    rw10(Opcode.WRITE_10, 4, 2),
    rw10(Opcode.WRITE_10, 255, 2),
    rw10(Opcode.VERIFY_10, 0, 1, b1=0x02),
    rw10(Opcode.SYNCHRONIZE_CACHE_10, 0, 0),
    bytes([0xA1]) + bytes(11),
    bytes([0x1B, 0, 0, 0, 0x01, 0]),
]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(CDBS),
            st.sampled_from([0, 13, 36, 512, 1024, 2048, 4096]),
            st.sampled_from([IN, OUT]),
            st.sampled_from([512, 1024, 65536]),
        ),
        min_size=1,
        max_size=12,
    ),
    can_stall=st.booleans(),
)
def test_any_command_sequence_ends_in_a_csw_with_its_tag(
    steps: list[tuple[bytes, int, int, int]], can_stall: bool
) -> None:
    """Whatever the host announces, right or wrong, the device never wedges a well-behaved host, never
    raises, and every command ends with a CSW for its tag; afterwards the transport still works."""
    bot = BulkOnlyTransport(ScsiTarget([MemoryStore(blocks=256)]), can_stall=can_stall)
    host = LinuxLikeHost(bot)
    for cdb, length, flags, urb in steps:
        host.command(cdb, length, flags, b"\x5a" * length, urb=urb)
        assert bot.phase is Phase.COMMAND and not bot.wedged
    assert host.command(TUR, 0, OUT)[0].status == US_BULK_STAT_OK


# --- MassStorageFunction in a Device -----------------------------------------------------------------------

BULK_IN, BULK_OUT = 0x81, 0x01
GET_MAX_LUN = SetupPacket(0xA1, 0xFE, 0, 0, 1)
BULK_RESET = SetupPacket(0x21, 0xFF, 0, 0, 0)


def configured(device: Device) -> Device:
    assert device.control(ch9.set_configuration(1)).status == OK
    return device


def endpoint_halted(device: Device, address: int) -> bool:
    return device.control(ch9.get_status(Recipient.ENDPOINT, address)).data == b"\x01\x00"


def device_command(
    device: Device, cdb: bytes, length: int, flags: int, data_out: bytes = b"", lun: int = 0
) -> tuple[BulkCsWrap, bytes]:
    """One command through Device.transfer the way Linux does it, clearing halts with CLEAR_FEATURE."""
    assert device.transfer(BULK_OUT, cbw(cdb, length, flags, tag=0x77, lun=lun), 31) == Reply(
        actual_length=31
    )
    data = b""
    if length and flags & IN:
        reply = device.transfer(BULK_IN, None, length)
        assert reply is not None
        if reply.status == STALLED:
            assert device.control(ch9.clear_halt(BULK_IN)).status == OK
        data = reply.data
    elif length:
        reply = device.transfer(BULK_OUT, data_out, length)
        assert reply is not None
        if reply.status == STALLED:
            assert device.control(ch9.clear_halt(BULK_OUT)).status == OK
    reply = device.transfer(BULK_IN, None, 13)
    assert reply is not None
    if reply.status == STALLED:
        assert device.control(ch9.clear_halt(BULK_IN)).status == OK
        reply = device.transfer(BULK_IN, None, 13)
        assert reply is not None
    return BulkCsWrap.unpack(reply.data), data


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(i % 249 for i in range(256 * BS)))
    return path


def test_device_declares_a_bot_scsi_interface_with_two_bulk_endpoints(image: Path) -> None:
    device = mass_storage_device(image, vendor="ACME", product="Stick", serial="0123456789AB")
    descriptor = device.device_descriptor
    assert (descriptor.id_vendor, descriptor.id_product) == (0x1209, 0x0004)
    assert device.speed is Speed.HIGH
    (interface,) = device.configuration.interfaces
    alt = interface.alternates[0]
    triple = (
        alt.descriptor.interface_class,
        alt.descriptor.interface_subclass,
        alt.descriptor.interface_protocol,
    )
    assert triple == (0x08, 0x06, 0x50)
    endpoints = {ep.address: ep.descriptor for ep in alt.endpoints}
    assert set(endpoints) == {BULK_IN, BULK_OUT}
    assert all(ep.attributes == TransferType.BULK and ep.max_packet_size == 512 for ep in endpoints.values())
    assert set(device.strings.values()) >= {"ACME", "Stick", "0123456789AB"}
    device.close()


def test_get_max_lun_class_request() -> None:
    device = configured(mass_storage_device([MemoryStore(), None, MemoryStore()]))
    assert device.control(GET_MAX_LUN) == Reply(data=b"\x02")
    assert device.control(SetupPacket(0xA1, 0xFE, 1, 0, 1)) == STALL  # wValue must be 0
    assert device.control(SetupPacket(0xA1, 0xFE, 0, 1, 1)) == STALL  # no interface 1
    assert device.control(SetupPacket(0x21, 0xFE, 0, 0, 0)) == STALL  # wrong direction
    assert device.control(SetupPacket(0xA1, 0x42, 0, 0, 1)) == STALL  # unknown class request


def test_commands_run_through_the_device(image: Path) -> None:
    device = configured(mass_storage_device(image))
    csw, data = device_command(device, rw10(Opcode.READ_CAPACITY_10, 0, 0), 8, IN)
    assert (csw.status, struct.unpack(">II", data)) == (US_BULK_STAT_OK, (255, 512))
    csw, data = device_command(device, inquiry(alloc=96), 96, IN)  # short data: STALL, clear, CSW
    assert csw == BulkCsWrap(0x77, 96 - 74, US_BULK_STAT_OK) and data[8:12] == b"vusb"
    assert not endpoint_halted(device, BULK_IN)


def test_invalid_cbw_keeps_endpoints_halted_through_clear_feature_until_bulk_reset(image: Path) -> None:
    device = configured(mass_storage_device(image))
    assert device.transfer(BULK_OUT, b"garbage", 7) == Reply(actual_length=7)
    assert endpoint_halted(device, BULK_IN) and endpoint_halted(device, BULK_OUT)
    assert device.transfer(BULK_IN, None, 13) == STALL
    assert device.control(ch9.clear_halt(BULK_IN)).status == OK
    assert device.control(ch9.clear_halt(BULK_OUT)).status == OK
    assert endpoint_halted(device, BULK_IN) and endpoint_halted(device, BULK_OUT)  # wedged
    assert device.control(BULK_RESET) == Reply(actual_length=0)
    assert endpoint_halted(device, BULK_IN) and endpoint_halted(device, BULK_OUT)  # §5.3.4
    device.control(ch9.clear_halt(BULK_IN))
    device.control(ch9.clear_halt(BULK_OUT))
    assert not endpoint_halted(device, BULK_IN) and not endpoint_halted(device, BULK_OUT)
    assert device_command(device, TUR, 0, OUT)[0].status == US_BULK_STAT_OK


def test_phase_error_then_reset_recovery_through_ep0(image: Path) -> None:
    device = configured(mass_storage_device(image))
    assert device_command(device, rw10(Opcode.READ_10, 0, 2), 512, IN)[0].status == US_BULK_STAT_PHASE
    assert device.control(BULK_RESET).status == OK
    device.control(ch9.clear_halt(BULK_IN))
    device.control(ch9.clear_halt(BULK_OUT))
    assert device_command(device, TUR, 0, OUT)[0].status == US_BULK_STAT_OK


def test_writes_reach_the_image_file_and_survive_reopening(image: Path) -> None:
    device = configured(mass_storage_device(image))
    payload = bytes([0xA5]) * (4 * BS)
    assert device_command(device, rw10(Opcode.WRITE_10, 20, 4), 4 * BS, OUT, payload)[0].status == 0
    assert image.read_bytes()[20 * BS : 24 * BS] == payload  # in the file once the CSW passed
    device.close()
    again = configured(mass_storage_device(image))
    csw, data = device_command(again, rw10(Opcode.READ_10, 20, 4), 4 * BS, IN)
    assert (csw.status, data) == (US_BULK_STAT_OK, payload)
    again.close()


def test_read_only_device_refuses_writes_and_reports_wp(image: Path) -> None:
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    device = configured(mass_storage_device(image, read_only=True))
    csw, _ = device_command(device, rw10(Opcode.WRITE_10, 0, 1), BS, OUT, b"x" * BS)
    assert csw.status == US_BULK_STAT_FAIL
    assert device_command(device, request_sense(), 18, IN)[1][2] == 0x07  # DATA PROTECT
    assert device_command(device, bytes([0x1A, 0, 0x3F, 0, 192, 0]), 192, IN)[1][2] == 0x80  # WP
    device.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_copy_on_write_device_leaves_the_base_image_alone(image: Path) -> None:
    before = hashlib.sha256(image.read_bytes()).hexdigest()
    device = configured(mass_storage_device(OverlayStore(image)))
    payload = b"\x3c" * (8 * BS)
    assert device_command(device, rw10(Opcode.WRITE_10, 0, 8), 8 * BS, OUT, payload)[0].status == 0
    assert device_command(device, rw10(Opcode.SYNCHRONIZE_CACHE_10, 0, 0), 0, OUT)[0].status == 0
    assert device_command(device, rw10(Opcode.READ_10, 0, 8), 8 * BS, IN)[1] == payload
    device.close()
    assert hashlib.sha256(image.read_bytes()).hexdigest() == before


def test_close_flushes_and_closes_the_stores() -> None:
    stores = [MemoryStore(), MemoryStore()]
    mass_storage_device(stores).close()
    assert all(s.closed and s.flushes == 1 for s in stores)


def test_a_missing_image_is_a_clear_error_and_leaves_nothing_open(image: Path, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"missing\.img: no such image file"):
        mass_storage_device([image, tmp_path / "missing.img"])
    with ImageStore(image):  # the first image was closed again: its lock is free
        pass


def test_port_reset_and_reconfiguration_raise_unit_attention_when_asked(image: Path) -> None:
    device = configured(mass_storage_device(image, unit_attention_on_reset=True))
    assert device_command(device, TUR, 0, OUT)[0].status == US_BULK_STAT_FAIL
    assert device_command(device, request_sense(), 18, IN)[1][12] == 0x29
    assert device_command(device, TUR, 0, OUT)[0].status == US_BULK_STAT_OK
    device.transfer(BULK_OUT, b"junk", 4)
    device.reset()
    configured(device)
    assert not endpoint_halted(device, BULK_IN)
    assert device_command(device, TUR, 0, OUT)[0].status == US_BULK_STAT_FAIL  # 29h again
    assert device_command(device, TUR, 0, OUT)[0].status == US_BULK_STAT_OK


def test_full_speed_device_uses_64_byte_packets_for_short_packet_detection(image: Path) -> None:
    device = configured(mass_storage_device(image, speed=Speed.FULL))
    assert device.max_packet_size(BULK_OUT) == 64
    assert device.transfer(BULK_OUT, cbw(rw10(Opcode.WRITE_10, 0, 1), BS, OUT), 31) is not None
    # 64 bytes is a full packet at full speed: the host is not done yet
    assert device.transfer(BULK_OUT, b"\x01" * 64, 64) == Reply(actual_length=64)
    assert device.transfer(BULK_IN, None, 13) is None  # still in the data phase: NAK
    assert device.transfer(BULK_OUT, b"\x01" * 448, 448) == Reply(actual_length=448)
    reply = device.transfer(BULK_IN, None, 13)
    assert reply is not None and BulkCsWrap.unpack(reply.data).status == US_BULK_STAT_OK


def test_naked_in_transfer_wakes_the_edge_when_the_cbw_arrives(image: Path) -> None:
    device = configured(mass_storage_device(image))
    woken: list[int] = []
    device.set_wakeup(lambda: woken.append(1))
    assert device.transfer(BULK_IN, None, 13) is None
    device.transfer(BULK_OUT, cbw(TUR, 0, OUT), 31)
    assert woken == [1]


def test_file_regions_when_the_edge_asks_big_reads_come_as_regions_of_the_image(image: Path) -> None:
    device = configured(mass_storage_device(image, read_only=True))
    content = image.read_bytes()
    # Not asked: bytes, as every edge that wants bytes expects.
    csw, data = device_command(device, rw10(Opcode.READ_10, 8, 64), 64 * BS, IN)
    assert type(data) is bytes and data == content[8 * BS : 72 * BS] and csw.status == US_BULK_STAT_OK
    device.file_regions = True
    csw, region = device_command(device, rw10(Opcode.READ_10, 8, 64), 64 * BS, IN)
    assert isinstance(region, FileRegion) and len(region) == 64 * BS and csw.status == US_BULK_STAT_OK
    assert bytes(region) == content[8 * BS : 72 * BS]
    # Small reads stay bytes (a region is not worth its own syscall), and so do other commands' data.
    _, small = device_command(device, rw10(Opcode.READ_10, 1, 2), 2 * BS, IN)
    assert type(small) is bytes and small == content[BS : 3 * BS]
    assert type(device_command(device, inquiry(), 36, IN)[1]) is bytes
    device.close()


def test_file_region_of_an_image_that_shrank_is_an_error_not_short_data(tmp_path: Path) -> None:
    path = tmp_path / "shrinks.img"
    path.write_bytes(bytes(64 * BS))
    with ImageStore(path, read_only=True) as store:
        region = store.region(0, 64 * BS)
        assert isinstance(region, FileRegion)
        os.truncate(path, 32 * BS)
        with pytest.raises(OSError, match="short"):
            bytes(region)


def test_regions_only_of_bytes_that_cannot_change_while_queued(image: Path) -> None:
    """sendfile queues the page cache pages: a writable image gives bytes (the next WRITE could rewrite
    pages a pipelining peer has not read yet); an overlay gives regions of its base where nothing was
    written, bytes where anything was."""
    content = image.read_bytes()
    with ImageStore(image) as writable:
        assert type(writable.region(0, 64 * BS)) is bytes
    with OverlayStore(image) as store:
        clean = store.region(0, 64 * BS)
        assert isinstance(clean, FileRegion) and bytes(clean) == content[: 64 * BS]
        store.pwrite(40 * BS, b"\xee" * BS)
        touched = store.region(0, 64 * BS)
        assert type(touched) is bytes
        assert touched == content[: 40 * BS] + b"\xee" * BS + content[41 * BS : 64 * BS]
        assert isinstance(store.region(64 * BS, 64 * BS), FileRegion)
