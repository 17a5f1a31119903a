"""The SCSI target against SPC-4 / SBC-3: every command, the sense data bytes, per-LUN state."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from emulator.devices import storage
from emulator.devices.scsi import (
    Direction,
    Opcode,
    ScsiError,
    ScsiStatus,
    ScsiTarget,
    Sense,
    SenseKey,
)
from emulator.devices.storage import ImageStore, StorageError, Store

BS = 512
GOOD, CHECK = ScsiStatus.GOOD, ScsiStatus.CHECK_CONDITION


class MemoryStore(Store):
    """A store in a bytearray that can be told to fail, and counts what it was asked to do."""

    def __init__(self, blocks: int = 128, *, read_only: bool = False, block_size: int = BS) -> None:
        self.block_size = block_size
        self.size = blocks * block_size
        self.read_only = read_only
        self.name = "memory"
        self.data = bytearray(bytes(i % 253 for i in range(self.size)))
        self.fail_reads = self.fail_writes = False
        self.preads: list[tuple[int, int]] = []
        self.flushes = 0
        self.closed = False

    def pread(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        self.preads.append((offset, length))
        if self.fail_reads:
            raise StorageError("memory: injected read error")
        return bytes(self.data[offset : offset + length])

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        if self.fail_writes:
            raise StorageError("memory: injected write error")
        self.data[offset : offset + len(data)] = data

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.flush()
        self.closed = True


class HugeStore(MemoryStore):
    """Claims more blocks than READ CAPACITY(10) can report (only its size is ever looked at)."""

    def __init__(self, blocks: int) -> None:
        super().__init__(1)
        self.size = blocks * BS


def cdb6(op: int, b1: int = 0, b2: int = 0, b3: int = 0, b4: int = 0, control: int = 0) -> bytes:
    return bytes((op, b1, b2, b3, b4, control))


def rw10(op: int, lba: int, count: int, b1: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, b1, lba, 0, count, 0)


def rw12(op: int, lba: int, count: int, b1: int = 0) -> bytes:
    return struct.pack(">BBIIBB", op, b1, lba, count, 0, 0)


def rw16(op: int, lba: int, count: int, b1: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, b1, lba, count, 0, 0)


def inquiry(evpd: int = 0, page: int = 0, alloc: int = 255) -> bytes:
    return struct.pack(">BBBHB", Opcode.INQUIRY, evpd, page, alloc, 0)


def request_sense(alloc: int = 18) -> bytes:
    return cdb6(Opcode.REQUEST_SENSE, b4=alloc)


def mode_sense6(page: int, pc: int = 0, dbd: bool = False, alloc: int = 255, subpage: int = 0) -> bytes:
    return cdb6(Opcode.MODE_SENSE_6, 0x08 if dbd else 0, (pc << 6) | page, subpage, alloc)


def mode_sense10(page: int, pc: int = 0, dbd: bool = False, llbaa: bool = False, alloc: int = 1024) -> bytes:
    b1 = (0x08 if dbd else 0) | (0x10 if llbaa else 0)
    return struct.pack(">BBBBBBBHB", Opcode.MODE_SENSE_10, b1, (pc << 6) | page, 0, 0, 0, 0, alloc, 0)


def start_stop(start: bool, loej: bool, power: int = 0, no_flush: bool = False) -> bytes:
    return cdb6(
        Opcode.START_STOP_UNIT, b4=(power << 4) | (4 if no_flush else 0) | (2 if loej else 0) | int(start)
    )


def prevent(on: bool) -> bytes:
    return cdb6(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, b4=int(on))


TUR = cdb6(Opcode.TEST_UNIT_READY)


def sense_of(target: ScsiTarget, lun: int = 0) -> bytes:
    status, data = target.execute(lun, request_sense())
    assert status == GOOD
    return data


def assert_sense(target: ScsiTarget, key: int, asc: int, ascq: int, lun: int = 0) -> bytes:
    data = sense_of(target, lun)
    assert (data[0] & 0x7F, data[2] & 0x0F, data[12], data[13]) == (0x70, key, asc, ascq)
    return data


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
def target(store: MemoryStore) -> ScsiTarget:
    return ScsiTarget([store], vendor="ACME", product="Disk One", revision="1.2", serial="SN0042")


# --- sense data format ------------------------------------------------------------------------------------


def test_fixed_sense_layout_matches_spc4() -> None:
    data = Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00, field=2).fixed()
    assert data == bytes(
        [0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x24, 0x00, 0, 0xC0, 0x00, 0x02]  # SKSV|C/D, pointer 2
    )
    data = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00, information=0x01020304).fixed()
    assert data[0] == 0xF0  # VALID: the INFORMATION field holds the LBA
    assert data[3:7] == b"\x01\x02\x03\x04"
    assert data[15:18] == b"\x00\x00\x00"


def test_information_too_wide_for_fixed_format_clears_valid() -> None:
    data = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00, information=1 << 40).fixed()
    assert data[0] == 0x70 and data[3:7] == bytes(4)


# --- INQUIRY ----------------------------------------------------------------------------------------------


def test_standard_inquiry_has_the_spc4_layout(target: ScsiTarget) -> None:
    status, data = target.execute(0, inquiry(alloc=255))
    assert status == GOOD
    assert len(data) == 74 and data[4] == 74 - 5
    assert data[0] == 0x00  # connected, direct-access block device
    assert data[1] == 0x80  # RMB
    assert data[2] == 0x06  # SPC-4
    assert data[3] == 0x02  # response data format 2
    assert data[8:16] == b"ACME    "
    assert data[16:32] == b"Disk One        "
    assert data[32:36] == b"1.2 "
    assert struct.unpack(">4H", data[58:66]) == (0x00A0, 0x0460, 0x04C0, 0x1730)


def test_inquiry_is_cut_to_the_allocation_length(target: ScsiTarget) -> None:
    status, data = target.execute(0, inquiry(alloc=36))
    assert status == GOOD and len(data) == 36 and data[32:36] == b"1.2 "
    assert target.execute(0, inquiry(alloc=0)) == (GOOD, b"")


def test_inquiry_of_a_fixed_disk_clears_rmb(store: MemoryStore) -> None:
    target = ScsiTarget([store], removable=False)
    assert target.execute(0, inquiry())[1][1] == 0x00


def test_vpd_supported_pages(target: ScsiTarget) -> None:
    assert target.execute(0, inquiry(1, 0x00)) == (GOOD, bytes([0, 0x00, 0, 3, 0x00, 0x80, 0x83]))


def test_vpd_unit_serial_number(target: ScsiTarget) -> None:
    assert target.execute(0, inquiry(1, 0x80)) == (GOOD, bytes([0, 0x80, 0, 6]) + b"SN0042")


def test_vpd_device_identification_has_a_t10_vendor_id_designator(target: ScsiTarget) -> None:
    status, data = target.execute(0, inquiry(1, 0x83))
    assert status == GOOD and data[:2] == b"\x00\x83"
    page_length = struct.unpack(">H", data[2:4])[0]
    assert page_length == len(data) - 4
    designator = data[4:]
    assert designator[0] == 0x02  # code set ASCII
    assert designator[1] == 0x01  # association: logical unit, type: T10 vendor ID based
    assert designator[3] == len(designator) - 4
    assert designator[4:12] == b"ACME    "
    assert designator[12:].endswith(b"SN0042")


def test_each_lun_gets_its_own_serial() -> None:
    target = ScsiTarget([MemoryStore(), MemoryStore()], serial="ABC")
    assert target.execute(0, inquiry(1, 0x80))[1][4:] == b"ABC-0"
    assert target.execute(1, inquiry(1, 0x80))[1][4:] == b"ABC-1"


def test_unsupported_vpd_page_is_invalid_field_in_cdb(target: ScsiTarget) -> None:
    assert target.execute(0, inquiry(1, 0xB0)) == (CHECK, b"")
    data = assert_sense(target, 0x05, 0x24, 0x00)
    assert data[15:18] == b"\xc0\x00\x02"  # the fault is CDB byte 2, the page code


def test_page_code_without_evpd_is_invalid_field_in_cdb(target: ScsiTarget) -> None:
    assert target.execute(0, inquiry(0, 0x80))[0] == CHECK
    assert_sense(target, 0x05, 0x24, 0x00)


def test_inquiry_of_a_missing_lun_reports_no_logical_unit(target: ScsiTarget) -> None:
    status, data = target.execute(3, inquiry(alloc=36))
    assert status == GOOD and data[0] == 0x7F and len(data) == 36
    assert target.execute(3, TUR) == (CHECK, b"")
    status, data = target.execute(3, request_sense())
    assert status == GOOD and (data[2], data[12], data[13]) == (0x05, 0x25, 0x00)


# --- TEST UNIT READY, REQUEST SENSE, unit attention ------------------------------------------------------


def test_test_unit_ready_is_good_with_a_medium(target: ScsiTarget) -> None:
    assert target.execute(0, TUR) == (GOOD, b"")


def test_test_unit_ready_without_medium_is_medium_not_present() -> None:
    target = ScsiTarget([None])
    assert target.execute(0, TUR) == (CHECK, b"")
    assert_sense(target, 0x02, 0x3A, 0x00)


def test_request_sense_reports_the_last_error_once(target: ScsiTarget) -> None:
    target.execute(0, bytes([0xFF] + [0] * 9))
    data = assert_sense(target, 0x05, 0x20, 0x00)
    assert data[7] == 10 and len(data) == 18
    assert sense_of(target) == bytes([0x70, 0, 0, 0, 0, 0, 0, 10] + [0] * 10)  # cleared: NO SENSE


def test_request_sense_obeys_the_allocation_length(target: ScsiTarget) -> None:
    target.execute(0, rw10(Opcode.READ_10, 10_000, 1))
    status, data = target.execute(0, request_sense(alloc=14))
    assert status == GOOD and len(data) == 14 and (data[2], data[12], data[13]) == (0x05, 0x21, 0x00)


def test_a_good_command_clears_the_previous_sense(target: ScsiTarget) -> None:
    target.execute(0, rw10(Opcode.READ_10, 10_000, 1))
    assert target.sense(0).asc == 0x21
    assert target.execute(0, TUR)[0] == GOOD
    assert sense_of(target)[2] == 0


def test_sense_is_kept_per_lun() -> None:
    target = ScsiTarget([MemoryStore(), MemoryStore(read_only=True)])
    assert target.execute(1, rw10(Opcode.WRITE_10, 0, 1), b"x" * BS)[0] == CHECK
    assert sense_of(target, 0)[2] == 0
    assert_sense(target, 0x07, 0x27, 0x00, lun=1)


def test_request_sense_without_medium_polls_not_ready() -> None:
    target = ScsiTarget([None])
    assert_sense(target, 0x02, 0x3A, 0x00)


def test_power_on_unit_attention_is_reported_once_like_a_real_disk(store: MemoryStore) -> None:
    target = ScsiTarget([store], unit_attention_on_reset=True)
    assert target.execute(0, inquiry())[0] == GOOD  # INQUIRY is not blocked by a unit attention
    assert target.execute(0, TUR) == (CHECK, b"")
    assert_sense(target, 0x06, 0x29, 0x00)
    assert target.execute(0, TUR) == (GOOD, b"")
    target.reset()
    assert_sense(target, 0x06, 0x29, 0x00)  # REQUEST SENSE reports and clears it too
    assert target.execute(0, TUR) == (GOOD, b"")


def test_no_unit_attention_by_default(target: ScsiTarget) -> None:
    target.reset()
    assert target.execute(0, TUR) == (GOOD, b"")


# --- capacity ---------------------------------------------------------------------------------------------


def test_read_capacity_10_reports_last_lba_and_block_length(target: ScsiTarget) -> None:
    assert target.execute(0, rw10(Opcode.READ_CAPACITY_10, 0, 0)) == (GOOD, struct.pack(">II", 127, 512))


def test_read_capacity_10_saturates_beyond_32_bits() -> None:
    target = ScsiTarget([HugeStore((1 << 32) + 5)])
    assert target.execute(0, rw10(Opcode.READ_CAPACITY_10, 0, 0))[1] == struct.pack(">II", 0xFFFFFFFF, 512)
    status, data = target.execute(0, rw16(Opcode.SERVICE_ACTION_IN_16, 0, 32, b1=0x10))
    assert status == GOOD and struct.unpack(">QI", data[:12]) == ((1 << 32) + 4, 512)


def test_read_capacity_10_boundary_around_2_to_the_32_blocks() -> None:
    target = ScsiTarget([HugeStore(1 << 32)])
    assert target.execute(0, rw10(Opcode.READ_CAPACITY_10, 0, 0))[1] == struct.pack(">II", 0xFFFFFFFF, 512)
    target = ScsiTarget([HugeStore((1 << 32) - 1)])
    assert target.execute(0, rw10(Opcode.READ_CAPACITY_10, 0, 0))[1] == struct.pack(">II", 0xFFFFFFFE, 512)


def test_read_capacity_16_layout_and_allocation_length(target: ScsiTarget) -> None:
    status, data = target.execute(0, rw16(Opcode.SERVICE_ACTION_IN_16, 0, 32, b1=0x10))
    assert status == GOOD and data == struct.pack(">QI", 127, 512) + bytes(20)
    assert target.execute(0, rw16(Opcode.SERVICE_ACTION_IN_16, 0, 8, b1=0x10))[1] == struct.pack(">Q", 127)


def test_other_service_action_in_is_invalid_field(target: ScsiTarget) -> None:
    assert target.execute(0, rw16(Opcode.SERVICE_ACTION_IN_16, 0, 32, b1=0x12))[0] == CHECK
    assert assert_sense(target, 0x05, 0x24, 0x00)[15:18] == b"\xc0\x00\x01"


def test_read_capacity_without_medium_is_not_ready() -> None:
    target = ScsiTarget([None])
    assert target.execute(0, rw10(Opcode.READ_CAPACITY_10, 0, 0))[0] == CHECK
    assert_sense(target, 0x02, 0x3A, 0x00)


def test_read_format_capacities_reports_the_formatted_capacity(target: ScsiTarget) -> None:
    cdb = struct.pack(">BBIBHB", Opcode.READ_FORMAT_CAPACITIES, 0, 0, 0, 0xFC, 0)
    status, data = target.execute(0, cdb)
    assert status == GOOD
    assert data == bytes([0, 0, 0, 8]) + struct.pack(">I", 128) + bytes([0x02, 0x00, 0x02, 0x00])


# --- READ / WRITE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [rw10, rw12, rw16])
def test_read_returns_the_blocks(target: ScsiTarget, store: MemoryStore, make: object) -> None:
    op = {rw10: Opcode.READ_10, rw12: Opcode.READ_12, rw16: Opcode.READ_16}[make]  # type: ignore[index]
    status, data = target.execute(0, make(op, 5, 3))  # type: ignore[operator]
    assert status == GOOD and data == bytes(store.data[5 * BS : 8 * BS])


def test_read_6_zero_count_means_256_blocks() -> None:
    store = MemoryStore(blocks=300)
    target = ScsiTarget([store])
    status, data = target.execute(0, cdb6(Opcode.READ_6, 0, 0, 10, 0))
    assert status == GOOD and data == bytes(store.data[10 * BS : 266 * BS])


@pytest.mark.parametrize(
    ("op", "make"),
    [(Opcode.WRITE_10, rw10), (Opcode.WRITE_12, rw12), (Opcode.WRITE_16, rw16)],
)
def test_write_lands_in_the_store(target: ScsiTarget, store: MemoryStore, op: int, make: object) -> None:
    payload = os.urandom(2 * BS)
    assert target.execute(0, make(op, 7, 2), payload) == (GOOD, b"")  # type: ignore[operator]
    assert bytes(store.data[7 * BS : 9 * BS]) == payload


def test_write_6_lands_in_the_store(target: ScsiTarget, store: MemoryStore) -> None:
    assert target.execute(0, cdb6(Opcode.WRITE_6, 0, 0, 4, 1), b"\x5a" * BS)[0] == GOOD
    assert bytes(store.data[4 * BS : 5 * BS]) == b"\x5a" * BS


def test_zero_length_read_and_write_are_good_and_move_nothing(target: ScsiTarget, store: MemoryStore) -> None:
    cmd = target.command(0, rw10(Opcode.READ_10, 127, 0))
    assert cmd.length == 0 and cmd.finish() == GOOD
    assert target.execute(0, rw10(Opcode.WRITE_10, 128, 0)) == (GOOD, b"")  # LBA = capacity, no blocks


@pytest.mark.parametrize(
    "cdb",
    [
        rw10(Opcode.READ_10, 128, 1),
        rw10(Opcode.READ_10, 127, 2),
        rw16(Opcode.READ_16, 1 << 40, 1),
        rw12(Opcode.WRITE_12, 100, 29),
        rw10(Opcode.VERIFY_10, 200, 1),
        rw10(Opcode.SYNCHRONIZE_CACHE_10, 129, 0),
    ],
)
def test_access_beyond_the_last_lba_is_lba_out_of_range(target: ScsiTarget, cdb: bytes) -> None:
    cmd = target.command(0, cdb)
    assert cmd.direction is Direction.NONE and cmd.finish() == CHECK
    assert_sense(target, 0x05, 0x21, 0x00)


def test_write_to_a_read_only_medium_is_write_protected(tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\x33" * (16 * BS))
    target = ScsiTarget([ImageStore(image, read_only=True)])
    cmd = target.command(0, rw10(Opcode.WRITE_10, 0, 1))
    assert cmd.direction is Direction.NONE and cmd.finish() == CHECK
    assert_sense(target, 0x07, 0x27, 0x00)
    assert image.read_bytes() == b"\x33" * (16 * BS)
    assert target.execute(0, rw10(Opcode.READ_10, 0, 1)) == (GOOD, b"\x33" * BS)


def test_protection_information_is_refused(target: ScsiTarget) -> None:
    assert target.execute(0, rw10(Opcode.READ_10, 0, 1, b1=0x20))[0] == CHECK
    assert assert_sense(target, 0x05, 0x24, 0x00)[15:18] == b"\xc0\x00\x01"


def test_read_error_is_an_unrecovered_read_error_with_the_lba(target: ScsiTarget, store: MemoryStore) -> None:
    store.fail_reads = True
    cmd = target.command(0, rw10(Opcode.READ_10, 9, 4))
    assert cmd.direction is Direction.IN and cmd.length == 4 * BS
    assert cmd.read(4 * BS) == b""
    assert cmd.finish() == CHECK
    data = assert_sense(target, 0x03, 0x11, 0x00)
    assert data[0] == 0xF0 and struct.unpack(">I", data[3:7])[0] == 9


def test_write_error_is_reported_as_medium_error(target: ScsiTarget, store: MemoryStore) -> None:
    store.fail_writes = True
    assert target.execute(0, rw10(Opcode.WRITE_10, 3, 1), b"q" * BS) == (CHECK, b"")
    assert_sense(target, 0x03, 0x0C, 0x00)


def test_fua_write_is_flushed_before_status(target: ScsiTarget, store: MemoryStore) -> None:
    assert target.execute(0, rw10(Opcode.WRITE_10, 0, 1, b1=0x08), b"f" * BS)[0] == GOOD
    assert store.flushes == 1
    assert target.execute(0, rw10(Opcode.WRITE_10, 0, 1), b"f" * BS)[0] == GOOD
    assert store.flushes == 1


def test_streamed_read_costs_one_pread_per_chunk(target: ScsiTarget, store: MemoryStore) -> None:
    cmd = target.command(0, rw10(Opcode.READ_10, 0, 128))
    assert cmd.length == 128 * BS
    chunks = [cmd.read(16 * 1024) for _ in range(4)]
    assert b"".join(chunks) == bytes(store.data)
    assert store.preads == [(i * 16384, 16384) for i in range(4)]
    assert cmd.read(100) == b"" and cmd.finish() == GOOD


# --- VERIFY -----------------------------------------------------------------------------------------------


def test_verify_without_bytchk_is_good(target: ScsiTarget) -> None:
    cmd = target.command(0, rw10(Opcode.VERIFY_10, 0, 16))
    assert cmd.direction is Direction.NONE and cmd.finish() == GOOD


def test_verify_with_bytchk_compares_the_data_out(target: ScsiTarget, store: MemoryStore) -> None:
    same = bytes(store.data[2 * BS : 4 * BS])
    assert target.execute(0, rw10(Opcode.VERIFY_10, 2, 2, b1=0x02), same) == (GOOD, b"")
    changed = bytearray(same)
    changed[700] ^= 0xFF
    assert target.execute(0, rw16(Opcode.VERIFY_16, 2, 2, b1=0x02), bytes(changed)) == (CHECK, b"")
    data = assert_sense(target, 0x0E, 0x1D, 0x00)
    assert data[0] == 0xF0 and struct.unpack(">I", data[3:7])[0] == 700  # offset of the first mismatch


def test_verify_bytchk_11b_compares_one_block_with_each(target: ScsiTarget, store: MemoryStore) -> None:
    store.data[10 * BS : 14 * BS] = b"\x7e" * (4 * BS)
    cmd = target.command(0, rw12(Opcode.VERIFY_12, 10, 4, b1=0x06))
    assert cmd.direction is Direction.OUT and cmd.length == BS
    cmd.write(b"\x7e" * BS)
    assert cmd.finish() == GOOD
    store.data[12 * BS + 3] = 0
    assert target.execute(0, rw12(Opcode.VERIFY_12, 10, 4, b1=0x06), b"\x7e" * BS)[0] == CHECK
    assert_sense(target, 0x0E, 0x1D, 0x00)


def test_verify_bytchk_10b_is_invalid_field(target: ScsiTarget) -> None:
    assert target.execute(0, rw10(Opcode.VERIFY_10, 0, 1, b1=0x04))[0] == CHECK
    assert_sense(target, 0x05, 0x24, 0x00)


# --- MODE SENSE -------------------------------------------------------------------------------------------


def test_mode_sense_6_all_pages_with_block_descriptor(target: ScsiTarget) -> None:
    status, data = target.execute(0, mode_sense6(0x3F))
    assert status == GOOD
    assert data[0] == len(data) - 1 and data[1] == 0 and data[2] == 0x00 and data[3] == 8
    assert data[4:12] == struct.pack(">I", 128) + b"\x00\x00\x02\x00"
    caching, iec = data[12:32], data[32:44]
    assert caching[:3] == bytes([0x08, 0x12, 0x04])  # WCE
    assert iec[:4] == bytes([0x1C, 0x0A, 0x08, 0x00])  # DEXCPT, MRIE 0
    assert len(data) == 44


def test_mode_sense_sets_wp_for_a_read_only_medium() -> None:
    target = ScsiTarget([MemoryStore(read_only=True)])
    assert target.execute(0, mode_sense6(0x3F))[1][2] == 0x80
    assert target.execute(0, mode_sense10(0x3F))[1][3] == 0x80


def test_mode_sense_dbd_drops_the_block_descriptor(target: ScsiTarget) -> None:
    status, data = target.execute(0, mode_sense6(0x08, dbd=True))
    assert status == GOOD and data[3] == 0 and data[4] == 0x08 and len(data) == 4 + 20


def test_mode_sense_single_pages(target: ScsiTarget) -> None:
    assert target.execute(0, mode_sense6(0x1C, dbd=True))[1][4:] == bytes([0x1C, 0x0A, 0x08]) + bytes(9)
    data = target.execute(0, mode_sense6(0x08, dbd=True, subpage=0xFF))[1]
    assert data[4] == 0x08


def test_mode_sense_allocation_length_truncates_but_keeps_the_full_length_field(target: ScsiTarget) -> None:
    full = target.execute(0, mode_sense6(0x3F))[1]
    status, data = target.execute(0, mode_sense6(0x3F, alloc=4))
    assert status == GOOD and data == full[:4] and data[0] == len(full) - 1


def test_mode_sense_changeable_values_are_all_zero(target: ScsiTarget) -> None:
    data = target.execute(0, mode_sense6(0x08, pc=1, dbd=True))[1]
    assert data[4:6] == bytes([0x08, 0x12]) and data[6:] == bytes(18)


def test_mode_sense_saved_values_are_not_supported(target: ScsiTarget) -> None:
    assert target.execute(0, mode_sense6(0x3F, pc=3))[0] == CHECK
    assert_sense(target, 0x05, 0x39, 0x00)


@pytest.mark.parametrize(("page", "subpage", "field"), [(0x0A, 0, 2), (0x08, 0x01, 3), (0x3F, 0x05, 3)])
def test_mode_sense_unsupported_page_is_invalid_field(
    target: ScsiTarget, page: int, subpage: int, field: int
) -> None:
    assert target.execute(0, mode_sense6(page, subpage=subpage))[0] == CHECK
    assert assert_sense(target, 0x05, 0x24, 0x00)[15:18] == bytes([0xC0, 0, field])


def test_mode_sense_10_header_and_long_lba_descriptor(target: ScsiTarget) -> None:
    status, data = target.execute(0, mode_sense10(0x08))
    assert status == GOOD
    assert struct.unpack(">H", data[:2])[0] == len(data) - 2 and data[4] == 0 and data[6:8] == b"\x00\x08"
    assert data[8:16] == struct.pack(">I", 128) + b"\x00\x00\x02\x00" and data[16] == 0x08
    status, data = target.execute(0, mode_sense10(0x08, llbaa=True))
    assert data[4] == 0x01 and data[6:8] == b"\x00\x10"  # LONGLBA, 16-byte descriptor
    assert data[8:24] == struct.pack(">QII", 128, 0, 512) and data[24] == 0x08


# --- removable medium -------------------------------------------------------------------------------------


def test_eject_leaves_no_medium_until_loaded_again(target: ScsiTarget, store: MemoryStore) -> None:
    assert target.execute(0, start_stop(start=False, loej=True)) == (GOOD, b"")
    assert store.flushes == 1  # written data is flushed before the medium goes
    assert target.execute(0, TUR) == (CHECK, b"")
    assert_sense(target, 0x02, 0x3A, 0x00)
    assert target.execute(0, rw10(Opcode.READ_10, 0, 1))[0] == CHECK
    assert_sense(target, 0x02, 0x3A, 0x00)
    assert target.execute(0, start_stop(start=True, loej=True)) == (GOOD, b"")
    assert target.execute(0, TUR) == (GOOD, b"")


def test_prevent_medium_removal_blocks_eject(target: ScsiTarget, store: MemoryStore) -> None:
    assert target.execute(0, prevent(True)) == (GOOD, b"")
    assert target.execute(0, start_stop(start=False, loej=True))[0] == CHECK
    assert_sense(target, 0x05, 0x53, 0x02)
    assert target.execute(0, TUR)[0] == GOOD
    assert target.execute(0, prevent(False)) == (GOOD, b"")
    assert store.flushes == 1  # allowing removal flushes
    assert target.execute(0, start_stop(start=False, loej=True))[0] == GOOD
    assert target.execute(0, TUR)[0] == CHECK


def test_prevent_field_10b_is_invalid(target: ScsiTarget) -> None:
    assert target.execute(0, cdb6(Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL, b4=2))[0] == CHECK
    assert_sense(target, 0x05, 0x24, 0x00)


def test_stopped_unit_needs_start(target: ScsiTarget) -> None:
    assert target.execute(0, start_stop(start=False, loej=False))[0] == GOOD
    assert target.execute(0, TUR)[0] == CHECK
    assert_sense(target, 0x02, 0x04, 0x02)
    assert target.execute(0, start_stop(start=True, loej=False))[0] == GOOD
    assert target.execute(0, TUR)[0] == GOOD


def test_power_condition_start_stop_changes_nothing(target: ScsiTarget) -> None:
    assert target.execute(0, start_stop(start=False, loej=True, power=3))[0] == GOOD
    assert target.execute(0, TUR)[0] == GOOD


def test_eject_of_a_fixed_disk_is_invalid_field(store: MemoryStore) -> None:
    target = ScsiTarget([store], removable=False)
    assert target.execute(0, start_stop(start=False, loej=True))[0] == CHECK
    assert_sense(target, 0x05, 0x24, 0x00)
    assert target.execute(0, TUR)[0] == GOOD


def test_load_inserts_a_medium_with_a_medium_changed_attention(store: MemoryStore) -> None:
    target = ScsiTarget([None])
    with pytest.raises(ScsiError, match="no medium"):
        target.load(0)
    target.load(0, store)
    assert target.execute(0, TUR)[0] == CHECK
    assert_sense(target, 0x06, 0x28, 0x00)
    assert target.execute(0, TUR)[0] == GOOD
    target.eject(0)
    assert target.execute(0, TUR)[0] == CHECK


# --- SYNCHRONIZE CACHE ------------------------------------------------------------------------------------


def test_synchronize_cache_fsyncs_the_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(32 * BS))
    target = ScsiTarget([ImageStore(image)])
    synced: list[int] = []
    monkeypatch.setattr(storage.os, "fsync", synced.append)
    assert target.execute(0, rw10(Opcode.WRITE_10, 1, 1), b"w" * BS)[0] == GOOD
    assert synced == []
    assert target.execute(0, rw10(Opcode.SYNCHRONIZE_CACHE_10, 0, 0)) == (GOOD, b"")
    assert len(synced) == 1
    assert target.execute(0, rw16(Opcode.SYNCHRONIZE_CACHE_16, 0, 0)) == (GOOD, b"")
    assert len(synced) == 2


def test_synchronize_cache_failure_is_a_write_error(target: ScsiTarget, store: MemoryStore) -> None:
    def broken() -> None:
        raise StorageError("memory: fsync failed")

    store.flush = broken  # type: ignore[method-assign]
    assert target.execute(0, rw10(Opcode.SYNCHRONIZE_CACHE_10, 0, 0))[0] == CHECK
    assert_sense(target, 0x03, 0x0C, 0x00)


# --- REPORT LUNS, unknown commands, configuration ---------------------------------------------------------


def test_report_luns_lists_every_lun() -> None:
    target = ScsiTarget([MemoryStore(), None, MemoryStore()])
    status, data = target.execute(0, struct.pack(">BBBBBBIBB", Opcode.REPORT_LUNS, 0, 0, 0, 0, 0, 64, 0, 0))
    assert status == GOOD
    assert data == struct.pack(">II", 24, 0) + b"".join(struct.pack(">HHI", n, 0, 0) for n in range(3))


def test_report_luns_with_a_tiny_allocation_length_is_invalid(target: ScsiTarget) -> None:
    assert (
        target.execute(0, struct.pack(">BBBBBBIBB", Opcode.REPORT_LUNS, 0, 0, 0, 0, 0, 8, 0, 0))[0] == CHECK
    )
    assert assert_sense(target, 0x05, 0x24, 0x00)[15:18] == b"\xc0\x00\x06"


@pytest.mark.parametrize("opcode", [0xA1, 0x15, 0x55, 0x04, 0x4A, 0xFF, 0xC0])
def test_unknown_opcodes_are_invalid_command_operation_code(target: ScsiTarget, opcode: int) -> None:
    cmd = target.command(0, bytes([opcode]) + bytes(15))
    assert cmd.direction is Direction.NONE and cmd.finish() == CHECK
    assert_sense(target, 0x05, 0x20, 0x00)


def test_cdb_shorter_than_its_opcode_needs_is_invalid_field(target: ScsiTarget) -> None:
    assert target.execute(0, bytes([Opcode.READ_10, 0, 0, 0]))[0] == CHECK
    assert_sense(target, 0x05, 0x24, 0x00)


def test_empty_cdb_is_a_programming_error(target: ScsiTarget) -> None:
    with pytest.raises(ScsiError, match="empty CDB"):
        target.command(0, b"")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vendor": "TOO LONG VENDOR"}, "vendor"),
        ({"product": "é"}, "product"),
        ({"revision": "12345"}, "revision"),
        ({"serial": ""}, "serial"),
        ({"serial": "bad\nserial"}, "serial"),
    ],
)
def test_bad_identity_strings_are_refused(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(ScsiError, match=match):
        ScsiTarget([MemoryStore()], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("count", [0, 17])
def test_lun_count_must_be_1_to_16(count: int) -> None:
    with pytest.raises(ScsiError, match="1 to 16"):
        ScsiTarget([MemoryStore() for _ in range(count)])


def test_close_flushes_and_closes_every_store() -> None:
    stores = [MemoryStore(), MemoryStore()]
    ScsiTarget([*stores, None]).close()
    assert all(s.closed and s.flushes == 1 for s in stores)
