"""HID devices: a boot-protocol keyboard and mouse (HID 1.11), fed from Python.

The model is pure: the host's interrupt IN polls take queued reports (None — a NAK — when there is none),
class requests on ep0 read and set reports, idle rate and protocol. Python code on any thread queues
reports (`Keyboard.type_text`, `Keyboard.press`, `Mouse.move`); queueing calls the device's wake-up so the
edge retries the pending IN transfer.

The report descriptors are the boot layouts of HID 1.11 appendix B (keyboard B.1, mouse B.2) in the byte
encoding of appendix E, so boot and report protocol carry the same reports: 8 bytes for the keyboard
(modifiers, reserved, six key codes), 3 for the mouse (buttons, dx, dy).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
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
from emulator.usb.descriptors import HidDescriptor
from emulator.usb.setup import (
    ClassCode,
    DescriptorType,
    Direction,
    Recipient,
    RequestType,
    SetupPacket,
    Speed,
    TransferType,
)


class HidError(DeviceError):
    """Python-side misuse of a HID model: a character with no key, too many keys, a bad report."""


class HidRequest(enum.IntEnum):
    """HID 1.11 §7.2 class-specific requests (bRequest)."""

    GET_REPORT = 0x01
    GET_IDLE = 0x02
    GET_PROTOCOL = 0x03
    SET_REPORT = 0x09
    SET_IDLE = 0x0A
    SET_PROTOCOL = 0x0B


class ReportType(enum.IntEnum):
    """High byte of wValue in GET_REPORT / SET_REPORT."""

    INPUT = 1
    OUTPUT = 2
    FEATURE = 3


class HidProtocol(enum.IntEnum):
    """GET_PROTOCOL / SET_PROTOCOL values; a device starts in report protocol (HID 1.11 §7.2.6)."""

    BOOT = 0
    REPORT = 1


HID_SUBCLASS_BOOT = 1
HID_PROTOCOL_KEYBOARD = 1
HID_PROTOCOL_MOUSE = 2

# HID 1.11 appendix B.1 (boot keyboard) as encoded in appendix E.6: 63 bytes.
KEYBOARD_REPORT_DESCRIPTOR = bytes([
    0x05, 0x01,  # Usage Page (Generic Desktop)
    0x09, 0x06,  # Usage (Keyboard)
    0xA1, 0x01,  # Collection (Application)
    0x05, 0x07,  # Usage Page (Key Codes)
    0x19, 0xE0,  # Usage Minimum (224)
    0x29, 0xE7,  # Usage Maximum (231)
    0x15, 0x00,  # Logical Minimum (0)
    0x25, 0x01,  # Logical Maximum (1)
    0x75, 0x01,  # Report Size (1)
    0x95, 0x08,  # Report Count (8)
    0x81, 0x02,  # Input (Data, Variable, Absolute): modifier byte
    0x95, 0x01,  # Report Count (1)
    0x75, 0x08,  # Report Size (8)
    0x81, 0x01,  # Input (Constant): reserved byte
    0x95, 0x05,  # Report Count (5)
    0x75, 0x01,  # Report Size (1)
    0x05, 0x08,  # Usage Page (LEDs)
    0x19, 0x01,  # Usage Minimum (1)
    0x29, 0x05,  # Usage Maximum (5)
    0x91, 0x02,  # Output (Data, Variable, Absolute): LED report
    0x95, 0x01,  # Report Count (1)
    0x75, 0x03,  # Report Size (3)
    0x91, 0x01,  # Output (Constant): LED report padding
    0x95, 0x06,  # Report Count (6)
    0x75, 0x08,  # Report Size (8)
    0x15, 0x00,  # Logical Minimum (0)
    0x25, 0x65,  # Logical Maximum (101)
    0x05, 0x07,  # Usage Page (Key Codes)
    0x19, 0x00,  # Usage Minimum (0)
    0x29, 0x65,  # Usage Maximum (101)
    0x81, 0x00,  # Input (Data, Array): key array (6 bytes)
    0xC0,        # End Collection
])

# HID 1.11 appendix B.2 (boot mouse) as encoded in appendix E.10: 50 bytes.
MOUSE_REPORT_DESCRIPTOR = bytes([
    0x05, 0x01,  # Usage Page (Generic Desktop)
    0x09, 0x02,  # Usage (Mouse)
    0xA1, 0x01,  # Collection (Application)
    0x09, 0x01,  # Usage (Pointer)
    0xA1, 0x00,  # Collection (Physical)
    0x05, 0x09,  # Usage Page (Buttons)
    0x19, 0x01,  # Usage Minimum (1)
    0x29, 0x03,  # Usage Maximum (3)
    0x15, 0x00,  # Logical Minimum (0)
    0x25, 0x01,  # Logical Maximum (1)
    0x95, 0x03,  # Report Count (3)
    0x75, 0x01,  # Report Size (1)
    0x81, 0x02,  # Input (Data, Variable, Absolute): 3 buttons
    0x95, 0x01,  # Report Count (1)
    0x75, 0x05,  # Report Size (5)
    0x81, 0x01,  # Input (Constant): 5 bit padding
    0x05, 0x01,  # Usage Page (Generic Desktop)
    0x09, 0x30,  # Usage (X)
    0x09, 0x31,  # Usage (Y)
    0x15, 0x81,  # Logical Minimum (-127)
    0x25, 0x7F,  # Logical Maximum (127)
    0x75, 0x08,  # Report Size (8)
    0x95, 0x02,  # Report Count (2)
    0x81, 0x06,  # Input (Data, Variable, Relative): X, Y
    0xC0,        # End Collection
    0xC0,        # End Collection
])


class HidFunction(Function):
    """One HID interface: an interrupt IN endpoint for input reports, an optional interrupt OUT endpoint
    for output reports, the HID class requests, and a thread-safe queue of input reports.

    `idle_rate` is in 4 ms units (0 = report only on change). When it is non-zero and no report is
    queued, a poll that comes at least one idle period after the last report repeats the current state
    (HID 1.11 §7.2.4). `clock` is injectable so the model stays pure under test.
    """

    name = "hid"

    def __init__(
        self,
        report_descriptor: bytes,
        report_length: int,
        *,
        subclass: int = 0,
        protocol: int = 0,
        output_report_length: int = 0,
        interval_ms: int = 10,
        idle_rate: int = 0,
        interface_name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        if not 1 <= report_length <= 64 or not 0 <= output_report_length <= 64:
            raise HidError("HID reports here are 1..64 bytes (one full-speed interrupt packet)")
        self.report_descriptor = bytes(report_descriptor)
        self.report_length = report_length
        self.output_report_length = output_report_length
        self.subclass, self.protocol_code = subclass, protocol
        self.interval_ms = interval_ms
        self.interface_name = interface_name
        self._default_idle = idle_rate
        self._clock = clock
        self._lock = threading.Lock()
        self._queue: deque[bytes] = deque()
        self._state = bytes(report_length)
        self._output = bytes(output_report_length)
        self._last_sent = clock()
        self.idle_rate = idle_rate
        self.protocol = HidProtocol.REPORT

    # --- declaration ---------------------------------------------------------------------------------

    @property
    def hid_descriptor(self) -> HidDescriptor:
        return HidDescriptor(bcd_hid=0x0111, country_code=0,
                             descriptors=((DescriptorType.REPORT, len(self.report_descriptor)),))

    def interfaces(self) -> Sequence[InterfaceSpec]:
        endpoints = [EndpointSpec("in", Direction.IN, TransferType.INTERRUPT, max(8, self.report_length),
                                  self.interval_ms)]
        if self.output_report_length:
            endpoints.append(EndpointSpec("out", Direction.OUT, TransferType.INTERRUPT,
                                          max(8, self.output_report_length), self.interval_ms))
        return [InterfaceSpec(ClassCode.HID, self.subclass, self.protocol_code, endpoints=tuple(endpoints),
                              descriptors=(self.hid_descriptor,), name=self.interface_name)]

    # --- Python side ---------------------------------------------------------------------------------

    def queue_reports(self, reports: Iterable[bytes]) -> None:
        """Queue input reports for the host, in order; safe from any thread."""
        batch = [bytes(r) for r in reports]
        for report in batch:
            if len(report) != self.report_length:
                raise HidError(f"input report is {len(report)} bytes, this device sends {self.report_length}")
        if not batch:
            return
        with self._lock:
            self._queue.extend(batch)
            self._state = self._steady(batch[-1])
        self.wakeup()

    @property
    def pending(self) -> int:
        """Input reports queued and not yet taken by the host."""
        with self._lock:
            return len(self._queue)

    def _steady(self, report: bytes) -> bytes:
        """The state a report leaves behind (what GET_REPORT and idle repeats send)."""
        return report

    def output_report(self, report: bytes) -> None:
        """The host sent an output report (SET_REPORT or interrupt OUT). Subclasses act on it."""
        self._output = report

    # --- host side -----------------------------------------------------------------------------------

    def transfer(self, endpoint: str, data: bytes | None, length: int) -> Reply | None:
        if endpoint == "out" and data is not None:
            if len(data) != self.output_report_length:
                return STALL
            self.output_report(data)
            return Reply(actual_length=len(data))
        with self._lock:
            now = self._clock()
            if self._queue:
                report = self._queue.popleft()
            elif self.idle_rate and now - self._last_sent + 1e-9 >= self.idle_rate * 0.004:
                report = self._state
            else:
                return None
            self._last_sent = now
        return Reply(data=report)

    def get_descriptor(self, setup: SetupPacket) -> bytes | None:
        if setup.index != self.interface_number() or setup.descriptor_index != 0:
            return None
        if setup.descriptor_type == DescriptorType.HID:
            return self.hid_descriptor.to_bytes()
        if setup.descriptor_type == DescriptorType.REPORT:
            return self.report_descriptor
        return None

    def control(self, setup: SetupPacket, data: bytes) -> Reply:
        if (setup.type is not RequestType.CLASS or setup.recipient != Recipient.INTERFACE
                or setup.index != self.interface_number()):
            return STALL
        request, high, low = setup.request, setup.value >> 8, setup.value & 0xFF
        boot = self.subclass == HID_SUBCLASS_BOOT
        if setup.is_in:
            if request == HidRequest.GET_REPORT and low == 0:  # report ID 0: this device has no IDs
                with self._lock:
                    if high == ReportType.INPUT:
                        return Reply(data=self._state)
                if high == ReportType.OUTPUT and self.output_report_length:
                    return Reply(data=self._output)
                return STALL
            if request == HidRequest.GET_IDLE and high == 0 and low == 0:
                return Reply(data=bytes((self.idle_rate,)))
            if request == HidRequest.GET_PROTOCOL and setup.value == 0 and boot:
                return Reply(data=bytes((self.protocol,)))
            return STALL
        if request == HidRequest.SET_REPORT and high == ReportType.OUTPUT and low == 0:
            if len(data) != self.output_report_length or not data:
                return STALL
            self.output_report(data)
            return Reply()
        if request == HidRequest.SET_IDLE and low == 0:  # report ID 0: all reports
            with self._lock:
                self.idle_rate = high
                self._last_sent = self._clock()
            return Reply()
        if request == HidRequest.SET_PROTOCOL and boot and setup.value in (0, 1):
            self.protocol = HidProtocol(setup.value)
            return Reply()
        return STALL

    def reset(self) -> None:
        """Back to report protocol and the default idle rate; queued reports stay (typed before attach)."""
        self.protocol = HidProtocol.REPORT
        self.idle_rate = self._default_idle


class Modifier(enum.IntFlag):
    """Byte 0 of a keyboard report (usages 0xE0..0xE7 of the Keyboard/Keypad page)."""

    LEFT_CTRL = 0x01
    LEFT_SHIFT = 0x02
    LEFT_ALT = 0x04
    LEFT_GUI = 0x08
    RIGHT_CTRL = 0x10
    RIGHT_SHIFT = 0x20
    RIGHT_ALT = 0x40
    RIGHT_GUI = 0x80


class Key(enum.IntEnum):
    """Some usages of the Keyboard/Keypad page (HID Usage Tables §10) that have no character."""

    ENTER = 0x28
    ESCAPE = 0x29
    BACKSPACE = 0x2A
    TAB = 0x2B
    SPACE = 0x2C
    CAPS_LOCK = 0x39
    F1 = 0x3A
    F2 = 0x3B
    F3 = 0x3C
    F4 = 0x3D
    F5 = 0x3E
    F6 = 0x3F
    F7 = 0x40
    F8 = 0x41
    F9 = 0x42
    F10 = 0x43
    F11 = 0x44
    F12 = 0x45
    PRINT_SCREEN = 0x46
    SCROLL_LOCK = 0x47
    PAUSE = 0x48
    INSERT = 0x49
    HOME = 0x4A
    PAGE_UP = 0x4B
    DELETE = 0x4C
    END = 0x4D
    PAGE_DOWN = 0x4E
    RIGHT = 0x4F
    LEFT = 0x50
    DOWN = 0x51
    UP = 0x52
    NUM_LOCK = 0x53


class Led(enum.IntFlag):
    """Bits of the keyboard's output report (LED page usages 1..5)."""

    NUM_LOCK = 0x01
    CAPS_LOCK = 0x02
    SCROLL_LOCK = 0x04
    COMPOSE = 0x08
    KANA = 0x10


def _us_layout() -> dict[str, tuple[int, int]]:
    keys: dict[str, tuple[int, int]] = {}
    shift = int(Modifier.LEFT_SHIFT)
    for i, letter in enumerate("abcdefghijklmnopqrstuvwxyz"):
        keys[letter] = (0x04 + i, 0)
        keys[letter.upper()] = (0x04 + i, shift)
    for i, (plain, shifted) in enumerate(zip("1234567890", "!@#$%^&*()", strict=True)):
        keys[plain], keys[shifted] = (0x1E + i, 0), (0x1E + i, shift)
    for code, plain, shifted in ((0x2D, "-", "_"), (0x2E, "=", "+"), (0x2F, "[", "{"), (0x30, "]", "}"),
                                 (0x31, "\\", "|"), (0x33, ";", ":"), (0x34, "'", '"'), (0x35, "`", "~"),
                                 (0x36, ",", "<"), (0x37, ".", ">"), (0x38, "/", "?")):
        keys[plain], keys[shifted] = (code, 0), (code, shift)
    keys.update({"\n": (Key.ENTER, 0), "\r": (Key.ENTER, 0), "\t": (Key.TAB, 0), " ": (Key.SPACE, 0),
                 "\b": (Key.BACKSPACE, 0), "\x1b": (Key.ESCAPE, 0)})
    return keys


US_LAYOUT: dict[str, tuple[int, int]] = _us_layout()
"""Character → (key code, modifiers) on a US keyboard."""

_MAX_KEYCODE = 0x65  # the report descriptor's Logical Maximum for the key array


class Keyboard(HidFunction):
    """A boot keyboard: 8-byte input reports, a one-byte LED output report (SET_REPORT or interrupt OUT).

    `on_leds` is called (on the edge's thread) with the new `Led` bits when the host changes them.
    """

    name = "keyboard"

    def __init__(self, *, on_leds: Callable[[Led], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(KEYBOARD_REPORT_DESCRIPTOR, 8, subclass=HID_SUBCLASS_BOOT,
                         protocol=HID_PROTOCOL_KEYBOARD, output_report_length=1, interval_ms=10,
                         idle_rate=125, interface_name="Keyboard", clock=clock)  # 500 ms, HID 1.11 §7.2.4
        self.on_leds = on_leds

    @staticmethod
    def report(keycodes: Iterable[int] = (), modifiers: int = 0) -> bytes:
        """One input report: modifiers, a reserved byte, up to six key codes."""
        codes = list(keycodes)
        if len(codes) > 6:
            raise HidError(f"a boot keyboard report holds 6 keys, got {len(codes)}")
        for code in codes:
            if 0xE0 <= code <= 0xE7:
                raise HidError(f"key code {code:#04x} is a modifier: pass it in `modifiers`")
            if not 0 <= code <= _MAX_KEYCODE:
                raise HidError(f"key code {code:#04x} is outside this keyboard's range 0..{_MAX_KEYCODE:#04x}")
        if not 0 <= modifiers <= 0xFF:
            raise HidError(f"modifiers {modifiers:#x} do not fit one byte")
        return bytes((modifiers, 0, *codes, *bytes(6 - len(codes))))

    def press(self, keycodes: Iterable[int] = (), modifiers: int = 0, *, release: bool = True) -> None:
        """Press keys together (and release them all, unless `release` is False)."""
        reports = [self.report(keycodes, modifiers)]
        if release:
            reports.append(self.report())
        self.queue_reports(reports)

    def release(self) -> None:
        self.queue_reports([self.report()])

    def type_text(self, text: str, layout: dict[str, tuple[int, int]] = US_LAYOUT) -> None:
        """Type `text`: for each character a key-down report (with shift where the layout needs it) and
        an all-keys-up report. Nothing is queued if any character has no key."""
        missing = sorted({c for c in text if c not in layout})
        if missing:
            raise HidError(f"no key for {', '.join(repr(c) for c in missing)} in this layout")
        reports: list[bytes] = []
        for char in text:
            code, modifiers = layout[char]
            reports += [self.report((code,), modifiers), self.report()]
        self.queue_reports(reports)

    @property
    def leds(self) -> Led:
        return Led(self._output[0] & 0x1F)

    def output_report(self, report: bytes) -> None:
        changed = report != self._output
        super().output_report(report)
        if changed and self.on_leds is not None:
            self.on_leds(self.leds)


class MouseButton(enum.IntFlag):
    LEFT = 0x01
    RIGHT = 0x02
    MIDDLE = 0x04


class Mouse(HidFunction):
    """A boot mouse: 3-byte input reports (buttons, dx, dy); large moves are split into steps of at
    most 127 counts, the report's logical range."""

    name = "mouse"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(MOUSE_REPORT_DESCRIPTOR, 3, subclass=HID_SUBCLASS_BOOT, protocol=HID_PROTOCOL_MOUSE,
                         interval_ms=10, idle_rate=0, interface_name="Mouse", clock=clock)
        self._buttons = 0

    def _steady(self, report: bytes) -> bytes:
        return report[:1] + b"\x00\x00"  # a repeated report must not move the pointer again

    @staticmethod
    def report(dx: int = 0, dy: int = 0, buttons: int = 0) -> bytes:
        if not (-127 <= dx <= 127 and -127 <= dy <= 127):
            raise HidError(f"a boot mouse report moves -127..127 per axis, got ({dx}, {dy})")
        if not 0 <= buttons <= 0x07:
            raise HidError(f"a boot mouse has 3 buttons, got button bits {buttons:#x}")
        return bytes((buttons, dx & 0xFF, dy & 0xFF))

    def move(self, dx: int, dy: int, buttons: int | None = None) -> None:
        """Move by (dx, dy) counts with `buttons` held (default: the buttons held now)."""
        held = self._buttons if buttons is None else buttons
        reports = []
        while True:
            step_x, step_y = max(-127, min(127, dx)), max(-127, min(127, dy))
            reports.append(self.report(step_x, step_y, held))
            dx, dy = dx - step_x, dy - step_y
            if not dx and not dy:
                break
        self._buttons = held
        self.queue_reports(reports)

    def click(self, buttons: int = MouseButton.LEFT) -> None:
        """Press and release `buttons` in place."""
        self.queue_reports([self.report(0, 0, self._buttons | buttons), self.report(0, 0, self._buttons)])


# --- ready-made devices ----------------------------------------------------------------------------------

PID_CODES_VENDOR = 0x1209  # pid.codes; PIDs 0x0001.. are its test PIDs, fine for emulation
KEYBOARD_PRODUCT_ID = 0x0001
MOUSE_PRODUCT_ID = 0x0002


def hid_keyboard_device(keyboard: Keyboard | None = None, **options: Any) -> Device:
    """A full-speed USB keyboard; keep `keyboard` to type on it. `options` go to `Device`."""
    settings: dict[str, Any] = dict(id_vendor=PID_CODES_VENDOR, id_product=KEYBOARD_PRODUCT_ID,
                                    manufacturer="vusb", product="vusb keyboard", serial="vusb-kbd-0001",
                                    speed=Speed.FULL, remote_wakeup=True)
    settings.update(options)
    return Device([keyboard or Keyboard()], **settings)


def hid_mouse_device(mouse: Mouse | None = None, **options: Any) -> Device:
    """A full-speed USB mouse; keep `mouse` to move it. `options` go to `Device`."""
    settings: dict[str, Any] = dict(id_vendor=PID_CODES_VENDOR, id_product=MOUSE_PRODUCT_ID,
                                    manufacturer="vusb", product="vusb mouse", serial="vusb-mouse-0001",
                                    speed=Speed.FULL, remote_wakeup=True)
    settings.update(options)
    return Device([mouse or Mouse()], **settings)
