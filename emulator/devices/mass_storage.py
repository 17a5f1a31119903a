"""USB Mass Storage, Bulk-Only Transport 1.0 (BOT), over the SCSI target in `scsi.py`.

`BulkOnlyTransport` is the pure BOT state machine: a CBW arrives on bulk OUT, data moves in the direction
and amount the CBW announced, a CSW goes back on bulk IN. It settles the thirteen host/device cases of BOT
§6.7 (host expects Hn/Hi/Ho bytes, device intends Dn/Di/Do), stalls both bulk endpoints on an invalid or
not meaningful CBW until Reset Recovery (§6.6.1: Bulk-Only Mass Storage Reset, then CLEAR_FEATURE(HALT) on
each endpoint), and answers Get Max LUN.

Transfers are whole URBs, as USB/IP delivers them: an IN transfer of `length` bytes is answered with up to
`length` bytes, so a 64 KiB READ(10) read by one 64 KiB URB costs one `pread`, and the same READ read in
four 16 KiB URBs costs four. How the end of a short data-in phase is signalled follows what Linux
usb-storage (`usb_stor_Bulk_transport`) and the kernel's own gadget (`f_mass_storage.c`, `finish_reply`)
do: the short data goes out, then bulk IN is halted; the host's CSW read stalls, the host clears the halt
and reads the CSW again. With `can_stall=False` a zero-length packet ends the data instead (the gadget's
"stall" module parameter).

`MassStorageFunction` puts the state machine into the device framework of `base.py`;
`mass_storage_device(...)` builds a complete high-speed device around image files.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import re
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any

from emulator.devices.base import (
    STALL,
    Device,
    DeviceError,
    EndpointSpec,
    FileRegion,
    Function,
    InterfaceSpec,
    Reply,
    TransferStatus,
)
from emulator.devices.scsi import Command, Direction, ScsiStatus, ScsiTarget
from emulator.devices.storage import ImageStore, Store
from emulator.usb import setup as ch9

log = logging.getLogger(__name__)

# include/linux/usb/storage.h
USB_CLASS_MASS_STORAGE = 0x08
USB_SC_SCSI = 0x06  # SCSI transparent command set
USB_PR_BULK = 0x50  # Bulk-Only Transport
US_BULK_CB_WRAP_LEN = 31
US_BULK_CB_SIGN = 0x43425355  # "USBC"
US_BULK_FLAG_IN = 0x80
US_BULK_FLAG_OUT = 0x00
US_BULK_CS_WRAP_LEN = 13
US_BULK_CS_SIGN = 0x53425355  # "USBS"
US_BULK_STAT_OK = 0
US_BULK_STAT_FAIL = 1
US_BULK_STAT_PHASE = 2
US_BULK_RESET_REQUEST = 0xFF
US_BULK_GET_MAX_LUN = 0xFE

_CBW = struct.Struct("<IIIBBB16s")
_CSW = struct.Struct("<IIIB")


class MassStorageError(DeviceError):
    """A CBW or CSW could not be decoded (bad length or signature)."""


@dataclasses.dataclass(frozen=True, slots=True)
class BulkCbWrap:
    """Command Block Wrapper, `struct bulk_cb_wrap` (BOT §5.1): 31 bytes, little-endian."""

    tag: int
    data_transfer_length: int
    flags: int
    lun: int
    cdb: bytes
    signature: int = US_BULK_CB_SIGN

    @property
    def length(self) -> int:
        """bCBWCBLength: how many bytes of the 16-byte CBWCB field are the command."""
        return len(self.cdb)

    def pack(self) -> bytes:
        return _CBW.pack(
            self.signature,
            self.tag,
            self.data_transfer_length,
            self.flags,
            self.lun,
            len(self.cdb),
            self.cdb,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> BulkCbWrap:
        """Decode a CBW; a wrong size or signature ("not valid", BOT §6.2.1) raises MassStorageError."""
        return cls(*_decode_cbw(data), US_BULK_CB_SIGN)


def _decode_cbw(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, bytes]:
    """A valid CBW's (tag, data_transfer_length, flags, lun, cdb); `BulkCbWrap.unpack` as a tuple, which is
    what the transport takes apart once per command."""
    if len(data) != US_BULK_CB_WRAP_LEN:
        raise MassStorageError(f"CBW is {len(data)} bytes, not {US_BULK_CB_WRAP_LEN}")
    signature, tag, length, flags, lun, cb_length, cb = _CBW.unpack(data)
    if signature != US_BULK_CB_SIGN:
        raise MassStorageError(f"CBW signature {signature:#010x} is not {US_BULK_CB_SIGN:#010x}")
    return tag, length, flags, lun, cb[:cb_length] if cb_length < 16 else cb


@dataclasses.dataclass(frozen=True, slots=True)
class BulkCsWrap:
    """Command Status Wrapper, `struct bulk_cs_wrap` (BOT §5.2): 13 bytes, little-endian."""

    tag: int
    residue: int
    status: int
    signature: int = US_BULK_CS_SIGN

    def pack(self) -> bytes:
        return _CSW.pack(self.signature, self.tag, self.residue, self.status)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> BulkCsWrap:
        if len(data) != US_BULK_CS_WRAP_LEN:
            raise MassStorageError(f"CSW is {len(data)} bytes, not {US_BULK_CS_WRAP_LEN}")
        signature, tag, residue, status = _CSW.unpack(data)
        if signature != US_BULK_CS_SIGN:
            raise MassStorageError(f"CSW signature {signature:#010x} is not {US_BULK_CS_SIGN:#010x}")
        return cls(tag, residue, status, signature)


class Phase(enum.Enum):
    """Where the transport is in the command/data/status sequence (BOT §5.3)."""

    COMMAND = "command"  # waiting for a CBW on bulk OUT
    DATA_IN = "data-in"
    DATA_OUT = "data-out"
    STATUS = "status"  # the CSW is ready on bulk IN


# The members the transport tests on every transfer, as module names: on Python 3.11 `Phase.STATUS` goes
# through EnumType.__getattr__, ten times the cost of a global.
_COMMAND, _DATA_IN, _DATA_OUT, _STATUS = Phase.COMMAND, Phase.DATA_IN, Phase.DATA_OUT, Phase.STATUS
_NONE, _IN, _OUT = Direction.NONE, Direction.IN, Direction.OUT
_GOOD = ScsiStatus.GOOD
_CBW_TAKEN = Reply(actual_length=US_BULK_CB_WRAP_LEN)


class BulkOnlyTransport:
    """The device side of BOT: `bulk_out(data)` and `bulk_in(length)` for the two bulk endpoints,
    `mass_storage_reset()`, `clear_halt()`/`set_halt()` and `reset()` for ep0 and the port.

    Transfers that cannot progress in the current phase (an IN while waiting for a CBW, an OUT while the
    CSW is still unread) are NAK'd: `None` is returned and `wakeup` is called once they may succeed.
    """

    def __init__(
        self,
        target: ScsiTarget,
        *,
        max_packet_size: int = 512,
        can_stall: bool = True,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        self.target = target
        self.max_packet_size = max_packet_size
        self.can_stall = can_stall
        self.wakeup = wakeup
        self.file_regions = False  # data-in may be a FileRegion (the edge sends it with sendfile)
        self._in_halted = False
        self._out_halted = False
        self._wedged = False  # halts survive CLEAR_FEATURE until a Bulk-Only Mass Storage Reset
        self._nak = False
        self._clear_command()

    def _clear_command(self) -> None:
        self.phase = _COMMAND
        self._cmd: Command | None = None
        self._tag = 0
        self._host_length = 0  # dCBWDataTransferLength
        self._host_left = 0  # data-out bytes the host has yet to send
        self._device_left = 0  # data bytes the device has yet to move
        self._moved = 0  # data bytes the device has processed (for dCSWDataResidue)
        self._scsi_status = _GOOD
        self._phase_error = False
        self._zlp_pending = False

    # ---------------------------------------------------------------- endpoint state

    @property
    def in_halted(self) -> bool:
        return self._in_halted

    @property
    def out_halted(self) -> bool:
        return self._out_halted

    @property
    def wedged(self) -> bool:
        """True after an invalid CBW, until a Bulk-Only Mass Storage Reset."""
        return self._wedged

    @property
    def max_lun(self) -> int:
        """What Get Max LUN (class request FEh) returns."""
        return self.target.max_lun

    def set_halt(self, *, bulk_in: bool) -> None:
        """SET_FEATURE(ENDPOINT_HALT) from the host."""
        if bulk_in:
            self._in_halted = True
        else:
            self._out_halted = True

    def clear_halt(self, *, bulk_in: bool) -> None:
        """CLEAR_FEATURE(ENDPOINT_HALT): ignored while wedged (BOT §6.6.1 wants the stall to persist
        until Reset Recovery; the request itself still succeeds, as with the kernel's usb_ep_set_wedge)."""
        if self._wedged:
            return
        if bulk_in:
            self._in_halted = False
        else:
            self._out_halted = False
        self._wake()

    def mass_storage_reset(self) -> None:
        """Bulk-Only Mass Storage Reset (class request FFh, BOT §3.1): drop the command in progress and wait
        for a CBW. Endpoint halts are kept (§5.3.4); the host clears them next."""
        if self._cmd is not None:
            log.info("mass storage reset aborts tag %#x in %s phase", self._tag, self.phase.value)
        self._clear_command()
        self._wedged = False
        self._wake()

    def reset(self) -> None:
        """USB port reset or a new configuration: transport and target back to their initial state."""
        self._clear_command()
        self._wedged = self._in_halted = self._out_halted = False
        self.target.reset()
        self._wake()

    def _wake(self) -> None:
        if self._nak and self.wakeup is not None:
            self._nak = False
            self.wakeup()

    def _stall_until_reset(self, why: str) -> None:
        log.warning("%s: stalling both bulk endpoints until reset recovery", why)
        self._clear_command()
        self._wedged = self._in_halted = self._out_halted = True

    # ---------------------------------------------------------------- bulk OUT

    def bulk_out(self, data: bytes | bytearray | memoryview) -> Reply | None:
        """A bulk OUT transfer from the host: a CBW or data-out."""
        if self._out_halted:
            return STALL
        if self.phase is _COMMAND:
            reply = self._command_block(data)
        elif self.phase is _DATA_OUT:
            reply = self._data_out(data)
        else:
            self._nak = True  # data-in or status pending: the next CBW has to wait for the CSW to go
            return None
        if self._nak:
            self._wake()
        return reply

    def _command_block(self, data: bytes | bytearray | memoryview) -> Reply:
        # The packet is taken; any stall comes afterwards. (A frozen constant for the usual 31 bytes.)
        if len(data) == US_BULK_CB_WRAP_LEN:  # _decode_cbw's valid case, without the call
            accepted = _CBW_TAKEN
            signature, tag, h, flags, lun, cb_length, cdb = _CBW.unpack(data)
            if cb_length < 16:
                cdb = cdb[:cb_length]
        else:
            accepted = Reply(actual_length=len(data))
            signature = 0
        if signature != US_BULK_CB_SIGN:
            try:
                tag, h, flags, lun, cdb = _decode_cbw(data)  # raises: it says why the CBW is not valid
            except MassStorageError as exc:
                self._stall_until_reset(f"invalid CBW ({exc})")
                return accepted
        # "Meaningful" (BOT §6.2.2): no reserved bits, a LUN the device has, a CB length of 1..16.
        if flags & ~US_BULK_FLAG_IN & 0xFF or (lun and lun > self.target.max_lun) or not 1 <= data[14] <= 16:
            self._stall_until_reset(
                f"CBW not meaningful (flags {flags:#04x}, LUN {lun}, CB length {data[14]})"
            )
            return accepted
        self._start(tag, h, flags, lun, cdb)
        return accepted

    def _start(self, tag: int, h: int, flags: int, lun: int, cdb: bytes) -> None:
        """Decode the command and settle which of BOT §6.7's thirteen cases this is (`h`: the CBW's
        dCBWDataTransferLength)."""
        cmd = self.target.command(lun, cdb)
        d = cmd.direction if cmd.length else _NONE
        self._cmd, self._tag, self._host_length = cmd, tag, h
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "CBW tag %#x LUN %d CDB %s H%s=%d D%s=%d",
                tag,
                lun,
                cdb.hex(),
                "n" if not h else "i" if flags & US_BULK_FLAG_IN else "o",
                h,
                d.value[0],
                cmd.length,
            )
        if h == 0:
            if d is _NONE:  # (1) Hn = Dn
                self._status(cmd.finish())
            else:  # (2) Hn < Di, (3) Hn < Do: the command is not run
                self._status(_GOOD, phase_error=True)
        elif flags & US_BULK_FLAG_IN:
            if d is _IN:  # (5) Hi > Di, (6) Hi = Di, (7) Hi < Di: send at most Hi, phase error
                self._phase_error = cmd.length > h
                self._device_left = min(cmd.length, h)
                self.phase = _DATA_IN
            elif d is _NONE:  # (4) Hi > Dn
                self._end_data_in(cmd.finish(), filled=True)
            else:  # (8) Hi <> Do: not run
                self._phase_error = True
                self._end_data_in(_GOOD, filled=True)
        else:
            self._host_left = h
            if d is _OUT:  # (11) Ho > Do, (12) Ho = Do, (13) Ho < Do: take at most Ho, phase error
                self._phase_error = cmd.length > h
                self._device_left = min(cmd.length, h)
                self.phase = _DATA_OUT
            elif d is _NONE:  # (9) Ho > Dn
                self._refuse_data_out(cmd.finish())
            else:  # (10) Ho <> Di: not run
                self._phase_error = True
                self._refuse_data_out(_GOOD)

    def _status(self, scsi_status: ScsiStatus, *, phase_error: bool = False) -> None:
        self._scsi_status = scsi_status
        self._phase_error = self._phase_error or phase_error
        self.phase = _STATUS

    def _end_data_in(self, scsi_status: ScsiStatus, *, filled: bool) -> None:
        """The device has sent all it will; the host wanted more if `_moved < H`. Then BOT §6.7.2 wants
        the bulk IN endpoint halted (or, without stalls, the data ended by a short or zero-length packet;
        `filled` says the last transfer was full, so only a zero-length one can end it)."""
        self._status(scsi_status)
        if self._moved < self._host_length:
            if self.can_stall:
                self._in_halted = True
            elif filled:
                self._zlp_pending = True

    def _refuse_data_out(self, scsi_status: ScsiStatus) -> None:
        """The device wants none (more) of the host's data-out: halt bulk OUT (BOT §6.7.3), or without
        stalls accept and discard what is left, as f_mass_storage's throw_away_data does."""
        self._scsi_status = scsi_status
        self._device_left = 0
        if self.can_stall:
            self._out_halted = True
            self._status(scsi_status)
        else:
            self.phase = _DATA_OUT

    def _data_out(self, data: bytes | bytearray | memoryview) -> Reply:
        n = len(data)
        take = min(n, self._device_left)
        cmd = self._cmd
        assert cmd is not None
        if take:
            cmd.write(data if take == n else memoryview(data)[:take])
            self._moved += take
            self._device_left -= take
        self._host_left = max(0, self._host_left - n)
        # A short packet (or a zero-length one) ends the host's transfer early (USB 2.0 §5.8.3).
        host_done = self._host_left == 0 or n == 0 or n % self.max_packet_size != 0
        if take and self._device_left == 0:  # the device has all it wanted: run it
            self._scsi_status = cmd.finish()
            if not host_done:  # (11) Ho > Do: refuse the rest
                if self.can_stall:
                    self._out_halted = True
                    self._status(self._scsi_status)
                    if take < n:
                        return Reply(TransferStatus.STALL, actual_length=take)
                    return Reply(actual_length=n)
                return Reply(actual_length=n)  # discard the rest as it comes
        elif self._device_left and host_done:
            # The host ended its data before the device had what the command needs: a write cut short.
            self._scsi_status = cmd.finish()
            self._device_left = 0
            self._phase_error = True
        if host_done:
            self._status(self._scsi_status)
        return Reply(actual_length=n)

    # ---------------------------------------------------------------- bulk IN

    def bulk_in(self, length: int) -> Reply | None:
        """A bulk IN transfer of up to `length` bytes: data-in or the CSW."""
        if self._in_halted:
            return STALL
        if self.phase is _DATA_IN:
            return self._data_in(length)
        if self.phase is _STATUS:
            if self._zlp_pending:
                self._zlp_pending = False
                return Reply(data=b"")
            reply = self._send_csw(length)
            if self._nak:
                self._wake()
            return reply
        self._nak = True  # nothing to send yet: no command, or the host is still sending data-out
        return None

    def _data_in(self, length: int) -> Reply:
        cmd = self._cmd
        assert cmd is not None
        n = min(length, self._device_left)
        if not n:
            data: bytes | FileRegion = b""
            got = 0
        elif self.file_regions:
            data = cmd.read_region(n)
            got = data.length if type(data) is FileRegion else len(data)  # not FileRegion.__len__, in Python
        else:
            data = cmd.read(n)
            got = len(data)
        self._moved += got
        self._device_left = self._device_left - got if got == n else 0  # short: the device ran out (error)
        if self._device_left == 0:
            status = cmd.finish()
            if self._moved < self._host_length:  # short of what the host asked for: BOT §6.7.2
                self._end_data_in(status, filled=got == length)
            else:  # _end_data_in's usual case
                self._scsi_status = status
                self.phase = _STATUS
        return Reply(data=data)

    def _send_csw(self, length: int) -> Reply:
        if self._phase_error:
            status = US_BULK_STAT_PHASE
        elif self._scsi_status == _GOOD:
            status = US_BULK_STAT_OK
        else:
            status = US_BULK_STAT_FAIL
        residue = self._host_length - self._moved
        # BulkCsWrap(...).pack() without the object: once per command
        csw = _CSW.pack(US_BULK_CS_SIGN, self._tag, residue, status)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("CSW tag %#x residue %d status %d", self._tag, residue, status)
        self._clear_command()
        if length < US_BULK_CS_WRAP_LEN:  # the host's buffer cannot hold it: babble
            return Reply(TransferStatus.OVERFLOW, csw[:length])
        return Reply(data=csw)


# ---------------------------------------------------------------------------------------------- the function


class MassStorageFunction(Function):
    """A USB mass-storage interface (class 08h, SCSI transparent 06h, Bulk-Only 50h) with one bulk IN and
    one bulk OUT endpoint, serving `target`'s LUNs through `BulkOnlyTransport`.

    The device framework owns endpoint halts (`Device.halted`); the transport keeps its own, because BOT
    decides when to halt. They are kept in step here: a halt the transport decides on is set on the device
    at once (so GET_STATUS sees it and the next transfer STALLs), and CLEAR_FEATURE(HALT) while the
    transport is wedged halts the endpoint again. A re-entrant lock makes the function safe to drive from
    more than one thread.
    """

    name = "mass_storage"

    def __init__(self, target: ScsiTarget, *, can_stall: bool = True) -> None:
        super().__init__()
        self.target = target
        self.bot = BulkOnlyTransport(target, can_stall=can_stall, wakeup=self.wakeup)
        self._lock = threading.RLock()

    def interfaces(self) -> list[InterfaceSpec]:
        return [
            InterfaceSpec(
                USB_CLASS_MASS_STORAGE,
                USB_SC_SCSI,
                USB_PR_BULK,
                endpoints=(EndpointSpec("in", ch9.Direction.IN), EndpointSpec("out", ch9.Direction.OUT)),
                name="Mass Storage",
            )
        ]

    def _sync_halts(self) -> None:
        if self.bot.in_halted and not self.is_halted("in"):
            self.halt("in")
        if self.bot.out_halted and not self.is_halted("out"):
            self.halt("out")

    def transfer(self, endpoint: str, data: bytes | None, length: int) -> Reply | None:
        with self._lock:
            bot = self.bot
            if endpoint == "out":
                reply = bot.bulk_out(data if data is not None else b"")
            else:
                bot.file_regions = self._device.file_regions  # type: ignore[union-attr]  # the edge's choice
                reply = bot.bulk_in(length)
            if bot._in_halted or bot._out_halted:  # not the properties: once per transfer
                self._sync_halts()
        return reply

    def control(self, setup: ch9.SetupPacket, data: bytes) -> Reply:
        """The two BOT class requests (§3.1, §3.2), addressed to this interface with wValue 0."""
        if setup.type is not ch9.RequestType.CLASS or setup.recipient != ch9.Recipient.INTERFACE:
            return STALL
        if setup.value != 0 or setup.index != self.interface_number():
            return STALL
        if setup.request == US_BULK_RESET_REQUEST and not setup.is_in and setup.length == 0:
            with self._lock:
                self.bot.mass_storage_reset()
                self._sync_halts()
            return Reply()
        if setup.request == US_BULK_GET_MAX_LUN and setup.is_in and setup.length >= 1:
            return Reply(data=bytes((self.bot.max_lun,)))
        return STALL

    def clear_halt(self, endpoint: str) -> None:
        with self._lock:
            self.bot.clear_halt(bulk_in=endpoint == "in")
            self._sync_halts()  # wedged after an invalid CBW: the endpoint stays halted

    def set_alt(self, interface: int, alternate: int) -> None:
        """SET_CONFIGURATION / SET_INTERFACE: endpoints start afresh, so does the transport (and the
        target, as f_mass_storage's do_set_interface does)."""
        with self._lock:
            self.bot.max_packet_size = self.max_packet_size("out")
            self.bot.reset()

    def disable(self) -> None:
        with self._lock:
            self.bot.reset()

    def reset(self) -> None:
        with self._lock:
            self.bot.reset()

    def close(self) -> None:
        with self._lock:
            self.target.close()


PID_CODES_VENDOR = 0x1209  # pid.codes, test PIDs 0x0001..0x0010
MASS_STORAGE_PRODUCT_ID = 0x0004
DEFAULT_SERIAL = "565553420001"  # "VUSB" in hex, then 0001: BOT §4.1.1 wants 12+ hex digits

StoreSpec = Store | str | os.PathLike[str] | None


def mass_storage_device(
    stores: StoreSpec | Sequence[StoreSpec],
    *,
    vendor: str = "vusb",
    product: str = "Virtual Disk",
    revision: str = "0100",
    serial: str = DEFAULT_SERIAL,
    read_only: bool = False,
    removable: bool = True,
    unit_attention_on_reset: bool = False,
    can_stall: bool = True,
    **options: Any,
) -> Device:
    """A ready high-speed USB disk: one LUN per entry of `stores` (an image path, opened read-only when
    `read_only`; a `Store`, used as it is; or None for an empty removable slot). `vendor`, `product` and
    `serial` name it both in INQUIRY and in the USB string descriptors. `options` go to `Device`
    (id_vendor, id_product, speed, ...)."""
    if isinstance(stores, Store | str | os.PathLike) or stores is None:
        stores = [stores]
    if not re.fullmatch(r"[0-9A-F]{12,}", serial):
        log.warning(
            "serial %r: BOT §4.1.1 asks for at least 12 hex digits (0-9, A-F); Windows may mind", serial
        )
    opened: list[Store] = []
    luns: list[Store | None] = []
    try:
        for spec in stores:
            if spec is None or isinstance(spec, Store):
                luns.append(spec)
            else:
                image = ImageStore(spec, read_only=read_only)
                opened.append(image)
                luns.append(image)
        target = ScsiTarget(
            luns,
            vendor=vendor,
            product=product,
            revision=revision,
            serial=serial,
            removable=removable,
            unit_attention_on_reset=unit_attention_on_reset,
        )
        settings: dict[str, Any] = dict(
            id_vendor=PID_CODES_VENDOR,
            id_product=MASS_STORAGE_PRODUCT_ID,
            manufacturer=vendor,
            product=product,
            serial=serial,
            speed=ch9.Speed.HIGH,
        )
        settings.update(options)
        return Device([MassStorageFunction(target, can_stall=can_stall)], **settings)
    except BaseException:
        for store in opened:
            store.close()
        raise
