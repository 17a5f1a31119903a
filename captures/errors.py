"""Errors of the captures package: one root, `CaptureError`, so the CLI reports any of them in one line."""

from __future__ import annotations

from emulator.errors import VusbError


class CaptureError(VusbError):
    """A capture that cannot be read or decoded: truncated, garbage, wrong link type, broken protocol.

    The message names the file and the frame (1-based, as Wireshark counts) so a user can open the same frame in
    Wireshark and look at it.
    """

    def __init__(self, message: str, *, frame: int | None = None, path: str | None = None) -> None:
        self.frame = frame
        self.path = path
        where = ""
        if path is not None:
            where += f"{path}: "
        if frame is not None:
            where += f"frame {frame}: "
        super().__init__(where + message)


class TruncatedCaptureError(CaptureError):
    """The file ends inside a record or block: a capture cut short, e.g. a recording whose writer was killed."""
