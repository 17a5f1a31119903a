"""Bytes <-> messages for USB/IP: `pack`, `unpack`, and the incremental readers the connections use.

This room knows the wire layout and nothing about conversations: it frames and validates one message at a
time (field ranges, payload lengths, caps), and leaves seqnum bookkeeping and phases to `connection.py`.

Layout (Documentation/usb/usbip_protocol.rst, usbip_common.h, usbip_network.h): all integers big-endian;
the 8-byte `setup` packet is copied through raw (it is little-endian inside, as USB defines it); `path` and
`busid` are NUL-terminated in fixed-size fields (bytes after the NUL are ignored on input, zero on output,
as the kernel tools read them with strncmp/strcpy); padding is written as zeros and ignored on input, as
the kernel does.

Framing rules the codec applies:
* An op message starts with version 0x0111 (checked) and a 16-bit code; a URB message with a 32-bit
  command 1..4, so its first two bytes are zero: that is how `unpack` tells them apart.
* CMD_SUBMIT carries `transfer_buffer_length` bytes when OUT, none when IN; RET_SUBMIT carries
  `actual_length` bytes when the *CMD_SUBMIT* was IN, none when OUT (the RET header's direction is 0 from
  the kernel, so the reader asks the caller, or `unpack` infers it from the length).
* Iso packet descriptors follow iff `number_of_packets` > 0; non-iso URBs carry 0 (Linux vhci/stub) or
  -1 (0xffffffff, the protocol document). For iso RET_SUBMIT the descriptors' actual_length must add up to
  `actual_length` (usbip_recv_iso checks the same).

Readers share one signature: `reader(buf, pos, base, limits, direction_of)` returns `(message, consumed)`
when `buf[pos:]` holds a whole message, or the number of bytes it needs at least (an `int`) when it does
not yet; `base` is the stream offset of `buf[pos]`, used only to say where an error is. Caps (`Limits`)
are checked as soon as the header announcing a length is in, before waiting for (or buffering) the
payload.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, Final, TypeAlias

from emulator.usbip.constants import (
    OP_COMMON_SIZE,
    SYSFS_BUS_ID_SIZE,
    SYSFS_PATH_MAX,
    USB_MAXINTERFACES,
    USBIP_CMD_SUBMIT,
    USBIP_CMD_UNLINK,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    USBIP_HEADER_SIZE,
    USBIP_ISO_PACKET_DESCRIPTOR_SIZE,
    USBIP_MAX_ISO_PACKETS,
    USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
    USBIP_USB_DEVICE_SIZE,
    USBIP_USB_INTERFACE_SIZE,
    USBIP_VERSION,
    OpCode,
)
from emulator.usbip.errors import (
    LimitExceededError,
    LocalFieldError,
    LocalLengthMismatchError,
    RemoteFieldError,
    RemoteLengthMismatchError,
    TrailingDataError,
    TruncatedMessageError,
    UnknownCommandError,
    VersionMismatchError,
)
from emulator.usbip.messages import (
    CmdSubmit,
    CmdUnlink,
    HeaderBasic,
    IsoPacketDescriptor,
    Message,
    OpDevlistReplyExtra,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    UsbDevice,
    UsbInterface,
)

Buffer: TypeAlias = bytes | bytearray | memoryview
DirectionOf: TypeAlias = Callable[[int], int]
"""Maps a RET_SUBMIT's seqnum to the direction of its CMD_SUBMIT (may raise a ProtocolError)."""
ReadResult: TypeAlias = tuple[Message, int] | int
Reader: TypeAlias = Callable[[Buffer, int, int, "Limits", DirectionOf | None], ReadResult]


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Caps on what a peer may make us allocate; anything above raises LimitExceededError up front."""

    max_transfer_buffer_length: int = 16 * 1024 * 1024
    """Largest transfer_buffer_length / actual_length accepted (usbfs' default per-URB budget)."""
    max_number_of_packets: int = USBIP_MAX_ISO_PACKETS
    """Largest iso number_of_packets accepted (the kernel's USBIP_MAX_ISO_PACKETS)."""
    max_devices: int = 256
    """Largest OP_REP_DEVLIST ndev accepted."""
    max_interfaces: int = USB_MAXINTERFACES
    """Largest bNumInterfaces accepted in an OP_REP_DEVLIST device."""


DEFAULT_LIMITS: Final = Limits()

_OP_PEEK = struct.Struct(">HH")
_OP_COMMON = struct.Struct(">HHI")
_NDEV = struct.Struct(">I")
_HEADER_BASIC = struct.Struct(">5I")
_CMD_SUBMIT = struct.Struct(">6I4i8s")
_RET_SUBMIT = struct.Struct(">5I5i8x")
_CMD_UNLINK = struct.Struct(">6I24x")
_RET_UNLINK = struct.Struct(">5Ii24x")
_ISO = struct.Struct(">3Ii")
_IMPORT_REQUEST = struct.Struct(">HHI32s")
_USB_DEVICE = struct.Struct(">256s32s3I3H6B")
_USB_INTERFACE = struct.Struct(">3Bx")

assert _OP_COMMON.size == OP_COMMON_SIZE
assert _CMD_SUBMIT.size == _RET_SUBMIT.size == _CMD_UNLINK.size == _RET_UNLINK.size == USBIP_HEADER_SIZE
assert _ISO.size == USBIP_ISO_PACKET_DESCRIPTOR_SIZE
assert _USB_DEVICE.size == USBIP_USB_DEVICE_SIZE
assert _USB_INTERFACE.size == USBIP_USB_INTERFACE_SIZE

_HDR: Final = USBIP_HEADER_SIZE
_new = object.__new__
_ISO_SIZE: Final = USBIP_ISO_PACKET_DESCRIPTOR_SIZE
_U32_MAX: Final = 0xFFFFFFFF

MESSAGE_NAMES: Final[dict[type[Message], str]] = {
    OpReqDevlist: "OP_REQ_DEVLIST",
    OpRepDevlist: "OP_REP_DEVLIST",
    OpReqImport: "OP_REQ_IMPORT",
    OpRepImport: "OP_REP_IMPORT",
    CmdSubmit: "USBIP_CMD_SUBMIT",
    RetSubmit: "USBIP_RET_SUBMIT",
    CmdUnlink: "USBIP_CMD_UNLINK",
    RetUnlink: "USBIP_RET_UNLINK",
}
"""Kernel name of each message class, for error messages and logs."""

_URB_TYPES: Final[dict[int, type[Message]]] = {
    USBIP_CMD_SUBMIT: CmdSubmit,
    USBIP_CMD_UNLINK: CmdUnlink,
    USBIP_RET_SUBMIT: RetSubmit,
    USBIP_RET_UNLINK: RetUnlink,
}
_OP_TYPES: Final[dict[int, type[Message]]] = {
    OpCode.OP_REQ_DEVLIST: OpReqDevlist,
    OpCode.OP_REP_DEVLIST: OpRepDevlist,
    OpCode.OP_REQ_IMPORT: OpReqImport,
    OpCode.OP_REP_IMPORT: OpRepImport,
}

# Field layouts (name, byte offset, signed) for error locations and for diagnosing struct.error on pack.
_BASIC_FIELDS = (
    ("command", 0, False),
    ("seqnum", 4, False),
    ("devid", 8, False),
    ("direction", 12, False),
    ("ep", 16, False),
)
_CMD_SUBMIT_FIELDS = (
    *_BASIC_FIELDS,
    ("transfer_flags", 20, False),
    ("transfer_buffer_length", 24, True),
    ("start_frame", 28, True),
    ("number_of_packets", 32, True),
    ("interval", 36, True),
)
_RET_SUBMIT_FIELDS = (
    *_BASIC_FIELDS,
    ("status", 20, True),
    ("actual_length", 24, True),
    ("start_frame", 28, True),
    ("number_of_packets", 32, True),
    ("error_count", 36, True),
)
_CMD_UNLINK_FIELDS = (*_BASIC_FIELDS, ("unlink_seqnum", 20, False))
_RET_UNLINK_FIELDS = (*_BASIC_FIELDS, ("status", 20, True))
_ISO_FIELDS = (("offset", 0, False), ("length", 4, False), ("actual_length", 8, False), ("status", 12, True))
_USB_DEVICE_INT_FIELDS = (
    ("busnum", 288, 32, False),
    ("devnum", 292, 32, False),
    ("speed", 296, 32, False),
    ("idVendor", 300, 16, False),
    ("idProduct", 302, 16, False),
    ("bcdDevice", 304, 16, False),
    ("bDeviceClass", 306, 8, False),
    ("bDeviceSubClass", 307, 8, False),
    ("bDeviceProtocol", 308, 8, False),
    ("bConfigurationValue", 309, 8, False),
    ("bNumConfigurations", 310, 8, False),
    ("bNumInterfaces", 311, 8, False),
)
_USB_INTERFACE_FIELDS = (
    ("bInterfaceClass", 0, 8, False),
    ("bInterfaceSubClass", 1, 8, False),
    ("bInterfaceProtocol", 2, 8, False),
)


def message_name(message_type: type[Message]) -> str:
    """The kernel's name for a message class (`CmdSubmit` -> "USBIP_CMD_SUBMIT")."""
    return MESSAGE_NAMES.get(message_type, message_type.__name__)


def _at(name: str, seqnum: int | None, field: str, rel: int, base: int) -> str:
    who = f"{name} seqnum {seqnum}" if seqnum is not None else name
    return f"{who}, field {field} at byte {rel} of the message (stream offset {base + rel})"


def _remote_field(
    what: str, name: str, seqnum: int | None, field: str, rel: int, base: int
) -> RemoteFieldError:
    return RemoteFieldError(
        f"{what} ({_at(name, seqnum, field, rel, base)})", field=field, offset=base + rel, seqnum=seqnum
    )


def _limit(
    what: str,
    value: int,
    cap: int,
    capname: str,
    name: str,
    seqnum: int | None,
    field: str,
    rel: int,
    base: int,
) -> LimitExceededError:
    return LimitExceededError(
        f"{what} {value} exceeds the cap {cap} (Limits.{capname}) ({_at(name, seqnum, field, rel, base)})",
        field=field,
        offset=base + rel,
        seqnum=seqnum,
    )


def _take(buf: Buffer, start: int, stop: int) -> bytes:
    """Copy buf[start:stop] into bytes exactly once (a bytearray slice would copy twice)."""
    if type(buf) is bytes:
        return buf[start:stop]
    with memoryview(buf) as view:
        return view[start:stop].tobytes()


# ------------------------------------------------------------------------------------------------ peeking


def peek_message_type(buf: Buffer, pos: int, base: int, *, urb_phase: bool) -> type[Message] | None:
    """Which message starts at buf[pos] (None if fewer than 4 bytes are in).

    `urb_phase` only picks the better complaint for bytes that are neither: an unknown command in the URB
    phase, a version mismatch in the operation phase.
    """
    if len(buf) - pos < 4:
        return None
    first, second = _OP_PEEK.unpack_from(buf, pos)
    if first == 0:
        urb_type = _URB_TYPES.get(second)
        if urb_type is not None:
            return urb_type
    elif first == USBIP_VERSION:
        op_type = _OP_TYPES.get(second)
        if op_type is not None:
            return op_type
        try:
            known = f" ({OpCode(second).name}: defined in usbip_network.h, served by neither usbipd nor vusb)"
        except ValueError:
            known = ""
        raise UnknownCommandError(
            f"unknown op code {second:#06x}{known} (field code at byte 2 of the message, stream offset "
            f"{base + 2})",
            field="code",
            offset=base + 2,
        )
    if urb_phase or first == 0:
        command = (first << 16) | second
        raise UnknownCommandError(
            f"unknown USB/IP command {command:#010x}: expected USBIP_CMD_SUBMIT (1), USBIP_CMD_UNLINK (2), "
            f"USBIP_RET_SUBMIT (3) or USBIP_RET_UNLINK (4) (field command at byte 0 of the message, stream "
            f"offset {base})",
            field="command",
            offset=base,
        )
    raise VersionMismatchError(
        f"op_common version {first:#06x}, expected USBIP_VERSION {USBIP_VERSION:#06x} (field version at "
        f"byte 0 of the message, stream offset {base})",
        field="version",
        offset=base,
    )


def unpack_header_basic(data: Buffer, pos: int = 0) -> HeaderBasic:
    """The usbip_header_basic at data[pos] (20 bytes), without interpreting the rest."""
    if len(data) - pos < _HEADER_BASIC.size:
        raise TruncatedMessageError(
            f"usbip_header_basic needs {_HEADER_BASIC.size} bytes, got {max(0, len(data) - pos)}"
        )
    command, seqnum, devid, direction, ep = _HEADER_BASIC.unpack_from(data, pos)
    return HeaderBasic(command=command, seqnum=seqnum, devid=devid, direction=direction, ep=ep)


# ------------------------------------------------------------------------------------------------ readers


def _read_isos(buf: Buffer, start: int, count: int) -> tuple[IsoPacketDescriptor, ...]:
    unpack_from = _ISO.unpack_from
    return tuple(
        IsoPacketDescriptor(offset=o, length=n, actual_length=a, status=s)
        for o, n, a, s in (unpack_from(buf, start + i * _ISO_SIZE) for i in range(count))
    )


def _iso_count(number_of_packets: int, limits: Limits, name: str, seqnum: int, base: int) -> int:
    """How many iso packet descriptors follow a SUBMIT header whose number_of_packets is neither 0 nor -1."""
    if number_of_packets < -1:
        raise _remote_field(
            f"number_of_packets {number_of_packets} is negative (only -1, 0xffffffff, marks a non-iso URB)",
            name,
            seqnum,
            "number_of_packets",
            32,
            base,
        )
    if number_of_packets > limits.max_number_of_packets:
        raise _limit(
            "number_of_packets",
            number_of_packets,
            limits.max_number_of_packets,
            "max_number_of_packets",
            name,
            seqnum,
            "number_of_packets",
            32,
            base,
        )
    return number_of_packets


def read_cmd_submit(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """USBIP_CMD_SUBMIT at buf[pos] (the direction is in its own header)."""
    if len(buf) - pos < _HDR:
        return _HDR
    (
        _,
        seqnum,
        devid,
        direction,
        ep,
        transfer_flags,
        transfer_buffer_length,
        start_frame,
        number_of_packets,
        interval,
        setup,
    ) = _CMD_SUBMIT.unpack_from(buf, pos)
    name = "USBIP_CMD_SUBMIT"
    if direction == USBIP_DIR_OUT:
        payload = transfer_buffer_length
    elif direction == USBIP_DIR_IN:
        payload = 0
    else:
        raise _remote_field(
            f"direction {direction} is neither USBIP_DIR_OUT (0) nor USBIP_DIR_IN (1)",
            name,
            seqnum,
            "direction",
            12,
            base,
        )
    if ep > 15:
        raise _remote_field(
            f"ep {ep} is not an endpoint number 0..15 (stub_rx.c get_pipe)", name, seqnum, "ep", 16, base
        )
    if transfer_buffer_length < 0:
        raise _remote_field(
            f"transfer_buffer_length {transfer_buffer_length} is negative",
            name,
            seqnum,
            "transfer_buffer_length",
            24,
            base,
        )
    if transfer_buffer_length > limits.max_transfer_buffer_length:
        raise _limit(
            "transfer_buffer_length",
            transfer_buffer_length,
            limits.max_transfer_buffer_length,
            "max_transfer_buffer_length",
            name,
            seqnum,
            "transfer_buffer_length",
            24,
            base,
        )
    if number_of_packets == 0 or number_of_packets == -1:  # non-iso, as vhci / the rst send it
        niso = 0
    else:
        niso = _iso_count(number_of_packets, limits, name, seqnum, base)
    total: int = _HDR + payload + niso * _ISO_SIZE
    if len(buf) - pos < total:
        return total
    start = pos + _HDR
    # CmdSubmit(seqnum=..., ...) without binding twelve keywords, which costs more than the decoding; the
    # assertion after the readers keeps this in step with the class's fields.
    message = _new(CmdSubmit)
    message.seqnum = seqnum
    message.devid = devid
    message.direction = direction
    message.ep = ep
    message.transfer_flags = transfer_flags
    message.transfer_buffer_length = transfer_buffer_length
    message.start_frame = start_frame
    message.number_of_packets = number_of_packets
    message.interval = interval
    message.setup = setup
    message.transfer_buffer = _take(buf, start, start + payload) if payload else b""
    message.iso_packet_descriptors = _read_isos(buf, start + payload, niso) if niso else ()
    return message, total


# Plain ints for the per-URB comparisons (an IntEnum operand costs more).
_CMD_SUBMIT_COMMAND: Final = int(USBIP_CMD_SUBMIT)
_DIR_IN: Final = int(USBIP_DIR_IN)
_DIR_OUT: Final = int(USBIP_DIR_OUT)

PlainSubmit: TypeAlias = tuple[int, int, int, int, int, int, bytes]
"""A plain CMD_SUBMIT as the hot path takes it: (seqnum, devid, direction, ep, transfer_flags,
transfer_buffer_length, transfer_buffer)."""


def read_plain_cmd_submit(buf: Buffer, limits: Limits, pos: int = 0) -> tuple[PlainSubmit, int] | None:
    """`read_cmd_submit` for the message a disk or serial port sees thousands of times a second: a
    complete non-isochronous CMD_SUBMIT to an endpoint other than ep0 at buf[pos], as a tuple (no message
    object), with its size. None for anything else (another message, ep0, iso, one not all in yet, one
    `read_cmd_submit` would reject): the caller then takes the full reader, which decodes it or names the
    error. start_frame, interval and setup mean nothing to a bulk or interrupt URB and are not returned."""
    if len(buf) - pos < _HDR:
        return None
    command, seqnum, devid, direction, ep, flags, length, _, packets, _, _ = _CMD_SUBMIT.unpack_from(buf, pos)
    if (
        command != _CMD_SUBMIT_COMMAND
        or not 0 < ep <= 15
        or not (packets == 0 or packets == -1)
        or not 0 <= length <= limits.max_transfer_buffer_length
    ):
        return None
    if direction == _DIR_IN:
        return (seqnum, devid, direction, ep, flags, length, b""), _HDR
    if direction != _DIR_OUT or len(buf) - pos < _HDR + length:
        return None
    total = _HDR + length
    start = pos + _HDR
    payload = _take(buf, start, start + length) if length else b""
    return (seqnum, devid, direction, ep, flags, length, payload), total


PlainRet: TypeAlias = tuple[int, int, int, int, int, bytes]
"""A plain RET_SUBMIT as a host's hot path takes it: (seqnum, status, actual_length, start_frame,
error_count, transfer_buffer)."""


def read_ret_submit_header(buf: Buffer, pos: int) -> tuple[int, int, int, int, int, int] | None:
    """(seqnum, status, actual_length, start_frame, number_of_packets, error_count) of the RET_SUBMIT
    header at buf[pos], or None if fewer than 48 bytes are in or it is another message: the first step
    of a host's per-URB path, which checks the rest against its CMD_SUBMIT (`read_ret_submit` otherwise)."""
    if len(buf) - pos < _HDR:
        return None
    command, seqnum, _, _, _, status, actual_length, start_frame, packets, error_count = (
        _RET_SUBMIT.unpack_from(buf, pos)
    )
    if command != _RET_SUBMIT_COMMAND:
        return None
    return seqnum, status, actual_length, start_frame, packets, error_count


def read_ret_submit(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """USBIP_RET_SUBMIT at buf[pos]; `direction_of(seqnum)` tells whether an IN buffer follows."""
    if len(buf) - pos < _HDR:
        return _HDR
    (_, seqnum, devid, direction, ep, status, actual_length, start_frame, number_of_packets, error_count) = (
        _RET_SUBMIT.unpack_from(buf, pos)
    )
    name = "USBIP_RET_SUBMIT"
    if actual_length < 0:
        raise _remote_field(
            f"actual_length {actual_length} is negative", name, seqnum, "actual_length", 24, base
        )
    if actual_length > limits.max_transfer_buffer_length:
        raise _limit(
            "actual_length",
            actual_length,
            limits.max_transfer_buffer_length,
            "max_transfer_buffer_length",
            name,
            seqnum,
            "actual_length",
            24,
            base,
        )
    if number_of_packets == 0 or number_of_packets == -1:  # non-iso, as vhci / the rst send it
        niso = 0
    else:
        niso = _iso_count(number_of_packets, limits, name, seqnum, base)
    if direction_of is None:
        raise TypeError("read_ret_submit needs direction_of: a RET_SUBMIT header does not say its direction")
    payload = actual_length if direction_of(seqnum) == USBIP_DIR_IN else 0
    total: int = _HDR + payload + niso * _ISO_SIZE
    if len(buf) - pos < total:
        return total
    start = pos + _HDR
    transfer_buffer = _take(buf, start, start + payload) if payload else b""
    isos: tuple[IsoPacketDescriptor, ...] = ()
    if niso:
        isos = _read_isos(buf, start + payload, niso)
        iso_total = sum(d.actual_length for d in isos)
        if iso_total != actual_length:
            raise RemoteLengthMismatchError(
                f"iso packets' actual_length add up to {iso_total}, not to actual_length {actual_length} "
                f"({_at(name, seqnum, 'actual_length', 24, base)})",
                field="actual_length",
                offset=base + 24,
                seqnum=seqnum,
            )
    message = _new(RetSubmit)  # RetSubmit(seqnum=..., ...) without the keyword binding, as for CmdSubmit
    message.seqnum = seqnum
    message.devid = devid
    message.direction = direction
    message.ep = ep
    message.status = status
    message.actual_length = actual_length
    message.start_frame = start_frame
    message.number_of_packets = number_of_packets
    message.error_count = error_count
    message.transfer_buffer = transfer_buffer
    message.iso_packet_descriptors = isos
    return message, total


def read_cmd_unlink(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """USBIP_CMD_UNLINK at buf[pos] (fixed 48 bytes)."""
    if len(buf) - pos < _HDR:
        return _HDR
    _, seqnum, devid, direction, ep, unlink_seqnum = _CMD_UNLINK.unpack_from(buf, pos)
    return CmdUnlink(
        seqnum=seqnum, devid=devid, direction=direction, ep=ep, unlink_seqnum=unlink_seqnum
    ), _HDR


def read_ret_unlink(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """USBIP_RET_UNLINK at buf[pos] (fixed 48 bytes)."""
    if len(buf) - pos < _HDR:
        return _HDR
    _, seqnum, devid, direction, ep, status = _RET_UNLINK.unpack_from(buf, pos)
    return RetUnlink(seqnum=seqnum, devid=devid, direction=direction, ep=ep, status=status), _HDR


def _request_status(buf: Buffer, pos: int, base: int, name: str) -> None:
    _, _, status = _OP_COMMON.unpack_from(buf, pos)
    if status != 0:
        # usbipd's usbip_net_recv_op_common fails a request whose status is not ST_OK.
        raise _remote_field(f"request status {status:#x} is not ST_OK (0)", name, None, "status", 4, base)


def _decode_str(raw: bytes, name: str, field: str, rel: int, base: int) -> str:
    nul = raw.find(b"\0")
    if nul < 0:
        raise _remote_field(
            f"{field} fills all {len(raw)} bytes without a terminating NUL", name, None, field, rel, base
        )
    return raw[:nul].decode("utf-8", "surrogateescape")


def read_op_req_devlist(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """OP_REQ_DEVLIST at buf[pos] (op_common only)."""
    if len(buf) - pos < OP_COMMON_SIZE:
        return OP_COMMON_SIZE
    _request_status(buf, pos, base, "OP_REQ_DEVLIST")
    return OpReqDevlist(), OP_COMMON_SIZE


def read_op_req_import(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """OP_REQ_IMPORT at buf[pos] (op_common + busid[32])."""
    size = _IMPORT_REQUEST.size
    if len(buf) - pos < size:
        return size
    _request_status(buf, pos, base, "OP_REQ_IMPORT")
    (_, _, _, raw_busid) = _IMPORT_REQUEST.unpack_from(buf, pos)
    busid = _decode_str(raw_busid, "OP_REQ_IMPORT", "busid", 8, base)
    return OpReqImport(busid=busid), size


def _read_usb_device(buf: Buffer, pos: int, base: int, name: str) -> UsbDevice:
    (
        raw_path,
        raw_busid,
        busnum,
        devnum,
        speed,
        id_vendor,
        id_product,
        bcd_device,
        device_class,
        device_subclass,
        device_protocol,
        configuration_value,
        num_configurations,
        num_interfaces,
    ) = _USB_DEVICE.unpack_from(buf, pos)
    return UsbDevice(
        path=_decode_str(raw_path, name, "path", 0, base),
        busid=_decode_str(raw_busid, name, "busid", SYSFS_PATH_MAX, base),
        busnum=busnum,
        devnum=devnum,
        speed=speed,
        idVendor=id_vendor,
        idProduct=id_product,
        bcdDevice=bcd_device,
        bDeviceClass=device_class,
        bDeviceSubClass=device_subclass,
        bDeviceProtocol=device_protocol,
        bConfigurationValue=configuration_value,
        bNumConfigurations=num_configurations,
        bNumInterfaces=num_interfaces,
    )


def read_op_rep_import(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """OP_REP_IMPORT at buf[pos]: 8 bytes on failure, 8 + 312 on success."""
    if len(buf) - pos < OP_COMMON_SIZE:
        return OP_COMMON_SIZE
    _, _, status = _OP_COMMON.unpack_from(buf, pos)
    if status != 0:
        return OpRepImport(status=status, udev=None), OP_COMMON_SIZE
    total = OP_COMMON_SIZE + USBIP_USB_DEVICE_SIZE
    if len(buf) - pos < total:
        return total
    udev = _read_usb_device(buf, pos + OP_COMMON_SIZE, base + OP_COMMON_SIZE, "OP_REP_IMPORT")
    return OpRepImport(status=status, udev=udev), total


def read_op_rep_devlist(
    buf: Buffer, pos: int, base: int, limits: Limits, direction_of: DirectionOf | None = None
) -> ReadResult:
    """OP_REP_DEVLIST at buf[pos]: op_common, ndev, then per device 312 bytes + 4 per interface."""
    if len(buf) - pos < OP_COMMON_SIZE:
        return OP_COMMON_SIZE
    _, _, status = _OP_COMMON.unpack_from(buf, pos)
    if status != 0:
        return OpRepDevlist(status=status, devices=()), OP_COMMON_SIZE
    need = OP_COMMON_SIZE + _NDEV.size
    if len(buf) - pos < need:
        return need
    (ndev,) = _NDEV.unpack_from(buf, pos + OP_COMMON_SIZE)
    if ndev > limits.max_devices:
        raise _limit(
            "ndev",
            ndev,
            limits.max_devices,
            "max_devices",
            "OP_REP_DEVLIST",
            None,
            "ndev",
            OP_COMMON_SIZE,
            base,
        )
    devices: list[OpDevlistReplyExtra] = []
    for index in range(ndev):
        rel = need
        need += USBIP_USB_DEVICE_SIZE
        if len(buf) - pos < need:
            return need
        num_interfaces = buf[pos + rel + USBIP_USB_DEVICE_SIZE - 1]
        if num_interfaces > limits.max_interfaces:
            raise _limit(
                f"device {index} bNumInterfaces",
                num_interfaces,
                limits.max_interfaces,
                "max_interfaces",
                "OP_REP_DEVLIST",
                None,
                "bNumInterfaces",
                rel + USBIP_USB_DEVICE_SIZE - 1,
                base,
            )
        need += num_interfaces * USBIP_USB_INTERFACE_SIZE
        if len(buf) - pos < need:
            return need
        udev = _read_usb_device(buf, pos + rel, base + rel, "OP_REP_DEVLIST")
        uinf = tuple(
            UsbInterface(bInterfaceClass=c, bInterfaceSubClass=s, bInterfaceProtocol=p)
            for c, s, p in (
                _USB_INTERFACE.unpack_from(
                    buf, pos + rel + USBIP_USB_DEVICE_SIZE + i * USBIP_USB_INTERFACE_SIZE
                )
                for i in range(num_interfaces)
            )
        )
        devices.append(OpDevlistReplyExtra(udev=udev, uinf=uinf))
    return OpRepDevlist(status=status, devices=tuple(devices)), need


# read_cmd_submit / read_ret_submit fill these slots one by one: they must be all the fields there are.
assert [f.name for f in fields(CmdSubmit)] == [
    "seqnum", "devid", "direction", "ep", "transfer_flags", "transfer_buffer_length", "start_frame",
    "number_of_packets", "interval", "setup", "transfer_buffer", "iso_packet_descriptors",
]  # fmt: skip
assert [f.name for f in fields(RetSubmit)] == [
    "seqnum", "devid", "direction", "ep", "status", "actual_length", "start_frame", "number_of_packets",
    "error_count", "transfer_buffer", "iso_packet_descriptors",
]  # fmt: skip

READERS: Final[dict[type[Message], Reader]] = {
    OpReqDevlist: read_op_req_devlist,
    OpRepDevlist: read_op_rep_devlist,
    OpReqImport: read_op_req_import,
    OpRepImport: read_op_rep_import,
    CmdSubmit: read_cmd_submit,
    RetSubmit: read_ret_submit,
    CmdUnlink: read_cmd_unlink,
    RetUnlink: read_ret_unlink,
}
"""The incremental reader of each message class."""


def _infer_ret_direction(data: Buffer) -> int:
    """IN if `data` is exactly header + actual_length + descriptors with actual_length > 0, else OUT."""
    if len(data) < _HDR:
        return USBIP_DIR_OUT
    (_, _, _, _, _, _, actual_length, _, number_of_packets, _) = _RET_SUBMIT.unpack_from(data, 0)
    niso = number_of_packets if number_of_packets > 0 else 0
    if actual_length > 0 and len(data) == _HDR + actual_length + niso * _ISO_SIZE:
        return USBIP_DIR_IN
    return USBIP_DIR_OUT


def unpack(data: Buffer, *, direction: int | None = None, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode exactly one whole message from `data` (no more, no less).

    For a USBIP_RET_SUBMIT, `direction` is the direction of its CMD_SUBMIT; when omitted it is inferred
    from the length (a buffer of actual_length bytes present means IN).
    """
    if len(data) < 4:
        raise TruncatedMessageError(
            f"{len(data)} bytes cannot hold a USB/IP message (at least 8 needed)", offset=len(data)
        )
    (first,) = struct.unpack_from(">H", data, 0)
    message_type = peek_message_type(data, 0, 0, urb_phase=first == 0)
    assert message_type is not None
    if message_type is RetSubmit:
        known = direction if direction is not None else _infer_ret_direction(data)
        result = read_ret_submit(data, 0, 0, limits, lambda _seqnum: known)
    else:
        result = READERS[message_type](data, 0, 0, limits, None)
    name = message_name(message_type)
    if isinstance(result, int):
        raise TruncatedMessageError(
            f"{name}: {len(data)} bytes given, the message needs at least {result}", offset=len(data)
        )
    message, consumed = result
    if consumed != len(data):
        raise TrailingDataError(
            f"{name}: {len(data) - consumed} bytes after the end of the message (stream offset {consumed})",
            offset=consumed,
        )
    return message


# ------------------------------------------------------------------------------------------------ packing


def _diagnose(
    name: str,
    seqnum: int | None,
    fields: Iterable[tuple[str, int, bool]],
    values: Iterable[object],
    prefix: str = "",
    error: struct.error | None = None,
) -> LocalFieldError:
    """Find which field made struct.pack fail and say so."""
    for (field, rel, signed), value in zip(fields, values, strict=False):
        lo, hi = (-(1 << 31), (1 << 31) - 1) if signed else (0, _U32_MAX)
        if not isinstance(value, int) or not lo <= value <= hi:
            kind = "__s32" if signed else "__u32"
            return LocalFieldError(
                f"{name}{'' if seqnum is None else f' seqnum {seqnum}'}: {prefix}{field} "
                f"{value!r} does not fit {kind} (byte {rel} of the message)",
                field=prefix + field,
                seqnum=seqnum,
            )
    return LocalFieldError(f"{name}: cannot pack: {error}", seqnum=seqnum)


def _local_field(what: str, name: str, seqnum: int | None, field: str) -> LocalFieldError:
    who = f"{name} seqnum {seqnum}" if seqnum is not None else name
    return LocalFieldError(f"{who}: {what} (field {field})", field=field, seqnum=seqnum)


def _pack_isos(name: str, seqnum: int, isos: tuple[IsoPacketDescriptor, ...]) -> bytes:
    pack = _ISO.pack
    try:
        return b"".join([pack(d.offset, d.length, d.actual_length, d.status) for d in isos])
    except struct.error as error:
        for i, d in enumerate(isos):
            values = (d.offset, d.length, d.actual_length, d.status)
            try:
                pack(*values)
            except struct.error:
                raise _diagnose(
                    name, seqnum, _ISO_FIELDS, values, f"iso_packet_descriptors[{i}].", error
                ) from None
        raise  # pragma: no cover - join failed although every descriptor packs


def _check_packets(
    name: str, seqnum: int, number_of_packets: int, isos: tuple[IsoPacketDescriptor, ...]
) -> int:
    if not isinstance(number_of_packets, int) or number_of_packets < -1:
        raise _local_field(
            f"number_of_packets {number_of_packets!r} must be > 0 (iso), 0 or -1 (non-iso)",
            name,
            seqnum,
            "number_of_packets",
        )
    niso = number_of_packets if number_of_packets > 0 else 0
    if len(isos) != niso:
        raise LocalLengthMismatchError(
            f"{name} seqnum {seqnum}: number_of_packets {number_of_packets} announces {niso} iso packet "
            f"descriptors, {len(isos)} given (field iso_packet_descriptors)",
            field="iso_packet_descriptors",
            seqnum=seqnum,
        )
    return niso


def _iov_cmd_submit(m: CmdSubmit) -> list[bytes]:
    tb = m.transfer_buffer
    direction = m.direction
    ep = m.ep
    transfer_buffer_length = m.transfer_buffer_length
    number_of_packets = m.number_of_packets
    setup = m.setup
    if (  # the usual non-iso command passes every check below: pack it straight away
        (
            len(tb) == transfer_buffer_length
            if direction == USBIP_DIR_OUT
            else direction == USBIP_DIR_IN and not tb
        )
        and type(ep) is int
        and 0 <= ep <= 15
        and type(transfer_buffer_length) is int
        and transfer_buffer_length >= 0
        and type(setup) is bytes
        and len(setup) == 8
        and (number_of_packets == 0 or number_of_packets == -1)
        and not m.iso_packet_descriptors
    ):
        try:
            header = _CMD_SUBMIT.pack(
                USBIP_CMD_SUBMIT,
                m.seqnum,
                m.devid,
                direction,
                ep,
                m.transfer_flags,
                transfer_buffer_length,
                m.start_frame,
                number_of_packets,
                m.interval,
                setup,
            )
        except struct.error:
            pass  # a field out of range: the full path below names it
        else:
            return [header, tb] if tb else [header]
    name, seqnum = "USBIP_CMD_SUBMIT", m.seqnum
    if m.direction == USBIP_DIR_OUT:
        if len(tb) != m.transfer_buffer_length:
            raise LocalLengthMismatchError(
                f"{name} seqnum {seqnum}: OUT transfer_buffer holds {len(tb)} bytes, transfer_buffer_length "
                f"says {m.transfer_buffer_length} (field transfer_buffer)",
                field="transfer_buffer",
                seqnum=seqnum,
            )
    elif m.direction == USBIP_DIR_IN:
        if tb:
            raise LocalLengthMismatchError(
                f"{name} seqnum {seqnum}: an IN CMD_SUBMIT carries no data, got a {len(tb)}-byte "
                "transfer_buffer (field transfer_buffer)",
                field="transfer_buffer",
                seqnum=seqnum,
            )
    else:
        raise _local_field(
            f"direction {m.direction!r} is neither USBIP_DIR_OUT (0) nor USBIP_DIR_IN (1)",
            name,
            seqnum,
            "direction",
        )
    if not isinstance(m.ep, int) or not 0 <= m.ep <= 15:
        raise _local_field(f"ep {m.ep!r} is not an endpoint number 0..15", name, seqnum, "ep")
    if not isinstance(m.transfer_buffer_length, int) or m.transfer_buffer_length < 0:
        raise _local_field(
            f"transfer_buffer_length {m.transfer_buffer_length!r} must be >= 0",
            name,
            seqnum,
            "transfer_buffer_length",
        )
    if type(m.setup) is not bytes or len(m.setup) != 8:
        raise _local_field(f"setup must be 8 bytes, got {m.setup!r}", name, seqnum, "setup")
    isos = m.iso_packet_descriptors
    niso = _check_packets(name, seqnum, m.number_of_packets, isos)
    values = (
        USBIP_CMD_SUBMIT,
        seqnum,
        m.devid,
        m.direction,
        m.ep,
        m.transfer_flags,
        m.transfer_buffer_length,
        m.start_frame,
        m.number_of_packets,
        m.interval,
    )
    try:
        header = _CMD_SUBMIT.pack(*values, m.setup)
    except struct.error as error:
        raise _diagnose(name, seqnum, _CMD_SUBMIT_FIELDS, values, "", error) from None
    if niso:
        return [header, tb, _pack_isos(name, seqnum, isos)]
    return [header, tb] if tb else [header]


def _iov_ret_submit(m: RetSubmit) -> list[bytes]:
    tb = m.transfer_buffer
    actual_length = m.actual_length
    number_of_packets = m.number_of_packets
    if (  # the usual non-iso reply passes every check below: pack it straight away
        type(actual_length) is int
        and actual_length >= 0
        and (number_of_packets == 0 or number_of_packets == -1)
        and not m.iso_packet_descriptors
        and (not tb or len(tb) == actual_length)
    ):
        try:
            header = _RET_SUBMIT.pack(
                USBIP_RET_SUBMIT,
                m.seqnum,
                m.devid,
                m.direction,
                m.ep,
                m.status,
                actual_length,
                m.start_frame,
                number_of_packets,
                m.error_count,
            )
        except struct.error:
            pass  # a field out of range: the full path below names it
        else:
            return [header, tb] if tb else [header]
    name, seqnum = "USBIP_RET_SUBMIT", m.seqnum
    if not isinstance(actual_length, int) or actual_length < 0:
        raise _local_field(f"actual_length {actual_length!r} must be >= 0", name, seqnum, "actual_length")
    if tb and len(tb) != actual_length:
        raise LocalLengthMismatchError(
            f"{name} seqnum {seqnum}: IN transfer_buffer holds {len(tb)} bytes, actual_length says "
            f"{actual_length} (field transfer_buffer)",
            field="transfer_buffer",
            seqnum=seqnum,
        )
    isos = m.iso_packet_descriptors
    niso = _check_packets(name, seqnum, number_of_packets, isos)
    if niso:
        iso_total = sum(d.actual_length for d in isos)
        if iso_total != actual_length:
            raise LocalLengthMismatchError(
                f"{name} seqnum {seqnum}: iso packets' actual_length add up to {iso_total}, not to "
                f"actual_length {actual_length} (field actual_length)",
                field="actual_length",
                seqnum=seqnum,
            )
    values = (
        USBIP_RET_SUBMIT,
        seqnum,
        m.devid,
        m.direction,
        m.ep,
        m.status,
        actual_length,
        m.start_frame,
        m.number_of_packets,
        m.error_count,
    )
    try:
        header = _RET_SUBMIT.pack(*values)
    except struct.error as error:
        raise _diagnose(name, seqnum, _RET_SUBMIT_FIELDS, values, "", error) from None
    if niso:
        return [header, tb, _pack_isos(name, seqnum, isos)]
    return [header, tb] if tb else [header]


def ret_submit_header(seqnum: int, status: int, actual_length: int) -> bytes:
    """The 48-byte header of a non-isochronous RET_SUBMIT as the stub sends it (devid, direction, ep,
    start_frame, number_of_packets and error_count 0): `pack_iov(RetSubmit(seqnum=..., status=...,
    actual_length=...))[0]` in one struct call, for the server's per-URB path. A value the wire cannot
    carry raises struct.error (the caller falls back to `pack_iov`, which names the field)."""
    return _RET_SUBMIT.pack(_RET_SUBMIT_COMMAND, seqnum, 0, 0, 0, status, actual_length, 0, 0, 0)


_RET_SUBMIT_COMMAND: Final = int(USBIP_RET_SUBMIT)
_NO_SETUP: Final = bytes(8)
RET_SUBMIT_LAYOUT: Final = _RET_SUBMIT
"""usbip_header_basic + usbip_header_ret_submit as one struct: (command, seqnum, devid, direction, ep,
status, actual_length, start_frame, number_of_packets, error_count), for a host's per-URB path that reads
the header in place (`read_ret_submit_header` returns the same fields)."""
RET_SUBMIT_COMMAND: Final = _RET_SUBMIT_COMMAND


def cmd_submit_header(
    seqnum: int,
    devid: int,
    direction: int,
    ep: int,
    transfer_flags: int,
    transfer_buffer_length: int,
    interval: int = 0,
    setup: bytes = _NO_SETUP,
) -> bytes:
    """The 48-byte header of a non-isochronous CMD_SUBMIT (start_frame and number_of_packets 0; `setup`
    for a control URB): `pack_iov(CmdSubmit(...))[0]` in one struct call, for a host's per-URB path. A
    value the wire cannot carry raises struct.error (the caller falls back to `pack_iov`, which names the
    field)."""
    return _CMD_SUBMIT.pack(
        _CMD_SUBMIT_COMMAND,
        seqnum,
        devid,
        direction,
        ep,
        transfer_flags,
        transfer_buffer_length,
        0,
        0,
        interval,
        setup,
    )


def _pack_cmd_unlink(m: CmdUnlink) -> bytes:
    values = (USBIP_CMD_UNLINK, m.seqnum, m.devid, m.direction, m.ep, m.unlink_seqnum)
    try:
        return _CMD_UNLINK.pack(*values)
    except struct.error as error:
        raise _diagnose("USBIP_CMD_UNLINK", m.seqnum, _CMD_UNLINK_FIELDS, values, "", error) from None


def _pack_ret_unlink(m: RetUnlink) -> bytes:
    values = (USBIP_RET_UNLINK, m.seqnum, m.devid, m.direction, m.ep, m.status)
    try:
        return _RET_UNLINK.pack(*values)
    except struct.error as error:
        raise _diagnose("USBIP_RET_UNLINK", m.seqnum, _RET_UNLINK_FIELDS, values, "", error) from None


def _encode_str(value: object, size: int, name: str, field: str) -> bytes:
    if not isinstance(value, str):
        raise _local_field(f"{field} must be a str, got {value!r}", name, None, field)
    raw = value.encode("utf-8", "surrogateescape")
    if b"\0" in raw or len(raw) >= size:
        raise _local_field(
            f"{field} {value!r} must encode to at most {size - 1} bytes without NUL "
            f"(a {size}-byte field closed by a zero byte)",
            name,
            None,
            field,
        )
    return raw


def _op_status(status: object, name: str) -> int:
    if not isinstance(status, int) or not 0 <= status <= _U32_MAX:
        raise _local_field(f"status {status!r} does not fit __u32", name, None, "status")
    return status


def _pack_usb_device(udev: UsbDevice, name: str, prefix: str) -> bytes:
    path = _encode_str(udev.path, SYSFS_PATH_MAX, name, prefix + "path")
    busid = _encode_str(udev.busid, SYSFS_BUS_ID_SIZE, name, prefix + "busid")
    values = (
        udev.busnum,
        udev.devnum,
        udev.speed,
        udev.idVendor,
        udev.idProduct,
        udev.bcdDevice,
        udev.bDeviceClass,
        udev.bDeviceSubClass,
        udev.bDeviceProtocol,
        udev.bConfigurationValue,
        udev.bNumConfigurations,
        udev.bNumInterfaces,
    )
    try:
        return _USB_DEVICE.pack(path, busid, *values)
    except struct.error:
        raise _diagnose_sized(name, _USB_DEVICE_INT_FIELDS, values, prefix) from None


def _diagnose_sized(
    name: str, fields: Iterable[tuple[str, int, int, bool]], values: Iterable[object], prefix: str
) -> LocalFieldError:
    for (field, _rel, bits, _signed), value in zip(fields, values, strict=False):
        if not isinstance(value, int) or not 0 <= value < (1 << bits):
            return _local_field(
                f"{field} {value!r} does not fit an unsigned {bits}-bit field", name, None, prefix + field
            )
    return _local_field("cannot pack", name, None, prefix.rstrip("."))  # pragma: no cover


def _pack_op_req_devlist(m: OpReqDevlist) -> bytes:
    return _OP_COMMON.pack(USBIP_VERSION, OpCode.OP_REQ_DEVLIST, 0)


def _pack_op_req_import(m: OpReqImport) -> bytes:
    busid = _encode_str(m.busid, SYSFS_BUS_ID_SIZE, "OP_REQ_IMPORT", "busid")
    return _IMPORT_REQUEST.pack(USBIP_VERSION, OpCode.OP_REQ_IMPORT, 0, busid)


def _pack_op_rep_import(m: OpRepImport) -> bytes:
    name = "OP_REP_IMPORT"
    status = _op_status(m.status, name)
    header = _OP_COMMON.pack(USBIP_VERSION, OpCode.OP_REP_IMPORT, status)
    if status != 0:
        if m.udev is not None:
            raise _local_field(
                f"a failed import (status {status}) carries no device: usbipd sends only op_common",
                name,
                None,
                "udev",
            )
        return header
    if m.udev is None:
        raise _local_field("a successful import (status ST_OK) must describe the device", name, None, "udev")
    return header + _pack_usb_device(m.udev, name, "udev.")


def _pack_op_rep_devlist(m: OpRepDevlist) -> bytes:
    name = "OP_REP_DEVLIST"
    status = _op_status(m.status, name)
    header = _OP_COMMON.pack(USBIP_VERSION, OpCode.OP_REP_DEVLIST, status)
    if status != 0:
        if m.devices:
            raise _local_field(
                f"a failed devlist (status {status}) carries no devices", name, None, "devices"
            )
        return header
    parts = [header, _NDEV.pack(len(m.devices))]
    for index, extra in enumerate(m.devices):
        prefix = f"devices[{index}]."
        udev = extra.udev
        if udev.bNumInterfaces != len(extra.uinf):
            raise LocalLengthMismatchError(
                f"{name}: device {index} says bNumInterfaces {udev.bNumInterfaces} but lists "
                f"{len(extra.uinf)} interfaces (field {prefix}uinf)",
                field=prefix + "uinf",
            )
        parts.append(_pack_usb_device(udev, name, prefix + "udev."))
        for i, uinf in enumerate(extra.uinf):
            values = (uinf.bInterfaceClass, uinf.bInterfaceSubClass, uinf.bInterfaceProtocol)
            try:
                parts.append(_USB_INTERFACE.pack(*values))
            except struct.error:
                raise _diagnose_sized(name, _USB_INTERFACE_FIELDS, values, f"{prefix}uinf[{i}].") from None
    return b"".join(parts)


def _pack_cmd_submit(m: CmdSubmit) -> bytes:
    return b"".join(_iov_cmd_submit(m))


def _pack_ret_submit(m: RetSubmit) -> bytes:
    return b"".join(_iov_ret_submit(m))


_IOV_PACKERS: Final[dict[type, Callable[[Any], list[bytes]]]] = {
    CmdSubmit: _iov_cmd_submit,
    RetSubmit: _iov_ret_submit,
}

_PACKERS: Final[dict[type, Callable[[Any], bytes]]] = {
    CmdSubmit: _pack_cmd_submit,
    RetSubmit: _pack_ret_submit,
    CmdUnlink: _pack_cmd_unlink,
    RetUnlink: _pack_ret_unlink,
    OpReqDevlist: _pack_op_req_devlist,
    OpRepDevlist: _pack_op_rep_devlist,
    OpReqImport: _pack_op_req_import,
    OpRepImport: _pack_op_rep_import,
}


def pack(message: Message) -> bytes:
    """Encode one message to its wire bytes; a value the wire cannot carry raises a LocalProtocolError."""
    packer = _PACKERS.get(type(message))
    if packer is None:
        raise TypeError(f"{type(message).__name__} is not a USB/IP message")
    return packer(message)


def pack_iov(message: Message) -> list[bytes]:
    """Like `pack`, as a list of buffers whose concatenation is the wire bytes: a transfer buffer stays its
    own (uncopied) element, for `socket.sendmsg` or `writelines` on the hot path."""
    iov = _IOV_PACKERS.get(type(message))
    if iov is not None:
        return iov(message)
    return [pack(message)]


__all__ = [
    "DEFAULT_LIMITS",
    "MESSAGE_NAMES",
    "READERS",
    "Buffer",
    "DirectionOf",
    "Limits",
    "PlainRet",
    "PlainSubmit",
    "ReadResult",
    "Reader",
    "cmd_submit_header",
    "message_name",
    "pack",
    "pack_iov",
    "peek_message_type",
    "read_cmd_submit",
    "read_cmd_unlink",
    "read_op_rep_devlist",
    "read_op_rep_import",
    "read_op_req_devlist",
    "read_op_req_import",
    "read_plain_cmd_submit",
    "read_ret_submit",
    "read_ret_submit_header",
    "read_ret_unlink",
    "ret_submit_header",
    "unpack",
    "unpack_header_basic",
]
