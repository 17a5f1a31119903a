"""A SCSI direct-access target (SPC-4 / SBC-3): CDB in, data and status out, sense kept per LUN.

This is the command set that Linux, Windows and macOS send to USB disks: INQUIRY (standard data and VPD
pages 00h/80h/83h), TEST UNIT READY, REQUEST SENSE, READ CAPACITY(10/16), READ/WRITE(6/10/12/16), VERIFY,
MODE SENSE(6/10), START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, SYNCHRONIZE CACHE(10/16), READ FORMAT
CAPACITIES (UFI) and REPORT LUNS. Anything else ends in CHECK CONDITION with ILLEGAL REQUEST / INVALID
COMMAND OPERATION CODE, never an exception or a hang.

It is pure: no USB, no sockets; blocks come from `Store`s (`storage.py`). A transport (BOT in
`mass_storage.py`) drives one command in three steps, because it must know the direction and size of the
data before moving any (BOT §6.7 compares them with what the host announced):

    cmd = target.command(lun, cdb)   # decode + check; cmd.direction, cmd.length
    cmd.read(n) / cmd.write(chunk)   # the data phase, in whatever chunks the host's transfers have
    status = cmd.finish()            # GOOD or CHECK CONDITION; the sense stays with the LUN

Block I/O streams: a READ of 64 KiB fetched by one 64 KiB transfer costs one `pread`. `execute()` runs the
three steps at once for tests and simple callers.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Sequence

from emulator.devices.base import DeviceError, FileRegion
from emulator.devices.storage import StorageError, Store


class ScsiError(DeviceError):
    """The target was configured or driven wrongly (bad vendor string, too many LUNs, empty CDB)."""


class Opcode(enum.IntEnum):
    """Operation codes the target implements, named as in SPC-4 / SBC-3 (and UFI for 23h)."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_FORMAT_CAPACITIES = 0x23
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    VERIFY_12 = 0xAF


READ_CAPACITY_16 = 0x10
"""SERVICE ACTION IN(16) service action for READ CAPACITY(16)."""

VPD_SUPPORTED_PAGES = 0x00
VPD_UNIT_SERIAL_NUMBER = 0x80
VPD_DEVICE_IDENTIFICATION = 0x83

MODE_PAGE_CACHING = 0x08
MODE_PAGE_INFORMATIONAL_EXCEPTIONS = 0x1C
MODE_PAGE_ALL = 0x3F

VERSION_DESCRIPTORS = (0x00A0, 0x0460, 0x04C0, 0x1730)
"""SAM-5, SPC-4, SBC-3 (no version claimed), USB Mass Storage Bulk-Only Transport 1.0."""


class ScsiStatus(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02


# Members tested per command, as module names: on Python 3.11 `Opcode.READ_6` goes through
# EnumType.__getattr__, ten times the cost of a global.
_REQUEST_SENSE = Opcode.REQUEST_SENSE
_SIX_BYTE_RW = (Opcode.READ_6, Opcode.WRITE_6)
_GOOD = ScsiStatus.GOOD


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


@dataclasses.dataclass(frozen=True, slots=True)
class Sense:
    """Sense data: key, additional sense code and qualifier, plus the optional INFORMATION field and, for
    INVALID FIELD IN CDB, the CDB byte at fault (the sense-key specific field pointer)."""

    key: SenseKey
    asc: int
    ascq: int
    information: int | None = None
    field: int | None = None

    def at(self, field: int) -> Sense:
        """The same sense pointing at CDB byte `field`."""
        return dataclasses.replace(self, field=field)

    def with_information(self, information: int) -> Sense:
        return dataclasses.replace(self, information=information)

    def fixed(self) -> bytes:
        """Fixed-format sense data (response code 70h, current error), 18 bytes (SPC-4 §4.5.3)."""
        info = self.information
        valid = info is not None and 0 <= info <= 0xFFFFFFFF
        if self.field is not None:
            sks = bytes((0x80 | 0x40, (self.field >> 8) & 0xFF, self.field & 0xFF))  # SKSV, C/D=CDB
        else:
            sks = b"\x00\x00\x00"
        return struct.pack(
            ">BBBIBIBBB3s",
            0x70 | (0x80 if valid else 0),
            0,
            self.key & 0x0F,
            info if valid else 0,
            10,  # additional sense length: bytes 8..17
            0,
            self.asc,
            self.ascq,
            0,
            sks,
        )


NO_SENSE = Sense(SenseKey.NO_SENSE, 0x00, 0x00)
INITIALIZING_COMMAND_REQUIRED = Sense(SenseKey.NOT_READY, 0x04, 0x02)
MEDIUM_NOT_PRESENT = Sense(SenseKey.NOT_READY, 0x3A, 0x00)
WRITE_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
UNRECOVERED_READ_ERROR = Sense(SenseKey.MEDIUM_ERROR, 0x11, 0x00)
INVALID_COMMAND_OPERATION_CODE = Sense(SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
LBA_OUT_OF_RANGE = Sense(SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_FIELD_IN_CDB = Sense(SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
LOGICAL_UNIT_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x25, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
MEDIUM_REMOVAL_PREVENTED = Sense(SenseKey.ILLEGAL_REQUEST, 0x53, 0x02)
MEDIUM_MAY_HAVE_CHANGED = Sense(SenseKey.UNIT_ATTENTION, 0x28, 0x00)
POWER_ON_RESET = Sense(SenseKey.UNIT_ATTENTION, 0x29, 0x00)
WRITE_PROTECTED = Sense(SenseKey.DATA_PROTECT, 0x27, 0x00)
MISCOMPARE_DURING_VERIFY = Sense(SenseKey.MISCOMPARE, 0x1D, 0x00)


class Direction(enum.Enum):
    """Which way a command's data moves, seen from the host (as in the CBW flags)."""

    NONE = "none"
    IN = "in"
    OUT = "out"


# ---------------------------------------------------------------------------------------------- commands


class Command:
    """One decoded CDB. `direction` and `length` say what data the device intends to move (BOT's Dn, Di,
    Do); the transport calls `read`/`write` with chunks of it, possibly stopping early, then `finish`."""

    direction: Direction = Direction.NONE
    length: int = 0

    def read(self, n: int) -> bytes:
        """The next at most `n` bytes of data-in; fewer than asked (b"" at worst) means the device could
        not produce more (a medium error, reported by `finish`)."""
        return b""

    def read_region(self, n: int) -> bytes | FileRegion:
        """`read`, but the data may come as a `FileRegion` of the backing file (READ on an image store)."""
        return self.read(n)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Consume the next chunk of data-out (the transport never passes more than `length` in all)."""

    def finish(self) -> ScsiStatus:
        raise NotImplementedError


class _Completed(Command):
    """A command fully executed at decode time; for data-in commands `data` is already cut to the
    allocation length."""

    def __init__(self, status: ScsiStatus, data: bytes = b"") -> None:
        self._status = status
        self._data = data
        self._pos = 0
        if data:
            self.direction = Direction.IN
            self.length = len(data)

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk

    def finish(self) -> ScsiStatus:
        return self._status


class _BlockCommand(Command):
    """Shared state of the streaming block commands: where on which LUN, how far along, first error."""

    def __init__(self, unit: LogicalUnit, offset: int, length: int) -> None:
        self._unit = unit
        self._offset = offset
        self.length = length
        self._pos = 0
        self._error: Sense | None = None

    def finish(self) -> ScsiStatus:
        if self._error is not None:
            self._unit.sense = self._error
            return ScsiStatus.CHECK_CONDITION
        return _GOOD


class _Read(_BlockCommand):
    direction = Direction.IN

    def read(self, n: int) -> bytes:
        return self._next(n, False)  # type: ignore[return-value]  # pread gives bytes

    def read_region(self, n: int) -> bytes | FileRegion:
        return self._next(n, True)

    def _next(self, n: int, region: bool) -> bytes | FileRegion:
        """The next at most `n` bytes from the store (as a region where it gives one); a store error ends
        the data with MEDIUM ERROR for `finish`."""
        n = min(n, self.length - self._pos)
        if n <= 0 or self._error is not None:
            return b""
        store = self._unit.store
        assert store is not None
        at = self._offset + self._pos
        try:
            data = store.region(at, n) if region else store.pread(at, n)
        except StorageError:
            self._error = UNRECOVERED_READ_ERROR.with_information(at // store.block_size)
            return b""
        self._pos += n
        return data


class _Write(_BlockCommand):
    direction = Direction.OUT

    def __init__(self, unit: LogicalUnit, offset: int, length: int, fua: bool) -> None:
        super().__init__(unit, offset, length)
        self._fua = fua

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None or not data:
            return
        store = self._unit.store
        assert store is not None
        try:
            store.pwrite(self._offset + self._pos, data)
        except StorageError:
            self._error = WRITE_ERROR.with_information((self._offset + self._pos) // store.block_size)
        self._pos += len(data)

    def finish(self) -> ScsiStatus:
        if self._fua and self._error is None and self._pos:
            store = self._unit.store
            assert store is not None
            try:
                store.flush()  # Force Unit Access: durable before GOOD status
            except StorageError:
                self._error = WRITE_ERROR
        return super().finish()


class _Verify(_BlockCommand):
    """VERIFY with BYTCHK 01b (compare the data-out with the blocks) or 11b (one block of data-out,
    compared with every block of the range)."""

    direction = Direction.OUT

    def __init__(self, unit: LogicalUnit, offset: int, blocks: int, single: bool) -> None:
        store = unit.store
        assert store is not None
        super().__init__(unit, offset, store.block_size if single else blocks * store.block_size)
        self._blocks = blocks if single else 0
        self._pattern = bytearray()

    def _miscompare(self, position: int) -> None:
        self._error = MISCOMPARE_DURING_VERIFY.with_information(position)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None or not data:
            return
        store = self._unit.store
        assert store is not None
        if self._blocks:  # BYTCHK 11b: gather the one block now, compare at finish
            self._pattern += data
            self._pos += len(data)
            return
        try:
            actual = store.pread(self._offset + self._pos, len(data))
        except StorageError:
            self._error = UNRECOVERED_READ_ERROR.with_information(
                (self._offset + self._pos) // store.block_size
            )
            return
        if actual != data:
            first = next(i for i, (a, b) in enumerate(zip(actual, bytes(data), strict=True)) if a != b)
            self._miscompare(self._pos + first)
        self._pos += len(data)

    def finish(self) -> ScsiStatus:
        if self._blocks and self._error is None and self._pos == self.length:
            store = self._unit.store
            assert store is not None
            bs = store.block_size
            pattern = bytes(self._pattern)
            done = 0
            while done < self._blocks and self._error is None:
                n = min(self._blocks - done, 256)
                try:
                    actual = store.pread(self._offset + done * bs, n * bs)
                except StorageError:
                    self._error = UNRECOVERED_READ_ERROR.with_information(self._offset // bs + done)
                    break
                if actual != pattern * n:
                    first = next(
                        i for i, (a, b) in enumerate(zip(actual, pattern * n, strict=True)) if a != b
                    )
                    self._miscompare(first % bs)
                done += n
        return super().finish()


# ---------------------------------------------------------------------------------------------- the target


@dataclasses.dataclass(eq=False)
class LogicalUnit:
    """One LUN: its store (None = no medium loaded) and the state SPC keeps per logical unit."""

    store: Store | None
    serial: str
    removable: bool = True
    sense: Sense = NO_SENSE
    unit_attention: Sense | None = None
    prevent_removal: bool = False
    ejected: bool = False
    stopped: bool = False

    @property
    def medium_present(self) -> bool:
        return self.store is not None and not self.ejected

    @property
    def write_protected(self) -> bool:
        return self.store is not None and self.store.read_only

    def not_ready(self) -> Sense | None:
        """Why medium access would fail now, or None when the unit is ready."""
        if not self.medium_present:
            return MEDIUM_NOT_PRESENT
        if self.stopped:
            return INITIALIZING_COMMAND_REQUIRED
        return None


def _ascii_field(value: str, width: int, what: str) -> bytes:
    try:
        raw = value.encode("ascii")
    except UnicodeEncodeError:
        raise ScsiError(f"{what} {value!r} must be ASCII") from None
    if len(raw) > width or any(c < 0x20 or c > 0x7E for c in raw):
        raise ScsiError(f"{what} {value!r} must be at most {width} printable ASCII characters")
    return raw.ljust(width, b" ")


_Handler = Callable[["ScsiTarget", LogicalUnit, bytes], Command]

_LBA_COUNT_10 = struct.Struct(">2xI1xH")  # a ten-byte CDB's LOGICAL BLOCK ADDRESS and TRANSFER LENGTH

# Minimum CDB length of each operation code group (SPC-4 §4.2.5.1): 00-1F six bytes, 20-5F ten, 80-9F
# sixteen, A0-BF twelve.
_GROUP_CDB_LENGTH = {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}


class ScsiTarget:
    """A SCSI target device with one direct-access logical unit per store.

    `vendor`, `product` and `revision` fill the standard INQUIRY data (8, 16 and 4 ASCII characters);
    `serial` is the unit serial number (VPD page 80h); with several LUNs each gets `serial-<lun>`.
    `removable` sets the RMB bit and allows eject by START STOP UNIT. With `unit_attention_on_reset`, each
    LUN starts (and restarts after `reset()`) with the POWER ON, RESET OR BUS DEVICE RESET OCCURRED unit
    attention pending, as real disks do; off by default so simple hosts get GOOD from the first command.
    """

    MAX_LUNS = 16

    def __init__(
        self,
        stores: Sequence[Store | None],
        *,
        vendor: str = "vusb",
        product: str = "Virtual Disk",
        revision: str = "0100",
        serial: str = "VUSB00000001",
        removable: bool = True,
        unit_attention_on_reset: bool = False,
    ) -> None:
        if not 1 <= len(stores) <= self.MAX_LUNS:
            raise ScsiError(f"a target has 1 to {self.MAX_LUNS} logical units, not {len(stores)}")
        self._vendor = _ascii_field(vendor, 8, "vendor")
        self._product = _ascii_field(product, 16, "product")
        self._revision = _ascii_field(revision, 4, "revision")
        if not serial:
            raise ScsiError("serial must not be empty")
        for store in stores:
            if store is not None and not isinstance(store, Store):
                raise ScsiError(f"{store!r} is not a Store")
        serials = [serial] if len(stores) == 1 else [f"{serial}-{lun}" for lun in range(len(stores))]
        for lun_serial in serials:
            _ascii_field(lun_serial, 240, "serial")
        self.unit_attention_on_reset = unit_attention_on_reset
        self.units = [
            LogicalUnit(store, serial=s, removable=removable)
            for store, s in zip(stores, serials, strict=True)
        ]
        if unit_attention_on_reset:
            for unit in self.units:
                unit.unit_attention = POWER_ON_RESET

    @property
    def max_lun(self) -> int:
        """The highest LUN, as Get Max LUN reports it."""
        return len(self.units) - 1

    # ---------------------------------------------------------------- management (not SCSI commands)

    def sense(self, lun: int) -> Sense:
        """The LUN's pending sense data (what REQUEST SENSE would report), without clearing it."""
        return self.units[lun].sense

    def reset(self) -> None:
        """A hard reset (USB port reset, new configuration): sense and medium locks go away; a unit
        attention is raised when `unit_attention_on_reset` is set."""
        for unit in self.units:
            unit.sense = NO_SENSE
            unit.prevent_removal = False
            unit.stopped = False
            unit.unit_attention = POWER_ON_RESET if self.unit_attention_on_reset else None

    def load(self, lun: int, store: Store | None = None) -> None:
        """Insert a medium (or re-insert the ejected one): the host sees NOT READY TO READY CHANGE, MEDIUM
        MAY HAVE CHANGED on its next command."""
        unit = self.units[lun]
        if store is not None:
            if unit.store is not None and unit.store is not store:
                unit.store.close()
            unit.store = store
        if unit.store is None:
            raise ScsiError(f"LUN {lun} has no medium to load")
        unit.ejected = False
        unit.stopped = False
        unit.unit_attention = MEDIUM_MAY_HAVE_CHANGED

    def eject(self, lun: int) -> None:
        """Take the medium out, as the eject button of a card reader would (ignores PREVENT)."""
        unit = self.units[lun]
        if unit.store is not None:
            unit.store.flush()
        unit.ejected = True

    def flush(self) -> None:
        for unit in self.units:
            if unit.store is not None:
                unit.store.flush()

    def close(self) -> None:
        """Flush and close every store (device shutdown)."""
        errors = []
        for unit in self.units:
            if unit.store is not None:
                try:
                    unit.store.close()
                except StorageError as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    # ---------------------------------------------------------------- commands

    def execute(
        self, lun: int, cdb: bytes | bytearray, data_out: bytes | bytearray = b""
    ) -> tuple[ScsiStatus, bytes]:
        """Run one command start to end: data-out is passed whole, data-in returned whole."""
        cmd = self.command(lun, cdb)
        data = b""
        if cmd.direction is Direction.IN:
            data = cmd.read(cmd.length)
        elif cmd.direction is Direction.OUT:
            cmd.write(bytes(data_out[: cmd.length]))
        return cmd.finish(), data

    def command(self, lun: int, cdb: bytes | bytearray | memoryview) -> Command:
        """Decode `cdb` for `lun` and do every check that needs no data; see the module docstring."""
        cdb = bytes(cdb)
        if not cdb:
            raise ScsiError("empty CDB")
        opcode = cdb[0]
        if not 0 <= lun < len(self.units):
            return self._absent_lun(opcode, cdb)
        unit = self.units[lun]
        if opcode != _REQUEST_SENSE:
            unit.sense = NO_SENSE
        if unit.unit_attention is not None and opcode not in (
            Opcode.INQUIRY,
            Opcode.REQUEST_SENSE,
            Opcode.REPORT_LUNS,
        ):
            unit.sense, unit.unit_attention = unit.unit_attention, None
            return _Completed(ScsiStatus.CHECK_CONDITION)
        handler = _HANDLERS.get(opcode)
        if handler is None:
            return self._fail(unit, INVALID_COMMAND_OPERATION_CODE)
        if len(cdb) < _GROUP_CDB_LENGTH[opcode >> 5]:
            return self._fail(unit, INVALID_FIELD_IN_CDB)
        return handler(self, unit, cdb)

    @staticmethod
    def _fail(unit: LogicalUnit, sense: Sense) -> Command:
        unit.sense = sense
        return _Completed(ScsiStatus.CHECK_CONDITION)

    @staticmethod
    def _data(data: bytes, allocation_length: int) -> Command:
        return _Completed(ScsiStatus.GOOD, data[:allocation_length])

    def _absent_lun(self, opcode: int, cdb: bytes) -> Command:
        """Commands addressed to a LUN that does not exist (SPC-4 §4.6.4)."""
        if opcode == Opcode.INQUIRY and len(cdb) >= 6 and not cdb[1] & 0x03 and not cdb[2]:
            # Peripheral qualifier 011b, device type 1Fh: no logical unit here.
            return self._data(b"\x7f" + self._standard_inquiry()[1:], int.from_bytes(cdb[3:5], "big"))
        if opcode == Opcode.REQUEST_SENSE and len(cdb) >= 6:
            return self._data(LOGICAL_UNIT_NOT_SUPPORTED.fixed(), cdb[4])
        if opcode == Opcode.REPORT_LUNS and len(cdb) >= 12:
            return self._report_luns(self.units[0], cdb)
        return _Completed(ScsiStatus.CHECK_CONDITION)

    # ---------------------------------------------------------------- SPC commands

    def _standard_inquiry(self, unit: LogicalUnit | None = None) -> bytes:
        rmb = 0x80 if unit is None or unit.removable else 0x00
        data = bytearray(74)
        data[0] = 0x00  # peripheral qualifier 000b, direct access block device
        data[1] = rmb
        data[2] = 0x06  # VERSION: SPC-4
        data[3] = 0x02  # RESPONSE DATA FORMAT 2
        data[4] = len(data) - 5  # ADDITIONAL LENGTH
        data[8:16] = self._vendor
        data[16:32] = self._product
        data[32:36] = self._revision
        for i, descriptor in enumerate(VERSION_DESCRIPTORS):
            struct.pack_into(">H", data, 58 + 2 * i, descriptor)
        return bytes(data)

    def _inquiry(self, unit: LogicalUnit, cdb: bytes) -> Command:
        evpd, page = cdb[1] & 0x01, cdb[2]
        allocation_length = int.from_bytes(cdb[3:5], "big")
        if cdb[1] & 0x02:  # CMDDT (obsolete)
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(1))
        if not evpd:
            if page:
                return self._fail(unit, INVALID_FIELD_IN_CDB.at(2))
            return self._data(self._standard_inquiry(unit), allocation_length)
        if page == VPD_SUPPORTED_PAGES:
            body = bytes((VPD_SUPPORTED_PAGES, VPD_UNIT_SERIAL_NUMBER, VPD_DEVICE_IDENTIFICATION))
        elif page == VPD_UNIT_SERIAL_NUMBER:
            body = unit.serial.encode("ascii")
        elif page == VPD_DEVICE_IDENTIFICATION:
            # One designator: T10 vendor ID based (type 1), ASCII, associated with the logical unit:
            # T10 VENDOR IDENTIFICATION (8 bytes) then a vendor-specific part: product and serial.
            ident = self._vendor + self._product.rstrip(b" ") + b" " + unit.serial.encode("ascii")
            ident = ident[:252]
            body = bytes((0x02, 0x01, 0x00, len(ident))) + ident
        else:
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(2))
        return self._data(bytes((0x00, page)) + struct.pack(">H", len(body)) + body, allocation_length)

    def _request_sense(self, unit: LogicalUnit, cdb: bytes) -> Command:
        # DESC=1 asks for descriptor format, which this target does not support: it answers with fixed
        # format sense data, which the host recognises by the response code (SPC-4 §6.39).
        if unit.sense != NO_SENSE:
            sense = unit.sense
        elif unit.unit_attention is not None:
            sense, unit.unit_attention = unit.unit_attention, None
        else:
            sense = unit.not_ready() or NO_SENSE  # "pollable" sense: the unit's current state
        unit.sense = NO_SENSE
        return self._data(sense.fixed(), cdb[4])

    def _test_unit_ready(self, unit: LogicalUnit, cdb: bytes) -> Command:
        sense = unit.not_ready()
        return self._fail(unit, sense) if sense else _Completed(ScsiStatus.GOOD)

    def _report_luns(self, unit: LogicalUnit, cdb: bytes) -> Command:
        select_report = cdb[2]
        allocation_length = int.from_bytes(cdb[6:10], "big")
        if select_report not in (0x00, 0x01, 0x02):
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(2))
        if allocation_length < 16:
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(6))
        luns = [] if select_report == 0x01 else range(len(self.units))  # 01h: well-known LUNs only
        body = b"".join(struct.pack(">HHI", lun, 0, 0) for lun in luns)  # peripheral device addressing
        return self._data(struct.pack(">II", len(body), 0) + body, allocation_length)

    def _mode_sense(self, unit: LogicalUnit, cdb: bytes) -> Command:
        ten = cdb[0] == Opcode.MODE_SENSE_10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        allocation_length = int.from_bytes(cdb[7:9], "big") if ten else cdb[4]
        if pc == 3:
            return self._fail(unit, SAVING_PARAMETERS_NOT_SUPPORTED.at(2))
        builders = {
            MODE_PAGE_CACHING: _caching_page,
            MODE_PAGE_INFORMATIONAL_EXCEPTIONS: _informational_exceptions_page,
        }
        if page == MODE_PAGE_ALL and subpage in (0x00, 0xFF):
            pages = b"".join(build(pc) for _, build in sorted(builders.items()))
        elif page in builders and subpage in (0x00, 0xFF):
            pages = builders[page](pc)
        else:
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(3 if page in builders or page == 0x3F else 2))
        sense = unit.not_ready()
        if sense:
            return self._fail(unit, sense)
        store = unit.store
        assert store is not None
        blocks, bs = store.block_count, store.block_size
        if dbd:
            descriptor = b""
        elif llbaa:
            descriptor = struct.pack(">QII", blocks, 0, bs)
        else:
            # Short LBA mode parameter block descriptor (SBC-3 §6.4.2.2): block count saturates.
            descriptor = struct.pack(">IB", min(blocks, 0xFFFFFFFF), 0) + bs.to_bytes(3, "big")
        wp = 0x80 if unit.write_protected else 0x00  # device-specific parameter: WP; DPOFUA not offered
        if ten:
            length = 8 + len(descriptor) + len(pages)
            header = struct.pack(
                ">HBBBBH", length - 2, 0, wp, 0x01 if llbaa and descriptor else 0, 0, len(descriptor)
            )
        else:
            length = 4 + len(descriptor) + len(pages)
            header = struct.pack(">BBBB", length - 1, 0, wp, len(descriptor))
        return self._data(header + descriptor + pages, allocation_length)

    # ---------------------------------------------------------------- SBC commands

    def _read_capacity_10(self, unit: LogicalUnit, cdb: bytes) -> Command:
        sense = unit.not_ready()
        if sense:
            return self._fail(unit, sense)
        store = unit.store
        assert store is not None
        last = store.block_count - 1
        # More than 2**32 - 1 blocks: FFFFFFFFh tells the host to use READ CAPACITY(16) (SBC-3 §5.16.2).
        return self._data(struct.pack(">II", min(last, 0xFFFFFFFF), store.block_size), 8)

    def _service_action_in_16(self, unit: LogicalUnit, cdb: bytes) -> Command:
        if cdb[1] & 0x1F != READ_CAPACITY_16:
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(1))
        allocation_length = int.from_bytes(cdb[10:14], "big")
        sense = unit.not_ready()
        if sense:
            return self._fail(unit, sense)
        store = unit.store
        assert store is not None
        data = struct.pack(">QI", store.block_count - 1, store.block_size) + bytes(20)
        return self._data(data, allocation_length)

    def _read_format_capacities(self, unit: LogicalUnit, cdb: bytes) -> Command:
        allocation_length = int.from_bytes(cdb[7:9], "big")
        sense = unit.not_ready()
        if sense:
            return self._fail(unit, sense)
        store = unit.store
        assert store is not None
        # Capacity list header, then the current/maximum capacity descriptor: descriptor code 10b
        # (formatted media), number of blocks, block length (UFI §4.10).
        descriptor = struct.pack(">IB", min(store.block_count, 0xFFFFFFFF), 0x02) + store.block_size.to_bytes(
            3, "big"
        )
        return self._data(b"\x00\x00\x00\x08" + descriptor, allocation_length)

    @staticmethod
    def _lba_and_count(cdb: bytes) -> tuple[int, int]:
        op = cdb[0]
        if op in _SIX_BYTE_RW:
            return int.from_bytes(cdb[1:4], "big") & 0x1FFFFF, cdb[4] or 256
        if op >> 5 in (1, 2):  # ten-byte CDBs
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[7:9], "big")
        if op >> 5 == 5:  # twelve-byte
            return int.from_bytes(cdb[2:6], "big"), int.from_bytes(cdb[6:10], "big")
        return int.from_bytes(cdb[2:10], "big"), int.from_bytes(cdb[10:14], "big")

    def _block_access(self, unit: LogicalUnit, cdb: bytes, write: bool) -> tuple[int, int] | Sense:
        """Checks shared by READ, WRITE, VERIFY and SYNCHRONIZE CACHE, in SBC order; (lba, count) or why not."""
        # RDPROTECT / WRPROTECT / VRPROTECT (not in the 6-byte CDBs): no protection information here.
        if cdb[0] in _PROTECT_FIELD_OPCODES and cdb[1] >> 5:
            return INVALID_FIELD_IN_CDB.at(1)
        store = unit.store
        if store is None or unit.ejected or unit.stopped:  # what not_ready() tests, without the calls
            sense = unit.not_ready()
            assert sense is not None
            return sense
        if write and store.read_only:
            return WRITE_PROTECTED
        if cdb[0] >> 5 == 1:  # READ(10), WRITE(10), VERIFY(10), SYNCHRONIZE CACHE(10): one unpack
            lba, count = _LBA_COUNT_10.unpack_from(cdb)
        else:
            lba, count = self._lba_and_count(cdb)
        if lba + count > store.size // store.block_size:
            return LBA_OUT_OF_RANGE
        return lba, count

    def _read(self, unit: LogicalUnit, cdb: bytes) -> Command:
        checked = self._block_access(unit, cdb, write=False)
        if isinstance(checked, Sense):
            return self._fail(unit, checked)
        lba, count = checked
        if count == 0:
            return _Completed(ScsiStatus.GOOD)
        bs = unit.store.block_size  # type: ignore[union-attr]
        return _Read(unit, lba * bs, count * bs)

    def _write(self, unit: LogicalUnit, cdb: bytes) -> Command:
        checked = self._block_access(unit, cdb, write=True)
        if isinstance(checked, Sense):
            return self._fail(unit, checked)
        lba, count = checked
        if count == 0:
            return _Completed(ScsiStatus.GOOD)
        bs = unit.store.block_size  # type: ignore[union-attr]
        fua = cdb[0] != Opcode.WRITE_6 and bool(cdb[1] & 0x08)
        return _Write(unit, lba * bs, count * bs, fua)

    def _verify(self, unit: LogicalUnit, cdb: bytes) -> Command:
        bytchk = (cdb[1] >> 1) & 0x03
        if bytchk == 0b10:
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(1))
        checked = self._block_access(unit, cdb, write=False)
        if isinstance(checked, Sense):
            return self._fail(unit, checked)
        lba, count = checked
        if bytchk == 0 or count == 0:
            # BYTCHK 0: a medium verification; the image has no media defects to find.
            return _Completed(ScsiStatus.GOOD)
        bs = unit.store.block_size  # type: ignore[union-attr]
        return _Verify(unit, lba * bs, count, single=bytchk == 0b11)

    def _synchronize_cache(self, unit: LogicalUnit, cdb: bytes) -> Command:
        checked = self._block_access(unit, cdb, write=False)
        if isinstance(checked, Sense):
            return self._fail(unit, checked)
        try:
            unit.store.flush()  # type: ignore[union-attr]
        except StorageError:
            return self._fail(unit, WRITE_ERROR)
        return _Completed(ScsiStatus.GOOD)

    def _start_stop_unit(self, unit: LogicalUnit, cdb: bytes) -> Command:
        power_condition, loej, start = cdb[4] >> 4, bool(cdb[4] & 0x02), bool(cdb[4] & 0x01)
        if power_condition:
            return _Completed(ScsiStatus.GOOD)  # power conditions: LOEJ and START are ignored (SBC-3)
        if loej and not unit.removable:
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(4))
        if start:
            if loej and unit.store is not None:
                unit.ejected = False  # load the medium back
            if not unit.medium_present:
                return self._fail(unit, MEDIUM_NOT_PRESENT)
            unit.stopped = False
            return _Completed(ScsiStatus.GOOD)
        if loej and unit.prevent_removal:
            return self._fail(unit, MEDIUM_REMOVAL_PREVENTED)
        if unit.medium_present and not cdb[4] & 0x04:  # NO_FLUSH clear: write the cache out first
            try:
                unit.store.flush()  # type: ignore[union-attr]
            except StorageError:
                return self._fail(unit, WRITE_ERROR)
        if loej:
            unit.ejected = True
        else:
            unit.stopped = True
        return _Completed(ScsiStatus.GOOD)

    def _prevent_allow_medium_removal(self, unit: LogicalUnit, cdb: bytes) -> Command:
        prevent = cdb[4] & 0x03
        if prevent > 1:  # 10b / 11b are for media changers
            return self._fail(unit, INVALID_FIELD_IN_CDB.at(4))
        if unit.prevent_removal and not prevent and unit.medium_present:
            try:
                unit.store.flush()  # type: ignore[union-attr]  # the host may pull the medium now
            except StorageError:
                return self._fail(unit, WRITE_ERROR)
        unit.prevent_removal = bool(prevent)
        return _Completed(ScsiStatus.GOOD)


def _caching_page(pc: int) -> bytes:
    """Caching mode page (SBC-3 §6.4.5): write cache enabled (WCE), so hosts send SYNCHRONIZE CACHE, which
    makes the store fsync. Nothing is changeable (no MODE SELECT); default = current."""
    page = bytearray(20)
    page[0], page[1] = MODE_PAGE_CACHING, len(page) - 2
    if pc != 1:
        page[2] = 0x04  # WCE=1, RCD=0
        struct.pack_into(">HHHH", page, 4, 0xFFFF, 0, 0xFFFF, 0xFFFF)  # prefetch: no limits
    return bytes(page)


def _informational_exceptions_page(pc: int) -> bytes:
    """Informational Exceptions Control mode page (SPC-4 §7.5.8): DEXCPT=1, no failure prediction."""
    page = bytearray(12)
    page[0], page[1] = MODE_PAGE_INFORMATIONAL_EXCEPTIONS, len(page) - 2
    if pc != 1:
        page[2] = 0x08  # DEXCPT
    return bytes(page)


_PROTECT_FIELD_OPCODES = frozenset(
    {
        Opcode.READ_10,
        Opcode.READ_12,
        Opcode.READ_16,
        Opcode.WRITE_10,
        Opcode.WRITE_12,
        Opcode.WRITE_16,
        Opcode.VERIFY_10,
        Opcode.VERIFY_12,
        Opcode.VERIFY_16,
    }
)

_HANDLERS: dict[int, _Handler] = {
    Opcode.TEST_UNIT_READY: ScsiTarget._test_unit_ready,
    Opcode.REQUEST_SENSE: ScsiTarget._request_sense,
    Opcode.READ_6: ScsiTarget._read,
    Opcode.WRITE_6: ScsiTarget._write,
    Opcode.INQUIRY: ScsiTarget._inquiry,
    Opcode.MODE_SENSE_6: ScsiTarget._mode_sense,
    Opcode.START_STOP_UNIT: ScsiTarget._start_stop_unit,
    Opcode.PREVENT_ALLOW_MEDIUM_REMOVAL: ScsiTarget._prevent_allow_medium_removal,
    Opcode.READ_FORMAT_CAPACITIES: ScsiTarget._read_format_capacities,
    Opcode.READ_CAPACITY_10: ScsiTarget._read_capacity_10,
    Opcode.READ_10: ScsiTarget._read,
    Opcode.WRITE_10: ScsiTarget._write,
    Opcode.VERIFY_10: ScsiTarget._verify,
    Opcode.SYNCHRONIZE_CACHE_10: ScsiTarget._synchronize_cache,
    Opcode.MODE_SENSE_10: ScsiTarget._mode_sense,
    Opcode.READ_16: ScsiTarget._read,
    Opcode.WRITE_16: ScsiTarget._write,
    Opcode.VERIFY_16: ScsiTarget._verify,
    Opcode.SYNCHRONIZE_CACHE_16: ScsiTarget._synchronize_cache,
    Opcode.SERVICE_ACTION_IN_16: ScsiTarget._service_action_in_16,
    Opcode.REPORT_LUNS: ScsiTarget._report_luns,
    Opcode.READ_12: ScsiTarget._read,
    Opcode.WRITE_12: ScsiTarget._write,
    Opcode.VERIFY_12: ScsiTarget._verify,
}
