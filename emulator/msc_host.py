"""A userspace USB mass-storage host: Bulk-Only Transport (BOT 1.0) and SCSI (SPC-4/SBC-3) initiator over
a `RemoteDevice` — what usb-storage + sd do in the kernel, enough to read and write a USB disk.

`MassStorage` (asyncio) finds the BOT interface, asks Get Max LUN, waits for the unit (TEST UNIT READY
through UNIT ATTENTION), reads INQUIRY and the capacity, and moves blocks with READ/WRITE(10) — (16) past
2 TiB or 65535 blocks. Each command is CBW → data → CSW (BOT §5.3); a failed command is followed by
REQUEST SENSE and raises `ScsiCheckCondition` naming the sense key, ASC and ASCQ; a phase error, an invalid
or not meaningful CSW, a stalled CBW, a transfer timeout or babble triggers Reset Recovery (BOT §5.3.4:
Bulk-Only Mass Storage Reset, then CLEAR_FEATURE(ENDPOINT_HALT) on bulk IN and bulk OUT) before the
error is raised.

Pipelining. BOT runs one command at a time per device (the next CBW may only follow the CSW), so there
are never two commands in flight. What can overlap is the phases of one command: with `pipeline=True`
(default) the CBW, the data URBs (`urbs_per_command` of them, splitting the data phase) and the CSW read
are all submitted at once, in one round trip instead of three. The device still sees them in order; the
hazard is a data phase that ends early (short packet): the next URB may then receive the CSW itself,
which is recognised (13 bytes, "USBS", our tag) and used, and URBs left over are unlinked. Babble or a
stall are handled as BOT §6.7 says (clear the halt, read the CSW again).

Several commands in flight (`commands_in_flight=N`, opt-in, default 1): sequential reads (`read_blocks`,
`readinto_blocks`) queue the URBs of the next N-1 READ commands before the earlier ones are answered. This is
only safe with a server that runs a device's URBs in order and holds a CBW until the previous CSW was read,
as vusb's server and device models do; a real device behind the kernel's usbip-host may see the next CBW on
bulk OUT during the previous data phase. A command that does not end cleanly stops the stream: the URBs
queued after it are unlinked, it is checked and recovered as above, and its CHECK CONDITION is raised with
its own sense (if a later command reached the device first, after Reset Recovery and the READ run alone).

`SyncMassStorage` is the blocking facade and `BlockDevice` an `io.RawIOBase` over it (seek, read,
readinto, write with read-modify-write of partial blocks, flush = SYNCHRONIZE CACHE).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import io
import logging
import math
import os
import struct
import threading
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, Final, TypeVar

from emulator.host import (
    DEFAULT_TIMEOUT,
    HostError,
    RemoteDevice,
    StallError,
    TransferError,
    Urb,
    UrbGroup,
    UrbResult,
    status_text,
)
from emulator.sync_host import SyncRemoteDevice
from emulator.usb.descriptors import AlternateSetting
from emulator.usb.setup import TransferType
from emulator.usbip.constants import EPIPE

log = logging.getLogger(__name__)

T = TypeVar("T")

# include/linux/usb/storage.h
USB_CLASS_MASS_STORAGE: Final = 0x08
USB_SC_SCSI: Final = 0x06
USB_PR_BULK: Final = 0x50
US_BULK_CB_WRAP_LEN: Final = 31
US_BULK_CB_SIGN: Final = 0x43425355  # "USBC"
US_BULK_FLAG_IN: Final = 0x80
US_BULK_CS_WRAP_LEN: Final = 13
US_BULK_CS_SIGN: Final = 0x53425355  # "USBS"
US_BULK_STAT_OK: Final = 0
US_BULK_STAT_FAIL: Final = 1
US_BULK_STAT_PHASE: Final = 2
US_BULK_RESET_REQUEST: Final = 0xFF
US_BULK_GET_MAX_LUN: Final = 0xFE

_CBW = struct.Struct("<IIIBBB16s")
_CSW = struct.Struct("<IIIB")

# SPC-4 / SBC-3 operation codes
TEST_UNIT_READY: Final = 0x00
REQUEST_SENSE: Final = 0x03
INQUIRY: Final = 0x12
READ_CAPACITY_10: Final = 0x25
READ_10: Final = 0x28
WRITE_10: Final = 0x2A
SYNCHRONIZE_CACHE_10: Final = 0x35
READ_16: Final = 0x88
WRITE_16: Final = 0x8A
SYNCHRONIZE_CACHE_16: Final = 0x91
SERVICE_ACTION_IN_16: Final = 0x9E
SAI_READ_CAPACITY_16: Final = 0x10

COMMAND_TIMEOUT: Final = 30.0
"""Seconds a SCSI command may take: the sd driver's default (SD_TIMEOUT, 30 s)."""
DEFAULT_MAX_TRANSFER: Final = 64 * 1024
"""Bytes per READ/WRITE command (64 KiB, what many USB disks advertise in their Block Limits VPD)."""
_REFILL_FRACTION = 2  # pipelined reads queue new commands once this fraction of the queue has been answered
_DRAIN_ABOVE = 256 * 1024  # data-out this large waits for the socket before the status phase

SENSE_KEYS: Final = {
    0x0: "NO SENSE", 0x1: "RECOVERED ERROR", 0x2: "NOT READY", 0x3: "MEDIUM ERROR", 0x4: "HARDWARE ERROR",
    0x5: "ILLEGAL REQUEST", 0x6: "UNIT ATTENTION", 0x7: "DATA PROTECT", 0x8: "BLANK CHECK",
    0x9: "VENDOR SPECIFIC", 0xA: "COPY ABORTED", 0xB: "ABORTED COMMAND", 0xD: "VOLUME OVERFLOW",
    0xE: "MISCOMPARE", 0xF: "COMPLETED",
}
UNIT_ATTENTION: Final = 0x6
NOT_READY: Final = 0x2

# SPC-4 Annex F (asc-num.txt): the additional sense codes a USB disk commonly reports.
ASC_NAMES: Final = {
    (0x00, 0x00): "NO ADDITIONAL SENSE INFORMATION",
    (0x04, 0x00): "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE",
    (0x04, 0x01): "LOGICAL UNIT IS IN PROCESS OF BECOMING READY",
    (0x04, 0x02): "LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED",
    (0x0C, 0x00): "WRITE ERROR",
    (0x11, 0x00): "UNRECOVERED READ ERROR",
    (0x1A, 0x00): "PARAMETER LIST LENGTH ERROR",
    (0x1D, 0x00): "MISCOMPARE DURING VERIFY OPERATION",
    (0x20, 0x00): "INVALID COMMAND OPERATION CODE",
    (0x21, 0x00): "LOGICAL BLOCK ADDRESS OUT OF RANGE",
    (0x24, 0x00): "INVALID FIELD IN CDB",
    (0x25, 0x00): "LOGICAL UNIT NOT SUPPORTED",
    (0x26, 0x00): "INVALID FIELD IN PARAMETER LIST",
    (0x27, 0x00): "WRITE PROTECTED",
    (0x28, 0x00): "NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED",
    (0x29, 0x00): "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED",
    (0x29, 0x01): "POWER ON OCCURRED",
    (0x29, 0x02): "SCSI BUS RESET OCCURRED",
    (0x29, 0x03): "BUS DEVICE RESET FUNCTION OCCURRED",
    (0x2A, 0x01): "MODE PARAMETERS CHANGED",
    (0x39, 0x00): "SAVING PARAMETERS NOT SUPPORTED",
    (0x3A, 0x00): "MEDIUM NOT PRESENT",
    (0x3F, 0x0E): "REPORTED LUNS DATA HAS CHANGED",
    (0x44, 0x00): "INTERNAL TARGET FAILURE",
    (0x53, 0x02): "MEDIUM REMOVAL PREVENTED",
}


# -- errors ------------------------------------------------------------------------------------------------


class MscError(HostError):
    """Base of the mass-storage initiator's errors."""


class NotMassStorage(MscError):
    """The device has no SCSI / Bulk-Only mass-storage interface."""


class BotTransportError(MscError):
    """The Bulk-Only Transport broke (phase error, bad CSW, stalled CBW, timeout, babble); Reset
    Recovery has been done, the command did not complete."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sense:
    """Decoded sense data (fixed format 70h/71h or descriptor format 72h/73h, SPC-4 §4.5)."""

    key: int
    asc: int
    ascq: int
    response_code: int = 0x70
    information: int | None = None
    raw: bytes = b""

    @property
    def key_name(self) -> str:
        return SENSE_KEYS.get(self.key, f"SENSE KEY {self.key:#x}")

    @property
    def asc_name(self) -> str:
        name = ASC_NAMES.get((self.asc, self.ascq))
        if name is None and self.asc == 0x04:
            name = "LOGICAL UNIT NOT READY"
        return name or "ADDITIONAL SENSE CODE"

    def __str__(self) -> str:
        info = f", information {self.information:#x}" if self.information is not None else ""
        return f"{self.key_name}: {self.asc_name} (ASC {self.asc:02X}h, ASCQ {self.ascq:02X}h{info})"


def parse_sense(data: bytes) -> Sense:
    """Decode REQUEST SENSE data in either format."""
    if len(data) < 1:
        raise MscError("REQUEST SENSE returned no data")
    code = data[0] & 0x7F
    if code in (0x70, 0x71):
        if len(data) < 14:
            raise MscError(f"fixed-format sense data is {len(data)} bytes, needs at least 14: {data.hex()}")
        information = struct.unpack_from(">I", data, 3)[0] if data[0] & 0x80 else None
        return Sense(data[2] & 0x0F, data[12], data[13], code, information, bytes(data))
    if code in (0x72, 0x73):
        if len(data) < 4:
            raise MscError(f"descriptor-format sense data is {len(data)} bytes: {data.hex()}")
        information = None
        position = 8
        while position + 2 <= len(data):  # the Information descriptor (type 00h) holds the LBA
            kind, length = data[position], data[position + 1]
            if kind == 0x00 and length >= 0x0A and position + 12 <= len(data):
                information = struct.unpack_from(">Q", data, position + 4)[0]
            position += 2 + length
        return Sense(data[1] & 0x0F, data[2], data[3], code, information, bytes(data))
    raise MscError(f"sense data response code {code:#04x} is neither fixed (70h/71h) nor descriptor "
                   f"(72h/73h) format: {data.hex()}")


class ScsiCheckCondition(MscError):
    """A command ended in CHECK CONDITION; `sense` is what REQUEST SENSE said."""

    def __init__(self, opcode: int, sense: Sense) -> None:
        super().__init__(f"SCSI command {opcode:02X}h failed: {sense}")
        self.opcode = opcode
        self.sense = sense


# -- results -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CommandResult:
    """One BOT command's outcome: the data-in bytes, dCSWDataResidue and bCSWStatus."""

    data: bytes
    residue: int
    status: int


@dataclasses.dataclass(frozen=True, slots=True)
class Inquiry:
    """Standard INQUIRY data (SPC-4 §6.6.2), the fields a person reads."""

    peripheral_qualifier: int
    device_type: int
    removable: bool
    version: int
    vendor: str
    product: str
    revision: str

    @classmethod
    def from_bytes(cls, data: bytes) -> Inquiry:
        if len(data) < 36:
            raise MscError(f"INQUIRY returned {len(data)} bytes, standard data is at least 36")

        def text(raw: bytes) -> str:
            return raw.decode("ascii", "replace").strip()

        return cls(data[0] >> 5, data[0] & 0x1F, bool(data[1] & 0x80), data[2], text(data[8:16]),
                   text(data[16:32]), text(data[32:36]))

    def __str__(self) -> str:
        return f"{self.vendor} {self.product} {self.revision}".strip()


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """READ CAPACITY: how many logical blocks and how big each is."""

    block_count: int
    block_size: int

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.block_count * self.block_size


@dataclasses.dataclass(slots=True)
class _Started:
    """A command whose URBs are submitted: what `_complete` needs to wait for and check it."""

    cdb: bytes
    tag: int
    data_in: int
    data_out: bytes | memoryview
    timeout: float
    cbw_urb: Urb
    data_urbs: list[Urb]
    csw_urb: Urb | None
    urbs: list[Urb]  # every URB of the command, those submitted later (CSW re-read) included


_RW_10_CDB = struct.Struct(">BBIBHB")  # READ(10) and WRITE(10): opcode, flags, LBA, group, length, control


def _cdb_rw(opcode10: int, opcode16: int, lba: int, count: int) -> bytes:
    if lba + count - 1 <= 0xFFFFFFFF and count <= 0xFFFF:
        return _RW_10_CDB.pack(opcode10, 0, lba, 0, count, 0)
    return struct.pack(">BBQIBB", opcode16, 0, lba, count, 0, 0)


def _split(total: int, parts: int, quantum: int) -> list[int]:
    """Split `total` bytes into at most `parts` pieces, each a multiple of `quantum` but the last."""
    if parts <= 1 or total <= quantum:
        return [total]
    size = math.ceil(total / parts / quantum) * quantum
    pieces = [size] * (total // size)
    if total % size:
        pieces.append(total % size)
    return pieces


def _csw_good(raw: bytes, tag: int) -> bool:
    """A 13-byte CSW answering `tag` with GOOD status and no residue: the command went as planned."""
    signature, csw_tag, residue, status = _CSW.unpack(raw)
    return signature == US_BULK_CS_SIGN and csw_tag == tag and not residue and status == US_BULK_STAT_OK


# -- the initiator -----------------------------------------------------------------------------------------


class MassStorage:
    """BOT + SCSI initiator on one LUN of an imported `RemoteDevice`. Call `open()` first (or use
    `async with`). Only one command runs at a time (an internal lock serialises callers)."""

    def __init__(self, device: RemoteDevice, *, lun: int = 0, interface: int | None = None,
                 max_transfer: int = DEFAULT_MAX_TRANSFER, urbs_per_command: int = 1, pipeline: bool = True,
                 timeout: float = COMMAND_TIMEOUT, commands_in_flight: int = 1) -> None:
        if max_transfer < 512:
            raise MscError(f"max_transfer {max_transfer} is smaller than a block")
        if urbs_per_command < 1:
            raise MscError(f"urbs_per_command must be at least 1, got {urbs_per_command}")
        if commands_in_flight < 1:
            raise MscError(f"commands_in_flight must be at least 1, got {commands_in_flight}")
        self.device = device
        self.commands_in_flight = commands_in_flight
        self.lun = lun
        self.max_transfer = max_transfer
        self.urbs_per_command = urbs_per_command
        self.pipeline = pipeline
        self.timeout = timeout
        self._wanted_interface = interface
        self.interface = -1
        self.ep_in = 0
        self.ep_out = 0
        self.max_packet_in = 512
        self.max_lun = 0
        self.inquiry_data: Inquiry | None = None
        self.capacity: Capacity | None = None
        self._tag = 0
        self._lock = asyncio.Lock()
        self._command_urbs: list[Urb] = []  # the URBs of the command in progress
        self._needs_recovery = False  # a command was abandoned half-way (its task cancelled)

    # -- setting up --------------------------------------------------------------------------------------------

    def _find_interface(self) -> tuple[int, AlternateSetting]:
        device = self.device
        candidates: list[tuple[int, int, AlternateSetting]] = []
        for config in device.configurations:
            for interface in config.interfaces:
                for alt in interface.alternates:
                    d = alt.descriptor
                    if (d.interface_class, d.interface_subclass, d.interface_protocol) == (
                            USB_CLASS_MASS_STORAGE, USB_SC_SCSI, USB_PR_BULK):
                        candidates.append((config.descriptor.configuration_value, interface.number, alt))
        if self._wanted_interface is not None:
            candidates = [c for c in candidates if c[1] == self._wanted_interface]
        if not candidates:
            where = f" interface {self._wanted_interface}" if self._wanted_interface is not None else ""
            raise NotMassStorage(f"{device.busid}{where}: no mass-storage interface (class 08h, SCSI 06h, "
                                 "Bulk-Only 50h)")
        value, _, alt = candidates[0]
        return value, alt

    async def open(self) -> MassStorage:
        """Configure the device if needed, find the endpoints, Get Max LUN, wait until the unit is ready,
        then INQUIRY and READ CAPACITY."""
        value, alt = self._find_interface()
        device = self.device
        if device.configuration_value is None:
            await device.get_configuration()
        if device.configuration_value != value:
            await device.set_configuration(value)
        if alt.descriptor.alternate_setting != device.alternate_settings.get(alt.descriptor.interface_number, 0):
            await device.set_interface(alt.descriptor.interface_number, alt.descriptor.alternate_setting)
        self.interface = alt.descriptor.interface_number
        for endpoint in alt.endpoints:
            d = endpoint.descriptor
            if d.transfer_type != TransferType.BULK:
                continue
            if d.endpoint_address & 0x80 and not self.ep_in:
                self.ep_in, self.max_packet_in = d.endpoint_address, d.max_packet_size & 0x7FF
            elif not d.endpoint_address & 0x80 and not self.ep_out:
                self.ep_out = d.endpoint_address
        if not self.ep_in or not self.ep_out:
            raise NotMassStorage(f"{device.busid} interface {self.interface}: a Bulk-Only interface needs a "
                                 "bulk IN and a bulk OUT endpoint")
        self.max_lun = await self.get_max_lun()
        if self.lun > self.max_lun:
            raise MscError(f"{device.busid}: LUN {self.lun} does not exist (Get Max LUN says {self.max_lun})")
        await self.wait_ready()
        self.inquiry_data = await self.inquiry()
        self.capacity = await self.read_capacity()
        log.info("%s LUN %d: %s, %d blocks of %d bytes", device.busid, self.lun, self.inquiry_data,
                 self.capacity.block_count, self.capacity.block_size)
        return self

    async def __aenter__(self) -> MassStorage:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        pass  # the device belongs to the caller

    async def get_max_lun(self) -> int:
        """Get Max LUN (BOT §3.2); a device that stalls it has one LUN (§3.2, and usb-storage's reading)."""
        try:
            data = await self.device.control_transfer(0xA1, US_BULK_GET_MAX_LUN, 0, self.interface, 1,
                                                      DEFAULT_TIMEOUT)
        except StallError:
            return 0
        assert isinstance(data, bytes)
        if len(data) != 1 or data[0] > 15:
            log.warning("%s: Get Max LUN answered %s; assuming one LUN", self.device.busid, data.hex())
            return 0
        return data[0]

    async def reset_recovery(self) -> None:
        """BOT §5.3.4 Reset Recovery: Bulk-Only Mass Storage Reset, then clear HALT on bulk IN and OUT. If
        the class reset itself fails, fall back to a USB port reset and reconfigure (as usb-storage does)."""
        device = self.device
        log.warning("%s: BOT reset recovery", device.busid)
        try:
            await device.control_transfer(0x21, US_BULK_RESET_REQUEST, 0, self.interface, b"", DEFAULT_TIMEOUT)
            await device.clear_halt(self.ep_in)
            await device.clear_halt(self.ep_out)
        except TransferError as exc:
            log.warning("%s: Bulk-Only Mass Storage Reset failed (%s); resetting the port", device.busid, exc)
            value = device.configuration_value or 1
            await device.reset()
            await device.set_configuration(value)

    # -- one command ---------------------------------------------------------------------------------------

    def _next_tag(self) -> int:
        self._tag = self._tag % 0xFFFFFFFF + 1
        return self._tag

    async def _abandon(self, urbs: Sequence[Urb]) -> None:
        """Unlink URBs still pending (the device will not answer them in this command any more)."""
        for urb in urbs:
            if not urb.done():
                await self.device.unlink(urb)
        for urb in urbs:  # fetch (and so silence) each outcome
            with contextlib.suppress(HostError):
                await urb

    async def _fail(self, urbs: Sequence[Urb], message: str) -> BotTransportError:
        await self._abandon(urbs)
        await self.reset_recovery()
        return BotTransportError(f"{self.device.busid}: {message}; reset recovery done")

    def _looks_like_csw(self, data: bytes, tag: int) -> bool:
        return len(data) == US_BULK_CS_WRAP_LEN and _CSW.unpack(data)[:2] == (US_BULK_CS_SIGN, tag)

    async def transport(self, cdb: bytes, *, data_in: int = 0, data_out: bytes | memoryview = b"",
                        lun: int | None = None, timeout: float | None = None) -> CommandResult:
        """Run one command through BOT and return its CSW-checked result (status may be FAIL: the caller
        decides about REQUEST SENSE). Raises `BotTransportError` after reset recovery if BOT broke."""
        if not 1 <= len(cdb) <= 16:
            raise MscError(f"a CDB is 1..16 bytes, got {len(cdb)}")
        if data_in and data_out:
            raise MscError("a BOT command moves data one way only")
        async with self._lock:
            return await self._transport(bytes(cdb), data_in, data_out, self.lun if lun is None else lun,
                                         self.timeout if timeout is None else timeout)

    async def _transport(self, cdb: bytes, data_in: int, data_out: bytes | memoryview, lun: int,
                         timeout: float) -> CommandResult:
        if self._needs_recovery:  # the last command stopped half-way: bring BOT back in step first
            self._needs_recovery = False
            await self.reset_recovery()
        self._command_urbs = []
        try:
            return await self._transport_once(cdb, data_in, data_out, lun, timeout)
        except asyncio.CancelledError:
            for urb in self._command_urbs:
                self.device.cancel(urb)
            self._needs_recovery = True
            raise

    def _submit(self, endpoint: int, data_or_length: bytes | memoryview | int, timeout: float,
                into: memoryview | None = None) -> Urb:
        urb = self.device.submit(endpoint, data_or_length, timeout=timeout, into=into)
        self._command_urbs.append(urb)
        return urb

    async def _transport_once(self, cdb: bytes, data_in: int, data_out: bytes | memoryview, lun: int,
                              timeout: float) -> CommandResult:
        return await self._complete(self._start(cdb, data_in, data_out, lun, timeout))

    def _start(self, cdb: bytes, data_in: int, data_out: bytes | memoryview, lun: int,
               timeout: float, into: memoryview | None = None) -> _Started:
        """Submit a command's CBW (and, pipelined, its data and CSW URBs) in one write; IN data goes
        straight into `into` if given (`RemoteDevice.submit`)."""
        self._command_urbs = []
        tag = self._next_tag()
        length = data_in or len(data_out)
        flags = US_BULK_FLAG_IN if data_in else 0
        cbw = _CBW.pack(US_BULK_CB_SIGN, tag, length, flags, lun, len(cdb), cdb)
        data_urbs: list[Urb] = []
        csw_urb: Urb | None = None
        with self.device.batched():  # the command's URBs in one write
            cbw_urb = self._submit(self.ep_out, cbw, timeout)
            if self.pipeline:
                data_urbs = self._submit_data(data_in, data_out, self.max_packet_in, timeout, into)
                csw_urb = self._submit(self.ep_in, US_BULK_CS_WRAP_LEN, timeout)
        return _Started(cdb, tag, data_in, data_out, timeout, cbw_urb, data_urbs, csw_urb, self._command_urbs)

    async def _complete(self, started: _Started) -> CommandResult:
        """Wait for a started command's phases and check them (BOT §5.3, §6.7), recovering as they say."""
        device = self.device
        ep_in, ep_out = self.ep_in, self.ep_out
        cdb, tag, data_in, data_out, timeout = (started.cdb, started.tag, started.data_in, started.data_out,
                                                started.timeout)
        length = data_in or len(data_out)
        quantum = self.max_packet_in
        cbw_urb, data_urbs, csw_urb = started.cbw_urb, started.data_urbs, started.csw_urb
        self._command_urbs = started.urbs
        if len(data_out) >= _DRAIN_ABOVE:
            await device.drain()
        pending = [cbw_urb, *data_urbs, *([csw_urb] if csw_urb else [])]

        # Command transport (§5.3.1): a CBW that is not taken whole means the device is lost to us.
        result = await device.wait(cbw_urb)
        if result.status != 0 or result.actual_length != US_BULK_CB_WRAP_LEN:
            why = "timed out" if cbw_urb.timed_out else status_text(result.status)
            raise await self._fail(pending, f"CBW tag {tag:#x} not accepted ({why})")
        if not self.pipeline:
            data_urbs = self._submit_data(data_in, data_out, quantum, timeout)
            pending = data_urbs
            if len(data_out) >= _DRAIN_ABOVE:
                await device.drain()

        # Data transport (§5.3.2, §6.7): collect in order; stop at the first short or stalled transfer.
        chunks: list[bytes] = []
        ended = False
        stalled_in = stalled_out = False
        csw_raw: bytes | None = None
        for index, urb in enumerate(data_urbs):
            result = await device.wait(urb)
            if result.unlinked:
                raise await self._fail(pending, f"data phase of tag {tag:#x} timed out")
            if result.status == -EPIPE:
                ended = True
                if urb.is_in:
                    stalled_in = True
                else:
                    stalled_out = True
                continue
            if result.status != 0:
                raise await self._fail(pending, f"data phase of tag {tag:#x} failed: "
                                                f"{status_text(result.status)}")
            data = result.data if urb.into is None else bytes(urb.into[:result.actual_length])
            if ended:  # the data ended earlier: this transfer got what the device sent next
                if urb.is_in and self._looks_like_csw(data, tag):
                    csw_raw = data
                    await self._abandon(data_urbs[index + 1:] + ([csw_urb] if csw_urb else []))
                    csw_urb = None
                    break
                if result.actual_length == 0:
                    continue
                raise await self._fail(pending, f"tag {tag:#x}: the device sent {result.actual_length} bytes "
                                                "after ending its data phase")
            if urb.is_in:
                chunks.append(data)
            if result.actual_length < urb.length:
                ended = True

        # Status transport (§5.3.3): read the CSW, once more after clearing a halt or a stray ZLP.
        if csw_raw is None:
            if stalled_in:
                if csw_urb is not None:
                    await self._abandon([csw_urb])
                    csw_urb = None
                await device.clear_halt(ep_in)
            csw_raw = await self._read_csw(csw_urb, tag, timeout)
        if stalled_out:
            await device.clear_halt(ep_out)  # §6.7.3: the host clears the bulk-out halt

        # Valid (§6.3.1) and meaningful (§6.3.2) CSW?
        signature, csw_tag, residue, status = _CSW.unpack(csw_raw)
        if signature != US_BULK_CS_SIGN or csw_tag != tag:
            raise await self._fail([], f"CSW not valid (signature {signature:#010x}, tag {csw_tag:#x}, "
                                       f"expected {US_BULK_CS_SIGN:#010x} / {tag:#x})")
        if status > US_BULK_STAT_PHASE or residue > length:
            raise await self._fail([], f"CSW not meaningful (status {status}, residue {residue} of {length})")
        if status == US_BULK_STAT_PHASE:
            raise await self._fail([], f"the device reported a phase error for tag {tag:#x}, SCSI "
                                       f"command {cdb[0]:02X}h")
        return CommandResult(b"".join(chunks), residue, status)

    def _submit_data(self, data_in: int, data_out: bytes | memoryview, quantum: int,
                     timeout: float, into: memoryview | None = None) -> list[Urb]:
        urbs = []
        if data_in:
            position = 0
            for size in _split(data_in, self.urbs_per_command, quantum):
                target = into[position:position + size] if into is not None else None
                urbs.append(self._submit(self.ep_in, size, timeout, target))
                position += size
        elif data_out:
            view = memoryview(data_out)
            position = 0
            for size in _split(len(view), self.urbs_per_command, quantum):
                urbs.append(self._submit(self.ep_out, view[position:position + size], timeout))
                position += size
        return urbs

    async def _read_csw(self, urb: Urb | None, tag: int, timeout: float) -> bytes:
        device = self.device
        cleared = zlp = False
        while True:
            if urb is None:
                urb = self._submit(self.ep_in, US_BULK_CS_WRAP_LEN, timeout)
            result: UrbResult = await device.wait(urb)
            urb = None
            if result.unlinked:
                raise await self._fail([], f"CSW of tag {tag:#x} timed out")
            if result.status == -EPIPE and not cleared:
                cleared = True  # §6.7.2: clear the halt, try once more
                await device.clear_halt(self.ep_in)
                continue
            if result.status == 0 and result.actual_length == 0 and not zlp:
                zlp = True  # a stray zero-length packet ending the data; the CSW comes next
                continue
            if result.status != 0:
                raise await self._fail([], f"CSW of tag {tag:#x} not received: {status_text(result.status)}")
            if result.actual_length != US_BULK_CS_WRAP_LEN:
                raise await self._fail([], f"CSW of tag {tag:#x} is {result.actual_length} bytes, not 13")
            return result.data

    # -- SCSI --------------------------------------------------------------------------------------------

    async def command(self, cdb: bytes, *, data_in: int = 0, data_out: bytes | memoryview = b"",
                      timeout: float | None = None) -> CommandResult:
        """Run `cdb`; CHECK CONDITION raises `ScsiCheckCondition` with the sense REQUEST SENSE returned."""
        if not 1 <= len(cdb) <= 16:
            raise MscError(f"a CDB is 1..16 bytes, got {len(cdb)}")
        if data_in and data_out:
            raise MscError("a BOT command moves data one way only")
        async with self._lock:  # REQUEST SENSE must follow the failed command before anything else
            result = await self._transport(bytes(cdb), data_in, data_out, self.lun,
                                           self.timeout if timeout is None else timeout)
            if result.status == US_BULK_STAT_FAIL:
                raise ScsiCheckCondition(cdb[0], await self._request_sense())
        return result

    async def request_sense(self) -> Sense:
        """REQUEST SENSE: the sense data of the last failed command (or NO SENSE)."""
        async with self._lock:
            return await self._request_sense()

    async def _request_sense(self) -> Sense:
        result = await self._transport(bytes((REQUEST_SENSE, 0, 0, 0, 252, 0)), 252, b"", self.lun, self.timeout)
        if result.status != US_BULK_STAT_OK:
            raise MscError(f"{self.device.busid}: REQUEST SENSE itself failed (CSW status {result.status})")
        return parse_sense(result.data)

    async def test_unit_ready(self) -> None:
        await self.command(bytes(6))

    async def wait_ready(self, attempts: int = 10, delay: float = 0.1) -> None:
        """TEST UNIT READY until GOOD, retrying through UNIT ATTENTION (a reset or medium change is being
        reported) and "becoming ready"; any other sense is raised."""
        for attempt in range(attempts):
            try:
                await self.test_unit_ready()
                return
            except ScsiCheckCondition as exc:
                sense = exc.sense
                if attempt + 1 == attempts:
                    raise
                if sense.key == UNIT_ATTENTION:
                    log.info("%s: unit attention: %s", self.device.busid, sense)
                    continue
                if sense.key == NOT_READY and (sense.asc, sense.ascq) == (0x04, 0x01):
                    await self.device.sleep(delay)
                    continue
                raise

    async def inquiry(self) -> Inquiry:
        result = await self.command(bytes((INQUIRY, 0, 0, 0, 36, 0)), data_in=36)
        return Inquiry.from_bytes(result.data)

    async def read_capacity(self) -> Capacity:
        """READ CAPACITY(10), and READ CAPACITY(16) when the disk is too large for it (SBC-3 §5.16)."""
        result = await self.command(bytes((READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0)), data_in=8)
        if len(result.data) < 8:
            raise MscError(f"READ CAPACITY(10) returned {len(result.data)} bytes, not 8")
        last, block_size = struct.unpack_from(">II", result.data)
        if last == 0xFFFFFFFF:
            cdb = struct.pack(">BBQIBB", SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 0, 32, 0, 0)
            result = await self.command(cdb, data_in=32)
            if len(result.data) < 12:
                raise MscError(f"READ CAPACITY(16) returned {len(result.data)} bytes, needs 12")
            last, block_size = struct.unpack_from(">QI", result.data)
        if block_size < 1:
            raise MscError(f"the device reports a block size of {block_size}")
        self.capacity = Capacity(last + 1, block_size)
        return self.capacity

    def _check_range(self, lba: int, count: int) -> Capacity:
        capacity = self.capacity
        if capacity is None:
            raise MscError("the capacity is unknown: call open() (or read_capacity()) first")
        if lba < 0 or count < 0 or lba + count > capacity.block_count:
            raise MscError(f"blocks {lba}..{lba + count - 1} are outside the disk (0..{capacity.block_count - 1})")
        return capacity

    def _whole_blocks(self, lba: int, buffer: bytes | bytearray | memoryview) -> tuple[memoryview, int, int]:
        """`buffer` as bytes, the block size, and how many whole blocks it holds from `lba` on (checked
        against the disk)."""
        view = memoryview(buffer).cast("B")
        capacity = self.capacity
        if capacity is None:
            raise MscError("the capacity is unknown: call open() (or read_capacity()) first")
        block_size = capacity.block_size
        if len(view) % block_size:
            raise MscError(f"{len(view)} bytes is not a whole number of {block_size}-byte blocks")
        count = len(view) // block_size
        self._check_range(lba, count)
        return view, block_size, count

    async def read_blocks(self, lba: int, count: int) -> bytes:
        """Read `count` blocks from `lba`, in commands of at most `max_transfer` bytes."""
        capacity = self._check_range(lba, count)
        if self.commands_in_flight > 1 and self.pipeline and count:
            buffer = bytearray(count * capacity.block_size)
            await self.readinto_blocks(lba, buffer)
            return bytes(buffer)
        block_size = capacity.block_size
        per = max(1, self.max_transfer // block_size)
        out = []
        done = 0
        while done < count:
            n = min(per, count - done)
            cdb = _cdb_rw(READ_10, READ_16, lba + done, n)
            result = await self.command(cdb, data_in=n * block_size)
            if result.residue or len(result.data) != n * block_size:
                raise MscError(f"READ of blocks {lba + done}..{lba + done + n - 1} returned "
                               f"{len(result.data)} of {n * block_size} bytes (residue {result.residue})")
            out.append(result.data)
            done += n
        return b"".join(out)

    async def readinto_blocks(self, lba: int, buffer: bytearray | memoryview) -> None:
        """Fill `buffer` (whole blocks) from block `lba` on: a sequential read with `commands_in_flight`
        READ commands of `max_transfer` bytes queued ahead when that is above 1 and `pipeline` is on."""
        view, block_size, count = self._whole_blocks(lba, buffer)
        if self.commands_in_flight == 1 or not self.pipeline:
            per = max(1, self.max_transfer // block_size)
            for first in range(0, count, per):
                n = min(per, count - first)
                view[first * block_size:(first + n) * block_size] = await self.read_blocks(lba + first, n)
            return
        async with self._lock:
            await self._read_pipelined(lba, view, block_size)

    # -- several commands in flight ------------------------------------------------------------------------

    async def _read_pipelined(self, lba: int, out: memoryview, block_size: int) -> None:
        """READ commands with the next ones' URBs queued before the earlier ones are answered.

        Only safe with a server that runs a device's URBs in order and holds a CBW until the previous CSW
        was read, as vusb's does: a real device behind usbip-host could see a CBW during the data phase.
        A command that does not end cleanly (short, stalled, failed, timed out) stops the stream: what was
        queued after it is unlinked, that command then goes through the ordinary checks and recovery
        (`_complete`), and a CHECK CONDITION raises with the sense of that command.
        """
        if self._needs_recovery:
            self._needs_recovery = False
            await self.reset_recovery()
        device = self.device
        count = len(out) // block_size
        per = max(1, self.max_transfer // block_size)
        depth = self.commands_in_flight
        batch = max(1, depth // _REFILL_FRACTION)  # commands sent together, as one URB group, once running
        # A command in the queue: the URB group of its batch, where its URBs are in it (offset, how many),
        # its first block, block count, CDB and tag.
        queue: collections.deque[tuple[UrbGroup, int, int, int, int, bytes, int]] = collections.deque()
        started_blocks = 0
        ep_out, ep_in, lun, timeout = self.ep_out, self.ep_in, self.lun, self.timeout
        full = per * block_size  # every command's length but maybe the last: its data URBs planned once
        sizes = _split(full, self.urbs_per_command, self.max_packet_in)
        csw = (ep_in, US_BULK_CS_WRAP_LEN, None)

        streaming = True  # batches end in on_batch, inside the receive path; the task only waits for `halted`
        halted = device.create_future()

        def halt() -> None:
            nonlocal streaming
            streaming = False
            if not halted.done():
                halted.set_result(None)

        def on_batch(group: UrbGroup) -> None:
            """A batch ended (run by the host as its last answer is decoded). If it went as planned, its
            commands are done and the next batch is submitted at once, without waking the task; anything
            else (a URB or CSW not as planned, a batch ending out of turn, the end) hands over to the task."""
            if not streaming:
                return
            try:
                advance(group)
            except BaseException:  # whatever it is, the task must not wait for a stream that stopped
                halt()
                raise

        def advance(group: UrbGroup) -> None:
            if not (queue and queue[0][0] is group and group.clean):
                halt()
                return
            results = group.results
            while queue and queue[0][0] is group:
                _, offset, urbs, _, _, _, tag = queue[0]
                if not _csw_good(results[offset + urbs - 1][5], tag):  # type: ignore[index]
                    halt()  # the task checks and recovers this command
                    return
                queue.popleft()
            if started_blocks >= count:
                if not queue:
                    halt()
                return
            try:
                refill()
            except Exception:  # e.g. the connection is gone: the task meets it again and raises it
                halt()

        def start(commands: int) -> None:
            """Submit the next `commands` READs as one URB group (one future, one wake-up for all)."""
            nonlocal started_blocks
            transfers: list[tuple[int, bytes | int, memoryview | None]] = []
            planned = []
            first = started_blocks
            for _ in range(commands):
                n = min(per, count - first)
                cdb = _cdb_rw(READ_10, READ_16, lba + first, n)
                length = n * block_size
                at = first * block_size
                tag = self._next_tag()
                offset = len(transfers)
                transfers.append((ep_out, _CBW.pack(US_BULK_CB_SIGN, tag, length, US_BULK_FLAG_IN, lun, len(cdb), cdb),
                                  None))
                for size in sizes if length == full else _split(length, self.urbs_per_command, self.max_packet_in):
                    transfers.append((ep_in, size, out[at:at + size]))  # the data phase in urbs_per_command URBs
                    at += size
                transfers.append(csw)
                planned.append((offset, len(transfers) - offset, first, n, cdb, tag))
                first += n
            group = device.submit_group(transfers, timeout=timeout)
            if streaming:
                if group.future.done():  # not even submitted whole: the task sorts it out
                    halt()
                else:
                    group.on_done = on_batch
            for entry in planned:
                queue.append((group, *entry))
            started_blocks = first

        def refill() -> None:
            """Fill the queue up to `depth` commands, in batches, in one write."""
            with device.batched():
                while started_blocks < count and len(queue) < depth:
                    start(min(batch, depth - len(queue), -(-(count - started_blocks) // per)))

        try:
            refill()
            if queue:
                await halted  # the clean stream runs in on_batch; what is left is for the loop below
            streaming = False
            while queue:
                group, offset, urbs, first, n, cdb, tag = queue[0]
                if not group.future.done():  # its batch: answered in order, all ended or one went wrong
                    await device.wait_group(group)
                # Clean: every URB of the batch went as planned, and this command's CSW (13 bytes then) says
                # GOOD for its tag, no residue. Otherwise URB by URB, as a command submitted alone would be
                # checked and recovered (the rest of a batch too).
                if not (group.clean and _csw_good(group.results[offset + urbs - 1][5], tag)):  # type: ignore[index]
                    target = out[first * block_size:(first + n) * block_size]
                    started = self._started(group.urbs()[offset:offset + urbs], cdb, tag, len(target))
                    if not await self._read_clean(started, target):
                        later = [command.urbs()[o:o + c] for command, o, c, *_ in list(queue)[1:]]
                        while len(queue) > 1:
                            queue.pop()
                        seen = await self._withdraw(later)
                        started_blocks = first + n
                        await self._finish_read(started, target, seen)
                queue.popleft()
                if started_blocks < count and len(queue) <= depth - batch:
                    refill()
        except asyncio.CancelledError:
            streaming = False
            self._cancel_queued(queue)
            self._needs_recovery = True
            raise
        except BaseException:  # e.g. the device went away: nothing of them is awaited any more
            streaming = False
            self._cancel_queued(queue)
            raise

    def _cancel_queued(self, queue: Iterable[tuple[UrbGroup, int, int, int, int, bytes, int]]) -> None:
        for group in dict.fromkeys(entry[0] for entry in queue):  # each batch's group once
            for urb in group.urbs():
                self.device.cancel(urb)

    def _started(self, urbs: Sequence[Urb], cdb: bytes, tag: int, length: int) -> _Started:
        """A pipelined READ's URBs (CBW, data, CSW) as `_read_clean`, `_complete` and recovery work on them."""
        return _Started(cdb, tag, length, b"", self.timeout, urbs[0], list(urbs[1:-1]), urbs[-1], list(urbs))

    async def _read_clean(self, started: _Started, target: memoryview) -> bool:
        """Wait for a READ's URBs; True (data in `target`) if every phase went as planned and the CSW
        says GOOD with no residue, False at the first thing that did not (nothing recovered yet)."""
        wait = self.device.wait
        result = await wait(started.cbw_urb)
        if result.status or result.actual_length != US_BULK_CB_WRAP_LEN:
            return False
        position = 0
        for urb in started.data_urbs:
            result = await wait(urb)
            if result.status or result.actual_length != urb.length:
                return False
            if urb.into is None:
                target[position:position + urb.length] = result.data
            position += urb.length
        assert started.csw_urb is not None
        result = await wait(started.csw_urb)
        return result.actual_length == US_BULK_CS_WRAP_LEN and not result.status and _csw_good(result.data, started.tag)

    async def _withdraw(self, commands: Sequence[Sequence[Urb]]) -> bool:
        """Unlink the URBs of commands queued behind one that went wrong; True if the device saw any of
        them (a URB completed rather than being unlinked or refused), so its sense data and BOT state may
        belong to a later command."""
        device = self.device
        urbs = [urb for command in commands for urb in command]
        for urb in urbs:
            if not urb.done():
                device.cancel(urb)
        seen = False
        for urb in urbs:
            try:
                result = await device.unlink(urb)
            except HostError:
                continue
            if not result.unlinked and result.status == 0:
                seen = True
        return seen

    async def _finish_read(self, started: _Started, target: memoryview, seen: bool) -> None:
        """The slow path of a pipelined READ that did not end cleanly: BOT's checks and recovery, then
        the data or an exact error. If commands queued after it reached the device, the device is reset
        to a known state and the READ is run once more alone, so the sense reported is its own."""
        n = len(target)
        cdb = started.cdb
        result = await self._complete(started)  # raises BotTransportError after reset recovery
        if seen:
            await self.reset_recovery()
            result = await self._transport(cdb, n, b"", self.lun, self.timeout)
        if result.status == US_BULK_STAT_FAIL:
            raise ScsiCheckCondition(cdb[0], await self._request_sense())
        if result.residue or len(result.data) != n:
            raise MscError(f"READ of {n} bytes (CDB {cdb.hex()}) returned {len(result.data)} bytes "
                           f"(residue {result.residue})")
        target[:] = result.data

    async def write_blocks(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        """Write whole blocks starting at `lba`, in commands of at most `max_transfer` bytes."""
        view, block_size, count = self._whole_blocks(lba, data)
        per = max(1, self.max_transfer // block_size)
        done = 0
        while done < count:
            n = min(per, count - done)
            cdb = _cdb_rw(WRITE_10, WRITE_16, lba + done, n)
            result = await self.command(cdb, data_out=view[done * block_size:(done + n) * block_size])
            if result.residue:
                raise MscError(f"WRITE of blocks {lba + done}..{lba + done + n - 1}: the device took "
                               f"{n * block_size - result.residue} of {n * block_size} bytes")
            done += n

    async def synchronize_cache(self) -> None:
        """SYNCHRONIZE CACHE over the whole medium (number of blocks 0 = to the end)."""
        capacity = self.capacity
        if capacity is not None and capacity.block_count > 0xFFFFFFFF:
            await self.command(struct.pack(">BBQIBB", SYNCHRONIZE_CACHE_16, 0, 0, 0, 0, 0))
        else:
            await self.command(bytes((SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0)))


# -- blocking facade and file-like view --------------------------------------------------------------------


class SyncMassStorage:
    """`MassStorage` driven from ordinary code: its coroutines run in the calling thread on the device's
    blocking runtime (`SyncRemoteDevice`). Commands from several threads are serialized, as a Bulk-Only
    device needs them to be."""

    def __init__(self, device: SyncRemoteDevice, *, lun: int = 0, max_transfer: int = DEFAULT_MAX_TRANSFER,
                 urbs_per_command: int = 1, pipeline: bool = True, timeout: float = COMMAND_TIMEOUT,
                 commands_in_flight: int = 1) -> None:
        self.remote = device
        self.timeout = timeout
        self._serial = threading.Lock()
        self.msc = MassStorage(device.device, lun=lun, max_transfer=max_transfer,
                               urbs_per_command=urbs_per_command, pipeline=pipeline, timeout=timeout,
                               commands_in_flight=commands_in_flight)
        self._run(self.msc.open())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        # Each command is bounded by its own timeout and a reset recovery's: no outer guard needed.
        with self._serial:
            return self.remote.run(coro)

    @property
    def capacity(self) -> Capacity:
        assert self.msc.capacity is not None
        return self.msc.capacity

    @property
    def inquiry_data(self) -> Inquiry:
        assert self.msc.inquiry_data is not None
        return self.msc.inquiry_data

    def read_blocks(self, lba: int, count: int) -> bytes:
        return self._run(self.msc.read_blocks(lba, count))

    def readinto_blocks(self, lba: int, buffer: bytearray | memoryview) -> None:
        """Fill `buffer` (whole blocks) from block `lba` on, without an intermediate copy."""
        self._run(self.msc.readinto_blocks(lba, buffer))

    def write_blocks(self, lba: int, data: bytes | bytearray | memoryview) -> None:
        self._run(self.msc.write_blocks(lba, data))

    def command(self, cdb: bytes, *, data_in: int = 0, data_out: bytes = b"") -> CommandResult:
        return self._run(self.msc.command(cdb, data_in=data_in, data_out=data_out))

    def synchronize_cache(self) -> None:
        self._run(self.msc.synchronize_cache())

    def test_unit_ready(self) -> None:
        self._run(self.msc.test_unit_ready())


class BlockDevice(io.RawIOBase):
    """The disk as a seekable binary file of `size` bytes. Reads and writes may start and end anywhere:
    partial blocks are read, patched and written back. `flush()` sends SYNCHRONIZE CACHE."""

    def __init__(self, disk: SyncMassStorage, *, close_device: bool = False) -> None:
        super().__init__()
        self.disk = disk
        self.block_size = disk.capacity.block_size
        self.size = disk.capacity.size
        self._position = 0
        self._close_device = close_device
        self._dirty = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._checkClosed()
        if whence == os.SEEK_SET:
            position = offset
        elif whence == os.SEEK_CUR:
            position = self._position + offset
        elif whence == os.SEEK_END:
            position = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if position < 0:
            raise OSError(22, f"negative seek position {position}")
        self._position = position
        return position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._checkClosed()
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self._position)
        if n <= 0:
            return 0
        bs = self.block_size
        first = self._position // bs
        last = (self._position + n - 1) // bs
        data = self.disk.read_blocks(first, last - first + 1)
        skip = self._position - first * bs
        view[:n] = data[skip:skip + n]
        self._position += n
        return n

    def readall(self) -> bytes:
        remaining = max(0, self.size - self._position)
        buffer = bytearray(remaining)
        got = self.readinto(buffer)
        return bytes(buffer[:got])

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._checkClosed()
        view = memoryview(data).cast("B")
        if not view:
            return 0
        n = min(len(view), self.size - self._position)
        if n <= 0:
            raise OSError(28, f"no space left on the device: position {self._position} is at or past its "
                              f"end ({self.size} bytes)")
        bs = self.block_size
        start = self._position
        first, last = start // bs, (start + n - 1) // bs
        head, tail = start - first * bs, (last + 1) * bs - (start + n)
        if head or tail:  # read-modify-write of the partial blocks at either end
            buffer = bytearray((last - first + 1) * bs)
            if head or last == first:
                buffer[:bs] = self.disk.read_blocks(first, 1)
            if tail and last != first:
                buffer[-bs:] = self.disk.read_blocks(last, 1)
            buffer[head:head + n] = view[:n]
            self.disk.write_blocks(first, buffer)
        else:
            self.disk.write_blocks(first, view[:n])
        self._position += n
        self._dirty = True
        return n

    def flush(self) -> None:
        if not self.closed and self._dirty:
            self.disk.synchronize_cache()
            self._dirty = False
        super().flush()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.flush()
        finally:
            super().close()
            if self._close_device:
                self.disk.remote.close()


def open_disk(host: str, busid: str, port: int = 3240, *, lun: int = 0, timeout: float = 5.0) -> BlockDevice:
    """Import `busid` from `host` and return its LUN as a file; closing the file releases the device."""
    remote = SyncRemoteDevice.open(host, busid, port, timeout=timeout)
    try:
        return BlockDevice(SyncMassStorage(remote, lun=lun), close_device=True)
    except BaseException:
        remote.close()
        raise


__all__ = [
    "BlockDevice",
    "BotTransportError",
    "Capacity",
    "CommandResult",
    "Inquiry",
    "MassStorage",
    "MscError",
    "NotMassStorage",
    "ScsiCheckCondition",
    "Sense",
    "SyncMassStorage",
    "open_disk",
    "parse_sense",
]
