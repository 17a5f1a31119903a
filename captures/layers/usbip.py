"""scapy layers for USB/IP (kernel Documentation/usb/usbip_protocol.rst, version 0x0111) on TCP port 3240.

One class per wire message, each including its header, named after the kernel's messages: the OP_* messages of
the userspace phase (device list, import) and the four URB messages of the kernel phase. `USBIP(data)` returns the
right class for the bytes at hand, choosing as Wireshark does: a 0x0111 version means an OP_* message, a first
16-bit word of 0 a URB message (its 32-bit command is 1..4).

USB/IP is stateful, and so is this dissector. A RET_SUBMIT carries neither direction nor endpoint (the server
sets both to 0), yet IN data follows its header only when the CMD_SUBMIT with the same seqnum was IN; and what
the data means (descriptors, a CSW, INQUIRY data) depends on that CMD_SUBMIT's endpoint, SETUP packet, and on the
CBW that came before it. A `UsbipConversation` per TCP connection remembers these, in capture order, like
Wireshark's per-conversation data:

* `sniff(offline=path, session=TCPSession)` reassembles each direction of the TCP stream and hands it to
  `USBIP.tcp_reassemble` (model: scapy's contrib/automotive/doip.py): a message split across segments comes out
  once, whole; several messages in one segment come out as a chain USBIP_x / USBIP_y.
* `rdpcap(path)` dissects frame by frame through `bind_layers` on port 3240: complete messages in a frame are
  decoded (chained), a message split across frames is not reassembled (its first part is decoded as far as it
  goes, the continuation is Raw).
* Without any state (a lone RET_SUBMIT), the direction is inferred from the length of what follows the header.

Field names are the kernel's (`seqnum`, `devid`, `transfer_buffer_length`, ...); `WIRESHARK_FIELDS` maps them to
Wireshark's (`usbip.sequence_no`, `usbip.urb`, ...) for `tshark -T fields` comparisons.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple

from scapy.config import conf
from scapy.fields import (
    ByteEnumField,
    ByteField,
    ConditionalField,
    FieldLenField,
    IntEnumField,
    IntField,
    PacketField,
    PacketListField,
    ShortEnumField,
    SignedIntField,
    StrFixedLenField,
    StrLenField,
    XIntField,
    XShortField,
)
from scapy.layers.inet import TCP
from scapy.packet import Packet, bind_layers

from captures.layers._state import BoundedDict
from captures.layers.bot_scsi import BOT_CBW, BOT_CSW, cbw_command, dissect_bulk, is_cbw, is_csw
from captures.layers.usb import USB_Setup, dissect_control_in
from captures.names import USB_CLASSES, errno_name
from emulator.usbip.constants import (
    OP_COMMON_SIZE,
    OP_REP_DEVLIST,
    OP_REP_IMPORT,
    OP_REQ_DEVLIST,
    OP_REQ_IMPORT,
    ST_OK,
    USBIP_CMD_SUBMIT,
    USBIP_CMD_UNLINK,
    USBIP_DIR_IN,
    USBIP_DIR_OUT,
    USBIP_HEADER_SIZE,
    USBIP_ISO_PACKET_DESCRIPTOR_SIZE,
    USBIP_PORT,
    USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
    USBIP_USB_DEVICE_SIZE,
    USBIP_USB_INTERFACE_SIZE,
    USBIP_VERSION,
    OpStatus,
    UsbipCommand,
    UsbipDir,
)

USBIP_DEVICE_SIZE = USBIP_USB_DEVICE_SIZE
USBIP_INTERFACE_SIZE = USBIP_USB_INTERFACE_SIZE
ISO_DESCRIPTOR_SIZE = USBIP_ISO_PACKET_DESCRIPTOR_SIZE

OP_CODES = {code.value: code.name for code in (OP_REQ_DEVLIST, OP_REP_DEVLIST, OP_REQ_IMPORT, OP_REP_IMPORT)}
URB_COMMANDS = {command.value: command.name for command in UsbipCommand}
DIRECTIONS = {direction.value: direction.name for direction in UsbipDir}
OP_STATUS = {status.value: status.name for status in OpStatus}

# enum usb_device_speed (include/uapi/linux/usb/ch9.h)
USB_SPEEDS = {0: "UNKNOWN", 1: "LOW", 2: "FULL", 3: "HIGH", 4: "WIRELESS", 5: "SUPER", 6: "SUPER_PLUS"}

# transfer_flags (include/uapi/linux/usbip.h)
USBIP_URB_FLAGS = {
    0x00000001: "USBIP_URB_SHORT_NOT_OK",
    0x00000002: "USBIP_URB_ISO_ASAP",
    0x00000004: "USBIP_URB_NO_TRANSFER_DMA_MAP",
    0x00000040: "USBIP_URB_ZERO_PACKET",
    0x00000080: "USBIP_URB_NO_INTERRUPT",
    0x00000100: "USBIP_URB_FREE_BUFFER",
    0x00000200: "USBIP_URB_DIR_IN",
    0x00010000: "USBIP_URB_DMA_MAP_SINGLE",
    0x00020000: "USBIP_URB_DMA_MAP_PAGE",
    0x00040000: "USBIP_URB_DMA_MAP_SG",
    0x00080000: "USBIP_URB_MAP_LOCAL",
    0x00100000: "USBIP_URB_SETUP_MAP_SINGLE",
    0x00200000: "USBIP_URB_SETUP_MAP_LOCAL",
    0x00400000: "USBIP_URB_DMA_SG_COMBINED",
    0x00800000: "USBIP_URB_ALIGNED_TEMP_BUFFER",
}

# scapy field name -> Wireshark field (packet-usbip.c), for `tshark -T fields` comparisons. Wireshark shows
# the devid/direction/ep of a RET_* twice: first restored from the matching CMD (generated), then as on the wire.
WIRESHARK_FIELDS = {
    "version": "usbip.version",
    "code": "usbip.operation",
    "command": "usbip.urb",
    "seqnum": "usbip.sequence_no",
    "devid": "usbip.devid",
    "dir": "usbip.endpoint_number.direction",
    "ep": "usbip.endpoint_number",
    "transfer_flags": "usbip.transfer_flags",
    "transfer_buffer_length": "usbip.transfer_buffer_length",
    "start_frame": "usbip.iso.start_frame",
    "number_of_packets": "usbip.iso.num_of_packets",
    "interval": "usbip.interval",
    "setup": "usbip.setup",
    "status": "usbip.status",
    "actual_length": "usbip.actual_length",
    "error_count": "usbip.iso.error_count",
    "unlink_seqnum": "usbip.sequence_no",  # Wireshark uses the same field for the victim's seqnum
    "transfer_buffer": "usbip.data",
    "ndev": "usbip.number_of_devices",
    "path": "usbip.system_path",
    "busid": "usbip.busid",
    "busnum": "usbip.bus_num",
    "devnum": "usbip.dev_num",
    "speed": "usbip.speed",
    "idVendor": "usbip.idVendor",
    "idProduct": "usbip.idProduct",
    "bcdDevice": "usbip.bcdDevice",
    "bDeviceClass": "usbip.bDeviceClass",
    "bDeviceSubClass": "usbip.bDeviceSubClass",
    "bDeviceProtocol": "usbip.bDeviceProtocol",
    "bConfigurationValue": "usbip.bConfigurationValue",
    "bNumConfigurations": "usbip.bNumConfigurations",
    "bNumInterfaces": "usbip.bNumInterfaces",
    "bInterfaceClass": "usbip.bInterfaceClass",
    "bInterfaceSubClass": "usbip.bInterfaceSubClass",
    "bInterfaceProtocol": "usbip.bInterfaceProtocol",
}


def transfer_flag_names(flags: int) -> list[str]:
    return [name for bit, name in USBIP_URB_FLAGS.items() if flags & bit]


# --- conversation state ------------------------------------------------------------------------------------------


class SubmitInfo(NamedTuple):
    """What a RET_SUBMIT needs to know about its CMD_SUBMIT."""

    direction: int
    ep: int
    devid: int
    setup: bytes
    number_of_packets: int


class UsbipConversation:
    """The memory of one USB/IP connection: pending CMD_SUBMITs by seqnum, phase, busid, BOT command per device."""

    def __init__(self) -> None:
        self.submits: BoundedDict[int, SubmitInfo] = BoundedDict(1 << 16)
        self.phase = "op"  # "op" until a successful OP_REP_IMPORT, then "urb"
        self.busid: str | None = None
        self.bot: dict[int, tuple[int, int | None]] = {}  # devid -> (opcode, service action) of the open CBW

    def reset(self) -> None:
        self.submits.clear()
        self.bot.clear()
        self.phase = "op"
        self.busid = None


_CONVERSATIONS: BoundedDict[tuple[Any, ...], UsbipConversation] = BoundedDict(1024)
# Set while `tcp_reassemble` dissects one reassembled message: (conversation, single message mode).
_CURRENT: ContextVar[tuple[UsbipConversation, bool] | None] = ContextVar("usbip_current", default=None)


def reset_conversations() -> None:
    """Forget every connection seen so far (dissection state is otherwise kept across files, keyed by 4-tuple)."""
    _CONVERSATIONS.clear()


def _tcp_key(tcp: Packet) -> tuple[Any, ...] | None:
    ip = tcp.underlayer
    if ip is None or not hasattr(ip, "src"):
        return None
    a = (str(ip.src), int(tcp.sport))
    b = (str(ip.dst), int(tcp.dport))
    return (a, b) if a <= b else (b, a)


def conversation_for_key(key: tuple[Any, ...]) -> UsbipConversation:
    conv = _CONVERSATIONS.get(key)
    if conv is None:
        conv = _CONVERSATIONS[key] = UsbipConversation()
    return conv


def _conversation_of(pkt: Packet) -> tuple[UsbipConversation | None, bool]:
    current = _CURRENT.get()
    if current is not None:
        return current
    layer = pkt.underlayer
    while layer is not None:
        if isinstance(layer, TCP):
            key = _tcp_key(layer)
            return (conversation_for_key(key) if key is not None else None), False
        layer = layer.underlayer
    return None, False


@contextmanager
def dissecting(conversation: UsbipConversation, single_message: bool = True) -> Iterator[None]:
    """Dissect USB/IP bytes with this conversation's memory (and, by default, one message per call)."""
    token = _CURRENT.set((conversation, single_message))
    try:
        yield
    finally:
        _CURRENT.reset(token)


# --- framing -----------------------------------------------------------------------------------------------------


def _is_urb_header(data: bytes, off: int = 0) -> bool:
    return len(data) - off >= 4 and data[off : off + 3] == b"\0\0\0" and 1 <= data[off + 3] <= 4


def looks_like_usbip(data: bytes, off: int = 0) -> bool:
    """Whether a USB/IP message plausibly starts at `off`: a URB command 1..4, or version 0x0111 with a known code."""
    if _is_urb_header(data, off):
        return True
    if len(data) - off >= 4 and data[off : off + 2] == b"\x01\x11":
        return struct.unpack_from(">H", data, off + 2)[0] in OP_CODES
    return False


def _iso_count(number_of_packets: int) -> int:
    return number_of_packets if number_of_packets > 0 else 0  # 0 and 0xffffffff (-1) both mean "not ISO"


def message_length(data: bytes, conversation: UsbipConversation | None = None) -> int | None:
    """Length of the USB/IP message at the start of `data`; None when more bytes are needed to know; 0 when the
    bytes are not a USB/IP message at all. A RET_SUBMIT needs the conversation to know whether IN data follows."""
    if len(data) < 4:
        return None
    if data[:2] == b"\x01\x11":
        code = struct.unpack_from(">H", data, 2)[0]
        if code == OP_REQ_DEVLIST:
            return OP_COMMON_SIZE
        if code == OP_REQ_IMPORT:
            return OP_COMMON_SIZE + 32
        if code == OP_REP_IMPORT:
            if len(data) < 8:
                return None
            status = struct.unpack_from(">I", data, 4)[0]
            return OP_COMMON_SIZE + (USBIP_DEVICE_SIZE if status == ST_OK else 0)
        if code == OP_REP_DEVLIST:
            if len(data) < 8:
                return None
            if struct.unpack_from(">I", data, 4)[0] != ST_OK:
                return OP_COMMON_SIZE  # a failed devlist is only op_common (usbip_net_recv_op_common stops there)
            if len(data) < 12:
                return None
            ndev = struct.unpack_from(">I", data, 8)[0]
            off = 12
            for _ in range(ndev):
                if len(data) < off + USBIP_DEVICE_SIZE:
                    return None
                off += USBIP_DEVICE_SIZE + USBIP_INTERFACE_SIZE * data[off + USBIP_DEVICE_SIZE - 1]
            return off
        return 0
    if not _is_urb_header(data):
        return 0
    if len(data) < USBIP_HEADER_SIZE:
        return None
    command = data[3]
    if command in (USBIP_CMD_UNLINK, USBIP_RET_UNLINK):
        return USBIP_HEADER_SIZE
    if command == USBIP_CMD_SUBMIT:
        direction, _ep, _flags, length, _sf, npk = struct.unpack_from(">IIIiii", data, 12)
        return (
            USBIP_HEADER_SIZE + (max(length, 0) if direction == USBIP_DIR_OUT else 0) + 16 * _iso_count(npk)
        )
    # RET_SUBMIT
    seqnum = struct.unpack_from(">I", data, 4)[0]
    actual_length, _sf, npk = struct.unpack_from(">iii", data, 24)
    info = conversation.submits.get(seqnum) if conversation is not None else None
    data_in = _ret_has_data(data, actual_length, npk, info)
    return USBIP_HEADER_SIZE + (max(actual_length, 0) if data_in else 0) + 16 * _iso_count(npk)


def _ret_has_data(s: bytes, actual_length: int, npk: int, info: SubmitInfo | None) -> bool:
    """Whether IN data follows a RET_SUBMIT header: known from the CMD_SUBMIT, else inferred from what follows."""
    if actual_length <= 0:
        return False
    if info is not None:
        return info.direction == USBIP_DIR_IN
    iso = 16 * _iso_count(npk)
    rest = len(s) - USBIP_HEADER_SIZE
    if rest == iso:
        return False
    if rest == actual_length + iso:
        return True
    out_next = USBIP_HEADER_SIZE + iso
    in_next = USBIP_HEADER_SIZE + actual_length + iso
    in_ok = rest > actual_length + iso and looks_like_usbip(s, in_next)
    out_ok = looks_like_usbip(s, out_next)
    return in_ok or not out_ok


# --- fields ------------------------------------------------------------------------------------------------------


class _CStringField(StrFixedLenField):
    """A fixed-size, zero-padded C string (path[256], busid[32]); shown and compared without the padding."""

    def m2i(self, pkt: Packet | None, x: bytes) -> bytes:
        return x.split(b"\0", 1)[0]


class _StatusField(SignedIntField):
    def i2repr(self, pkt: Packet | None, x: Any) -> str:
        return "None" if x is None else f"{x} ({errno_name(x)})"


class _TransferFlagsField(XIntField):
    def i2repr(self, pkt: Packet | None, x: Any) -> str:
        if x is None:
            return "None"
        names = transfer_flag_names(x)
        return f"0x{x:08x}" + (f" ({'|'.join(names)})" if names else "")


class _TransferBufferField(StrLenField):
    """transfer_buffer: bytes on the wire, decoded (CBW, CSW, descriptors, SCSI data) when the context allows."""

    holds_packets = (
        1  # so pkt[BOT_CBW] finds a CBW inside; the value is always a Packet (Raw if undecoded) or None
    )

    def getfield(self, pkt: Packet, s: bytes) -> tuple[bytes, Any]:
        length = self.length_from(pkt) if self.length_from is not None else 0
        return s[length:], self.m2i(pkt, s[:length])

    def m2i(self, pkt: Packet | None, m: bytes) -> Any:
        if not m:
            return None
        decoded = None
        try:
            decoded = pkt._decode_buffer(m) if pkt is not None else None
        except Exception:
            if conf.debug_dissector:
                raise
        return conf.raw_layer(m) if decoded is None else decoded

    def any2i(self, pkt: Packet | None, x: Any) -> Any:
        if isinstance(x, bytes | bytearray):
            return conf.raw_layer(bytes(x)) if x else None
        return x

    def i2m(self, pkt: Packet | None, x: Any) -> bytes:
        return b"" if x is None else bytes(x)

    def i2len(self, pkt: Packet | None, x: Any) -> int:
        return len(self.i2m(pkt, x))


# --- the layers --------------------------------------------------------------------------------------------------


class USBIP_Interface(Packet):
    """struct usbip_usb_interface: one interface of an exported device in OP_REP_DEVLIST."""

    name = "USBIP interface"
    fields_desc = [
        ByteEnumField("bInterfaceClass", 0, USB_CLASSES),
        ByteField("bInterfaceSubClass", 0),
        ByteField("bInterfaceProtocol", 0),
        ByteField("padding", 0),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


def _device_fields(num_interfaces: Any) -> list[Any]:
    return [
        _CStringField("path", b"", 256),
        _CStringField("busid", b"", 32),
        IntField("busnum", 0),
        IntField("devnum", 0),
        IntEnumField("speed", 3, USB_SPEEDS),
        XShortField("idVendor", 0),
        XShortField("idProduct", 0),
        XShortField("bcdDevice", 0),
        ByteEnumField("bDeviceClass", 0, USB_CLASSES),
        ByteField("bDeviceSubClass", 0),
        ByteField("bDeviceProtocol", 0),
        ByteField("bConfigurationValue", 1),
        ByteField("bNumConfigurations", 1),
        num_interfaces,
    ]


class USBIP_Device(Packet):
    """struct usbip_usb_device (312 bytes): the device record of OP_REP_IMPORT."""

    name = "USBIP device"
    fields_desc = _device_fields(ByteField("bNumInterfaces", 1))

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s

    @property
    def devid(self) -> int:
        return (self.busnum << 16) | self.devnum


class USBIP_ExportedDevice(Packet):
    """One device of OP_REP_DEVLIST: usbip_usb_device followed by its bNumInterfaces interface records."""

    name = "USBIP exported device"
    fields_desc = [
        *_device_fields(FieldLenField("bNumInterfaces", None, count_of="interfaces", fmt="B")),
        PacketListField("interfaces", [], USBIP_Interface, count_from=lambda p: p.bNumInterfaces),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class USBIP_IsoPacketDescriptor(Packet):
    """struct usbip_iso_packet_descriptor: follows the transfer buffer of an ISO CMD_SUBMIT / RET_SUBMIT."""

    name = "USBIP iso packet descriptor"
    fields_desc = [
        IntField("offset", 0),
        IntField("length", 0),
        IntField("actual_length", 0),
        _StatusField("status", 0),
    ]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return b"", s


class USBIP(Packet):
    """Base of every USB/IP message, and the dispatcher: `USBIP(data)` is the message at the start of `data`."""

    name = "USBIP"
    match_subclass = True
    fields_desc = []  # type: ignore[var-annotated]  # a dispatcher: the subclasses have the fields

    @classmethod
    def dispatch_hook(cls, _pkt: bytes | None = None, *args: Any, **kargs: Any) -> type[Packet]:
        if cls is not USBIP or not _pkt:
            return cls
        if len(_pkt) >= 4 and _pkt[:2] == b"\x01\x11":
            return _OP_CLASSES.get(struct.unpack_from(">H", _pkt, 2)[0], conf.raw_layer)
        if _is_urb_header(_pkt):
            return _URB_CLASSES[_pkt[3]]
        return conf.raw_layer

    @classmethod
    def tcp_reassemble(cls, data: bytes, metadata: dict[str, Any], session: dict[str, Any]) -> Packet | None:
        """Called by TCPSession with the bytes buffered for one direction: return one whole message or None."""
        conv = session.get("usbip")
        if conv is None:
            original = metadata.get("original")
            key = _tcp_key(original[TCP]) if original is not None and TCP in original else None
            conv = conversation_for_key(key) if key is not None else UsbipConversation()
            session["usbip"] = conv
        length = message_length(data, conv)
        if length == 0:
            return conf.raw_layer(data)  # not USB/IP (a capture started mid-stream): let the buffer go
        if length is None or len(data) < length:
            if length is not None:
                metadata["tcp_min_len"] = length
            return None
        with dissecting(conv, single_message=True):
            return cls(data)

    def _single_message(self) -> bool:
        current = _CURRENT.get()
        return current is not None and current[1]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        if self._single_message():
            return b"", s
        return s, b""  # frame-by-frame dissection: further messages in the segment become the payload

    def guess_payload_class(self, payload: bytes) -> type[Packet]:
        return USBIP if looks_like_usbip(payload) else conf.raw_layer

    def post_dissect(self, s: bytes) -> bytes:
        conv, _single = _conversation_of(self)
        if conv is not None:
            self._remember(conv)
        return s

    def _remember(self, conv: UsbipConversation) -> None:
        pass


class _OpMessage(USBIP):
    """An OP_* message of the userspace phase: struct op_common then the message body."""

    def mysummary(self) -> str:
        status = OP_STATUS.get(self.status, self.status)
        return f"USBIP {OP_CODES.get(self.code, hex(self.code))} status={status}"


def _op_common(code: int) -> list[Any]:
    return [
        XShortField("version", USBIP_VERSION),
        ShortEnumField("code", code, OP_CODES),
        IntEnumField("status", ST_OK, OP_STATUS),
    ]


class USBIP_OpReqDevlist(_OpMessage):
    name = "USBIP OP_REQ_DEVLIST"
    fields_desc = _op_common(OP_REQ_DEVLIST)

    def _remember(self, conv: UsbipConversation) -> None:
        conv.reset()


class USBIP_OpRepDevlist(_OpMessage):
    name = "USBIP OP_REP_DEVLIST"
    fields_desc = [
        *_op_common(OP_REP_DEVLIST),
        # With a status other than ST_OK only op_common travels.
        ConditionalField(
            FieldLenField("ndev", None, count_of="devices", fmt="!I"), lambda p: p.status == ST_OK
        ),
        ConditionalField(
            PacketListField("devices", [], USBIP_ExportedDevice, count_from=lambda p: p.ndev),
            lambda p: p.status == ST_OK,
        ),
    ]


class USBIP_OpReqImport(_OpMessage):
    name = "USBIP OP_REQ_IMPORT"
    fields_desc = [*_op_common(OP_REQ_IMPORT), _CStringField("busid", b"", 32)]

    def _remember(self, conv: UsbipConversation) -> None:
        conv.reset()
        conv.busid = bytes(self.busid).decode("ascii", errors="replace")

    def mysummary(self) -> str:
        return f"USBIP OP_REQ_IMPORT busid={bytes(self.busid).decode('ascii', errors='replace')}"


class USBIP_OpRepImport(_OpMessage):
    """The reply to an import: the device record when status is ST_OK, else only the 8-byte header."""

    name = "USBIP OP_REP_IMPORT"
    fields_desc = [
        *_op_common(OP_REP_IMPORT),
        ConditionalField(PacketField("udev", USBIP_Device(), USBIP_Device), lambda p: p.status == ST_OK),
    ]

    def _remember(self, conv: UsbipConversation) -> None:
        if self.status == ST_OK:
            conv.phase = "urb"


def _basic_header(command: int) -> list[Any]:
    """struct usbip_header_basic (20 bytes)."""
    return [
        IntEnumField("command", command, URB_COMMANDS),
        IntField("seqnum", 0),
        XIntField("devid", 0),
        # The kernel's `direction`; named `dir` here because scapy's Packet.direction is taken (sniff direction).
        IntEnumField("dir", USBIP_DIR_OUT, DIRECTIONS),
        IntField("ep", 0),
    ]


class _UrbMessage(USBIP):
    def hashret(self) -> bytes:
        return struct.pack(">I", self.seqnum)


class USBIP_CmdSubmit(_UrbMessage):
    """USBIP_CMD_SUBMIT: a URB; OUT data follows the header, then ISO packet descriptors."""

    name = "USBIP CMD_SUBMIT"
    fields_desc = [
        *_basic_header(USBIP_CMD_SUBMIT),
        _TransferFlagsField("transfer_flags", 0),
        FieldLenField("transfer_buffer_length", None, length_of="transfer_buffer", fmt="!i"),
        SignedIntField("start_frame", 0),
        FieldLenField("number_of_packets", None, count_of="iso_packet_descriptors", fmt="!i"),
        SignedIntField("interval", 0),
        # Always 8 bytes; meaningful for control transfers (ep 0), zeros otherwise.
        PacketField("setup", USB_Setup(bmRequestType=0, bRequest=0), USB_Setup),
        _TransferBufferField(
            "transfer_buffer",
            None,
            length_from=lambda p: max(p.transfer_buffer_length or 0, 0) if p.dir == USBIP_DIR_OUT else 0,
        ),
        PacketListField(
            "iso_packet_descriptors",
            [],
            USBIP_IsoPacketDescriptor,
            count_from=lambda p: _iso_count(p.number_of_packets or 0),
        ),
    ]

    @property
    def endpoint_address(self) -> int:
        return (self.ep & 0x7F) | (0x80 if self.dir == USBIP_DIR_IN else 0)

    @property
    def setup_bytes(self) -> bytes:
        return bytes(self.setup) if self.setup is not None else b"\0" * 8

    def _decode_buffer(self, data: bytes) -> Packet | None:
        if self.ep != 0 and is_cbw(data):
            return BOT_CBW(data)
        return None

    def _remember(self, conv: UsbipConversation) -> None:
        conv.phase = "urb"
        conv.submits[self.seqnum] = SubmitInfo(
            self.dir, self.ep, self.devid, self.setup_bytes, self.number_of_packets or 0
        )
        buf = self.transfer_buffer
        if isinstance(buf, BOT_CBW):
            _tag, opcode, service_action = cbw_command(bytes(buf))
            conv.bot[self.devid] = (opcode, service_action)

    def mysummary(self) -> str:
        direction = "IN" if self.dir == USBIP_DIR_IN else "OUT"
        return (
            f"USBIP CMD_SUBMIT seq={self.seqnum} devid={self.devid:#x} ep={self.ep} {direction} "
            f"len={self.transfer_buffer_length}"
        )


class USBIP_RetSubmit(_UrbMessage):
    """USBIP_RET_SUBMIT: the URB's result; IN data follows the header when the URB was IN, then ISO descriptors."""

    name = "USBIP RET_SUBMIT"
    fields_desc = [
        *_basic_header(USBIP_RET_SUBMIT),
        _StatusField("status", 0),
        FieldLenField("actual_length", None, length_of="transfer_buffer", fmt="!i"),
        SignedIntField("start_frame", 0),
        FieldLenField("number_of_packets", None, count_of="iso_packet_descriptors", fmt="!i"),
        SignedIntField("error_count", 0),
        StrFixedLenField("padding", b"\0" * 8, 8),
        _TransferBufferField(
            "transfer_buffer",
            None,
            length_from=lambda p: max(p.actual_length or 0, 0) if p.__dict__.get("_data_in") else 0,
        ),
        PacketListField(
            "iso_packet_descriptors",
            [],
            USBIP_IsoPacketDescriptor,
            count_from=lambda p: _iso_count(p.number_of_packets or 0),
        ),
    ]

    def pre_dissect(self, s: bytes) -> bytes:
        conv, _single = _conversation_of(self)
        self._submit = None
        self._bot = None
        if len(s) >= USBIP_HEADER_SIZE:
            seqnum = struct.unpack_from(">I", s, 4)[0]
            actual_length, _sf, npk = struct.unpack_from(">iii", s, 24)
            if conv is not None:
                self._submit = conv.submits.get(seqnum)
                if self._submit is not None:
                    self._bot = conv.bot.get(self._submit.devid)
            self._data_in = _ret_has_data(s, actual_length, npk, self._submit)
        else:
            self._data_in = False
        return s

    @property
    def submit(self) -> SubmitInfo | None:
        """The CMD_SUBMIT this answers, when the dissection saw it."""
        return self.__dict__.get("_submit")

    def _decode_buffer(self, data: bytes) -> Packet | None:
        submit = self.submit
        if submit is not None and submit.ep == 0:
            return dissect_control_in(submit.setup, data)
        if submit is not None or is_csw(data):
            return dissect_bulk(data, self.__dict__.get("_bot"))
        return None

    def _remember(self, conv: UsbipConversation) -> None:
        conv.phase = "urb"
        submit = self.submit
        if submit is not None and isinstance(self.transfer_buffer, BOT_CSW):
            conv.bot.pop(submit.devid, None)

    def answers(self, other: Packet) -> bool:
        return isinstance(other, USBIP_CmdSubmit) and other.seqnum == self.seqnum

    def mysummary(self) -> str:
        return f"USBIP RET_SUBMIT seq={self.seqnum} status={errno_name(self.status)} len={self.actual_length}"


class USBIP_CmdUnlink(_UrbMessage):
    """USBIP_CMD_UNLINK: cancel the CMD_SUBMIT whose seqnum is `unlink_seqnum`."""

    name = "USBIP CMD_UNLINK"
    fields_desc = [
        *_basic_header(USBIP_CMD_UNLINK),
        IntField("unlink_seqnum", 0),
        StrFixedLenField("padding", b"\0" * 24, 24),
    ]

    def mysummary(self) -> str:
        return f"USBIP CMD_UNLINK seq={self.seqnum} unlink_seqnum={self.unlink_seqnum}"


class USBIP_RetUnlink(_UrbMessage):
    """USBIP_RET_UNLINK: -ECONNRESET when the URB was unlinked (no RET_SUBMIT follows), 0 if it had completed."""

    name = "USBIP RET_UNLINK"
    fields_desc = [
        *_basic_header(USBIP_RET_UNLINK),
        _StatusField("status", 0),
        StrFixedLenField("padding", b"\0" * 24, 24),
    ]

    def answers(self, other: Packet) -> bool:
        return isinstance(other, USBIP_CmdUnlink) and other.seqnum == self.seqnum

    def mysummary(self) -> str:
        return f"USBIP RET_UNLINK seq={self.seqnum} status={errno_name(self.status)}"


_OP_CLASSES: dict[int, type[Packet]] = {
    OP_REQ_DEVLIST: USBIP_OpReqDevlist,
    OP_REP_DEVLIST: USBIP_OpRepDevlist,
    OP_REQ_IMPORT: USBIP_OpReqImport,
    OP_REP_IMPORT: USBIP_OpRepImport,
}
_URB_CLASSES: dict[int, type[Packet]] = {
    USBIP_CMD_SUBMIT: USBIP_CmdSubmit,
    USBIP_CMD_UNLINK: USBIP_CmdUnlink,
    USBIP_RET_SUBMIT: USBIP_RetSubmit,
    USBIP_RET_UNLINK: USBIP_RetUnlink,
}

bind_layers(TCP, USBIP, sport=USBIP_PORT)
bind_layers(TCP, USBIP, dport=USBIP_PORT)


def dissect_message(data: bytes, *, direction: int | None = None) -> Packet:
    """One standalone message; for a RET_SUBMIT, `direction` is its CMD_SUBMIT's (else inferred from the length).

    The counterpart of the core's `emulator.usbip.unpack(data, direction=...)`, for rich dissection.
    """
    conv = UsbipConversation()
    if direction is not None and _is_urb_header(data) and data[3] == USBIP_RET_SUBMIT and len(data) >= 8:
        seqnum = struct.unpack_from(">I", data, 4)[0]
        conv.submits[seqnum] = SubmitInfo(direction, -1, 0, b"\0" * 8, 0)
    with dissecting(conv, single_message=True):
        return USBIP(data)


def usbip_messages(pkt: Packet) -> list[Packet]:
    """The USB/IP messages of a dissected packet, in order (a segment may chain several)."""
    out = []
    layer = pkt.getlayer(USBIP)
    while layer is not None and isinstance(layer, USBIP):
        out.append(layer)
        layer = layer.payload if isinstance(layer.payload, USBIP) else None
    return out


def message_bytes(layer: Packet) -> bytes:
    """The wire bytes of one message layer, without the messages chained after it."""
    whole = bytes(layer)
    return whole[: len(whole) - len(bytes(layer.payload))] if layer.payload else whole
