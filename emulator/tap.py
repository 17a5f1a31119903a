"""Taps: how an observer (a pcapng recorder, a test) sees every byte the USB/IP edges move.

The edges — the server (`emulator.server`), the userspace host (`emulator.host`), later the gadget bridge — own
the sockets; a tap is handed to them and told what crosses each connection, in the order the edge saw it. The
interface lives here, on the emulator side, so the edges depend on nothing outside `emulator`; implementations
(e.g. `captures.record.PcapngRecorder.tap`) live outward.

Two shapes are accepted:

* a plain callable `(connection id, from_client, data)`, which sees bytes only;
* a `SessionTap`, which is also told when a connection opens (with both TCP endpoints) and closes (with the
  reason), so it can frame the bytes as a real TCP conversation.

A tap runs on the edge's thread, inside its I/O callbacks: it must be quick and must not raise (an exception would
break the connection it watches). An edge may call it from several threads (a thread per session).

A tap may also have `data_iov(cid, from_client, buffers)`: the same as `data` with the bytes given as the
buffers of one socket write (what `sendmsg` takes, e.g. a RET_SUBMIT header and its transfer buffer), so the edge
need not join them. Edges call it through `iov_callback`, which joins for a tap without it. The buffers are the
edge's: valid during the call only (it may reuse them after), so a tap copies what it keeps.

A tap may also have `data_parts(cid, from_client, parts)`: `data_iov` whose parts may include a
`emulator.devices.base.FileRegion` (file bytes the server will sendfile, not read into Python). A tap that
writes to a file can copy them file to file in the kernel (`os.copy_file_range`) instead of the edge reading
them into bytes for it. The server calls it through `parts_callback`, which reads regions into bytes for a
tap without it (what every other tap gets).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from emulator.devices.base import FileRegion

Address = tuple[str, int]
"""(host, port) as the socket reports it (IPv6 addresses without brackets)."""

Tap = Callable[[int, bool, bytes], None]
"""A tap that sees every byte of every connection: (connection id, True if client→server, bytes)."""

IovTap = Callable[[int, bool, Sequence[bytes | bytearray | memoryview]], None]
"""`data_iov`: (connection id, True if client→server, the buffers of one socket read or write, in order)."""

PartsTap = Callable[[int, bool, Sequence["bytes | bytearray | memoryview | FileRegion"]], None]
"""`data_parts`: `IovTap` whose parts may also be file regions (emulator.devices.base.FileRegion)."""


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


def iov_callback(tap: Tap | SessionTap | None) -> IovTap | None:
    """The buffers callback of a tap (None for no tap): its own `data_iov`, or its bytes callback with the
    buffers joined."""
    own: IovTap | None = getattr(tap, "data_iov", None)
    if own is not None or tap is None:
        return own
    data = data_callback(tap)
    assert data is not None

    def joined(cid: int, from_client: bool, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        data(cid, from_client, b"".join(buffers))

    return joined


def parts_callback(tap: Tap | SessionTap | None) -> PartsTap | None:
    """The parts callback of a tap (None for no tap): its own `data_parts`, or its buffers callback with any
    file region read into bytes (`bytes(region)`: raises OSError if the file ended before the region did)."""
    own: PartsTap | None = getattr(tap, "data_parts", None)
    if own is not None:
        return own
    iov = iov_callback(tap)
    if iov is None:
        return None

    def read(cid: int, from_client: bool, parts: Sequence[bytes | bytearray | memoryview | FileRegion]) -> None:
        iov(cid, from_client, [p if isinstance(p, (bytes, bytearray, memoryview)) else bytes(p) for p in parts])

    return read


def session_tap(tap: Tap | SessionTap | None) -> SessionTap | None:
    """`tap` if it wants open/close notifications, else None."""
    return tap if isinstance(tap, SessionTap) else None


__all__ = [
    "Address",
    "IovTap",
    "PartsTap",
    "SessionTap",
    "Tap",
    "data_callback",
    "iov_callback",
    "parts_callback",
    "session_tap",
]
