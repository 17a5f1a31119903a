"""The sans-I/O USB/IP protocol core (kernel Documentation/usb/usbip_protocol.rst, version 0x0111).

Bytes in, typed messages out, and back; no sockets, no asyncio, no files. Rooms:
`constants` (kernel names as IntEnums), `messages` (one frozen dataclass per wire struct), `codec`
(`pack`/`unpack` and incremental readers), `connection` (server and client state machines: phases,
seqnums, unlink), `errors` (`ProtocolError` and its remote/local kinds).
"""

from emulator.usbip.codec import DEFAULT_LIMITS, Limits, message_name, pack, unpack
from emulator.usbip.connection import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Event,
    Phase,
    ServerConnection,
)
from emulator.usbip.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
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

__all__ = [
    "DEFAULT_LIMITS",
    "NEED_DATA",
    "ClientConnection",
    "CmdSubmit",
    "CmdUnlink",
    "ConnectionClosed",
    "Event",
    "HeaderBasic",
    "IsoPacketDescriptor",
    "Limits",
    "LocalProtocolError",
    "Message",
    "OpDevlistReplyExtra",
    "OpRepDevlist",
    "OpRepImport",
    "OpReqDevlist",
    "OpReqImport",
    "Phase",
    "ProtocolError",
    "RemoteProtocolError",
    "RetSubmit",
    "RetUnlink",
    "ServerConnection",
    "UsbDevice",
    "UsbInterface",
    "message_name",
    "pack",
    "unpack",
]
