"""USB/IP sans-I/O connections: phases, seqnum bookkeeping, kernel unlink semantics, stream splitting, and a
stateful client/server pair (after h11's tests/helpers.py ConnectionPair)."""

from __future__ import annotations

import struct

import hypothesis
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from emulator.usbip import codec
from emulator.usbip.codec import Limits, pack
from emulator.usbip.connection import (
    NEED_DATA,
    ClientConnection,
    ConnectionClosed,
    Phase,
    ServerConnection,
)
from emulator.usbip.constants import ECONNRESET, ST_DEV_BUSY, USBIP_DIR_IN, USBIP_DIR_OUT
from emulator.usbip.errors import (
    LimitExceededError,
    LocalFieldError,
    LocalLengthMismatchError,
    LocalPhaseError,
    LocalSeqnumError,
    ProtocolError,
    RemoteFieldError,
    RemoteLengthMismatchError,
    RemotePhaseError,
    RemoteProtocolError,
    RemoteSeqnumError,
    TruncatedMessageError,
    UnknownCommandError,
    UnlinkedUrbError,
)
from emulator.usbip.messages import (
    CmdSubmit,
    CmdUnlink,
    IsoPacketDescriptor,
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

UDEV = UsbDevice(
    path="/sys/devices/platform/vusb/usb1/1-1",
    busid="1-1",
    busnum=1,
    devnum=2,
    speed=3,
    idVendor=0x1D6B,
    idProduct=0x0104,
    bcdDevice=0x0100,
    bNumInterfaces=1,
)
DEVID = UDEV.devid


def drain(conn):
    """All events available now (stops after ConnectionClosed, which would repeat forever)."""
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def imported_pair():
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(OpReqImport(busid="1-1")))
    assert drain(server) == [OpReqImport(busid="1-1")]
    client.receive_data(server.send(OpRepImport(udev=UDEV)))
    assert drain(client) == [OpRepImport(udev=UDEV)]
    assert client.phase is server.phase is Phase.URB
    return client, server


def submit(client, server, *, direction=USBIP_DIR_IN, length=64, data=b""):
    seqnum = client.next_seqnum()
    if direction == USBIP_DIR_OUT:
        length = len(data)
    cmd = CmdSubmit(
        seqnum=seqnum,
        devid=DEVID,
        direction=direction,
        ep=1,
        transfer_buffer_length=length,
        transfer_buffer=data,
    )
    server.receive_data(client.send(cmd))
    assert drain(server) == [cmd]
    return seqnum


def unlink(client, server, target):
    seqnum = client.next_seqnum()
    cmd = CmdUnlink(seqnum=seqnum, devid=DEVID, unlink_seqnum=target)
    server.receive_data(client.send(cmd))
    assert drain(server) == [cmd]
    return seqnum


def cmd_submit_bytes(seqnum, devid=DEVID, **fields):
    return pack(
        CmdSubmit(
            seqnum=seqnum,
            devid=devid,
            direction=fields.pop("direction", USBIP_DIR_IN),
            ep=fields.pop("ep", 1),
            **fields,
        )
    )


# ---------------------------------------------------------------------------------------------- operation phase


def test_devlist_is_one_request_one_reply_then_the_connection_is_done():
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(OpReqDevlist()))
    assert drain(server) == [OpReqDevlist()]
    reply = OpRepDevlist(
        devices=(
            OpDevlistReplyExtra(
                udev=UDEV,
                uinf=(UsbInterface(bInterfaceClass=8, bInterfaceSubClass=6, bInterfaceProtocol=0x50),),
            ),
        )
    )
    client.receive_data(server.send(reply))
    assert drain(client) == [reply]
    assert client.phase is server.phase is Phase.DONE
    server.receive_data(b"")
    assert drain(server) == [ConnectionClosed()]


def test_successful_import_enters_the_urb_phase_with_the_devices_devid():
    client, server = imported_pair()
    assert client.devid == server.devid == (1 << 16) | 2
    assert client.imported_device == UDEV


@pytest.mark.parametrize("status", [ST_DEV_BUSY, 1])
def test_failed_import_ends_the_operation_and_further_bytes_are_a_phase_error(status):
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(OpReqImport(busid="9-9")))
    drain(server)
    client.receive_data(server.send(OpRepImport(status=status)))
    assert drain(client) == [OpRepImport(status=status)]
    assert client.phase is server.phase is Phase.DONE
    server.receive_data(cmd_submit_bytes(1))
    with pytest.raises(RemotePhaseError, match="one operation per connection"):
        server.next_event()


def test_cmd_submit_before_import_is_a_remote_phase_error_naming_the_command():
    server = ServerConnection()
    server.receive_data(cmd_submit_bytes(1))
    with pytest.raises(
        RemotePhaseError, match=r"USBIP_CMD_SUBMIT from the client is not allowed in phase OP"
    ):
        server.next_event()


def test_a_second_operation_on_the_same_connection_is_a_remote_phase_error():
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send(OpReqDevlist()))
    drain(server)
    server.send(OpRepDevlist())
    server.receive_data(pack(OpReqDevlist()))
    with pytest.raises(RemotePhaseError, match="one operation per connection"):
        server.next_event()


def test_op_request_in_the_urb_phase_is_a_remote_phase_error():
    _, server = imported_pair()
    server.receive_data(pack(OpReqDevlist()))
    with pytest.raises(RemotePhaseError, match="OP_REQ_DEVLIST from the client is not allowed in phase URB"):
        server.next_event()


def test_server_waits_for_its_import_reply_before_decoding_pipelined_bytes():
    server = ServerConnection()
    server.receive_data(pack(OpReqImport(busid="1-1")) + cmd_submit_bytes(5))
    assert server.next_event() == OpReqImport(busid="1-1")
    assert server.next_event() is NEED_DATA
    server.send(OpRepImport(udev=UDEV))
    event = server.next_event()
    assert isinstance(event, CmdSubmit) and event.seqnum == 5


def test_server_speaking_first_is_a_remote_phase_error_on_the_client():
    client = ClientConnection()
    client.receive_data(pack(OpRepDevlist()))
    with pytest.raises(RemotePhaseError, match="before any request was sent"):
        client.next_event()


def test_reply_of_the_wrong_operation_is_a_remote_phase_error_on_the_client():
    client = ClientConnection()
    client.send(OpReqImport(busid="1-1"))
    client.receive_data(pack(OpRepDevlist()))
    with pytest.raises(RemotePhaseError, match=r"OP_REP_DEVLIST .* expected OP_REP_IMPORT"):
        client.next_event()


def test_import_reply_for_another_busid_is_a_remote_field_error_like_usbip_attach():
    client = ClientConnection()
    client.send(OpReqImport(busid="1-1"))
    other = UsbDevice(
        path="/sys/x", busid="2-1", busnum=2, devnum=1, speed=2, idVendor=1, idProduct=1, bcdDevice=1
    )
    client.receive_data(pack(OpRepImport(udev=other)))
    with pytest.raises(RemoteFieldError, match=r"'2-1'.*'1-1'") as info:
        client.next_event()
    assert info.value.field == "busid"


def test_unknown_command_in_the_urb_phase_is_an_unknown_command_error():
    _, server = imported_pair()
    server.receive_data(struct.pack(">I", 7) + bytes(44))
    with pytest.raises(UnknownCommandError, match="0x00000007"):
        server.next_event()


@pytest.mark.parametrize(
    "who, message, match",
    [
        ("server", RetSubmit(seqnum=1), "cannot send USBIP_RET_SUBMIT in phase OP"),
        ("server", OpRepImport(udev=UDEV), "cannot send OP_REP_IMPORT in phase OP"),
        (
            "server",
            CmdSubmit(seqnum=1, devid=DEVID, direction=0, ep=0),
            "server does not send USBIP_CMD_SUBMIT",
        ),
        ("client", RetUnlink(seqnum=1), "client does not send USBIP_RET_UNLINK"),
        ("client", CmdUnlink(seqnum=2, unlink_seqnum=1), "cannot send USBIP_CMD_UNLINK in phase OP"),
        ("client", OpRepDevlist(), "client does not send OP_REP_DEVLIST"),
    ],
)
def test_sending_a_message_of_the_wrong_role_or_phase_is_a_local_phase_error(who, message, match):
    conn = ServerConnection() if who == "server" else ClientConnection()
    with pytest.raises(LocalPhaseError, match=match):
        conn.send(message)
    assert conn.phase is Phase.OP


def test_server_answering_an_import_with_a_devlist_is_a_local_phase_error():
    server = ServerConnection()
    server.receive_data(pack(OpReqImport(busid="1-1")))
    drain(server)
    with pytest.raises(LocalPhaseError, match="OP_REP_DEVLIST does not answer OP_REQ_IMPORT"):
        server.send(OpRepDevlist())
    assert server.phase is Phase.OP_REPLY
    server.send(OpRepImport(udev=UDEV))
    assert server.phase is Phase.URB


# ---------------------------------------------------------------------------------------------- seqnums


def test_cmd_submit_reusing_an_outstanding_seqnum_is_a_remote_seqnum_error():
    client, server = imported_pair()
    seqnum = submit(client, server)
    server.receive_data(cmd_submit_bytes(seqnum))
    with pytest.raises(RemoteSeqnumError, match=f"reuses seqnum {seqnum}") as info:
        server.next_event()
    assert info.value.seqnum == seqnum and info.value.field == "seqnum"


def test_cmd_submit_for_another_devid_is_a_remote_field_error_like_stub_valid_request():
    _, server = imported_pair()
    server.receive_data(cmd_submit_bytes(1, devid=0x30004))
    with pytest.raises(RemoteFieldError, match="devid 0x30004") as info:
        server.next_event()
    assert info.value.field == "devid" and info.value.offset is not None


def test_client_reusing_an_outstanding_seqnum_is_a_local_seqnum_error():
    client, server = imported_pair()
    seqnum = submit(client, server)
    with pytest.raises(LocalSeqnumError, match=f"reuses seqnum {seqnum}"):
        client.send(CmdSubmit(seqnum=seqnum, devid=DEVID, direction=USBIP_DIR_IN, ep=1))


def test_client_sending_another_devid_is_a_local_field_error():
    client, _ = imported_pair()
    with pytest.raises(LocalFieldError, match="devid") as info:
        client.send(CmdSubmit(seqnum=1, devid=DEVID + 1, direction=USBIP_DIR_IN, ep=1))
    assert info.value.field == "devid"


def test_ret_submit_for_an_unknown_seqnum_is_a_remote_seqnum_error_with_its_offset():
    client, _ = imported_pair()
    client.receive_data(pack(RetSubmit(seqnum=77)))
    with pytest.raises(RemoteSeqnumError, match="seqnum 77: no USBIP_CMD_SUBMIT") as info:
        client.next_event()
    assert info.value.seqnum == 77 and info.value.offset == 0x140 + 4  # after the 0x140-byte OP_REP_IMPORT


def test_ret_unlink_for_an_unknown_seqnum_is_a_remote_seqnum_error():
    client, _ = imported_pair()
    client.receive_data(pack(RetUnlink(seqnum=5, status=-ECONNRESET)))
    with pytest.raises(RemoteSeqnumError, match="seqnum 5: no USBIP_CMD_UNLINK"):
        client.next_event()


def test_server_answering_an_unknown_seqnum_is_a_local_seqnum_error_and_changes_nothing():
    client, server = imported_pair()
    seqnum = submit(client, server)
    with pytest.raises(LocalSeqnumError, match="seqnum 99: no USBIP_CMD_SUBMIT"):
        server.send(RetSubmit(seqnum=99))
    with pytest.raises(LocalSeqnumError, match="no USBIP_CMD_UNLINK"):
        server.send(RetUnlink(seqnum=99))
    assert set(server.pending_seqnums) == {seqnum}


def test_next_seqnum_counts_from_one_and_skips_outstanding_ones():
    client, server = imported_pair()
    assert submit(client, server) == 1
    client._last_seqnum = 0  # wrap-around, as after 0xffffffff
    assert client.next_seqnum() == 2


# ---------------------------------------------------------------------------------------------- URB payloads


def test_ret_submit_longer_than_its_cmd_is_a_remote_length_mismatch():
    client, server = imported_pair()
    seqnum = submit(client, server, length=4)
    client.receive_data(pack(RetSubmit(seqnum=seqnum, actual_length=8, transfer_buffer=bytes(8))))
    with pytest.raises(
        RemoteLengthMismatchError, match="exceeds the CMD_SUBMIT's transfer_buffer_length 4"
    ) as i:
        client.next_event()
    assert i.value.field == "actual_length"


def test_iso_ret_with_more_packets_than_its_cmd_is_a_remote_field_error():
    client, server = imported_pair()
    seqnum = client.next_seqnum()
    isos = (IsoPacketDescriptor(offset=0, length=8),)
    server.receive_data(
        client.send(
            CmdSubmit(
                seqnum=seqnum,
                devid=DEVID,
                direction=USBIP_DIR_IN,
                ep=3,
                transfer_buffer_length=16,
                number_of_packets=1,
                iso_packet_descriptors=isos,
            )
        )
    )
    drain(server)
    two = (IsoPacketDescriptor(offset=0, length=8), IsoPacketDescriptor(offset=8, length=8))
    client.receive_data(pack(RetSubmit(seqnum=seqnum, number_of_packets=2, iso_packet_descriptors=two)))
    with pytest.raises(RemoteFieldError, match="number_of_packets 2 for an iso URB of 1") as info:
        client.next_event()
    assert info.value.field == "number_of_packets"


def test_server_must_send_actual_length_bytes_for_in_and_none_for_out():
    client, server = imported_pair()
    urb_in = submit(client, server, length=16)
    urb_out = submit(client, server, direction=USBIP_DIR_OUT, data=b"hello")
    with pytest.raises(LocalLengthMismatchError, match="IN URB's transfer_buffer must hold actual_length 4"):
        server.send(RetSubmit(seqnum=urb_in, actual_length=4))
    with pytest.raises(LocalLengthMismatchError, match="OUT URB's RET_SUBMIT carries no data"):
        server.send(RetSubmit(seqnum=urb_out, actual_length=2, transfer_buffer=b"hi"))
    with pytest.raises(LocalLengthMismatchError, match="exceeds"):
        server.send(RetSubmit(seqnum=urb_out, actual_length=6))
    with pytest.raises(LocalFieldError, match="non-iso URB"):
        server.send(
            RetSubmit(
                seqnum=urb_out,
                actual_length=5,
                number_of_packets=1,
                iso_packet_descriptors=(IsoPacketDescriptor(offset=0, length=5, actual_length=5),),
            )
        )
    client.receive_data(server.send(RetSubmit(seqnum=urb_out, actual_length=5)))
    client.receive_data(server.send(RetSubmit(seqnum=urb_in, actual_length=4, transfer_buffer=b"data")))
    assert drain(client) == [
        RetSubmit(seqnum=urb_out, actual_length=5),
        RetSubmit(seqnum=urb_in, actual_length=4, transfer_buffer=b"data"),
    ]


def test_cmd_submit_above_the_connection_cap_is_refused_from_its_header():
    server = ServerConnection(limits=Limits(max_transfer_buffer_length=1024))
    server.receive_data(pack(OpReqImport(busid="1-1")))
    drain(server)
    server.send(OpRepImport(udev=UDEV))
    header = cmd_submit_bytes(
        1, direction=USBIP_DIR_OUT, transfer_buffer_length=2048, transfer_buffer=bytes(2048)
    )[:48]
    server.receive_data(header)
    with pytest.raises(LimitExceededError, match="2048 exceeds the cap 1024") as info:
        server.next_event()
    assert info.value.field == "transfer_buffer_length"


# ---------------------------------------------------------------------------------------------- unlink


def test_unlink_of_a_pending_urb_returns_econnreset_and_no_ret_submit():
    client, server = imported_pair()
    target = submit(client, server)
    unlink_seqnum = unlink(client, server, target)
    assert dict(server.unlinked_seqnums) == {target: unlink_seqnum}
    reply = server.ret_unlink_for(unlink_seqnum)
    assert reply == RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET)
    client.receive_data(server.send(reply))
    assert drain(client) == [reply]
    assert not client.pending_seqnums and not client.pending_unlinks
    assert not server.pending_seqnums and not server.pending_unlinks
    with pytest.raises(LocalSeqnumError):  # the URB is gone: no RET_SUBMIT can follow
        server.send(RetSubmit(seqnum=target))


def test_ret_submit_for_an_unlinked_urb_is_refused_and_leaves_the_state_as_it_was():
    client, server = imported_pair()
    target = submit(client, server, length=3)
    unlink_seqnum = unlink(client, server, target)
    with pytest.raises(
        UnlinkedUrbError, match=f"unlinked by USBIP_CMD_UNLINK seqnum {unlink_seqnum}"
    ) as info:
        server.send(RetSubmit(seqnum=target, actual_length=3, transfer_buffer=b"abc"))
    assert info.value.seqnum == target and isinstance(info.value, LocalSeqnumError)
    assert set(server.pending_seqnums) == {target} and dict(server.pending_unlinks) == {unlink_seqnum: target}


def test_complete_of_an_unlinked_urb_sends_ret_unlink_with_the_urb_status_like_stub_complete():
    client, server = imported_pair()
    target = submit(client, server, length=3)
    unlink_seqnum = unlink(client, server, target)
    data = server.complete(RetSubmit(seqnum=target, status=-ECONNRESET))
    assert data == pack(RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET))
    client.receive_data(data)
    assert drain(client) == [RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET)]
    assert not client.pending_seqnums


def test_unlink_after_completion_returns_status_0_and_the_ret_submit_still_arrives():
    client, server = imported_pair()
    target = submit(client, server, length=2)
    ret = RetSubmit(seqnum=target, actual_length=2, transfer_buffer=b"ok")
    in_flight = server.complete(ret)  # RET_SUBMIT sent, not yet read by the client
    unlink_seqnum = unlink(client, server, target)  # the client unlinks meanwhile
    assert not server.unlinked_seqnums
    reply = server.ret_unlink_for(unlink_seqnum)
    assert reply.status == 0
    with pytest.raises(LocalFieldError, match="status must be 0") as info:
        server.send(RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET))
    assert info.value.field == "status"
    client.receive_data(in_flight + server.send(reply))
    assert drain(client) == [ret, reply]  # the RET_SUBMIT racing the unlink is legal
    assert not client.pending_seqnums and not client.pending_unlinks


def test_ret_submit_after_a_cancelling_ret_unlink_is_a_remote_seqnum_error_like_vhci_rx():
    client, server = imported_pair()
    target = submit(client, server)
    unlink_seqnum = unlink(client, server, target)
    client.receive_data(
        pack(RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET)) + pack(RetSubmit(seqnum=target))
    )
    assert client.next_event() == RetUnlink(seqnum=unlink_seqnum, status=-ECONNRESET)
    with pytest.raises(RemoteSeqnumError, match=f"seqnum {target}"):
        client.next_event()


def test_second_unlink_of_the_same_urb_gets_status_0_as_in_stub_rx():
    client, server = imported_pair()
    target = submit(client, server)
    first = unlink(client, server, target)
    server.receive_data(pack(CmdUnlink(seqnum=first + 1, devid=DEVID, unlink_seqnum=target)))
    drain(server)
    assert server.ret_unlink_for(first).status == -ECONNRESET
    assert server.ret_unlink_for(first + 1).status == 0


def test_unlink_of_an_unknown_urb_gets_status_0():
    _, server = imported_pair()
    server.receive_data(pack(CmdUnlink(seqnum=10, devid=DEVID, unlink_seqnum=3)))
    drain(server)
    assert server.ret_unlink_for(10) == RetUnlink(seqnum=10, status=0)


def test_client_may_unlink_only_a_pending_urb_and_only_once():
    client, server = imported_pair()
    with pytest.raises(LocalSeqnumError, match="no USBIP_CMD_SUBMIT with seqnum 40") as info:
        client.send(CmdUnlink(seqnum=41, devid=DEVID, unlink_seqnum=40))
    assert info.value.field == "unlink_seqnum"
    target = submit(client, server)
    unlink(client, server, target)
    with pytest.raises(LocalSeqnumError, match="already being unlinked"):
        client.send(CmdUnlink(seqnum=client.next_seqnum(), devid=DEVID, unlink_seqnum=target))


def test_ret_unlink_for_for_an_unknown_unlink_is_a_local_seqnum_error():
    _, server = imported_pair()
    with pytest.raises(LocalSeqnumError, match="seqnum 3"):
        server.ret_unlink_for(3)


# ---------------------------------------------------------------------------------------------- EOF and errors


def test_eof_at_a_message_boundary_gives_connection_closed_repeatedly_and_blocks_sending():
    client, server = imported_pair()
    seqnum = submit(client, server)
    server.receive_data(b"")
    assert server.next_event() == ConnectionClosed()
    assert server.next_event() == ConnectionClosed()
    assert server.phase is Phase.CLOSED
    with pytest.raises(LocalPhaseError, match="client closed the connection"):
        server.send(RetSubmit(seqnum=seqnum))


def test_eof_in_the_middle_of_a_message_is_a_truncated_message_error_naming_it():
    _, server = imported_pair()
    server.receive_data(cmd_submit_bytes(1)[:20])
    assert server.next_event() is NEED_DATA
    server.receive_data(b"")
    with pytest.raises(TruncatedMessageError, match=r"20 bytes into USBIP_CMD_SUBMIT .* at least 48") as info:
        server.next_event()
    assert info.value.offset == 40 + 20


def test_eof_in_the_middle_of_an_out_payload_is_a_truncated_message_error():
    _, server = imported_pair()
    data = cmd_submit_bytes(
        1, direction=USBIP_DIR_OUT, transfer_buffer_length=100, transfer_buffer=bytes(100)
    )
    server.receive_data(data[:120])
    server.receive_data(b"")
    with pytest.raises(TruncatedMessageError, match="at least 148"):
        server.next_event()


def test_receive_data_after_eof_is_a_local_phase_error():
    server = ServerConnection()
    server.receive_data(b"")
    with pytest.raises(LocalPhaseError, match="after the end of the stream"):
        server.receive_data(b"x")


def test_a_remote_error_is_sticky_and_blocks_sending():
    client, server = imported_pair()
    seqnum = submit(client, server)
    server.receive_data(b"\x00\x00\x00\x09" + bytes(44))
    with pytest.raises(UnknownCommandError) as first:
        server.next_event()
    with pytest.raises(UnknownCommandError) as again:
        server.next_event()
    assert again.value is first.value and server.phase is Phase.ERROR
    with pytest.raises(LocalPhaseError, match="the connection failed"):
        server.send(RetSubmit(seqnum=seqnum))


@settings(max_examples=200)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_into_a_server_give_events_or_a_remote_error_and_nothing_else(data, imported):
    if imported:
        _, server = imported_pair()
    else:
        server = ServerConnection()
    server.receive_data(data)
    server.receive_data(b"")
    try:
        events = drain(server)
    except ProtocolError as error:
        assert isinstance(error, RemoteProtocolError) and str(error)
    else:  # with the stream ended, only a server owing its operation reply may still wait
        assert events[-1:] == [ConnectionClosed()] or server.phase is Phase.OP_REPLY


# ---------------------------------------------------------------------------------------------- conversations


class Pair:
    """A client and a server joined by two byte queues; the server side plays a simple application.

    Records both whole streams and every event so the conversation can be replayed in other splits.
    """

    def __init__(self):
        self.client, self.server = ClientConnection(), ServerConnection()
        self.c2s, self.s2c = bytearray(), bytearray()
        self.c2s_log, self.s2c_log = bytearray(), bytearray()
        self.client_sent, self.server_events, self.client_events = [], [], []
        self.server_urbs: dict[int, CmdSubmit] = {}  # the app's view: received, not answered
        self.server_unlinks: list[int] = []  # CMD_UNLINK seqnums received, not answered
        self.client_send(OpReqImport(busid="1-1"))
        self.deliver_c2s()
        self.server_send(OpRepImport(udev=UDEV))
        self.deliver_s2c()
        assert self.client.phase is Phase.URB

    def client_send(self, message):
        data = self.client.send(message)
        self.c2s += data
        self.c2s_log += data
        self.client_sent.append(message)

    def server_send(self, message, *, complete=False):
        data = self.server.complete(message) if complete else self.server.send(message)
        self.s2c += data
        self.s2c_log += data

    def deliver_c2s(self, count=None):
        count = len(self.c2s) if count is None else min(count, len(self.c2s))
        if count:  # b"" would mean EOF
            self.server.receive_data(bytes(self.c2s[:count]))
            del self.c2s[:count]
        for event in drain(self.server):
            self.server_events.append(event)
            if isinstance(event, CmdSubmit):
                self.server_urbs[event.seqnum] = event
            elif isinstance(event, CmdUnlink):
                self.server_unlinks.append(event.seqnum)

    def deliver_s2c(self, count=None):
        count = len(self.s2c) if count is None else min(count, len(self.s2c))
        if count:  # b"" would mean EOF
            self.client.receive_data(bytes(self.s2c[:count]))
            del self.s2c[:count]
        events = drain(self.client)
        self.client_events.extend(events)
        return events

    def make_cmd(self, draw, direction, iso_packets):
        seqnum = self.client.next_seqnum()
        if direction == USBIP_DIR_OUT:
            data = draw(st.binary(max_size=300))
            length = len(data)
        else:
            data, length = b"", draw(st.integers(0, 600))
        packets = iso_packets if iso_packets else draw(st.sampled_from([0, -1]))
        isos = tuple(IsoPacketDescriptor(offset=i * 8, length=8) for i in range(iso_packets))
        return CmdSubmit(
            seqnum=seqnum,
            devid=DEVID,
            direction=direction,
            ep=2,
            transfer_buffer_length=length,
            number_of_packets=packets,
            transfer_buffer=data,
            iso_packet_descriptors=isos,
        )

    def make_ret(self, draw, cmd):
        if cmd.number_of_packets > 0:
            per_packet = cmd.transfer_buffer_length // cmd.number_of_packets
            lengths = [draw(st.integers(0, per_packet)) for _ in range(cmd.number_of_packets)]
            actual = sum(lengths)
            isos = tuple(
                IsoPacketDescriptor(offset=i * per_packet, length=per_packet, actual_length=n)
                for i, n in enumerate(lengths)
            )
        else:
            actual = draw(st.integers(0, cmd.transfer_buffer_length))
            isos = ()
        data = draw(st.binary(min_size=actual, max_size=actual)) if cmd.direction == USBIP_DIR_IN else b""
        return RetSubmit(
            seqnum=cmd.seqnum,
            status=draw(st.sampled_from([0, -32, -71])),
            actual_length=actual,
            number_of_packets=cmd.number_of_packets,
            transfer_buffer=data,
            iso_packet_descriptors=isos,
        )

    def complete(self, draw, seqnum):
        """The app finishes URB `seqnum` the way stub_complete does (RET_UNLINK instead if unlinked)."""
        cmd = self.server_urbs.pop(seqnum)
        unlink_seqnum = self.server.unlinked_seqnums.get(seqnum)
        self.server_send(self.make_ret(draw, cmd), complete=True)
        if unlink_seqnum is not None:
            self.server_unlinks.remove(unlink_seqnum)

    def answer_unlink(self, unlink_seqnum):
        reply = self.server.ret_unlink_for(unlink_seqnum)
        target = self.server.pending_unlinks[unlink_seqnum]
        self.server_send(reply)
        self.server_unlinks.remove(unlink_seqnum)
        if reply.status == -ECONNRESET:
            del self.server_urbs[target]  # the app cancelled the URB


def play_conversation(draw, steps):
    pair = Pair()
    for _ in range(steps):
        actions = ["submit", "deliver_c2s", "deliver_s2c"]
        pending = [s for s in pair.client.pending_seqnums if s not in pair.client.unlinked_seqnums]
        if pending:
            actions.append("unlink")
        if pair.server_urbs:
            actions.append("complete")
        if pair.server_unlinks:
            actions.append("answer_unlink")
        action = draw(st.sampled_from(actions))
        if action == "submit":
            direction = draw(st.sampled_from([USBIP_DIR_IN, USBIP_DIR_OUT]))
            pair.client_send(pair.make_cmd(draw, direction, draw(st.sampled_from([0, 0, 0, 2]))))
        elif action == "unlink":
            target = draw(st.sampled_from(sorted(pending)))
            pair.client_send(CmdUnlink(seqnum=pair.client.next_seqnum(), devid=DEVID, unlink_seqnum=target))
        elif action == "complete":
            pair.complete(draw, draw(st.sampled_from(sorted(pair.server_urbs))))
        elif action == "answer_unlink":
            pair.answer_unlink(draw(st.sampled_from(pair.server_unlinks)))
        elif action == "deliver_c2s":
            pair.deliver_c2s(draw(st.integers(1, 200)))
        else:
            pair.deliver_s2c(draw(st.integers(1, 200)))
    pair.deliver_c2s()
    pair.deliver_s2c()
    return pair


def feed_by_copy(conn, data, hint):
    conn.receive_data(data)


def feed_in_place(conn, data, hint):
    """What a BufferedProtocol edge does: read into the connection's own buffer, then say how much came."""
    view = conn.get_buffer(hint)
    assert len(view) >= max(hint, 1)
    view[: len(data)] = data
    del view
    conn.buffer_updated(len(data))


def replay_server(stream, chunks, feed=feed_by_copy, hints=()):
    server, events, pos = ServerConnection(), [], 0
    hints = [*hints]
    for size in [*chunks, len(stream)]:
        if stream[pos : pos + size]:  # b"" would mean EOF
            chunk = stream[pos : pos + size]
            feed(server, chunk, max(hints.pop() if hints else 0, len(chunk)))
        pos += size
        while (event := server.next_event()) is not NEED_DATA:  # one at a time: react before the next
            events.append(event)
            if isinstance(event, OpReqImport):
                server.send(OpRepImport(udev=UDEV))
    return events


def _plain_or_full(client):
    """next_plain_ret, else next_event, as the host's pump takes them; RET_SUBMITs as comparable tuples."""
    plain = client.next_plain_ret()
    if plain is NEED_DATA:
        assert client.next_event() is NEED_DATA  # what next_event says then too
        return NEED_DATA
    if plain is not None:
        return ("ret", *plain)
    event = client.next_event()
    if type(event) is RetSubmit and not event.iso_packet_descriptors:
        return (
            "ret",
            event.seqnum,
            event.status,
            event.actual_length,
            event.start_frame,
            event.error_count,
            event.transfer_buffer,
        )
    return event


def as_plain(events):
    """`events` as the plain paths report them: a non-iso RetSubmit as a ("ret", ...) tuple, the rest as is."""
    return [
        ("ret", e.seqnum, e.status, e.actual_length, e.start_frame, e.error_count, e.transfer_buffer)
        if type(e) is RetSubmit and not e.iso_packet_descriptors
        else e
        for e in events
    ]


def replay_client_plain(stream, chunks, client_sent):
    client, events, pos = ClientConnection(), [], 0
    client.send(client_sent[0])
    for size in [*chunks, len(stream)]:
        if stream[pos : pos + size]:
            client.receive_data(stream[pos : pos + size])
        pos += size
        while (event := _plain_or_full(client)) is not NEED_DATA:
            events.append(event)
            if isinstance(event, OpRepImport):
                for message in client_sent[1:]:
                    client.send(message)
    return events


def replay_client(stream, chunks, client_sent, feed=feed_by_copy, hints=()):
    client, events, pos = ClientConnection(), [], 0
    hints = [*hints]
    client.send(client_sent[0])
    for size in [*chunks, len(stream)]:
        if stream[pos : pos + size]:  # b"" would mean EOF
            chunk = stream[pos : pos + size]
            feed(client, chunk, max(hints.pop() if hints else 0, len(chunk)))
        pos += size
        while (event := client.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, OpRepImport):
                for message in client_sent[1:]:  # no seqnum is reused, so all can go out now
                    client.send(message)
    return events


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_split_of_a_valid_stream_yields_the_same_events(data):
    pair = play_conversation(data.draw, data.draw(st.integers(5, 40)))
    chunk_sizes = st.lists(st.integers(1, 97), max_size=60)
    assert replay_server(bytes(pair.c2s_log), data.draw(chunk_sizes)) == pair.server_events
    assert replay_client(bytes(pair.s2c_log), data.draw(chunk_sizes), pair.client_sent) == pair.client_events


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_split_through_next_plain_ret_yields_the_same_events(data):
    """A client taking plain RET_SUBMITs as tuples (next_plain_ret, else next_event) sees the same answers,
    in the same order, as through next_event alone."""
    pair = play_conversation(data.draw, data.draw(st.integers(5, 40)))
    chunks = data.draw(st.lists(st.integers(1, 97), max_size=60))
    full = replay_client(bytes(pair.s2c_log), chunks, pair.client_sent)
    events = replay_client_plain(bytes(pair.s2c_log), chunks, pair.client_sent)
    assert events == as_plain(full)


def test_next_plain_ret_leaves_the_unusual_to_next_event():
    client, server = imported_pair()
    in_seq, waiting_seq, unlinked_seq = (submit(client, server) for _ in range(3))
    iso = CmdSubmit(
        seqnum=9,
        devid=DEVID,
        direction=USBIP_DIR_IN,
        ep=3,
        transfer_buffer_length=8,
        number_of_packets=1,
        iso_packet_descriptors=(IsoPacketDescriptor(offset=0, length=8),),
    )
    server.receive_data(client.send(iso))
    drain(server)
    server.receive_data(client.send(CmdUnlink(seqnum=10, devid=DEVID, unlink_seqnum=unlinked_seq)))
    drain(server)
    assert client.next_plain_ret() is NEED_DATA  # nothing in
    client.receive_data(
        server.send(RetSubmit(seqnum=in_seq, status=-32, actual_length=3, transfer_buffer=b"abc"))
    )
    client.receive_data(
        server.send(
            RetSubmit(
                seqnum=9,
                actual_length=0,
                number_of_packets=1,
                iso_packet_descriptors=(IsoPacketDescriptor(offset=0, length=8),),
            )
        )
    )
    assert client.next_plain_ret() == (in_seq, -32, 3, 0, 0, b"abc")
    assert client.next_plain_ret() is None  # iso: a message
    assert type(client.next_event()) is RetSubmit
    client.receive_data(server.send(server.ret_unlink_for(10)))
    assert client.next_plain_ret() is None  # a RET_UNLINK
    assert type(client.next_event()) is RetUnlink
    assert sorted(client.pending_seqnums) == [waiting_seq]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_split_read_into_get_buffer_yields_the_same_events(data):
    """The same through get_buffer/buffer_updated, with small size hints: the unconsumed tail moves to the
    front or into a bigger buffer many times."""
    pair = play_conversation(data.draw, data.draw(st.integers(5, 40)))
    chunk_sizes = st.lists(st.integers(1, 97), max_size=60)
    hints = st.lists(st.integers(-1, 200), max_size=60)
    c2s, s2c = bytes(pair.c2s_log), bytes(pair.s2c_log)
    server_events = replay_server(c2s, data.draw(chunk_sizes), feed_in_place, data.draw(hints))
    assert server_events == pair.server_events
    client_events = replay_client(
        s2c, data.draw(chunk_sizes), pair.client_sent, feed_in_place, data.draw(hints)
    )
    assert client_events == pair.client_events


def _send_with_into(client, message, intos):
    """Send `message`; a plain IN CMD_SUBMIT goes through submit_plain with an `into` view (kept in `intos`)."""
    if type(message) is CmdSubmit and message.direction == USBIP_DIR_IN and not message.number_of_packets > 0:
        into = memoryview(bytearray(message.transfer_buffer_length + 3))  # longer than needed, as allowed
        intos[message.seqnum] = into
        return client.submit_plain(
            message.seqnum,
            message.devid,
            message.direction,
            message.ep,
            message.transfer_flags,
            message.transfer_buffer_length,
            interval=message.interval,
            into=into,
        )
    return client.send(message)


def replay_client_into(stream, chunks, client_sent, limits):
    """The host's edge: IN URBs with `into`, each read a scatter read into get_buffers(limit) (payloads
    straight into `into`), then next_plain_ret else next_event until NEED_DATA. RET_SUBMITs as tuples
    with the data, wherever it went."""
    client, events, pos, intos = ClientConnection(), [], 0, {}
    limits = [*limits]
    client.send(client_sent[0])
    for size in [*chunks, len(stream)]:
        chunk = stream[pos : pos + size]
        pos += size
        while chunk:
            buffers = client.get_buffers(max(limits.pop() if limits else 0, 1))
            assert buffers and all(len(b) for b in buffers)
            got = 0
            for buffer in buffers:
                part = chunk[got : got + len(buffer)]
                buffer[: len(part)] = part
                got += len(part)
            del buffers
            client.buffer_updated(got)
            chunk = chunk[got:]
            while True:
                plain = client.next_plain_ret()
                if plain is NEED_DATA:
                    assert client.next_event() is NEED_DATA
                    break
                if plain is not None:
                    seqnum, status, actual, start_frame, error_count, data = plain
                    if seqnum in intos:
                        assert data == b""
                        data = bytes(intos[seqnum][:actual])
                    events.append(("ret", seqnum, status, actual, start_frame, error_count, data))
                    continue
                event = client.next_event()
                if event is NEED_DATA:
                    break
                if type(event) is RetSubmit and not event.iso_packet_descriptors:
                    event = ("ret", event.seqnum, event.status, event.actual_length, event.start_frame,
                             event.error_count, event.transfer_buffer)
                events.append(event)
                if isinstance(event, OpRepImport):
                    for message in client_sent[1:]:
                        _send_with_into(client, message, intos)
    return events


def play_in_traffic(draw):
    """Mostly IN URBs in flight at once, some unlinked, answered in any order: payloads back to back."""
    pair = Pair()
    for _ in range(draw(st.integers(1, 12))):
        direction = draw(st.sampled_from([USBIP_DIR_IN, USBIP_DIR_IN, USBIP_DIR_IN, USBIP_DIR_OUT]))
        pair.client_send(pair.make_cmd(draw, direction, draw(st.sampled_from([0, 0, 0, 0, 2]))))
    pair.deliver_c2s()
    for target in draw(st.lists(st.sampled_from(sorted(pair.server_urbs)), unique=True, max_size=2)):
        pair.client_send(CmdUnlink(seqnum=pair.client.next_seqnum(), devid=DEVID, unlink_seqnum=target))
    pair.deliver_c2s()
    if draw(st.booleans()):
        for unlink_seqnum in list(pair.server_unlinks):  # before the URBs complete: they are cancelled
            pair.answer_unlink(unlink_seqnum)
    for seqnum in draw(st.permutations(sorted(pair.server_urbs))):
        pair.complete(draw, seqnum)
    for unlink_seqnum in list(pair.server_unlinks):
        pair.answer_unlink(unlink_seqnum)
    pair.deliver_s2c()
    return pair


@settings(max_examples=100, deadline=None)
@given(st.data(), st.booleans())
def test_any_split_read_into_get_buffers_with_into_yields_the_same_events(data, busy):
    """IN payloads read straight into their URBs' `into` views (get_buffers / buffer_updated, any split,
    any read size) give the answers next_event gives for the same stream, data included."""
    pair = play_in_traffic(data.draw) if busy else play_conversation(data.draw, data.draw(st.integers(5, 40)))
    chunks = data.draw(st.lists(st.integers(1, 700), max_size=60))
    limits = data.draw(st.lists(st.integers(1, 120), max_size=200))
    full = replay_client(bytes(pair.s2c_log), chunks, pair.client_sent)
    assert replay_client_into(bytes(pair.s2c_log), chunks, pair.client_sent, limits) == as_plain(full)


def _into_pair(length=10):
    client, server = imported_pair()
    target = bytearray(length)
    server.receive_data(b"".join(client.submit_plain(1, DEVID, USBIP_DIR_IN, 1, 0, length, into=memoryview(target))))
    drain(server)
    ret = server.send(RetSubmit(seqnum=1, actual_length=length, transfer_buffer=bytes(range(65, 65 + length))))
    return client, server, target, ret


def test_get_buffer_gives_the_rest_of_a_payload_bound_for_into():
    client, _, target, ret = _into_pair()
    client.receive_data(ret[:52])  # the header and 4 bytes of data
    assert client.next_plain_ret() is NEED_DATA and client.next_event() is NEED_DATA
    assert target[:4] == b"ABCD"
    assert client.trailing_data == (ret[:52], False)
    view = client.get_buffer(1)
    assert len(view) == 6  # exactly the missing part of the payload, in `into`
    view[:2] = ret[52:54]
    del view
    client.buffer_updated(2)
    client.receive_data(ret[54:] + b"\0" * 3)  # the payload's end, then the start of the next message
    assert client.trailing_data == (b"\0" * 3, False)
    assert client.next_plain_ret() == (1, 0, 10, 0, 0, b"")
    assert target == b"ABCDEFGHIJ"
    assert not client.pending_seqnums


def test_eof_inside_a_payload_bound_for_into_is_the_same_truncation_error():
    client, _, _, ret = _into_pair()
    plain, server = imported_pair()
    server.receive_data(
        plain.send(CmdSubmit(seqnum=1, devid=DEVID, direction=USBIP_DIR_IN, ep=1, transfer_buffer_length=10))
    )
    errors = []
    for conn in (client, plain):
        conn.receive_data(ret[:55])
        assert conn.next_plain_ret() in (None, NEED_DATA) and conn.next_event() is NEED_DATA
        conn.receive_data(b"")
        with pytest.raises(TruncatedMessageError) as error:
            conn.next_event()
        errors.append((str(error.value), error.value.offset))
        assert conn.phase is Phase.ERROR
    assert errors[0] == errors[1]
    assert "55 bytes into USBIP_RET_SUBMIT" in errors[0][0]


def test_unlink_while_a_payload_goes_into_into_leaves_the_ret_submit_to_next_event():
    client, server, target, ret = _into_pair()
    client.receive_data(ret[:50])
    assert client.next_plain_ret() is NEED_DATA
    server.receive_data(client.send(CmdUnlink(seqnum=2, devid=DEVID, unlink_seqnum=1)))
    client.receive_data(ret[50:])
    assert client.next_plain_ret() is None  # the RET_SUBMIT overtook the unlink: the message path says so
    event = client.next_event()
    assert type(event) is RetSubmit and event.transfer_buffer == b"ABCDEFGHIJ" == target
    assert dict(client.unlinked_seqnums) == {} and dict(client.pending_unlinks) == {2: 1}
    client.receive_data(pack(RetUnlink(seqnum=2, status=0)))
    assert client.next_event() == RetUnlink(seqnum=2, status=0)


def test_buffer_updated_takes_what_was_read_into_get_buffer_and_0_means_eof():
    server = ServerConnection()
    request = pack(OpReqDevlist())
    view = server.get_buffer(-1)
    assert len(view) >= 1 << 16
    view[: len(request)] = request
    del view
    server.buffer_updated(len(request))
    assert server.next_event() == OpReqDevlist()
    server.send(OpRepDevlist())
    server.get_buffer(1)
    server.buffer_updated(0)
    assert server.next_event() == ConnectionClosed()
    with pytest.raises(LocalPhaseError, match="after the end of the stream"):
        server.get_buffer(4)
        server.buffer_updated(4)


def test_buffer_updated_beyond_the_view_is_refused():
    server = ServerConnection()
    room = len(server.get_buffer(8))
    with pytest.raises(ValueError, match="holds"):
        server.buffer_updated(room + 1)


def test_receive_data_takes_a_memoryview_of_any_format_as_its_bytes():
    server = ServerConnection()
    request = pack(OpReqDevlist())
    server.receive_data(memoryview(request).cast("I"))
    assert server.trailing_data == (request, False)
    assert server.next_event() == OpReqDevlist()


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_one_byte_at_a_time_yields_the_same_events(data):
    pair = play_conversation(data.draw, 25)
    ones_c2s = [1] * len(pair.c2s_log)
    ones_s2c = [1] * len(pair.s2c_log)
    assert replay_server(bytes(pair.c2s_log), ones_c2s) == pair.server_events
    assert replay_client(bytes(pair.s2c_log), ones_s2c, pair.client_sent) == pair.client_events


class ConnectionPairMachine(RuleBasedStateMachine):
    """Random submits, unlinks, completions and partial deliveries between a client and a server.

    Model: every URB the client submits ends exactly once on the client (by its RET_SUBMIT or by a
    cancelling RET_UNLINK); a RET_UNLINK arriving after the URB's RET_SUBMIT says 0; IN data arrives as
    the server sent it; at quiescence nothing is left outstanding on either side.
    """

    def __init__(self):
        super().__init__()
        self.pair = Pair()
        self.submitted: dict[int, CmdSubmit] = {}
        self.ended: set[int] = set()
        self.unlink_targets: dict[int, int] = {}
        self.sent_data: dict[int, bytes] = {}
        self.draw = None

    def _check_client_events(self, events):
        for event in events:
            if isinstance(event, RetSubmit):
                assert event.seqnum in self.submitted and event.seqnum not in self.ended
                self.ended.add(event.seqnum)
                assert event.transfer_buffer == self.sent_data.pop(event.seqnum)
            else:
                assert isinstance(event, RetUnlink)
                target = self.unlink_targets.pop(event.seqnum)
                if target in self.ended:
                    hypothesis.event("RET_UNLINK after the URB's RET_SUBMIT (race)")
                    assert event.status == 0
                else:
                    hypothesis.event("RET_UNLINK ended a pending URB")
                    self.ended.add(target)
                    self.sent_data.pop(target, None)

    @rule(
        data=st.data(),
        direction=st.sampled_from([USBIP_DIR_IN, USBIP_DIR_OUT]),
        iso_packets=st.sampled_from([0, 0, 1, 3]),
    )
    def submit(self, data, direction, iso_packets):
        cmd = self.pair.make_cmd(data.draw, direction, iso_packets)
        self.pair.client_send(cmd)
        self.submitted[cmd.seqnum] = cmd

    @precondition(
        lambda self: any(s not in self.pair.client.unlinked_seqnums for s in self.pair.client.pending_seqnums)
    )
    @rule(data=st.data())
    def unlink(self, data):
        client = self.pair.client
        target = data.draw(
            st.sampled_from(sorted(s for s in client.pending_seqnums if s not in client.unlinked_seqnums))
        )
        seqnum = client.next_seqnum()
        self.pair.client_send(CmdUnlink(seqnum=seqnum, devid=DEVID, unlink_seqnum=target))
        self.unlink_targets[seqnum] = target

    @precondition(lambda self: self.pair.server_urbs)
    @rule(data=st.data())
    def complete(self, data):
        seqnum = data.draw(st.sampled_from(sorted(self.pair.server_urbs)))
        before = len(self.pair.s2c)
        unlinked = seqnum in self.pair.server.unlinked_seqnums
        self.pair.complete(data.draw, seqnum)
        message = codec.unpack(bytes(self.pair.s2c[before:]))
        if unlinked:
            hypothesis.event("complete() of an unlinked URB sent RET_UNLINK")
            assert isinstance(message, RetUnlink)
        else:
            assert isinstance(message, RetSubmit)
            self.sent_data[seqnum] = message.transfer_buffer

    @precondition(lambda self: any(s not in self.pair.server.unlinked_seqnums for s in self.pair.server_urbs))
    @rule(data=st.data())
    def unlink_racing_the_completion(self, data):
        """The server completes a URB while the client, not having read the RET_SUBMIT, unlinks it."""
        seqnum = data.draw(
            st.sampled_from(
                sorted(s for s in self.pair.server_urbs if s not in self.pair.server.unlinked_seqnums)
            )
        )
        self.pair.deliver_c2s()  # an earlier unlink of this URB may be in flight: let it land first
        if seqnum in self.pair.server.unlinked_seqnums or seqnum in self.pair.client.unlinked_seqnums:
            return
        self.complete_one(data, seqnum)
        unlink_seqnum = self.pair.client.next_seqnum()
        self.pair.client_send(CmdUnlink(seqnum=unlink_seqnum, devid=DEVID, unlink_seqnum=seqnum))
        self.unlink_targets[unlink_seqnum] = seqnum
        if data.draw(st.booleans()):  # let the server see the unlink now: it must answer status 0
            self.pair.deliver_c2s()
            assert self.pair.server.ret_unlink_for(unlink_seqnum).status == 0
            self.pair.answer_unlink(unlink_seqnum)

    @precondition(lambda self: self.pair.server_unlinks)
    @rule(data=st.data())
    def answer_unlink(self, data):
        self.pair.answer_unlink(data.draw(st.sampled_from(self.pair.server_unlinks)))

    @precondition(lambda self: self.pair.server.unlinked_seqnums)
    @rule(data=st.data())
    def ret_submit_for_an_unlinked_urb_is_refused(self, data):
        server = self.pair.server
        seqnum = data.draw(st.sampled_from(sorted(server.unlinked_seqnums)))
        before = (set(server.pending_seqnums), dict(server.pending_unlinks))
        with pytest.raises(UnlinkedUrbError):
            server.send(self.pair.make_ret(data.draw, self.pair.server_urbs[seqnum]))
        assert (set(server.pending_seqnums), dict(server.pending_unlinks)) == before

    @rule(count=st.integers(1, 300))
    def deliver_to_server(self, count):
        self.pair.deliver_c2s(count)

    @rule(count=st.integers(1, 300))
    def deliver_to_client(self, count):
        self._check_client_events(self.pair.deliver_s2c(count))

    @rule(data=st.data())
    def settle(self, data):
        """Deliver everything, let the server answer everything: nothing may stay outstanding."""
        pair = self.pair
        pair.deliver_c2s()
        while pair.server_unlinks:
            pair.answer_unlink(pair.server_unlinks[0])
        for seqnum in sorted(pair.server_urbs):
            self.complete_one(data, seqnum)
        self._check_client_events(pair.deliver_s2c())
        assert not pair.client.pending_seqnums and not pair.client.pending_unlinks
        assert not pair.server.pending_seqnums and not pair.server.pending_unlinks
        assert self.ended == set(self.submitted)

    def complete_one(self, data, seqnum):
        before = len(self.pair.s2c)
        self.pair.complete(data.draw, seqnum)
        message = codec.unpack(bytes(self.pair.s2c[before:]))
        assert isinstance(message, RetSubmit)
        self.sent_data[seqnum] = message.transfer_buffer

    @invariant()
    def server_owes_only_what_the_client_still_awaits(self):
        assert set(self.pair.server.pending_seqnums) <= set(self.pair.client.pending_seqnums)

    @invariant()
    def client_pending_is_what_the_model_says(self):
        assert set(self.pair.client.pending_seqnums) == set(self.submitted) - self.ended


ConnectionPairMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50, deadline=None)
test_connection_pair_state_machine_keeps_urbs_and_unlinks_consistent = ConnectionPairMachine.TestCase


def test_trailing_data_returns_unconsumed_bytes_and_eof_for_handing_the_socket_on():
    server = ServerConnection()
    server.receive_data(pack(OpReqImport(busid="1-1")) + b"\x00\x00\x00\x01partial")
    assert server.next_event() == OpReqImport(busid="1-1")
    assert server.trailing_data == (b"\x00\x00\x00\x01partial", False)
    server.receive_data(b"")
    assert server.trailing_data[1] is True


# -- the plain-submit fast path: the same stream, the same replies, the same state as next_event() --------


def _fast_or_full(server):
    """Take the next event the way the server's hot path does: next_plain_submit, else next_event."""
    plain = server.next_plain_submit()
    if plain is None:
        return server.next_event()
    seqnum, devid, direction, ep, flags, length, data = plain
    return CmdSubmit(
        seqnum=seqnum,
        devid=devid,
        direction=direction,
        ep=ep,
        transfer_flags=flags,
        transfer_buffer_length=length,
        transfer_buffer=data,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([USBIP_DIR_IN, USBIP_DIR_OUT]),
            st.integers(0, 15),
            st.sampled_from([0, -1, 2]),
            st.binary(max_size=600),
            st.integers(0, 4096),
        ),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 97),
)
def test_plain_submit_fast_path_decodes_and_answers_like_next_event(urbs, chunk):
    """Any split of a stream of CMD_SUBMITs (ep0, iso and non-iso among them) gives the same events through
    next_plain_submit + next_event as through next_event alone, and complete_plain the same bytes as
    complete_iov."""
    cmds = []
    for seqnum, (direction, ep, packets, data, length) in enumerate(urbs, start=1):
        iso = (IsoPacketDescriptor(offset=0, length=8),) * packets if packets > 0 else ()
        cmds.append(
            CmdSubmit(
                seqnum=seqnum,
                devid=DEVID,
                direction=direction,
                ep=ep,
                transfer_flags=seqnum,
                transfer_buffer_length=len(data) if direction == USBIP_DIR_OUT else length,
                number_of_packets=packets,
                transfer_buffer=data if direction == USBIP_DIR_OUT else b"",
                iso_packet_descriptors=iso,
            )
        )
    stream = b"".join(pack(c) for c in cmds)
    _, full = imported_pair()
    _, fast = imported_pair()
    full_events, fast_events = [], []
    for at in range(0, len(stream), chunk):
        full.receive_data(stream[at : at + chunk])
        fast.receive_data(stream[at : at + chunk])
        full_events += drain(full)
        while (event := _fast_or_full(fast)) is not NEED_DATA:
            fast_events.append(event)
    assert len(full_events) == len(fast_events) == len(cmds)
    for cmd, a, b in zip(cmds, full_events, fast_events, strict=True):
        assert a == cmd
        for name in ("seqnum", "devid", "direction", "ep", "transfer_flags", "transfer_buffer_length"):
            assert getattr(a, name) == getattr(b, name)
        assert a.transfer_buffer == b.transfer_buffer
    assert set(full.pending_seqnums) == set(fast.pending_seqnums)
    for cmd in cmds:
        if cmd.is_iso:
            continue
        data = bytes(cmd.transfer_buffer_length % 300) if cmd.direction == USBIP_DIR_IN else b""
        actual = len(data) if cmd.direction == USBIP_DIR_IN else cmd.transfer_buffer_length
        ret = RetSubmit(
            seqnum=cmd.seqnum, status=-32 * (cmd.seqnum % 2), actual_length=actual, transfer_buffer=data
        )
        assert b"".join(fast.complete_plain(cmd.seqnum, ret.status, actual, data)) == full.complete(ret)
    assert set(full.pending_seqnums) == set(fast.pending_seqnums)


def test_plain_submit_fast_path_leaves_errors_to_next_event():
    """A foreign devid or a reused seqnum is not taken by the fast path: next_event raises as always."""
    client, server = imported_pair()
    seqnum = submit(client, server)
    server.receive_data(pack(CmdSubmit(seqnum=seqnum, devid=DEVID, direction=USBIP_DIR_IN, ep=1)))
    assert server.next_plain_submit() is None
    with pytest.raises(RemoteSeqnumError):
        server.next_event()
    _, server = imported_pair()
    server.receive_data(pack(CmdSubmit(seqnum=1, devid=DEVID + 1, direction=USBIP_DIR_IN, ep=1)))
    assert server.next_plain_submit() is None
    with pytest.raises(RemoteFieldError):
        server.next_event()


def test_complete_plain_of_an_unlinked_urb_sends_the_ret_unlink():
    client, server = imported_pair()
    server.receive_data(client.send(CmdSubmit(seqnum=client.next_seqnum(), devid=DEVID, direction=1, ep=1)))
    target = server.next_plain_submit()
    assert target is not None
    unlink_seqnum = unlink(client, server, target[0])
    reply = b"".join(server.complete_plain(target[0], 0, 3, b"abc"))
    assert reply == pack(RetUnlink(seqnum=unlink_seqnum, status=0))
    assert not server.pending_seqnums


def test_complete_plain_checks_lengths_like_complete_iov():
    client, server = imported_pair()
    seqnum = submit(client, server, length=4)
    with pytest.raises(LocalLengthMismatchError):
        server.complete_plain(seqnum, 0, 5, b"abcde")
    assert seqnum in server.pending_seqnums


def _outcome(call):
    try:
        return b"".join(call())
    except Exception as error:  # the type and text are what is compared
        return type(error), str(error)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 6),
    st.sampled_from([DEVID, DEVID + 1]),
    st.sampled_from([USBIP_DIR_IN, USBIP_DIR_OUT, 7]),
    st.integers(-1, 17),
    st.sampled_from([0, 0x200, -1, 1 << 32]),
    st.integers(-1, 40),
    st.binary(max_size=40),
    st.sampled_from([0, 4, -1 << 31, 1 << 31]),
    st.sampled_from([bytes(8), bytes.fromhex("8006000100001200"), b"short"]),
)
@example(0, DEVID, USBIP_DIR_IN, 1, 0, -1, b"", 0, bytes(8))  # a negative IN length: the wire's int32 would take it
@example(0, DEVID, USBIP_DIR_IN, 0, 0x200, 18, b"", 0, bytes.fromhex("8006000100001200"))  # GET_DESCRIPTOR
def test_submit_plain_sends_what_send_iov_sends_or_raises_the_same(
    outstanding, devid, direction, ep, flags, length, data, interval, setup
):
    """submit_plain gives send_iov(CmdSubmit(...))'s bytes, bookkeeping and errors, with or without its shortcut."""
    plain, _ = imported_pair()
    full, _ = imported_pair()
    for conn in (plain, full):
        for seqnum in range(1, 4):  # seqnums 1-3 are outstanding
            conn.send(
                CmdSubmit(seqnum=seqnum, devid=DEVID, direction=USBIP_DIR_IN, ep=1, transfer_buffer_length=8)
            )
    cmd = dict(seqnum=outstanding, devid=devid, direction=direction, ep=ep, transfer_flags=flags)
    cmd.update(transfer_buffer_length=length, transfer_buffer=data, interval=interval, setup=setup)
    got = _outcome(lambda: plain.submit_plain(**cmd))
    want = _outcome(lambda: full.send_iov(CmdSubmit(**cmd)))
    assert got == want
    assert dict(plain._submits) == dict(full._submits)


_MANY_URB = st.tuples(
    st.sampled_from([USBIP_DIR_IN, USBIP_DIR_OUT, 7]),
    st.integers(-1, 17),
    st.sampled_from([0, 0x200, 1 << 32]),
    st.integers(-1, 40),
    st.binary(max_size=40),
    st.sampled_from([None, 8, 64]),
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([DEVID, DEVID + 1]), st.lists(_MANY_URB, max_size=4))
@example(DEVID, [(USBIP_DIR_OUT, 2, 0, 31, bytes(31), None), (USBIP_DIR_IN, 1, 0x200, 64, b"", 64),
                 (USBIP_DIR_IN, 1, 0x200, 13, b"", None)])  # a Bulk-Only command
def test_submit_plain_many_is_next_seqnum_and_submit_plain_for_each(devid, urbs):
    """One call for several URBs: the bytes, seqnums, bookkeeping and first error of a next_seqnum() +
    submit_plain() per URB, the URBs before a refusal submitted and accounted for."""
    many, _ = imported_pair()
    each, _ = imported_pair()
    for conn in (many, each):
        conn.send(CmdSubmit(seqnum=1, devid=DEVID, direction=USBIP_DIR_IN, ep=1, transfer_buffer_length=8))
    specs = [(d, ep, flags, length, data, None if into is None else memoryview(bytearray(into)))
             for d, ep, flags, length, data, into in urbs]
    out: list[bytes] = []
    seqnums: list[int] = []
    got = _outcome(lambda: many.submit_plain_many(devid, specs, out, seqnums) or out)
    want_out: list[bytes] = []
    want_seqnums: list[int] = []

    def one_by_one() -> list[bytes]:
        for d, ep, flags, length, data, into in specs:
            seqnum = each.next_seqnum()
            want_out.extend(each.submit_plain(seqnum, devid, d, ep, flags, length, data, 0, into))
            want_seqnums.append(seqnum)
        return want_out

    want = _outcome(one_by_one)
    assert (got if isinstance(got, tuple) else b"") == (want if isinstance(want, tuple) else b"")
    assert b"".join(out) == b"".join(want_out) and seqnums == want_seqnums
    assert dict(many._submits) == dict(each._submits) and dict(many._into) == dict(each._into)


def test_submit_plain_urbs_are_answered_like_any_other():
    client, server = imported_pair()
    server.receive_data(b"".join(client.submit_plain(client.next_seqnum(), DEVID, USBIP_DIR_IN, 1, 0x200, 5)))
    server.receive_data(
        b"".join(client.submit_plain(client.next_seqnum(), DEVID, USBIP_DIR_OUT, 2, 0, 3, b"abc"))
    )
    first, second = drain(server)
    assert (first.seqnum, first.direction, first.ep, first.transfer_flags) == (1, USBIP_DIR_IN, 1, 0x200)
    assert (second.seqnum, second.ep, second.transfer_buffer) == (2, 2, b"abc")
    client.receive_data(server.send(RetSubmit(seqnum=2, actual_length=3)))
    client.receive_data(server.send(RetSubmit(seqnum=1, actual_length=5, transfer_buffer=b"12345")))
    assert [e.transfer_buffer for e in drain(client)] == [b"", b"12345"]
    assert not client.pending_seqnums


def test_submit_plain_into_puts_the_in_data_where_asked():
    client, server = imported_pair()
    target = bytearray(12)
    server.receive_data(
        b"".join(client.submit_plain(1, DEVID, USBIP_DIR_IN, 1, 0, 8, into=memoryview(target)[2:10]))
    )
    server.receive_data(
        b"".join(client.submit_plain(2, DEVID, USBIP_DIR_IN, 1, 0, 4, into=memoryview(target)[:4]))
    )
    drain(server)
    client.receive_data(server.send(RetSubmit(seqnum=1, actual_length=5, transfer_buffer=b"hello")))
    assert client.next_plain_ret() == (1, 0, 5, 0, 0, b"")  # the data went into the view
    assert target == bytearray(b"\0\0hello\0\0\0\0\0")
    client.receive_data(server.send(RetSubmit(seqnum=2, actual_length=2, transfer_buffer=b"ab")))
    event = client.next_event()  # next_event ignores `into` and forgets it
    assert (event.seqnum, event.transfer_buffer) == (2, b"ab")
    assert target[:2] == b"\0\0"
    assert not client._into
    with pytest.raises(ValueError, match="into"):
        client.submit_plain(3, DEVID, USBIP_DIR_OUT, 1, 0, 0, into=memoryview(target))
    with pytest.raises(ValueError, match="into"):
        client.submit_plain(3, DEVID, USBIP_DIR_IN, 1, 0, 13, into=memoryview(target))
    assert not client.pending_seqnums
