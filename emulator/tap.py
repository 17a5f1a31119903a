"""Taps: how an observer (a pcapng recorder, a test) sees every byte the USB/IP edges move.

The edges — the server (`emulator.server`), the userspace host (`emulator.host`), later the gadget bridge — own
the sockets; a tap is handed to them and told what crosses each connection, in the order the edge saw it. The
interface lives here, on the emulator side, so the edges depend on nothing outside `emulator`; implementations
(e.g. `captures.record.PcapngRecorder.tap`) live outward.

Two shapes are accepted:

* a plain callable `(connection id, from_client, data)`, which sees bytes only;
* a `SessionTap`, which is also told when a connection opens (with both TCP endpoints) and closes (with the
  reason), so it can frame the bytes as a real TCP conversation.

A tap runs on the edge's event loop, inside its I/O callbacks: it must be quick and must not raise (an exception
would break the connection it watches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

Address = tuple[str, int]
"""(host, port) as the socket reports it (IPv6 addresses without brackets)."""

Tap = Callable[[int, bool, bytes], None]
"""A tap that sees every byte of every connection: (connection id, True if client→server, bytes)."""


@runtime_checkable
class SessionTap(Protocol):
    """A tap that also sees connections open and close. Connection ids are unique per edge object."""

    def opened(self, cid: int, client: Address, server: Address) -> None:
        """Connection `cid` is established between `client` and `server` (before any of its bytes)."""

    def data(self, cid: int, from_client: bool, data: bytes) -> None:
        """`data` crossed connection `cid`: sent by the client if `from_client`, else by the server."""

    def closed(self, cid: int, reason: str) -> None:
        """Connection `cid` ended (no more bytes follow); `reason` says why, for people."""


def data_callback(tap: Tap | SessionTap | None) -> Tap | None:
    """The bytes callback of either shape of tap (None for no tap)."""
    if tap is None:
        return None
    if isinstance(tap, SessionTap):
        return tap.data
    return tap


def session_tap(tap: Tap | SessionTap | None) -> SessionTap | None:
    """`tap` if it wants open/close notifications, else None."""
    return tap if isinstance(tap, SessionTap) else None


__all__ = ["Address", "SessionTap", "Tap", "data_callback", "session_tap"]
