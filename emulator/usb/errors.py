"""Errors of the USB chapter-9 layer: malformed SETUP packets and descriptors."""

from __future__ import annotations

from emulator.errors import VusbError


class UsbError(VusbError):
    """Base of every error `emulator.usb` raises on purpose."""


class SetupError(UsbError):
    """A SETUP packet that is not 8 bytes, or a field outside its wire width."""


class DescriptorError(UsbError):
    """A descriptor that cannot be parsed or built; `offset` is where in the input it went wrong."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        self.reason = message
        super().__init__(message if offset is None else f"at offset {offset}: {message}")
