"""One dataclass per USB/IP wire struct or message, named after the kernel's.

These are plain values: no I/O, no validation at construction (the codec validates on `pack` and on
decode, so the hot path builds each message once). Field names and order follow the kernel
(usbip_common.h, usbip_network.h); every constructor is keyword-only.

All are frozen except the four URB messages (CmdSubmit, RetSubmit, CmdUnlink, RetUnlink): the hot path
builds two of them per URB, and a frozen dataclass stores each field through `object.__setattr__`, which
makes a CmdSubmit cost five times what the rest of its decoding does. Treat them as values all the same:
they compare and hash by their fields, and nothing in vusb changes one after it is made (the connections
keep their own record of each outstanding URB, so changing a message after sending it changes nothing).

Signedness follows the kernel structs: `transfer_buffer_length`, `start_frame`, `number_of_packets`,
`interval`, `status`, `actual_length`, `error_count` are `__s32` (so a non-iso `number_of_packets` of
0xffffffff on the wire is -1 here); header fields and iso `offset`/`length`/`actual_length` are `__u32`.
An iso descriptor's `status` is `__u32` on the wire but an errno in the kernel's
`usb_iso_packet_descriptor`, so it is signed here.

Payloads ride with their message: `transfer_buffer` holds exactly the bytes on the wire (OUT data in a
CmdSubmit, IN data in a RetSubmit; for iso IN, the packets' actual bytes back to back, without the padding
stub_tx.c strips), `iso_packet_descriptors` the descriptors that follow it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from emulator.usbip.constants import (
    OP_REP_DEVLIST,
    OP_REP_IMPORT,
    OP_REQ_DEVLIST,
    OP_REQ_IMPORT,
    ST_OK,
    USBIP_CMD_SUBMIT,
    USBIP_CMD_UNLINK,
    USBIP_RET_SUBMIT,
    USBIP_RET_UNLINK,
)

_NO_SETUP = bytes(8)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderBasic:
    """struct usbip_header_basic: the first 20 bytes of every URB-phase message."""

    command: int
    seqnum: int
    devid: int
    direction: int
    ep: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IsoPacketDescriptor:
    """struct usbip_iso_packet_descriptor (16 bytes)."""

    offset: int
    length: int
    actual_length: int = 0
    status: int = 0


@dataclass(slots=True, kw_only=True, unsafe_hash=True)  # not frozen: see the module docstring
class CmdSubmit:
    """USBIP_CMD_SUBMIT: usbip_header_basic + usbip_header_cmd_submit, then the OUT transfer_buffer
    (transfer_buffer_length bytes; none for IN), then the iso packet descriptors.

    `number_of_packets` > 0 means isochronous (that many descriptors follow); a non-iso URB carries 0 (what
    Linux's vhci sends) or -1 (0xffffffff, what the protocol document prescribes), kept as decoded.
    """

    command: ClassVar[int] = USBIP_CMD_SUBMIT

    seqnum: int
    devid: int
    direction: int
    ep: int
    transfer_flags: int = 0
    transfer_buffer_length: int = 0
    start_frame: int = 0
    number_of_packets: int = 0
    interval: int = 0
    setup: bytes = _NO_SETUP
    transfer_buffer: bytes = b""
    iso_packet_descriptors: tuple[IsoPacketDescriptor, ...] = ()

    @property
    def is_iso(self) -> bool:
        """True when iso packet descriptors follow (number_of_packets > 0)."""
        return self.number_of_packets > 0


@dataclass(slots=True, kw_only=True, unsafe_hash=True)  # not frozen: see the module docstring
class RetSubmit:
    """USBIP_RET_SUBMIT: usbip_header_basic + usbip_header_ret_submit (+ 8 bytes of padding), then the IN
    transfer_buffer (actual_length bytes; none for OUT), then the iso packet descriptors.

    `devid`, `direction`, `ep` are what travels in the header: the kernel's stub sends 0 for all three.
    Whether a transfer_buffer follows is decided by the direction of the CMD_SUBMIT with the same seqnum,
    not by this header.
    """

    command: ClassVar[int] = USBIP_RET_SUBMIT

    seqnum: int
    devid: int = 0
    direction: int = 0
    ep: int = 0
    status: int = 0
    actual_length: int = 0
    start_frame: int = 0
    number_of_packets: int = 0
    error_count: int = 0
    transfer_buffer: bytes = b""
    iso_packet_descriptors: tuple[IsoPacketDescriptor, ...] = ()


@dataclass(slots=True, kw_only=True, unsafe_hash=True)  # not frozen: see the module docstring
class CmdUnlink:
    """USBIP_CMD_UNLINK: usbip_header_basic + usbip_header_cmd_unlink (+ 24 bytes of padding).

    `seqnum` is this request's own number; `unlink_seqnum` the CMD_SUBMIT to cancel.
    """

    command: ClassVar[int] = USBIP_CMD_UNLINK

    seqnum: int
    devid: int = 0
    direction: int = 0
    ep: int = 0
    unlink_seqnum: int


@dataclass(slots=True, kw_only=True, unsafe_hash=True)  # not frozen: see the module docstring
class RetUnlink:
    """USBIP_RET_UNLINK: usbip_header_basic + usbip_header_ret_unlink (+ 24 bytes of padding).

    `status` is -ECONNRESET when the URB was cancelled (no RET_SUBMIT follows), 0 when it had already
    completed (its RET_SUBMIT was or will be sent).
    """

    command: ClassVar[int] = USBIP_RET_UNLINK

    seqnum: int
    devid: int = 0
    direction: int = 0
    ep: int = 0
    status: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class UsbInterface:
    """struct usbip_usb_interface (4 bytes: class, subclass, protocol, padding)."""

    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UsbDevice:
    """struct usbip_usb_device (312 bytes): an exported device as usbipd describes it.

    `path` and `busid` are NUL-terminated strings in fixed fields of SYSFS_PATH_MAX (256) and
    SYSFS_BUS_ID_SIZE (32) bytes.
    """

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    idVendor: int
    idProduct: int
    bcdDevice: int
    bDeviceClass: int = 0
    bDeviceSubClass: int = 0
    bDeviceProtocol: int = 0
    bConfigurationValue: int = 1
    bNumConfigurations: int = 1
    bNumInterfaces: int = 0

    @property
    def devid(self) -> int:
        """The devid URB headers carry for this device: (busnum << 16) | devnum, as stub_dev.c computes."""
        return (self.busnum << 16) | self.devnum


@dataclass(frozen=True, slots=True, kw_only=True)
class OpDevlistReplyExtra:
    """struct op_devlist_reply_extra: one device of OP_REP_DEVLIST and its bNumInterfaces interfaces."""

    udev: UsbDevice
    uinf: tuple[UsbInterface, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class OpReqDevlist:
    """OP_REQ_DEVLIST: just op_common (status 0)."""

    code: ClassVar[int] = OP_REQ_DEVLIST


@dataclass(frozen=True, slots=True, kw_only=True)
class OpRepDevlist:
    """OP_REP_DEVLIST: op_common, then (if status is ST_OK) ndev and ndev op_devlist_reply_extra records.

    With a non-zero status only the 8-byte op_common travels: the client (usbip_net_recv_op_common) stops
    reading there.
    """

    code: ClassVar[int] = OP_REP_DEVLIST

    status: int = ST_OK
    devices: tuple[OpDevlistReplyExtra, ...] = ()

    @property
    def ndev(self) -> int:
        """op_devlist_reply.ndev."""
        return len(self.devices)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpReqImport:
    """OP_REQ_IMPORT: op_common (status 0) + op_import_request.busid[32]."""

    code: ClassVar[int] = OP_REQ_IMPORT

    busid: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpRepImport:
    """OP_REP_IMPORT: op_common, then the imported usbip_usb_device (no interfaces) if status is ST_OK.

    On failure usbipd (recv_request_import) sends only the 8-byte op_common with ST_NA / ST_NODEV /
    ST_DEV_BUSY, so `udev` is None exactly when `status` is not ST_OK.
    """

    code: ClassVar[int] = OP_REP_IMPORT

    status: int = ST_OK
    udev: UsbDevice | None = None


OpMessage = OpReqDevlist | OpRepDevlist | OpReqImport | OpRepImport
UrbMessage = CmdSubmit | RetSubmit | CmdUnlink | RetUnlink
Message = OpMessage | UrbMessage
