"""Errors of the USB/IP protocol core.

Two axes, as in h11 (`RemoteProtocolError` / `LocalProtocolError`), crossed with *what* went wrong:

* **who**: `RemoteProtocolError` — the peer sent bytes that break the protocol (the connection is then
  unusable, like the kernel's `SDEV_EVENT_ERROR_TCP`); `LocalProtocolError` — our own application tried to
  send something illegal (nothing was sent and the connection state is unchanged, so it may carry on).
* **what**: `FieldError`, `LengthMismatchError`, `SeqnumError`, `PhaseError`, ... so a caller can catch a
  kind of mistake whichever side made it.

Every error carries, where known, the offending `field`, the `offset` (byte offset in the received stream)
and the `seqnum`, and says all of them in its message.
"""

from __future__ import annotations

from emulator.errors import VusbError


class ProtocolError(VusbError):
    """Base of every USB/IP protocol violation; `field`, `offset`, `seqnum` say where, when known."""

    def __init__(
        self, message: str, *, field: str | None = None, offset: int | None = None, seqnum: int | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.offset = offset
        self.seqnum = seqnum


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol; the connection cannot be trusted any more."""


class LocalProtocolError(ProtocolError):
    """Our application tried to send something illegal; nothing was sent, state is unchanged."""


# -- kinds of mistake (caught by kind, whichever side made it) --------------------------------------------


class FieldError(ProtocolError):
    """A field holds a value the protocol does not allow (range, sign, enum, string termination)."""


class LengthMismatchError(ProtocolError):
    """A payload's length disagrees with the length field that announces it."""


class SeqnumError(ProtocolError):
    """A seqnum that is unknown, already outstanding, or not answerable this way."""


class PhaseError(ProtocolError):
    """A message that is legal somewhere, but not in the connection's current phase or direction."""


# -- concrete errors ---------------------------------------------------------------------------------------


class RemoteFieldError(FieldError, RemoteProtocolError):
    """The peer sent a field value the protocol does not allow."""


class LocalFieldError(FieldError, LocalProtocolError):
    """We tried to send a field value the protocol does not allow (or that does not fit its wire type)."""


class RemoteLengthMismatchError(LengthMismatchError, RemoteProtocolError):
    """The peer's payload length disagrees with its length field."""


class LocalLengthMismatchError(LengthMismatchError, LocalProtocolError):
    """Our payload length disagrees with our length field (e.g. an OUT buffer of the wrong size)."""


class RemoteSeqnumError(SeqnumError, RemoteProtocolError):
    """The peer answered an unknown seqnum, or reused one still outstanding."""


class LocalSeqnumError(SeqnumError, LocalProtocolError):
    """We tried to answer an unknown seqnum, or to reuse one still outstanding."""


class UnlinkedUrbError(LocalSeqnumError):
    """We tried to send USBIP_RET_SUBMIT for a URB the peer unlinked: the kernel sends only USBIP_RET_UNLINK."""


class RemotePhaseError(PhaseError, RemoteProtocolError):
    """The peer sent a message its role or the current phase does not allow."""


class LocalPhaseError(PhaseError, LocalProtocolError):
    """We tried to send a message our role or the current phase does not allow."""


class UnknownCommandError(RemoteProtocolError):
    """An op code or USB/IP command code that the protocol (or usbipd) does not define."""


class VersionMismatchError(RemoteProtocolError):
    """An op_common header whose version is not USBIP_VERSION (0x0111)."""


class LimitExceededError(RemoteProtocolError):
    """A length or count above our configured cap: refused before allocating anything."""


class TruncatedMessageError(RemoteProtocolError):
    """The stream ended (or the given bytes ended) in the middle of a message."""


class TrailingDataError(RemoteProtocolError):
    """`unpack` was given more bytes than the one message they hold."""
