"""USB/IP protocol constants, named exactly as in the kernel so a reader can grep for them.

Sources: Documentation/usb/usbip_protocol.rst, drivers/usb/usbip/usbip_common.h (commands, directions,
USBIP_MAX_ISO_PACKETS), include/uapi/linux/usbip.h (device states, USBIP_URB_* wire flags),
tools/usb/usbip/libsrc/usbip_common.h (ST_* op status, SYSFS_* sizes), tools/usb/usbip/src/usbip_network.h
(OP_* codes), include/uapi/linux/usb/ch9.h (USB_SPEED_*), include/uapi/asm-generic/errno*.h (Linux errno
values as they travel in `status` fields — they are Linux numbers whatever the host OS).

Every enum member is also bound at module level (`OP_REQ_IMPORT`, `USBIP_CMD_SUBMIT`, `ST_NODEV`, ...).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

USBIP_VERSION: Final = 0x0111
"""Protocol version v1.1.1 as carried in every op_common header."""

USBIP_PORT: Final = 3240
"""usbipd's default TCP port (tools/usb/usbip/src/usbip_network.c)."""

SYSFS_PATH_MAX: Final = 256
SYSFS_BUS_ID_SIZE: Final = 32

USBIP_MAX_ISO_PACKETS: Final = 1024
"""stub_rx.c refuses iso CMD_SUBMITs with more packets than this (usbip_common.h)."""

USB_MAXINTERFACES: Final = 32
"""include/linux/usb.h: the most interfaces a configuration may have in Linux."""

# Wire sizes (bytes).
OP_COMMON_SIZE: Final = 8
USBIP_HEADER_SIZE: Final = 48
USBIP_USB_DEVICE_SIZE: Final = 312
USBIP_USB_INTERFACE_SIZE: Final = 4
USBIP_ISO_PACKET_DESCRIPTOR_SIZE: Final = 16


class OpCode(IntEnum):
    """op_common.code (usbip_network.h): OP_REQUEST (0x80 << 8) | op, or OP_REPLY (0) | op."""

    OP_UNSPEC = 0x00
    OP_REQ_DEVINFO = 0x8002
    OP_REP_DEVINFO = 0x0002
    OP_REQ_IMPORT = 0x8003
    OP_REP_IMPORT = 0x0003
    OP_REQ_CRYPKEY = 0x8004
    OP_REP_CRYPKEY = 0x0004
    OP_REQ_DEVLIST = 0x8005
    OP_REP_DEVLIST = 0x0005
    OP_REQ_EXPORT = 0x8006
    OP_REP_EXPORT = 0x0006
    OP_REQ_UNEXPORT = 0x8007
    OP_REP_UNEXPORT = 0x0007


OP_UNSPEC: Final = OpCode.OP_UNSPEC
OP_REQ_DEVINFO: Final = OpCode.OP_REQ_DEVINFO
OP_REP_DEVINFO: Final = OpCode.OP_REP_DEVINFO
OP_REQ_IMPORT: Final = OpCode.OP_REQ_IMPORT
OP_REP_IMPORT: Final = OpCode.OP_REP_IMPORT
OP_REQ_CRYPKEY: Final = OpCode.OP_REQ_CRYPKEY
OP_REP_CRYPKEY: Final = OpCode.OP_REP_CRYPKEY
OP_REQ_DEVLIST: Final = OpCode.OP_REQ_DEVLIST
OP_REP_DEVLIST: Final = OpCode.OP_REP_DEVLIST
OP_REQ_EXPORT: Final = OpCode.OP_REQ_EXPORT
OP_REP_EXPORT: Final = OpCode.OP_REP_EXPORT
OP_REQ_UNEXPORT: Final = OpCode.OP_REQ_UNEXPORT
OP_REP_UNEXPORT: Final = OpCode.OP_REP_UNEXPORT


class OpStatus(IntEnum):
    """op_common.status of a reply (libsrc/usbip_common.h). Requests carry ST_OK."""

    ST_OK = 0x00
    ST_NA = 0x01
    ST_DEV_BUSY = 0x02
    ST_DEV_ERR = 0x03
    ST_NODEV = 0x04
    ST_ERROR = 0x05


ST_OK: Final = OpStatus.ST_OK
ST_NA: Final = OpStatus.ST_NA
ST_DEV_BUSY: Final = OpStatus.ST_DEV_BUSY
ST_DEV_ERR: Final = OpStatus.ST_DEV_ERR
ST_NODEV: Final = OpStatus.ST_NODEV
ST_ERROR: Final = OpStatus.ST_ERROR


class UsbipCommand(IntEnum):
    """usbip_header_basic.command (usbip_common.h)."""

    USBIP_CMD_SUBMIT = 0x0001
    USBIP_CMD_UNLINK = 0x0002
    USBIP_RET_SUBMIT = 0x0003
    USBIP_RET_UNLINK = 0x0004


USBIP_CMD_SUBMIT: Final = UsbipCommand.USBIP_CMD_SUBMIT
USBIP_CMD_UNLINK: Final = UsbipCommand.USBIP_CMD_UNLINK
USBIP_RET_SUBMIT: Final = UsbipCommand.USBIP_RET_SUBMIT
USBIP_RET_UNLINK: Final = UsbipCommand.USBIP_RET_UNLINK


class UsbipDir(IntEnum):
    """usbip_header_basic.direction."""

    USBIP_DIR_OUT = 0x00
    USBIP_DIR_IN = 0x01


USBIP_DIR_OUT: Final = UsbipDir.USBIP_DIR_OUT
USBIP_DIR_IN: Final = UsbipDir.USBIP_DIR_IN


class UsbDeviceSpeed(IntEnum):
    """enum usb_device_speed (ch9.h), as in usbip_usb_device.speed."""

    USB_SPEED_UNKNOWN = 0
    USB_SPEED_LOW = 1
    USB_SPEED_FULL = 2
    USB_SPEED_HIGH = 3
    USB_SPEED_WIRELESS = 4
    USB_SPEED_SUPER = 5
    USB_SPEED_SUPER_PLUS = 6


USB_SPEED_UNKNOWN: Final = UsbDeviceSpeed.USB_SPEED_UNKNOWN
USB_SPEED_LOW: Final = UsbDeviceSpeed.USB_SPEED_LOW
USB_SPEED_FULL: Final = UsbDeviceSpeed.USB_SPEED_FULL
USB_SPEED_HIGH: Final = UsbDeviceSpeed.USB_SPEED_HIGH
USB_SPEED_WIRELESS: Final = UsbDeviceSpeed.USB_SPEED_WIRELESS
USB_SPEED_SUPER: Final = UsbDeviceSpeed.USB_SPEED_SUPER
USB_SPEED_SUPER_PLUS: Final = UsbDeviceSpeed.USB_SPEED_SUPER_PLUS


class UsbipUrbFlag(IntFlag):
    """cmd_submit.transfer_flags on the wire (uapi/linux/usbip.h: fixed values, independent of the
    in-kernel URB_* bits, which vhci/stub translate to and from)."""

    USBIP_URB_SHORT_NOT_OK = 0x0001
    USBIP_URB_ISO_ASAP = 0x0002
    USBIP_URB_NO_TRANSFER_DMA_MAP = 0x0004
    USBIP_URB_ZERO_PACKET = 0x0040
    USBIP_URB_NO_INTERRUPT = 0x0080
    USBIP_URB_FREE_BUFFER = 0x0100
    USBIP_URB_DIR_IN = 0x0200
    USBIP_URB_DMA_MAP_SINGLE = 0x00010000
    USBIP_URB_DMA_MAP_PAGE = 0x00020000
    USBIP_URB_DMA_MAP_SG = 0x00040000
    USBIP_URB_MAP_LOCAL = 0x00080000
    USBIP_URB_SETUP_MAP_SINGLE = 0x00100000
    USBIP_URB_SETUP_MAP_LOCAL = 0x00200000
    USBIP_URB_DMA_SG_COMBINED = 0x00400000
    USBIP_URB_ALIGNED_TEMP_BUFFER = 0x00800000


USBIP_URB_SHORT_NOT_OK: Final = UsbipUrbFlag.USBIP_URB_SHORT_NOT_OK
USBIP_URB_ISO_ASAP: Final = UsbipUrbFlag.USBIP_URB_ISO_ASAP
USBIP_URB_NO_TRANSFER_DMA_MAP: Final = UsbipUrbFlag.USBIP_URB_NO_TRANSFER_DMA_MAP
USBIP_URB_ZERO_PACKET: Final = UsbipUrbFlag.USBIP_URB_ZERO_PACKET
USBIP_URB_NO_INTERRUPT: Final = UsbipUrbFlag.USBIP_URB_NO_INTERRUPT
USBIP_URB_FREE_BUFFER: Final = UsbipUrbFlag.USBIP_URB_FREE_BUFFER
USBIP_URB_DIR_IN: Final = UsbipUrbFlag.USBIP_URB_DIR_IN
USBIP_URB_DIR_OUT: Final = 0
USBIP_URB_DIR_MASK: Final = UsbipUrbFlag.USBIP_URB_DIR_IN

# The same wire bits under the in-kernel URB_* names (include/linux/usb.h), as drivers know them.
URB_SHORT_NOT_OK: Final = UsbipUrbFlag.USBIP_URB_SHORT_NOT_OK
URB_ISO_ASAP: Final = UsbipUrbFlag.USBIP_URB_ISO_ASAP
URB_NO_TRANSFER_DMA_MAP: Final = UsbipUrbFlag.USBIP_URB_NO_TRANSFER_DMA_MAP
URB_ZERO_PACKET: Final = UsbipUrbFlag.USBIP_URB_ZERO_PACKET
URB_NO_INTERRUPT: Final = UsbipUrbFlag.USBIP_URB_NO_INTERRUPT
URB_FREE_BUFFER: Final = UsbipUrbFlag.USBIP_URB_FREE_BUFFER
URB_DIR_IN: Final = UsbipUrbFlag.USBIP_URB_DIR_IN
URB_DIR_OUT: Final = 0
URB_DIR_MASK: Final = UsbipUrbFlag.USBIP_URB_DIR_IN


class UsbipDeviceStatus(IntEnum):
    """enum usbip_device_status (uapi/linux/usbip.h): the sysfs `status` of a stub (SDEV) or vhci port
    (VDEV)."""

    SDEV_ST_AVAILABLE = 0x01
    SDEV_ST_USED = 0x02
    SDEV_ST_ERROR = 0x03
    VDEV_ST_NULL = 0x04
    VDEV_ST_NOTASSIGNED = 0x05
    VDEV_ST_USED = 0x06
    VDEV_ST_ERROR = 0x07


SDEV_ST_AVAILABLE: Final = UsbipDeviceStatus.SDEV_ST_AVAILABLE
SDEV_ST_USED: Final = UsbipDeviceStatus.SDEV_ST_USED
SDEV_ST_ERROR: Final = UsbipDeviceStatus.SDEV_ST_ERROR
VDEV_ST_NULL: Final = UsbipDeviceStatus.VDEV_ST_NULL
VDEV_ST_NOTASSIGNED: Final = UsbipDeviceStatus.VDEV_ST_NOTASSIGNED
VDEV_ST_USED: Final = UsbipDeviceStatus.VDEV_ST_USED
VDEV_ST_ERROR: Final = UsbipDeviceStatus.VDEV_ST_ERROR


class LinuxErrno(IntEnum):
    """Linux errno values that URB status fields carry, negated (Documentation/driver-api/usb/error-codes
    .rst). Fixed numbers: the wire speaks Linux whatever OS we run on."""

    ENOENT = 2
    EXDEV = 18
    ENODEV = 19
    EINVAL = 22
    EPIPE = 32
    ETIME = 62
    ENOSR = 63
    ECOMM = 70
    EPROTO = 71
    EOVERFLOW = 75
    EILSEQ = 84
    EMSGSIZE = 90
    ECONNRESET = 104
    ESHUTDOWN = 108
    EINPROGRESS = 115
    EREMOTEIO = 121


ENOENT: Final = LinuxErrno.ENOENT
EXDEV: Final = LinuxErrno.EXDEV
ENODEV: Final = LinuxErrno.ENODEV
EINVAL: Final = LinuxErrno.EINVAL
EPIPE: Final = LinuxErrno.EPIPE
ETIME: Final = LinuxErrno.ETIME
ENOSR: Final = LinuxErrno.ENOSR
ECOMM: Final = LinuxErrno.ECOMM
EPROTO: Final = LinuxErrno.EPROTO
EOVERFLOW: Final = LinuxErrno.EOVERFLOW
EILSEQ: Final = LinuxErrno.EILSEQ
EMSGSIZE: Final = LinuxErrno.EMSGSIZE
ECONNRESET: Final = LinuxErrno.ECONNRESET
ESHUTDOWN: Final = LinuxErrno.ESHUTDOWN
EINPROGRESS: Final = LinuxErrno.EINPROGRESS
EREMOTEIO: Final = LinuxErrno.EREMOTEIO
