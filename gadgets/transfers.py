"""How big the next transfer on a gadget endpoint should be, given that the gadget cannot see the host's.

A USB/IP device receives whole URBs: their length says where a host transfer ends. A FunctionFS gadget sees
only packets. An OUT read completes when its buffer is full or a short (or zero-length) packet arrives, so a
read bigger than what the host sends in a transfer that ends on a packet boundary never completes
(FUNCTIONFS.md pitfall 5), and a read of one packet chops every transfer into packets. The same blindness
hits a bridge on the IN side: the URB it sends to the remote device must not be so big that it swallows
the start of the next transfer.

So a `TransferSizer` per endpoint pair decides. `PacketSizer` is always correct: every packet is its own
read (transfers end at short packets on the wire anyway). `BulkOnlySizer` knows USB Mass Storage Bulk-Only
Transport (BOT 1.0 §5): it reads the 31-byte CBW, then exactly dCBWDataTransferLength of data-out in large
reads, and on the IN side asks for exactly the data-in, then the 13-byte CSW. That is what the kernel's own
f_mass_storage does, and it turns 512-byte reads into 64 KiB ones. A bridge may ask for a long data-in in
several URBs (`in_chunk`): the remote then sends the first part while it still reads the rest, and the
bridge forwards one part while the next is on its way. If the device ends the data early (a short packet
or a STALL), the URBs asked for beyond the one that will carry the CSW are stale: the sizer says how many,
and the bridge unlinks them before the host may send its next command.

Pure: no I/O; the edges (gadgets.model, gadgets.bridge) call it.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from typing import Protocol

US_BULK_CB_SIGN = 0x43425355  # "USBC", include/linux/usb/storage.h
US_BULK_CB_WRAP_LEN = 31
US_BULK_CS_WRAP_LEN = 13
US_BULK_FLAG_IN = 0x80
USB_CLASS_MASS_STORAGE, USB_SC_SCSI, USB_PR_BULK = 0x08, 0x06, 0x50
_CBW = struct.Struct("<IIIBBB16s")
_CSW = (US_BULK_CS_WRAP_LEN, False)
_MIN_TAIL = 64  # a data-in's last transfer: room for a CSW should the data end before it


class TransferSizer(Protocol):
    """Sizes for the next OUT read and IN transfer on one function's data endpoints; told what moved."""

    def next_read(self, queued: int) -> int | None:
        """Bytes for one more OUT read while `queued` are outstanding; None: queue no more for now."""

    def next_in(self, queued: int) -> int | None:
        """Bytes for one more IN transfer (a bridge's URB to the remote) while `queued` are outstanding."""

    def out_done(self, data: bytes) -> None:
        """An OUT read completed with `data`."""

    def in_done(self, data: bytes | memoryview) -> int:
        """An IN transfer (the oldest outstanding) completed with `data`. Returns how many of the most
        recently asked-for IN transfers are stale now (to be unlinked, their data never forwarded)."""

    def in_stalled(self, size: int) -> int:
        """An IN transfer of `size` (the oldest outstanding) ended with a STALL: what has to be asked for
        again once the halt is gone is planned anew. Returns the stale count, as `in_done`."""

    def reset(self) -> None:
        """The host reset the function (bus reset, new configuration, class reset request)."""


class PacketSizer:
    """One packet per OUT read, `in_size` per IN transfer, `depth` of each outstanding."""

    def __init__(self, max_packet: int, *, in_size: int | None = None, depth: int = 8) -> None:
        if max_packet < 1 or depth < 1:
            raise ValueError("max_packet and depth must be positive")
        self.max_packet = max_packet
        self.in_size = in_size or max_packet
        self.depth = depth

    def next_read(self, queued: int) -> int | None:
        return self.max_packet if queued < self.depth else None

    def next_in(self, queued: int) -> int | None:
        return self.in_size if queued < self.depth else None

    def out_done(self, data: bytes) -> None:
        pass

    def in_done(self, data: bytes | memoryview) -> int:
        return 0

    def in_stalled(self, size: int) -> int:
        return 0

    def reset(self) -> None:
        pass


class BotPhase(enum.Enum):
    COMMAND = "command"  # the next OUT packet is a CBW
    DATA_OUT = "data-out"
    DATA_IN = "data-in"
    STATUS = "status"  # the CSW comes next on bulk IN


class BulkOnlySizer:
    """Bulk-Only Transport framing, learnt from the CBWs the host sends.

    OUT: one packet-sized read for the CBW (it is a short packet, so any multiple of the packet size takes
    it); after a CBW announcing data-out, reads of up to `chunk` bytes that add up to exactly its length;
    then the next CBW read. IN: after a CBW announcing data-in, one transfer of exactly its length, then
    one of 13 bytes for the CSW; after any other CBW just the CSW. Whatever the host does that BOT does not
    foresee (a reset, an invalid CBW) only costs speed: reads stay multiples of the packet size, and a
    short packet ends any of them.

    With `in_chunk` the data-in is asked for in transfers of that many bytes (whole packets; the last one
    takes the rest, at least `_MIN_TAIL` bytes so it can hold a CSW), all of them at once up to `depth`.
    A short one ends the data stage (BOT §6.7.2, the device sends the CSW next): the next transfer asked
    for will carry the CSW, those after it are stale. A STALL ends it too: everything asked for after the
    stalled transfer is stale, and one CSW is asked for once the halt is cleared.
    """

    def __init__(self, max_packet: int, *, chunk: int = 64 * 1024, in_chunk: int | None = None,
                 depth: int = 4) -> None:
        if max_packet < 1 or chunk < max_packet or depth < 1 or (in_chunk is not None and in_chunk < max_packet):
            raise ValueError("need max_packet >= 1, chunk and in_chunk >= max_packet and depth >= 1")
        self.max_packet = max_packet
        self.chunk = chunk - chunk % max_packet
        self.in_chunk = None if in_chunk is None else in_chunk - in_chunk % max_packet
        self.depth = depth
        self.reset()

    def reset(self) -> None:
        self.phase = BotPhase.COMMAND
        self.tag = 0
        self.expected = 0  # dCBWDataTransferLength of the command in progress
        self._out_left = 0  # data-out bytes not yet received
        self._out_unplanned = 0  # data-out bytes no read has been queued for yet
        self._in_plan: deque[tuple[int, bool]] = deque()  # IN transfers still to issue: (size, is data-in)
        self._in_asked: deque[tuple[int, bool]] = deque()  # issued and not ended yet, oldest first
        self._in_left = 0  # data-in bytes not yet received

    def _round(self, n: int) -> int:
        return -(-n // self.max_packet) * self.max_packet

    # OUT

    def next_read(self, queued: int) -> int | None:
        if queued >= self.depth:
            return None
        if self.phase is BotPhase.DATA_OUT and self._out_unplanned:
            size = min(self._out_unplanned, self.chunk)
            self._out_unplanned -= size
            return self._round(size)
        if queued:
            return None  # the next CBW read waits until the data-out reads are in
        return self.max_packet

    def out_done(self, data: bytes) -> None:
        if self.phase is BotPhase.DATA_OUT:
            self._out_left = max(0, self._out_left - len(data))
            if self._out_left == 0 or len(data) % self.max_packet:
                self.phase = BotPhase.STATUS
                self._out_unplanned = 0
            return
        cbw = parse_cbw(data)
        if cbw is None:
            return
        tag, length, flags = cbw
        self.tag, self.expected = tag, length
        plan = self._in_plan
        plan.clear()
        if length and not flags & US_BULK_FLAG_IN:
            self.phase = BotPhase.DATA_OUT
            self._out_left = self._out_unplanned = length
        elif length:
            self.phase = BotPhase.DATA_IN
            self._in_left = length
            step = self.in_chunk or length
            while length - step >= _MIN_TAIL:
                plan.append((step, True))
                length -= step
            plan.append((length, True))
        else:
            self.phase = BotPhase.STATUS
        plan.append(_CSW)

    # IN

    def next_in(self, queued: int) -> int | None:
        # The CSW is asked for right behind the data-in: if the device stalls the data-in, the CSW transfer
        # fails too (or is stale), and one is asked for again once the halt is cleared.
        if queued >= self.depth or not self._in_plan:
            return None
        item = self._in_plan.popleft()
        self._in_asked.append(item)
        return item[0]

    def _stale_after(self, keep: int) -> int:
        """Drop the planned data-in; of the transfers asked for after the one that just ended, the first
        `keep` stay, the rest are stale (forgotten here, unlinked by the caller)."""
        plan, asked = self._in_plan, self._in_asked
        while plan and plan[0][1]:
            plan.popleft()
        stale = max(0, len(asked) - keep)
        for _ in range(stale):
            asked.pop()
        return stale

    def in_stalled(self, size: int) -> int:
        """BOT §6.7.2: after a STALL the host clears the halt and reads the CSW: ask for one, once."""
        if self._in_asked:
            self._in_asked.popleft()
        if self.phase is BotPhase.COMMAND:
            return 0  # no transfer of ours was due: nothing to plan
        stale = self._stale_after(0)
        self.phase = BotPhase.STATUS
        self._in_plan.clear()
        self._in_plan.append(_CSW)
        return stale

    def in_done(self, data: bytes | memoryview) -> int:
        size, is_data = self._in_asked.popleft() if self._in_asked else (0, False)
        n = len(data)
        if n == US_BULK_CS_WRAP_LEN and data[:4] == b"USBS":
            self.phase = BotPhase.COMMAND
            return 0
        if self.phase is BotPhase.DATA_IN and is_data:
            self._in_left -= n
            if self._in_left <= 0:
                self.phase = BotPhase.STATUS
            elif n < size:  # a short transfer ended the data stage: the CSW comes next
                self.phase = BotPhase.STATUS
                if self._in_asked:  # the next transfer asked for takes it; the CSW planned is not needed
                    stale = self._stale_after(1)
                    if self._in_plan and not self._in_plan[0][1]:
                        self._in_plan.popleft()
                    return stale
                self._stale_after(0)  # nothing asked for yet: the planned CSW stays
        elif self.phase is BotPhase.DATA_IN:
            self.phase = BotPhase.STATUS
        return 0


def parse_cbw(data: bytes) -> tuple[int, int, int] | None:
    """(dCBWTag, dCBWDataTransferLength, bmCBWFlags) of a Command Block Wrapper, None if `data` is not one."""
    if len(data) != US_BULK_CB_WRAP_LEN:
        return None
    signature, tag, length, flags, _lun, _cb_length, _cb = _CBW.unpack(data)
    if signature != US_BULK_CB_SIGN:
        return None
    return tag, length, flags


def is_bulk_only(interface_class: int, interface_subclass: int, interface_protocol: int) -> bool:
    """A mass-storage interface speaking Bulk-Only Transport (any command set: SCSI, UFI, ...)."""
    return interface_class == USB_CLASS_MASS_STORAGE and interface_protocol == USB_PR_BULK
