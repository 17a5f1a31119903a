"""A CDC-ACM serial port (CDC 1.2 + PSTN 1.2 Abstract Control Model), fed from Python.

Two interfaces, tied together by an IAD like the kernel's f_acm: a communication interface (header, call
management, ACM and union functional descriptors, an interrupt IN endpoint for SERIAL_STATE
notifications) and a data interface (bulk IN, bulk OUT). The host sees /dev/ttyACM*.

Where the bytes the host writes go: back to the host on bulk IN (loopback, the default), to a
`on_receive` callback, or into a buffer Python code `read()`s. Python code `write()`s bytes for the host
to read. Each direction holds at most `buffer_size` bytes: a full buffer NAKs the host's bulk OUT (returns
None) until there is room again, and the device's wake-up is called when there is.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from emulator.devices.base import (
    STALL,
    Device,
    DeviceError,
    EndpointSpec,
    Function,
    InterfaceSpec,
    Reply,
)
from emulator.usb.descriptors import (
    CdcAcmDescriptor,
    CdcCallManagementDescriptor,
    CdcHeaderDescriptor,
    CdcUnionDescriptor,
)
from emulator.usb.setup import ClassCode, Direction, Recipient, RequestType, SetupPacket, Speed, TransferType


class CdcAcmError(DeviceError):
    """Python-side misuse of the serial model (reading in loopback mode, a bad line coding)."""


class CdcRequest(enum.IntEnum):
    """CDC 1.2 table 19 / PSTN 1.2 table 13 class requests used by ACM (kernel USB_CDC_REQ_*)."""

    SEND_ENCAPSULATED_COMMAND = 0x00
    GET_ENCAPSULATED_RESPONSE = 0x01
    SET_LINE_CODING = 0x20
    GET_LINE_CODING = 0x21
    SET_CONTROL_LINE_STATE = 0x22
    SEND_BREAK = 0x23


CDC_SUBCLASS_ACM = 0x02
CDC_ACM_PROTO_AT_V25TER = 0x01
NOTIFY_SERIAL_STATE = 0x20  # PSTN 1.2 §6.5.4
CDC_CAP_LINE = 0x02  # ACM bmCapabilities: line coding, control line state, serial state
CDC_CAP_BRK = 0x04  # ACM bmCapabilities: SEND_BREAK
CONTROL_LINE_DTR = 0x01
CONTROL_LINE_RTS = 0x02
SEND_BREAK_UNTIL_CLEARED = 0xFFFF


class SerialState(enum.IntFlag):
    """The UART state bitmap of a SERIAL_STATE notification (PSTN 1.2 table 31)."""

    DCD = 0x01  # bRxCarrier
    DSR = 0x02  # bTxCarrier
    BREAK = 0x04
    RING = 0x08
    FRAMING = 0x10
    PARITY = 0x20
    OVERRUN = 0x40


_LINE_CODING = struct.Struct("<IBBB")


@dataclass(frozen=True, slots=True)
class LineCoding:
    """PSTN 1.2 table 17: dwDTERate, bCharFormat (0 = 1 stop bit, 1 = 1.5, 2 = 2), bParityType (0 none,
    1 odd, 2 even, 3 mark, 4 space), bDataBits (5, 6, 7, 8 or 16). Default 9600 8N1, as f_acm."""

    rate: int = 9600
    char_format: int = 0
    parity: int = 0
    data_bits: int = 8

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 0xFFFFFFFF:
            raise CdcAcmError(f"line rate {self.rate} does not fit dwDTERate")
        if self.char_format not in (0, 1, 2):
            raise CdcAcmError(f"bCharFormat {self.char_format} is not 0, 1 or 2")
        if self.parity not in range(5):
            raise CdcAcmError(f"bParityType {self.parity} is not 0..4")
        if self.data_bits not in (5, 6, 7, 8, 16):
            raise CdcAcmError(f"bDataBits {self.data_bits} is not 5, 6, 7, 8 or 16")

    def to_bytes(self) -> bytes:
        return _LINE_CODING.pack(self.rate, self.char_format, self.parity, self.data_bits)

    @classmethod
    def from_bytes(cls, data: bytes) -> LineCoding:
        if len(data) != _LINE_CODING.size:
            raise CdcAcmError(f"a line coding is {_LINE_CODING.size} bytes, got {len(data)}")
        return cls(*_LINE_CODING.unpack(data))


class CdcAcmFunction(Function):
    """The ACM function: class requests on the communication interface, the byte streams on the data
    interface, SERIAL_STATE notifications on the interrupt endpoint.

    Modes: `CdcAcmFunction()` loops back; `CdcAcmFunction(loopback=False)` keeps host bytes for
    `read()`; `CdcAcmFunction(on_receive=callback)` hands them to `callback` (on the edge's thread).
    """

    name = "cdc_acm"
    function_name = "CDC Serial"

    def __init__(
        self,
        *,
        loopback: bool = True,
        on_receive: Callable[[bytes], None] | None = None,
        buffer_size: int = 64 * 1024,
    ) -> None:
        super().__init__()
        if buffer_size < 1:
            raise CdcAcmError("buffer_size must be at least one byte")
        self.on_receive = on_receive
        self.loopback = loopback and on_receive is None
        self.buffer_size = buffer_size
        self._cond = threading.Condition()
        self._to_host = bytearray()  # bulk IN
        self._from_host = bytearray()  # what read() returns (stream mode)
        self._notifications: list[bytes] = []
        self._out_blocked = False  # a bulk OUT was NAK'd for want of room
        self.line_coding = LineCoding()
        self.control_lines = 0
        self.break_duration: int | None = None  # ms of the last SEND_BREAK; 0xFFFF: until cleared
        self.breaks_sent = 0

    # --- declaration ---------------------------------------------------------------------------------

    def interfaces(self) -> Sequence[InterfaceSpec]:
        control, data = self.interface_number(0), self.interface_number(1)
        return [
            InterfaceSpec(
                ClassCode.COMM, CDC_SUBCLASS_ACM, CDC_ACM_PROTO_AT_V25TER,
                endpoints=(EndpointSpec("notify", Direction.IN, TransferType.INTERRUPT, 10, interval_ms=32),),
                descriptors=(CdcHeaderDescriptor(bcd_cdc=0x0110),
                             CdcCallManagementDescriptor(capabilities=0, data_interface=data),
                             CdcAcmDescriptor(capabilities=CDC_CAP_LINE | CDC_CAP_BRK),
                             CdcUnionDescriptor(control_interface=control, subordinate_interfaces=(data,))),
                name="CDC Abstract Control Model (ACM)"),
            InterfaceSpec(ClassCode.CDC_DATA,
                          endpoints=(EndpointSpec("in", Direction.IN), EndpointSpec("out", Direction.OUT)),
                          name="CDC ACM Data"),
        ]

    # --- Python side ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> int:
        """Queue bytes for the host to read; returns how many fit (the rest does not)."""
        with self._cond:
            taken = min(len(data), self.buffer_size - len(self._to_host))
            self._to_host += data[:taken]
        if taken:
            self.wakeup()
        return taken

    def read(self, size: int = -1, timeout: float | None = None) -> bytes:
        """Bytes the host wrote, at most `size` (all if negative); waits up to `timeout` seconds for the
        first byte (None: forever) and returns b"" if none came."""
        if self.loopback or self.on_receive is not None:
            raise CdcAcmError("read() needs stream mode: CdcAcmFunction(loopback=False)")
        with self._cond:
            self._cond.wait_for(lambda: bool(self._from_host), timeout)
            count = len(self._from_host) if size < 0 else min(size, len(self._from_host))
            chunk = bytes(self._from_host[:count])
            del self._from_host[:count]
            unblocked = self._out_blocked and bool(chunk)
            self._out_blocked = self._out_blocked and not unblocked
        if unblocked:
            self.wakeup()  # room again for the NAK'd bulk OUT
        return chunk

    @property
    def dtr(self) -> bool:
        return bool(self.control_lines & CONTROL_LINE_DTR)

    @property
    def rts(self) -> bool:
        return bool(self.control_lines & CONTROL_LINE_RTS)

    def notify_serial_state(self, state: SerialState | int) -> None:
        """Queue a SERIAL_STATE notification (carrier, DSR, ring, errors) for the interrupt endpoint."""
        if not 0 <= int(state) <= 0xFFFF:
            raise CdcAcmError(f"serial state {state:#x} does not fit 16 bits")
        header = SetupPacket(0xA1, NOTIFY_SERIAL_STATE, 0, self.interface_number(0), 2).to_bytes()
        with self._cond:
            self._notifications.append(header + struct.pack("<H", int(state)))
        self.wakeup()

    # --- host side -----------------------------------------------------------------------------------

    def transfer(self, endpoint: str, data: bytes | None, length: int) -> Reply | None:
        if endpoint == "out" and data is not None:
            return self._receive(data)
        with self._cond:
            if endpoint == "notify":
                return Reply(data=self._notifications.pop(0)) if self._notifications else None
            if not self._to_host:
                return None
            chunk = bytes(self._to_host[:length])
            del self._to_host[:length]
            unblocked = self._out_blocked and self.loopback
            self._out_blocked = self._out_blocked and not unblocked
        if unblocked:
            self.wakeup()  # loopback: room again for the NAK'd bulk OUT
        return Reply(data=chunk)

    def _receive(self, data: bytes) -> Reply | None:
        if self.on_receive is not None:
            self.on_receive(data)
            return Reply(actual_length=len(data))
        with self._cond:
            target = self._to_host if self.loopback else self._from_host
            if len(target) + len(data) > self.buffer_size:
                self._out_blocked = True
                return None  # NAK until the other side drains: the host retries after the wake-up
            target += data
            self._cond.notify_all()
        if self.loopback:
            self.wakeup()
        return Reply(actual_length=len(data))

    def control(self, setup: SetupPacket, data: bytes) -> Reply:
        if (setup.type is not RequestType.CLASS or setup.recipient != Recipient.INTERFACE
                or setup.index != self.interface_number(0)):
            return STALL
        request = setup.request
        if setup.is_in:
            if request == CdcRequest.GET_LINE_CODING:
                return Reply(data=self.line_coding.to_bytes())
            return STALL  # GET_ENCAPSULATED_RESPONSE: no AT command processor, as the kernel's f_acm
        if request == CdcRequest.SET_LINE_CODING:
            try:
                self.line_coding = LineCoding.from_bytes(data)
            except CdcAcmError:
                return STALL
            return Reply()
        if request == CdcRequest.SET_CONTROL_LINE_STATE and setup.length == 0:
            self.control_lines = setup.value & (CONTROL_LINE_DTR | CONTROL_LINE_RTS)
            return Reply()
        if request == CdcRequest.SEND_BREAK and setup.length == 0:
            self.break_duration = setup.value
            self.breaks_sent += 1
            return Reply()
        return STALL  # SEND_ENCAPSULATED_COMMAND and anything else

    def reset(self) -> None:
        """A port reset drops what was in flight and the host's line settings."""
        with self._cond:
            self._to_host.clear()
            self._notifications.clear()
            self._out_blocked = False
        self.line_coding = LineCoding()
        self.control_lines = 0
        self.break_duration = None


PID_CODES_VENDOR = 0x1209  # pid.codes; PIDs 0x0001.. are its test PIDs, fine for emulation
CDC_ACM_PRODUCT_ID = 0x0003


def cdc_acm_device(function: CdcAcmFunction | None = None, **options: Any) -> Device:
    """A high-speed USB serial port (loopback unless `function` says otherwise). `options` go to
    `Device`."""
    settings: dict[str, Any] = dict(id_vendor=PID_CODES_VENDOR, id_product=CDC_ACM_PRODUCT_ID,
                                    manufacturer="vusb", product="vusb serial", serial="vusb-acm-0001",
                                    speed=Speed.HIGH)
    settings.update(options)
    return Device([function or CdcAcmFunction()], **settings)
