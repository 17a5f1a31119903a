"""Sans-I/O USB/IP conversations: `ServerConnection` (the usbipd + stub side) and `ClientConnection` (the
`usbip attach` + vhci side), modelled on h11's `Connection`.

Feed bytes with `receive_data(data)` (`b""` means the peer closed), pull events with `next_event()` (a
message, `ConnectionClosed`, or `NEED_DATA`), and turn your own messages into bytes with `send(message)`.
Nothing here touches a socket.

Phases (`Phase`), as usbipd runs them: one operation per connection. OP_REQ_DEVLIST is answered with
OP_REP_DEVLIST and the connection is DONE (close it). OP_REQ_IMPORT is answered with OP_REP_IMPORT; ST_OK
switches to the URB phase (CMD_SUBMIT / CMD_UNLINK from the client, RET_SUBMIT / RET_UNLINK from the
server), any other status makes it DONE. A server's `next_event()` returns NEED_DATA while its own reply
to the operation is due (bytes that arrive meanwhile wait in the buffer).

Seqnums are tracked both ways: a CMD_SUBMIT or CMD_UNLINK may not reuse a seqnum still outstanding, every
RET must answer an outstanding one. Unlink follows stub_rx.c / stub_tx.c / vhci_rx.c:
* a CMD_UNLINK of a URB still pending cancels it: the server answers RET_UNLINK (status -ECONNRESET, or
  the URB's own status if it completed anyway, as stub_complete sends) and **no** RET_SUBMIT; sending one
  raises `UnlinkedUrbError` (a LocalProtocolError, nothing sent). Avoid it by checking
  `unlinked_seqnums`, or call `ServerConnection.complete(ret)`, which does what stub_complete does: sends
  the RET_SUBMIT, or the due RET_UNLINK instead if the URB was unlinked meanwhile.
* a CMD_UNLINK of a URB already answered (or never known: the kernel cannot tell them apart either) gets
  RET_UNLINK status 0; the server may not claim anything else. `ret_unlink_for(seqnum)` builds the right
  reply for either case.
* on the client, a RET_SUBMIT that overtakes the RET_UNLINK of its URB is legal (the URB completed before
  the unlink reached the server); a RET_UNLINK of a still-pending URB finishes it, and a later RET_SUBMIT
  for it is an error (vhci_rx.c drops the connection too).

Errors: bad bytes from the peer raise a `RemoteProtocolError` subclass from `next_event()`, and the
connection stays in Phase.ERROR (further bytes are discarded, next_event() raises the same error again).
An illegal `send()` raises a `LocalProtocolError` subclass *before* any state changes, so the caller may
recover. After `ConnectionClosed` nothing can be sent.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import KeysView, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Final, Literal, TypeAlias

from emulator.usbip.codec import (
    DEFAULT_LIMITS,
    READERS,
    RET_SUBMIT_COMMAND,
    RET_SUBMIT_LAYOUT,
    Limits,
    PlainRet,
    PlainSubmit,
    cmd_submit_header,
    message_name,
    pack_iov,
    peek_message_type,
    read_plain_cmd_submit,
    read_ret_submit_header,
    ret_submit_header,
)
from emulator.usbip.constants import ECONNRESET, ST_OK, USBIP_DIR_IN, USBIP_DIR_OUT, USBIP_HEADER_SIZE
from emulator.usbip.errors import (
    LocalFieldError,
    LocalLengthMismatchError,
    LocalPhaseError,
    LocalSeqnumError,
    RemoteFieldError,
    RemoteLengthMismatchError,
    RemotePhaseError,
    RemoteProtocolError,
    RemoteSeqnumError,
    TruncatedMessageError,
    UnlinkedUrbError,
)
from emulator.usbip.messages import (
    CmdSubmit,
    CmdUnlink,
    Message,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    UsbDevice,
)

logger = logging.getLogger(__name__)

_SEQNUM_MAX: Final = 0xFFFFFFFF
_ROOM: Final = 1 << 16
"""Free bytes `get_buffer()` offers at least (when the caller's size hint is smaller or none)."""


class Phase(Enum):
    """Where a connection stands."""

    OP = "OP"
    """Before the one operation request (OP_REQ_DEVLIST or OP_REQ_IMPORT)."""
    OP_REPLY = "OP_REPLY"
    """The request was made; its reply is due."""
    URB = "URB"
    """The device is imported: URB traffic until the peer closes."""
    DONE = "DONE"
    """The operation ended without an import (devlist, failed import): close the connection."""
    CLOSED = "CLOSED"
    """The peer closed the stream at a message boundary (ConnectionClosed was returned)."""
    ERROR = "ERROR"
    """The peer broke the protocol."""


# The phases the hot path tests, as module names: `Phase.URB` goes through EnumType.__getattr__ on Python
# 3.11 (ten times the cost of a global), and these tests run for every message.
_URB: Final = Phase.URB
_NO_SETUP: Final = bytes(8)
_DIR_IN: Final = int(USBIP_DIR_IN)
_DIR_OUT: Final = int(USBIP_DIR_OUT)
_CLOSED: Final = Phase.CLOSED


class _Marker(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = _Marker.NEED_DATA
"""`next_event()` needs more bytes (call `receive_data`) or, on a server, its operation reply sent first."""
NeedData: TypeAlias = Literal[_Marker.NEED_DATA]


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream cleanly, between two messages."""


Event: TypeAlias = Message | ConnectionClosed

# An outstanding CMD_SUBMIT, reduced to what answering it needs: (direction, transfer_buffer_length,
# number_of_packets). A tuple rather than the message: the OUT payload need not stay alive.
_Urb: TypeAlias = tuple[int, int, int]


class _Direct:
    """A RET_SUBMIT whose IN payload is being read straight into its URB's `into` view (the client's
    `get_buffer`): its header as received, its plain tuple, how much of the payload is in, and the stream
    offset where it began (for errors)."""

    __slots__ = ("base", "got", "header", "into", "length", "plain")

    def __init__(self, header: bytes, plain: PlainRet, into: memoryview, got: int, base: int) -> None:
        self.header = header
        self.plain = plain
        self.into = into
        self.got = got
        self.length = plain[2]
        self.base = base


class _Connection:
    """What both sides share: the receive buffer, EOF, phases, error state."""

    _role: str = ""
    _peer: str = ""

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits: Final = limits
        # Received bytes live in _buf[_start:_end]; the rest of _buf is room for the next read. Consuming a
        # message advances _start (no bytes move); the unconsumed tail moves to the front only when the room
        # runs out. _view is memoryview(_buf)[:_end] for the readers, rebuilt when _buf or _end changes.
        self._buf = bytearray()
        self._start = 0
        self._end = 0
        self._view: memoryview | None = None
        self._base = 0  # stream offset of _buf[_start]
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._phase = Phase.OP
        self._expect: tuple[type[Message], ...] | None = ()
        self._request: OpReqDevlist | OpReqImport | None = None
        self._devid: int | None = None
        self._submits: dict[int, _Urb] = {}
        self._unlinking: dict[int, int] = {}  # target seqnum -> seqnum of the CMD_UNLINK that cancels it
        self._unlinks: dict[int, int] = {}  # CMD_UNLINK seqnum -> target seqnum, until its RET_UNLINK
        self._direction_hook = self._direction_of  # bound once, not per message
        self._debug = logger.isEnabledFor(logging.DEBUG)  # for the plain-submit path: looked up per batch
        self._set_phase(Phase.OP)

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._phase

    @property
    def devid(self) -> int | None:
        """The imported device's devid ((busnum << 16) | devnum) once the import succeeded."""
        return self._devid

    @property
    def pending_seqnums(self) -> KeysView[int]:
        """Seqnums of CMD_SUBMITs not answered yet (live view; includes URBs being unlinked)."""
        return self._submits.keys()

    @property
    def unlinked_seqnums(self) -> Mapping[int, int]:
        """Pending URBs a CMD_UNLINK targets: URB seqnum -> CMD_UNLINK seqnum (live, read-only)."""
        return MappingProxyType(self._unlinking)

    @property
    def pending_unlinks(self) -> Mapping[int, int]:
        """CMD_UNLINKs not answered yet: CMD_UNLINK seqnum -> target URB seqnum (live, read-only)."""
        return MappingProxyType(self._unlinks)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not consumed, and whether the peer closed (h11's name and meaning)."""
        return bytes(self._buf[self._start : self._end]), self._eof

    def _set_phase(self, phase: Phase) -> None:
        self._phase = phase
        self._expect = self._expectations(phase)

    def _expectations(self, phase: Phase) -> tuple[type[Message], ...] | None:
        """Message types the peer may send in `phase`; None: pause until our own reply is sent."""
        raise NotImplementedError

    # -- receiving -----------------------------------------------------------------------------------------

    def _urb_view(self) -> memoryview | None:
        """What has been received, as a view, when a whole USB/IP header may be in it during the URB phase
        (the per-URB fast paths start here); None at the end of a batch."""
        if self._phase is not _URB or self._end - self._start < USBIP_HEADER_SIZE:
            return None
        view = self._view
        if view is None:
            view = self._view = memoryview(self._buf)[: self._end]
        return view

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer; `b""` means the peer closed its side."""
        if self._error is not None:
            return  # the connection is dead; next_event() keeps raising the error
        if self._eof:
            if data:
                raise LocalPhaseError(f"receive_data() got {len(data)} bytes after the end of the stream")
            return
        self._debug = logger.isEnabledFor(logging.DEBUG)
        if data:
            if type(data) is memoryview and (data.format != "B" or not data.c_contiguous):
                data = data.tobytes()
            size = len(data)
            end = self._end
            if len(self._buf) - end < size:
                self._make_room(size)
                end = self._end
            self._buf[end : end + size] = data
            self._end = end + size
            self._view = None
        else:
            self._eof = True

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to read the peer's next bytes into (at least `sizehint` bytes, or 64 KiB), for
        `socket.recv_into` or an `asyncio.BufferedProtocol`; report what was read with `buffer_updated`.
        Unlike `receive_data` this copies nothing. Drop the view before the next `get_buffer`."""
        want = sizehint if sizehint > 0 else _ROOM
        if len(self._buf) - self._end < want:
            self._make_room(want)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` bytes were read into the last `get_buffer()` view (0 means the peer closed, as
        `receive_data(b"")`)."""
        if self._error is not None:
            return
        if nbytes <= 0:
            self.receive_data(b"")
            return
        if self._eof:
            raise LocalPhaseError(f"buffer_updated() got {nbytes} bytes after the end of the stream")
        if self._end + nbytes > len(self._buf):
            raise ValueError(
                f"buffer_updated({nbytes}): the get_buffer() view holds {len(self._buf) - self._end}"
            )
        self._debug = logger.isEnabledFor(logging.DEBUG)
        self._end += nbytes
        self._view = None

    def _make_room(self, want: int) -> None:
        """Move the unconsumed bytes to the front of a buffer with at least `want` bytes free after them.
        In place when they fit and do not overlap their new place (equal-size slice assignment, allowed
        while views of the buffer are alive); else into a new, bigger buffer."""
        buf, start, end = self._buf, self._start, self._end
        kept = end - start
        if kept + want <= len(buf) and kept <= start:
            if kept:
                with memoryview(buf) as whole:
                    buf[:kept] = whole[start:end]
        else:
            new = bytearray(max(2 * len(buf), kept + want))
            if kept:
                with memoryview(buf) as whole:
                    new[:kept] = whole[start:end]
            self._buf = new
        self._start = 0
        self._end = kept
        self._view = None

    def next_event(self) -> Event | NeedData:
        """The next complete event from the peer, NEED_DATA, or ConnectionClosed once the peer has closed."""
        if self._error is not None:
            raise self._error
        start = self._start
        end = self._end
        if start == end:
            if self._phase is _CLOSED:
                return ConnectionClosed()
            if not self._eof:
                return NEED_DATA  # the usual end of a batch
            self._set_phase(Phase.CLOSED)
            return ConnectionClosed()
        expect = self._expect
        if expect is None:
            return NEED_DATA  # our reply to the operation is due first
        base = self._base
        buf = self._view
        if buf is None:
            buf = self._view = memoryview(self._buf)[:end]
        try:  # one function, not two: this runs once per message
            if not expect:
                raise self._nothing_expected(base)
            message_type = peek_message_type(buf, start, base, urb_phase=self._phase is _URB)
            if message_type is None:
                need = 4
            elif message_type not in expect:
                raise self._unexpected(message_type, expect, base)
            else:
                result = READERS[message_type](buf, start, base, self.limits, self._direction_hook)
                if type(result) is tuple:
                    message, consumed = result
                    self._start = start + consumed
                    self._base = base + consumed
                    self._received(message, base)
                    if logger.isEnabledFor(logging.DEBUG):
                        logger.debug("%s received %r", self._role, message)
                    return message
                assert isinstance(result, int)
                need = result
            if self._eof:
                what = message_name(message_type) if message_type is not None else "a message"
                have = end - start
                raise TruncatedMessageError(
                    f"the {self._peer} closed the connection {have} bytes into {what} that needs at least "
                    f"{need} (stream offset {base + have})",
                    offset=base + have,
                )
            return NEED_DATA
        except RemoteProtocolError as error:
            self._error = error
            self._set_phase(Phase.ERROR)
            raise

    def _direction_of(self, seqnum: int) -> int:
        raise NotImplementedError

    def _received(self, message: Message, base: int) -> None:
        raise NotImplementedError

    def _nothing_expected(self, base: int) -> RemotePhaseError:
        if self._phase is Phase.DONE:
            why = "after the operation ended (usbipd serves one operation per connection)"
        else:
            why = "before any request was sent"
        return RemotePhaseError(
            f"the {self._peer} sent {self._end - self._start} bytes {why} (stream offset {base})", offset=base
        )

    def _unexpected(
        self, message_type: type[Message], expect: tuple[type[Message], ...], base: int
    ) -> RemotePhaseError:
        wanted = " or ".join(message_name(t) for t in expect)
        return RemotePhaseError(
            f"{message_name(message_type)} from the {self._peer} is not allowed in phase {self._phase.value}: "
            f"expected {wanted} (stream offset {base})",
            offset=base,
        )

    # -- sending -------------------------------------------------------------------------------------------

    def _check_can_send(self, message: Message, phases: tuple[Phase, ...]) -> None:
        phase = self._phase
        if phase in phases:
            return
        name = message_name(type(message))
        if phase is Phase.ERROR:
            raise LocalPhaseError(f"cannot send {name}: the connection failed: {self._error}")
        if phase is Phase.CLOSED:
            raise LocalPhaseError(f"cannot send {name}: the {self._peer} closed the connection")
        raise LocalPhaseError(f"cannot send {name} in phase {phase.value}")

    def _log_sent(self, message: Message) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s sent %r", self._role, message)

    def _check_outstanding(self, seqnum: int, name: str, base: int | None) -> None:
        """A new CMD's seqnum must not be one still outstanding (a CMD_SUBMIT or CMD_UNLINK)."""
        if seqnum in self._submits or seqnum in self._unlinks:
            what = "USBIP_CMD_SUBMIT" if seqnum in self._submits else "USBIP_CMD_UNLINK"
            text = f"{name} reuses seqnum {seqnum}, still outstanding for a {what}"
            if base is None:
                raise LocalSeqnumError(text, field="seqnum", seqnum=seqnum)
            raise RemoteSeqnumError(
                f"{text} (stream offset {base + 4})", field="seqnum", offset=base + 4, seqnum=seqnum
            )

    def _check_devid(self, devid: int, seqnum: int, name: str, base: int | None) -> None:
        if devid == self._devid:
            return
        text = f"{name} seqnum {seqnum}: devid {devid:#x} is not the imported device's {self._devid:#x}"
        if base is None:
            raise LocalFieldError(f"{text} (field devid)", field="devid", seqnum=seqnum)
        # stub_rx.c valid_request() drops the connection for a foreign devid.
        raise RemoteFieldError(
            f"{text} (field devid, stream offset {base + 8})", field="devid", offset=base + 8, seqnum=seqnum
        )


def _check_ret_against_cmd(ret: RetSubmit, urb: _Urb, base: int | None) -> None:
    """A RET_SUBMIT must fit its CMD_SUBMIT: buffer by direction, length, iso packet count."""
    direction, transfer_buffer_length, number_of_packets = urb
    actual_length = ret.actual_length
    if (  # the usual non-iso answer, which passes every check below: say so in one test
        number_of_packets <= 0
        and (ret.number_of_packets == 0 or ret.number_of_packets == -1)
        and actual_length <= transfer_buffer_length
        and (
            len(ret.transfer_buffer) == actual_length
            if direction == USBIP_DIR_IN
            else not ret.transfer_buffer
        )
    ):
        return
    seqnum = ret.seqnum
    problem: str | None = None
    field = ""
    rel = 0
    mismatch = True
    if direction == USBIP_DIR_IN:
        if len(ret.transfer_buffer) != ret.actual_length:
            problem = (
                f"an IN URB's transfer_buffer must hold actual_length {ret.actual_length} bytes, "
                f"holds {len(ret.transfer_buffer)}"
            )
            field, rel = "transfer_buffer", 48
    elif ret.transfer_buffer:
        problem = f"an OUT URB's RET_SUBMIT carries no data, got {len(ret.transfer_buffer)} bytes"
        field, rel = "transfer_buffer", 48
    if problem is None and ret.actual_length > transfer_buffer_length:
        problem = (
            f"actual_length {ret.actual_length} exceeds the CMD_SUBMIT's transfer_buffer_length "
            f"{transfer_buffer_length}"
        )
        field, rel = "actual_length", 24
    if problem is None:
        ret_packets = ret.number_of_packets
        if number_of_packets > 0:
            if not 0 <= ret_packets <= number_of_packets:
                problem = (
                    f"number_of_packets {ret_packets} for an iso URB of {number_of_packets} packets "
                    f"(must be 0..{number_of_packets})"
                )
        elif ret_packets not in (0, -1):
            problem = f"number_of_packets {ret_packets} for a non-iso URB (must be 0 or -1)"
        field, rel, mismatch = "number_of_packets", 32, False
    if problem is None:
        return
    text = f"USBIP_RET_SUBMIT seqnum {seqnum}: {problem} (field {field}"
    if base is None:
        cls_local = LocalLengthMismatchError if mismatch else LocalFieldError
        raise cls_local(f"{text})", field=field, seqnum=seqnum)
    cls_remote = RemoteLengthMismatchError if mismatch else RemoteFieldError
    raise cls_remote(f"{text}, stream offset {base + rel})", field=field, offset=base + rel, seqnum=seqnum)


class ServerConnection(_Connection):
    """The exporting side: answers one operation, then (after a successful import) the URB traffic."""

    _role = "server"
    _peer = "client"

    def _expectations(self, phase: Phase) -> tuple[type[Message], ...] | None:
        if phase is Phase.OP:
            return (OpReqDevlist, OpReqImport)
        if phase is Phase.OP_REPLY:
            return None
        if phase is Phase.URB:
            return (CmdSubmit, CmdUnlink)
        return ()

    def _direction_of(self, seqnum: int) -> int:  # pragma: no cover - a server never reads RET_SUBMIT
        raise AssertionError("a server does not receive USBIP_RET_SUBMIT")

    def _received(self, message: Message, base: int) -> None:
        message_type = type(message)
        if type(message) is CmdSubmit:  # `type(...) is` narrows for mypy: no isinstance per URB
            seqnum = message.seqnum
            if message.devid != self._devid:
                self._check_devid(message.devid, seqnum, "USBIP_CMD_SUBMIT", base)
            if seqnum in self._submits or seqnum in self._unlinks:
                self._check_outstanding(seqnum, "USBIP_CMD_SUBMIT", base)
            self._submits[seqnum] = (
                message.direction,
                message.transfer_buffer_length,
                message.number_of_packets,
            )
        elif message_type is CmdUnlink:
            assert isinstance(message, CmdUnlink)
            seqnum, target = message.seqnum, message.unlink_seqnum
            self._check_devid(message.devid, seqnum, "USBIP_CMD_UNLINK", base)
            self._check_outstanding(seqnum, "USBIP_CMD_UNLINK", base)
            self._unlinks[seqnum] = target
            if target in self._submits and target not in self._unlinking:
                self._unlinking[target] = seqnum
        elif message_type is OpReqDevlist or message_type is OpReqImport:
            assert isinstance(message, OpReqDevlist | OpReqImport)
            self._request = message
            self._set_phase(Phase.OP_REPLY)

    def next_plain_submit(self) -> PlainSubmit | None:
        """The next event if it is a plain CMD_SUBMIT — non-isochronous, to an endpoint other than ep0,
        whole, and passing every check `next_event()` makes — as a tuple (`codec.PlainSubmit`) instead of
        a message object, for a server's per-URB path. Otherwise None and nothing is consumed: call
        `next_event()`, which returns the event, NEED_DATA, or raises the error. Answer it with
        `complete_plain` (or `complete_iov`): the URB is outstanding as any other."""
        view = self._urb_view()
        if view is None:
            return None
        start = self._start
        found = read_plain_cmd_submit(view, self.limits, start)
        if found is None:
            return None
        submit, consumed = found
        seqnum = submit[0]
        if (
            submit[1] != self._devid
            or seqnum in self._submits
            or seqnum in self._unlinks
            or self._debug  # next_event() logs each message
        ):
            return None
        self._start = start + consumed
        self._base += consumed
        self._submits[seqnum] = (submit[2], submit[5], 0)
        return submit

    def complete_plain(
        self, seqnum: int, status: int, actual_length: int, transfer_buffer: bytes = b""
    ) -> list[bytes]:
        """`complete_iov(RetSubmit(seqnum=seqnum, status=status, actual_length=actual_length,
        transfer_buffer=transfer_buffer))` — the same bytes, checks and unlink handling — without the
        message object when nothing is unusual (the URB is pending, not unlinked, the lengths fit)."""
        urb = self._submits.get(seqnum)
        if urb is not None and self._phase is _URB and seqnum not in self._unlinking:
            direction, transfer_buffer_length, number_of_packets = urb
            if (
                number_of_packets <= 0
                and 0 <= actual_length <= transfer_buffer_length
                and (
                    len(transfer_buffer) == actual_length
                    if direction == USBIP_DIR_IN
                    else not transfer_buffer
                )
                and not self._debug  # complete_iov() logs each message
            ):
                try:
                    header = ret_submit_header(seqnum, status, actual_length)
                except struct.error:
                    pass  # a status the wire cannot carry: complete_iov names it
                else:
                    del self._submits[seqnum]
                    return [header, transfer_buffer] if transfer_buffer else [header]
        return self.complete_iov(
            RetSubmit(
                seqnum=seqnum, status=status, actual_length=actual_length, transfer_buffer=transfer_buffer
            )
        )

    # -- sending -------------------------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Bytes for `message`; raises a LocalProtocolError (and changes nothing) if it is illegal now."""
        return b"".join(self.send_iov(message))

    def send_iov(self, message: Message) -> list[bytes]:
        """Like `send`, as buffers to write in order (`socket.sendmsg`): a transfer buffer is not copied."""
        message_type = type(message)
        if message_type is RetSubmit:
            assert isinstance(message, RetSubmit)
            data = self._send_ret_submit(message)
        elif message_type is RetUnlink:
            assert isinstance(message, RetUnlink)
            data = self._send_ret_unlink(message)
        elif message_type is OpRepImport or message_type is OpRepDevlist:
            assert isinstance(message, OpRepImport | OpRepDevlist)
            data = self._send_op_reply(message)
        elif message_type in (CmdSubmit, CmdUnlink, OpReqDevlist, OpReqImport):
            raise LocalPhaseError(f"a server does not send {message_name(message_type)}")
        else:
            raise TypeError(f"{message_type.__name__} is not a USB/IP message")
        self._log_sent(message)
        return data

    def _send_op_reply(self, message: OpRepImport | OpRepDevlist) -> list[bytes]:
        self._check_can_send(message, (Phase.OP_REPLY,))
        request = self._request
        assert request is not None
        wanted = OpRepDevlist if isinstance(request, OpReqDevlist) else OpRepImport
        if type(message) is not wanted:
            raise LocalPhaseError(
                f"{message_name(type(message))} does not answer "
                f"{message_name(type(request))}: send {message_name(wanted)}"
            )
        data = pack_iov(message)
        if isinstance(message, OpRepImport) and message.status == ST_OK:
            assert message.udev is not None
            self._devid = message.udev.devid
            self._set_phase(Phase.URB)
        else:
            self._set_phase(Phase.DONE)
        return data

    def _send_ret_submit(self, ret: RetSubmit) -> list[bytes]:
        if self._phase is not _URB:
            self._check_can_send(ret, (Phase.URB,))
        seqnum = ret.seqnum
        urb = self._submits.get(seqnum)
        if urb is None:
            raise LocalSeqnumError(
                f"USBIP_RET_SUBMIT seqnum {seqnum}: no USBIP_CMD_SUBMIT with this seqnum is pending",
                field="seqnum",
                seqnum=seqnum,
            )
        unlink_seqnum = self._unlinking.get(seqnum)
        if unlink_seqnum is not None:
            raise UnlinkedUrbError(
                f"USBIP_RET_SUBMIT seqnum {seqnum}: the URB was unlinked by USBIP_CMD_UNLINK seqnum "
                f"{unlink_seqnum}; answer that with USBIP_RET_UNLINK (status -ECONNRESET, or the URB's status) "
                "and send no RET_SUBMIT, or use complete()",
                field="seqnum",
                seqnum=seqnum,
            )
        _check_ret_against_cmd(ret, urb, None)
        data = pack_iov(ret)
        del self._submits[seqnum]
        return data

    def _send_ret_unlink(self, ret: RetUnlink) -> list[bytes]:
        self._check_can_send(ret, (Phase.URB,))
        seqnum = ret.seqnum
        target = self._unlinks.get(seqnum)
        if target is None:
            raise LocalSeqnumError(
                f"USBIP_RET_UNLINK seqnum {seqnum}: no USBIP_CMD_UNLINK with this seqnum is pending",
                field="seqnum",
                seqnum=seqnum,
            )
        cancels = self._unlinking.get(target) == seqnum
        if not cancels and ret.status != 0:
            raise LocalFieldError(
                f"USBIP_RET_UNLINK seqnum {seqnum}: URB {target} was not pending when the unlink arrived, so "
                f"status must be 0 (stub_rx.c), not {ret.status} (field status)",
                field="status",
                seqnum=seqnum,
            )
        data = pack_iov(ret)
        del self._unlinks[seqnum]
        if cancels:
            del self._unlinking[target]
            del self._submits[target]
        return data

    # -- helpers -------------------------------------------------------------------------------------------

    def ret_unlink_for(self, unlink_seqnum: int) -> RetUnlink:
        """The RET_UNLINK due for CMD_UNLINK `unlink_seqnum`: -ECONNRESET if it cancels a pending URB, else 0."""
        target = self._unlinks.get(unlink_seqnum)
        if target is None:
            raise LocalSeqnumError(
                f"no USBIP_CMD_UNLINK with seqnum {unlink_seqnum} is pending",
                field="seqnum",
                seqnum=unlink_seqnum,
            )
        cancels = self._unlinking.get(target) == unlink_seqnum
        return RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET if cancels else 0)

    def complete(self, ret: RetSubmit) -> bytes:
        """`complete_iov`, joined."""
        return b"".join(self.complete_iov(ret))

    def complete_iov(self, ret: RetSubmit) -> list[bytes]:
        """Finish URB `ret.seqnum` as stub_complete() does: its RET_SUBMIT, or, if the client unlinked it
        meanwhile, the due RET_UNLINK carrying `ret.status` (and no RET_SUBMIT)."""
        unlink_seqnum = self._unlinking.get(ret.seqnum)
        if unlink_seqnum is None:
            if type(ret) is not RetSubmit:
                return self.send_iov(ret)  # which says what is wrong with it
            data = self._send_ret_submit(ret)  # send_iov's branch for a RetSubmit, once per URB
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("%s sent %r", self._role, ret)
            return data
        return self.send_iov(RetUnlink(seqnum=unlink_seqnum, status=ret.status))


class ClientConnection(_Connection):
    """The importing side: asks for the device list or one import, then submits and unlinks URBs."""

    _role = "client"
    _peer = "server"

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        super().__init__(limits=limits)
        self._imported: UsbDevice | None = None
        self._last_seqnum = 0
        self._into: dict[int, memoryview] = {}  # IN URB seqnum -> where next_plain_ret puts its data
        self._direct: _Direct | None = None  # the RET_SUBMIT whose payload is being read into its `into`

    def _expectations(self, phase: Phase) -> tuple[type[Message], ...] | None:
        if phase is Phase.OP_REPLY:
            return (OpRepDevlist,) if isinstance(self._request, OpReqDevlist) else (OpRepImport,)
        if phase is Phase.URB:
            return (RetSubmit, RetUnlink)
        return ()

    @property
    def imported_device(self) -> UsbDevice | None:
        """The device OP_REP_IMPORT described, once imported."""
        return self._imported

    def next_seqnum(self) -> int:
        """A fresh seqnum (1, 2, ... wrapping past 0xffffffff, skipping 0 and outstanding ones), as vhci counts."""
        seqnum = self._last_seqnum
        while True:
            seqnum = seqnum % _SEQNUM_MAX + 1
            if seqnum not in self._submits and seqnum not in self._unlinks:
                self._last_seqnum = seqnum
                return seqnum

    def _direction_of(self, seqnum: int) -> int:
        urb = self._submits.get(seqnum)
        if urb is None:
            base = self._base
            raise RemoteSeqnumError(
                f"USBIP_RET_SUBMIT seqnum {seqnum}: no USBIP_CMD_SUBMIT with this seqnum is pending (stream "
                f"offset {base + 4})",
                field="seqnum",
                offset=base + 4,
                seqnum=seqnum,
            )
        return urb[0]

    # -- IN payloads straight into the caller's buffer ------------------------------------------------------

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes received but not consumed, and whether the peer closed (h11's name and meaning)."""
        direct = self._direct
        if direct is None:
            return super().trailing_data
        head = direct.header + bytes(direct.into[: direct.got]) if direct.got < direct.length else b""
        return head + bytes(self._buf[self._start : self._end]), self._eof

    @property
    def reading_into(self) -> bool:
        """Whether a URB submitted with `into` is pending: its payload goes to `into` when read with
        `get_buffer`/`get_buffers`, so an edge should read little at a time past a header (`get_buffers`)."""
        return bool(self._into) or self._direct is not None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        direct = self._direct
        if direct is not None and data and direct.got < direct.length and not self._eof and self._error is None:
            if type(data) is memoryview and (data.format != "B" or not data.c_contiguous):
                data = data.tobytes()
            took = min(len(data), direct.length - direct.got)
            direct.into[direct.got : direct.got + took] = data[:took]
            direct.got += took
            data = data[took:]
            if not data:
                return
        super().receive_data(data)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the server's next bytes go (see `_Connection.get_buffer`). While the IN payload of a URB
        submitted with `into` is arriving (its RET_SUBMIT header in, its data not yet whole), that is the
        missing part of `into`: the payload is read where the caller wants it and never copied."""
        direct = self._incoming()
        if direct is not None:
            return direct.into[direct.got : direct.length]
        return super().get_buffer(sizehint)

    def get_buffers(self, limit: int = _ROOM) -> list[memoryview]:
        """`get_buffer` for one scatter read (`os.readv`, `socket.recvmsg_into`): the missing part of a
        payload arriving into `into`, then `limit` bytes of the receive buffer for what follows it; else the
        receive buffer's free space, only `limit` bytes of it while a URB with `into` is pending (so that
        little of its payload lands in the receive buffer before its header is read). Report the total read
        with `buffer_updated`."""
        direct = self._direct
        if direct is None or direct.got >= direct.length:  # (_incoming's own first test, inline)
            direct = self._incoming()
        if direct is not None:
            return [direct.into[direct.got : direct.length], super().get_buffer(limit)[:limit]]
        view = super().get_buffer(limit)
        return [view[:limit] if self._into else view]

    def buffer_updated(self, nbytes: int) -> None:
        direct = self._direct
        if direct is not None and nbytes > 0 and direct.got < direct.length and not self._eof and self._error is None:
            took = min(nbytes, direct.length - direct.got)
            direct.got += took
            if took == nbytes:
                return
            nbytes -= took  # the rest went to the receive buffer's view after the payload's
        super().buffer_updated(nbytes)

    def _incoming(self) -> _Direct | None:
        """The RET_SUBMIT whose payload the next bytes belong to, if it goes to an `into`; starts one when the
        receive buffer holds such a header and only part of its payload."""
        direct = self._direct
        if direct is not None:
            return direct if direct.got < direct.length else None
        if not self._into or self._eof or self._error is not None:
            return None
        view = self._urb_view()
        if view is None:
            return None
        start = self._start
        header = read_ret_submit_header(view, start)
        if header is None:
            return None
        seqnum, _, actual_length, _, number_of_packets, _ = header
        if self._end - start - USBIP_HEADER_SIZE >= actual_length:
            return None  # the whole message is in: next_plain_ret copies it
        into = self._into.get(seqnum)
        urb = self._submits.get(seqnum)
        if (  # what next_plain_ret would take, and nothing else
            into is None
            or urb is None
            or urb[0] != _DIR_IN
            or urb[2] > 0
            or not (number_of_packets == 0 or number_of_packets == -1)
            or actual_length > urb[1]
            or actual_length > self.limits.max_transfer_buffer_length
            or seqnum in self._unlinking
        ):
            return None
        del self._into[seqnum]
        return self._read_into(view, start, header, into)

    def _read_into(
        self, view: memoryview, start: int, header: tuple[int, int, int, int, int, int], into: memoryview
    ) -> _Direct:
        """Go on with the RET_SUBMIT at `start`, whose header is checked and whose payload is partly in, by
        reading the rest of its payload into `into`: what is in moves there, the receive buffer is empty."""
        seqnum, status, actual_length, start_frame, _, error_count = header
        payload = start + USBIP_HEADER_SIZE
        have = self._end - payload
        if have:
            into[:have] = view[payload : self._end]
        direct = self._direct = _Direct(
            bytes(view[start:payload]), (seqnum, status, actual_length, start_frame, error_count, b""), into, have,
            self._base,
        )
        self._base += USBIP_HEADER_SIZE + actual_length  # the receive buffer now starts after the payload
        self._start = self._end = 0
        self._view = None
        return direct

    def next_event(self) -> Event | NeedData:
        if self._direct is not None and self._error is None:
            return self._direct_event()
        return super().next_event()

    def _direct_event(self) -> RetSubmit | NeedData:
        """The message path's answer for a RET_SUBMIT read into `into`: the same RetSubmit (decoded from the
        same bytes, the data in `into` too), the same checks and errors."""
        direct = self._direct
        assert direct is not None
        if direct.got < direct.length:
            if not self._eof:
                return NEED_DATA
            have = USBIP_HEADER_SIZE + direct.got
            error = TruncatedMessageError(
                f"the {self._peer} closed the connection {have} bytes into {message_name(RetSubmit)} that needs "
                f"at least {USBIP_HEADER_SIZE + direct.length} (stream offset {direct.base + have})",
                offset=direct.base + have,
            )
            self._error = error
            self._set_phase(Phase.ERROR)
            raise error
        self._direct = None
        result = READERS[RetSubmit](
            direct.header + bytes(direct.into[: direct.length]), 0, direct.base, self.limits, self._direction_hook
        )
        assert type(result) is tuple
        message, _ = result
        assert type(message) is RetSubmit
        self._received(message, direct.base)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s received %r", self._role, message)
        return message

    def next_plain_ret(self) -> PlainRet | NeedData | None:
        """The next event if it is a plain RET_SUBMIT — the whole answer to a pending non-isochronous URB
        that is not being unlinked, passing every check `next_event()` makes — as a tuple
        (`codec.PlainRet`) instead of a message object, for a host's per-URB path. NEED_DATA where
        `next_event()` would return it too: nothing received, or a payload still arriving into `into`.
        Otherwise None and nothing is consumed: call `next_event()`, which returns the event, NEED_DATA, or
        raises the error."""
        direct = self._direct
        if direct is not None:  # a payload read into `into` (get_buffer): done once it is whole
            seqnum = direct.plain[0]
            if self._error is not None:
                return None
            if direct.got < direct.length:
                return None if self._eof else NEED_DATA
            if seqnum in self._unlinking or self._debug:
                return None
            self._direct = None
            del self._submits[seqnum]
            return direct.plain
        start = self._start
        end = self._end
        if self._phase is not _URB:
            return None
        if end - start < USBIP_HEADER_SIZE:  # (_urb_view and read_ret_submit_header, inline: once per URB)
            return NEED_DATA if start == end and not self._eof and self._error is None else None
        view = self._view
        if view is None:
            view = self._view = memoryview(self._buf)[:end]
        command, seqnum, _, _, _, status, actual_length, start_frame, number_of_packets, error_count = (
            RET_SUBMIT_LAYOUT.unpack_from(view, start)
        )
        if command != RET_SUBMIT_COMMAND:
            return None
        urb = self._submits.get(seqnum)
        if (
            urb is None
            or urb[2] > 0
            or not (number_of_packets == 0 or number_of_packets == -1)
            or not 0 <= actual_length <= urb[1]
            or actual_length > self.limits.max_transfer_buffer_length
            or seqnum in self._unlinking
            or self._debug  # next_event() logs each message
        ):
            return None
        transfer_buffer = b""
        into = self._into.pop(seqnum, None) if self._into else None
        if urb[0] == _DIR_IN and actual_length:
            total = USBIP_HEADER_SIZE + actual_length
            if end - start < total:
                if into is not None:  # the rest of its payload is read straight into `into`
                    header = (seqnum, status, actual_length, start_frame, number_of_packets, error_count)
                    self._read_into(view, start, header, into)
                return None if self._eof else NEED_DATA  # next_event() would wait for the payload too
            # (a slice released as soon as it is used: CPython frees it at once, `with` would cost more)
            if into is not None:
                into[:actual_length] = view[start + USBIP_HEADER_SIZE : start + total]
            else:
                transfer_buffer = view[start + USBIP_HEADER_SIZE : start + total].tobytes()
        else:
            total = USBIP_HEADER_SIZE
        self._start = start + total
        self._base += total
        del self._submits[seqnum]
        return seqnum, status, actual_length, start_frame, error_count, transfer_buffer

    def _received(self, message: Message, base: int) -> None:
        message_type = type(message)
        if type(message) is RetSubmit:  # `type(...) is` narrows for mypy: no isinstance per URB
            seqnum = message.seqnum
            _check_ret_against_cmd(message, self._submits[seqnum], base)
            del self._submits[seqnum]
            if self._into:
                self._into.pop(seqnum, None)
            # A RET_SUBMIT overtaking the RET_UNLINK of its URB: the unlink stays pending, cancels nothing.
            self._unlinking.pop(seqnum, None)
        elif message_type is RetUnlink:
            assert isinstance(message, RetUnlink)
            seqnum = message.seqnum
            target = self._unlinks.pop(seqnum, None)
            if target is None:
                raise RemoteSeqnumError(
                    f"USBIP_RET_UNLINK seqnum {seqnum}: no USBIP_CMD_UNLINK with this seqnum is pending "
                    f"(stream offset {base + 4})",
                    field="seqnum",
                    offset=base + 4,
                    seqnum=seqnum,
                )
            if self._unlinking.get(target) == seqnum:
                del self._unlinking[target]
                del self._submits[target]
                if self._into:
                    self._into.pop(target, None)
        elif message_type is OpRepImport:
            assert isinstance(message, OpRepImport) and isinstance(self._request, OpReqImport)
            if message.status != ST_OK:
                self._set_phase(Phase.DONE)
                return
            assert message.udev is not None
            if message.udev.busid != self._request.busid:
                # usbip_attach.c query_import_device(): "recv different busid".
                raise RemoteFieldError(
                    f"OP_REP_IMPORT describes busid {message.udev.busid!r}, but {self._request.busid!r} was "
                    f"requested (field udev.busid, stream offset {base + 8 + 256})",
                    field="busid",
                    offset=base + 8 + 256,
                )
            self._imported = message.udev
            self._devid = message.udev.devid
            self._set_phase(Phase.URB)
        elif message_type is OpRepDevlist:
            self._set_phase(Phase.DONE)

    # -- sending -------------------------------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Bytes for `message`; raises a LocalProtocolError (and changes nothing) if it is illegal now."""
        return b"".join(self.send_iov(message))

    def send_iov(self, message: Message) -> list[bytes]:
        """Like `send`, as buffers to write in order (`socket.sendmsg`): a transfer buffer is not copied."""
        message_type = type(message)
        if message_type is CmdSubmit:
            assert isinstance(message, CmdSubmit)
            data = self._send_cmd_submit(message)
        elif message_type is CmdUnlink:
            assert isinstance(message, CmdUnlink)
            data = self._send_cmd_unlink(message)
        elif message_type is OpReqImport or message_type is OpReqDevlist:
            assert isinstance(message, OpReqImport | OpReqDevlist)
            self._check_can_send(message, (Phase.OP,))
            data = pack_iov(message)
            self._request = message
            self._set_phase(Phase.OP_REPLY)
        elif message_type in (RetSubmit, RetUnlink, OpRepDevlist, OpRepImport):
            raise LocalPhaseError(f"a client does not send {message_name(message_type)}")
        else:
            raise TypeError(f"{message_type.__name__} is not a USB/IP message")
        self._log_sent(message)
        return data

    def submit_plain(
        self,
        seqnum: int,
        devid: int,
        direction: int,
        ep: int,
        transfer_flags: int,
        transfer_buffer_length: int,
        transfer_buffer: bytes = b"",
        interval: int = 0,
        into: memoryview | None = None,
        setup: bytes = _NO_SETUP,
    ) -> list[bytes]:
        """`send_iov(CmdSubmit(...))` of a non-isochronous URB (start_frame 0; `setup`, 8 bytes, for a
        control URB) — the same bytes, checks and bookkeeping — without the message object when nothing is
        unusual (URB phase, the imported devid, a fresh seqnum, an endpoint 0-15, the lengths fit): a host's
        per-URB path. `into` (an IN URB's, at least transfer_buffer_length bytes, format "B"): where
        `next_plain_ret` copies the data (into[:actual_length]; its transfer_buffer is then b""), instead of
        into a new bytes object; `next_event` still returns a RetSubmit with the bytes."""
        if into is not None and (
            direction != _DIR_IN or len(into) < transfer_buffer_length or into.readonly or into.format != "B"
        ):
            raise ValueError("into: a writable byte view, as long as transfer_buffer_length, for an IN URB")
        if (
            self._phase is _URB
            and devid == self._devid
            and type(ep) is int
            and 0 <= ep <= 15
            and type(setup) is bytes
            and len(setup) == 8
            and seqnum not in self._submits
            and seqnum not in self._unlinks
            and (
                len(transfer_buffer) == transfer_buffer_length
                if direction == _DIR_OUT
                else direction == _DIR_IN and not transfer_buffer and transfer_buffer_length >= 0
            )
            and not self._debug  # send_iov() logs each message
        ):
            try:
                header = cmd_submit_header(
                    seqnum, devid, direction, ep, transfer_flags, transfer_buffer_length, interval, setup
                )
            except struct.error:
                pass  # a field out of range: send_iov names it
            else:
                self._submits[seqnum] = (direction, transfer_buffer_length, 0)
                if into is not None:
                    self._into[seqnum] = into
                return [header, transfer_buffer] if transfer_buffer else [header]
        data = self.send_iov(
            CmdSubmit(
                seqnum=seqnum,
                devid=devid,
                direction=direction,
                ep=ep,
                transfer_flags=transfer_flags,
                transfer_buffer_length=transfer_buffer_length,
                interval=interval,
                transfer_buffer=transfer_buffer,
                setup=setup,
            )
        )
        if into is not None:
            self._into[seqnum] = into
        return data

    def submit_plain_many(
        self,
        devid: int,
        urbs: Sequence[tuple[int, int, int, int, bytes, memoryview | None]],
        out: list[bytes],
        seqnums: list[int],
    ) -> None:
        """`submit_plain` for several URBs — each (direction, ep, transfer_flags, transfer_buffer_length,
        transfer_buffer, into), interval 0 — with a fresh seqnum each (`next_seqnum`), in order: the bytes go to
        the end of `out` and the seqnums to `seqnums` as each URB is accepted, so a refusal (raised as
        `submit_plain` raises it) leaves the earlier ones submitted and accounted for. A host's per-command
        path: one call for a Bulk-Only command's CBW, data and CSW (or a batch of commands)."""
        # submit_plain's shortcut and next_seqnum, inline: a pipelined READ runs this once per URB, and the
        # calls cost ~10K instructions per 64 KiB command (callgrind); anything unusual goes to submit_plain.
        fast = self._phase is _URB and devid == self._devid and not self._debug
        submits = self._submits
        unlinks = self._unlinks
        for direction, ep, transfer_flags, length, transfer_buffer, into in urbs:
            seqnum = self._last_seqnum % _SEQNUM_MAX + 1
            while seqnum in submits or seqnum in unlinks:
                seqnum = seqnum % _SEQNUM_MAX + 1
            self._last_seqnum = seqnum
            if (
                fast
                and type(ep) is int
                and 0 < ep <= 15
                and (
                    len(transfer_buffer) == length and into is None
                    if direction == _DIR_OUT
                    else direction == _DIR_IN
                    and not transfer_buffer
                    and length >= 0
                    and (into is None or (len(into) >= length and not into.readonly and into.format == "B"))
                )
            ):
                try:
                    header = cmd_submit_header(seqnum, devid, direction, ep, transfer_flags, length)
                except struct.error:
                    pass  # a field out of range: submit_plain names it
                else:
                    submits[seqnum] = (direction, length, 0)
                    if into is not None:
                        self._into[seqnum] = into
                    out.append(header)
                    if transfer_buffer:
                        out.append(transfer_buffer)
                    seqnums.append(seqnum)
                    continue
            out += self.submit_plain(seqnum, devid, direction, ep, transfer_flags, length, transfer_buffer, 0, into)
            seqnums.append(seqnum)

    def _send_cmd_submit(self, cmd: CmdSubmit) -> list[bytes]:
        if self._phase is not _URB:
            self._check_can_send(cmd, (Phase.URB,))
        seqnum = cmd.seqnum
        if cmd.devid != self._devid:
            self._check_devid(cmd.devid, seqnum, "USBIP_CMD_SUBMIT", None)
        if seqnum in self._submits or seqnum in self._unlinks:
            self._check_outstanding(seqnum, "USBIP_CMD_SUBMIT", None)
        data = pack_iov(cmd)
        self._submits[seqnum] = (cmd.direction, cmd.transfer_buffer_length, cmd.number_of_packets)
        return data

    def _send_cmd_unlink(self, cmd: CmdUnlink) -> list[bytes]:
        self._check_can_send(cmd, (Phase.URB,))
        seqnum, target = cmd.seqnum, cmd.unlink_seqnum
        self._check_devid(cmd.devid, seqnum, "USBIP_CMD_UNLINK", None)
        self._check_outstanding(seqnum, "USBIP_CMD_UNLINK", None)
        if target not in self._submits:
            raise LocalSeqnumError(
                f"USBIP_CMD_UNLINK seqnum {seqnum}: no USBIP_CMD_SUBMIT with seqnum {target} "
                "is pending (field unlink_seqnum)",
                field="unlink_seqnum",
                seqnum=seqnum,
            )
        if target in self._unlinking:
            raise LocalSeqnumError(
                f"USBIP_CMD_UNLINK seqnum {seqnum}: URB {target} is already being unlinked "
                f"by seqnum {self._unlinking[target]} (field unlink_seqnum)",
                field="unlink_seqnum",
                seqnum=seqnum,
            )
        data = pack_iov(cmd)
        self._unlinks[seqnum] = target
        self._unlinking[target] = seqnum
        return data


__all__ = [
    "NEED_DATA",
    "ClientConnection",
    "ConnectionClosed",
    "Event",
    "NeedData",
    "Phase",
    "ServerConnection",
]
