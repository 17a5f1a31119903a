"""The asyncio USB/IP server over real loopback sockets, driven by the sans-I/O client connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from emulator.devices.hid import Keyboard, hid_keyboard_device
from emulator.devices.mass_storage import mass_storage_device
from emulator.server import ServerThread, UrbDispatcher, UsbipServer
from emulator.usb.setup import get_descriptor, set_configuration
from emulator.usbip import (
    NEED_DATA,
    ClientConnection,
    CmdSubmit,
    CmdUnlink,
    OpRepDevlist,
    OpRepImport,
    OpReqDevlist,
    OpReqImport,
    RetSubmit,
    RetUnlink,
    pack,
)
from emulator.usbip.constants import ECONNRESET, ST_DEV_BUSY, ST_NODEV, ST_OK, USBIP_DIR_IN, USBIP_DIR_OUT

TIMEOUT = 5


class Client:
    """A minimal USB/IP client: the core's ClientConnection over an asyncio stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = ClientConnection()
        self.devid = 0

    @classmethod
    async def connect(cls, port: int) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    def send(self, message: object) -> None:
        self.writer.write(self.conn.send(message))  # type: ignore[arg-type]

    async def event(self) -> object:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            self.conn.receive_data(data)

    async def import_(self, busid: str) -> OpRepImport:
        self.send(OpReqImport(busid=busid))
        rep = await self.event()
        assert isinstance(rep, OpRepImport)
        if rep.udev is not None:
            self.devid = rep.udev.devid
        return rep

    def submit(
        self, ep: int, direction: int, length: int = 0, setup: bytes = bytes(8), data: bytes = b""
    ) -> int:
        seq = self.conn.next_seqnum()
        self.send(
            CmdSubmit(
                seqnum=seq,
                devid=self.devid,
                direction=direction,
                ep=ep,
                transfer_buffer_length=length if direction == USBIP_DIR_IN else len(data),
                setup=setup,
                transfer_buffer=data,
            )
        )
        return seq

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_devlist_lists_every_export_with_interfaces() -> None:
    async def body() -> None:
        devices = [hid_keyboard_device(), hid_keyboard_device()]
        async with UsbipServer(devices, port=0) as server:
            c = await Client.connect(server.port)
            c.send(OpReqDevlist())
            rep = await c.event()
            assert isinstance(rep, OpRepDevlist)
            assert [d.udev.busid for d in rep.devices] == ["1-1", "1-2"]
            first = rep.devices[0]
            assert (first.udev.idVendor, first.udev.idProduct) == (0x1209, 0x0001)
            assert first.udev.bNumInterfaces == len(first.uinf) == 1
            assert (first.uinf[0].bInterfaceClass, first.uinf[0].bInterfaceSubClass) == (3, 1)
            # usbipd closes after one operation
            assert await asyncio.wait_for(c.reader.read(1), TIMEOUT) == b""

    run(body())


def test_import_unknown_busid_answers_st_nodev() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            c = await Client.connect(server.port)
            rep = await c.import_("9-9")
            assert rep.status == ST_NODEV and rep.udev is None

    run(body())


def test_second_importer_gets_st_dev_busy_until_first_leaves() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            a = await Client.connect(server.port)
            assert (await a.import_("1-1")).status == ST_OK
            b = await Client.connect(server.port)
            assert (await b.import_("1-1")).status == ST_DEV_BUSY
            await a.close()
            for _ in range(100):
                if server.exports["1-1"].importer is None:
                    break
                await asyncio.sleep(0.02)
            c = await Client.connect(server.port)
            assert (await c.import_("1-1")).status == ST_OK

    run(body())


def test_control_in_returns_device_descriptor_read_by_get_descriptor() -> None:
    async def body() -> None:
        dev = hid_keyboard_device()
        async with UsbipServer([dev], port=0) as server:
            c = await Client.connect(server.port)
            await c.import_("1-1")
            seq = c.submit(0, USBIP_DIR_IN, 18, get_descriptor(1, 0, 18).to_bytes())
            ret = await c.event()
            assert isinstance(ret, RetSubmit) and ret.seqnum == seq and ret.status == 0
            assert ret.transfer_buffer == dev.device_descriptor.to_bytes()

    run(body())


def test_pending_interrupt_in_completes_when_key_typed_and_unlink_of_pending_gets_econnreset() -> None:
    async def body() -> None:
        kb = Keyboard()
        async with UsbipServer([hid_keyboard_device(kb)], port=0) as server:
            c = await Client.connect(server.port)
            await c.import_("1-1")
            c.submit(0, USBIP_DIR_OUT, setup=set_configuration(1).to_bytes())
            assert isinstance(await c.event(), RetSubmit)
            seq = c.submit(1, USBIP_DIR_IN, 8)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.event(), 0.3)  # nothing to report yet: the URB waits
            kb.type_text("a")
            ret = await c.event()
            assert isinstance(ret, RetSubmit) and ret.seqnum == seq
            assert ret.transfer_buffer[2] == 0x04  # HID usage 'a'
            # a new IN gets the key-up; the third waits, and an unlink cancels it
            c.submit(1, USBIP_DIR_IN, 8)
            assert isinstance(await c.event(), RetSubmit)
            pending = c.submit(1, USBIP_DIR_IN, 8)
            useq = c.conn.next_seqnum()
            c.send(CmdUnlink(seqnum=useq, devid=c.devid, unlink_seqnum=pending))
            ret = await c.event()
            assert isinstance(ret, RetUnlink) and ret.seqnum == useq and ret.status == -ECONNRESET
            assert pending not in c.conn.pending_seqnums

    run(body())


def test_unlink_after_completion_returns_status_zero() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            c = await Client.connect(server.port)
            await c.import_("1-1")
            seq = c.submit(0, USBIP_DIR_IN, 18, get_descriptor(1, 0, 18).to_bytes())
            # the unlink is sent before the RET_SUBMIT is read: the server has answered already
            useq = c.conn.next_seqnum()
            c.send(CmdUnlink(seqnum=useq, devid=c.devid, unlink_seqnum=seq))
            first, second = await c.event(), await c.event()
            assert isinstance(first, RetSubmit) and first.seqnum == seq
            assert isinstance(second, RetUnlink) and second.status == 0

    run(body())


def test_many_pipelined_urbs_answered_in_order() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            c = await Client.connect(server.port)
            await c.import_("1-1")
            seqs = [c.submit(0, USBIP_DIR_IN, 18, get_descriptor(1, 0, 18).to_bytes()) for _ in range(64)]
            got = [await c.event() for _ in seqs]
            assert [r.seqnum for r in got if isinstance(r, RetSubmit)] == seqs

    run(body())


def test_garbage_closes_only_that_connection_and_server_keeps_serving() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            good = await Client.connect(server.port)
            await good.import_("1-1")
            r, w = await asyncio.open_connection("127.0.0.1", server.port)
            w.write(b"\xde\xad\xbe\xef" * 16)
            assert await asyncio.wait_for(r.read(100), TIMEOUT) == b""  # closed by the server
            seq = good.submit(0, USBIP_DIR_IN, 18, get_descriptor(1, 0, 18).to_bytes())
            ret = await good.event()
            assert isinstance(ret, RetSubmit) and ret.seqnum == seq and ret.status == 0

    run(body())


def test_unknown_urb_command_after_import_closes_and_releases_the_device() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            c = await Client.connect(server.port)
            await c.import_("1-1")
            c.writer.write(struct.pack(">5I", 7, 1, c.devid, 0, 0) + bytes(28))
            assert await asyncio.wait_for(c.reader.read(100), TIMEOUT) == b""
            for _ in range(100):
                if server.exports["1-1"].importer is None:
                    break
                await asyncio.sleep(0.02)
            assert server.exports["1-1"].importer is None
            again = await Client.connect(server.port)
            assert (await again.import_("1-1")).status == ST_OK

    run(body())


def test_peer_vanishing_mid_message_releases_the_device() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as server:
            c = await Client.connect(server.port)
            await c.import_("1-1")
            c.writer.write(struct.pack(">5I", 1, 99, c.devid, 0, 0))  # half a CMD_SUBMIT
            await c.writer.drain()
            sock = c.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
            c.writer.transport.abort()
            for _ in range(200):
                if server.exports["1-1"].importer is None:
                    break
                await asyncio.sleep(0.02)
            assert server.exports["1-1"].importer is None

    run(body())


def test_port_in_use_is_a_clear_error() -> None:
    async def body() -> None:
        async with UsbipServer([hid_keyboard_device()], port=0) as first:
            from emulator.server import ServerError

            with pytest.raises(ServerError, match="cannot listen"):
                await UsbipServer([hid_keyboard_device()], port=first.port).start()

    run(body())


def test_dispatcher_queues_per_endpoint_and_keeps_order() -> None:
    kb = Keyboard()
    dev = hid_keyboard_device(kb)
    dev.control(set_configuration(1), b"")
    d = UrbDispatcher(dev)
    cmds = [
        CmdSubmit(seqnum=i, devid=0, direction=USBIP_DIR_IN, ep=1, transfer_buffer_length=8) for i in (1, 2)
    ]
    assert d.submit(cmds[0]) is None and d.submit(cmds[1]) is None
    assert d.queued == 2
    kb.type_text("b")
    done = d.retry()
    assert [r.seqnum for r in done] == [1, 2]
    assert done[0].transfer_buffer[2] == 0x05  # 'b' down, then key up
    assert done[1].transfer_buffer == bytes(8)


def test_dispatcher_plain_path_answers_like_submit(tmp_path: Path) -> None:
    """submit_plain (the hot path, no message objects) and submit give the same status, length and data:
    a CBW taken, a READ(10) data phase read whole, short (URB_SHORT_NOT_OK), and cut (overflow), and the
    CSW; and a URB the device NAKs is queued by both, then answered by retry."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 128)

    def run_both(urbs: list[tuple[int, int, int, int, bytes]]) -> list[list[tuple[int, int, bytes] | None]]:
        results = []
        for plain in (False, True):
            dev = mass_storage_device(image, read_only=True)
            dev.control(set_configuration(1), b"")
            d = UrbDispatcher(dev)
            got: list[tuple[int, int, bytes] | None] = []
            for seqnum, (direction, ep, flags, length, data) in enumerate(urbs, start=1):
                if plain:
                    got.append(d.submit_plain((seqnum, 0, direction, ep, flags, length, data)))
                else:
                    cmd = CmdSubmit(
                        seqnum=seqnum,
                        devid=0,
                        direction=direction,
                        ep=ep,
                        transfer_flags=flags,
                        transfer_buffer_length=length,
                        transfer_buffer=data,
                    )
                    ret = d.submit(cmd)
                    got.append(None if ret is None else (ret.status, ret.actual_length, ret.transfer_buffer))
            got += [(r.status, r.actual_length, r.transfer_buffer) for r in d.retry()]
            dev.close()
            results.append(got)
        return results

    def cbw(tag: int, length: int, blocks: int) -> bytes:
        cdb = struct.pack(">BBIBHB", 0x28, 0, 0, 0, blocks, 0)
        return struct.pack("<IIIBBB16s", 0x43425355, tag, length, 0x80, 0, len(cdb), cdb)

    short_not_ok = 0x1  # URB_SHORT_NOT_OK
    urbs = [
        (USBIP_DIR_OUT, 1, 0, 31, cbw(1, 1024, 2)),
        (USBIP_DIR_IN, 1, 0, 4096, b""),  # all 1024 bytes in a bigger buffer
        (USBIP_DIR_IN, 1, 0, 13, b""),
        (USBIP_DIR_OUT, 1, 0, 31, cbw(2, 2048, 4)),
        (USBIP_DIR_IN, 1, short_not_ok, 4096, b""),  # short: -EREMOTEIO
        (USBIP_DIR_IN, 1, 0, 13, b""),
        (USBIP_DIR_OUT, 1, 0, 31, cbw(3, 1024, 2)),
        (USBIP_DIR_IN, 1, 0, 512, b""),
        (USBIP_DIR_IN, 1, 0, 512, b""),
        (USBIP_DIR_IN, 1, 0, 4, b""),  # the CSW into 4 bytes: overflow
        (USBIP_DIR_IN, 1, 0, 512, b""),  # no command: NAK'd, queued
        (USBIP_DIR_OUT, 1, 0, 31, cbw(4, 512, 1)),  # ... and answered by retry()
    ]
    full, plain = run_both(urbs)
    assert full == plain
    assert [(r[0], r[1]) if r else r for r in full] == [
        (0, 31),
        (0, 1024),
        (0, 13),
        (0, 31),
        (-121, 2048),
        (0, 13),
        (0, 31),
        (0, 512),
        (0, 512),
        (-75, 4),
        None,
        (0, 31),
        (0, 512),
    ]
    assert full[1][2] == bytes(range(256)) * 4
    assert any(r is not None and r[0] == -121 for r in full)
    assert any(r is not None and r[0] == -75 for r in full)


def _read10_urbs(client: ClientConnection, devid: int, lba: int, blocks: int, tag: int) -> bytes:
    """The three CMD_SUBMITs of one Bulk-Only READ(10) (CBW, data, CSW) as bytes to send at once."""
    cdb = struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)
    cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, blocks * 512, 0x80, 0, len(cdb), cdb)
    out = b""
    for direction, length, data in (
        (USBIP_DIR_OUT, 31, cbw),
        (USBIP_DIR_IN, blocks * 512, b""),
        (1, 13, b""),
    ):
        out += client.send(
            CmdSubmit(
                seqnum=client.next_seqnum(),
                devid=devid,
                direction=direction,
                ep=1,
                transfer_buffer_length=length,
                transfer_buffer=data,
            )
        )
    return out


def _import_disk(port: int) -> tuple[socket.socket, ClientConnection, int]:
    """A blocking socket with the disk imported and configured, its client connection, and the devid."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    client = ClientConnection()
    sock.sendall(client.send(OpReqImport(busid="1-1")))
    rep = _next(sock, client)
    assert isinstance(rep, OpRepImport) and rep.udev is not None
    devid = rep.udev.devid
    sock.sendall(
        client.send(
            CmdSubmit(
                seqnum=client.next_seqnum(),
                devid=devid,
                direction=USBIP_DIR_OUT,
                ep=0,
                setup=set_configuration(1).to_bytes(),
            )
        )
    )
    assert isinstance(_next(sock, client), RetSubmit)
    return sock, client, devid


def _next(sock: socket.socket, client: ClientConnection) -> object:
    while (event := client.next_event()) is NEED_DATA:
        data = sock.recv(1 << 20)
        assert data, "the server closed the connection"
        client.receive_data(data)
    return event


@pytest.mark.parametrize("threads", [True, False], ids=["urb-thread", "loop-only"])
def test_client_that_stops_reading_gets_every_reply_in_order_once_it_reads(
    tmp_path: Path, threads: bool
) -> None:
    """16 MiB of READ(10) replies asked for at once, none read for a while: the server's sends fill the
    socket, the rest waits (the URB thread for the loop to write it), and every reply arrives, in order
    and with the image's bytes, once the client reads; the session then goes on as before."""
    image = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image.write_bytes(content)
    with ServerThread([mass_storage_device(image, read_only=True)], threads=threads) as server:
        sock, client, devid = _import_disk(server.port)
        with sock:
            commands = 256  # of 64 KiB: 16 MiB, far more than both socket buffers hold
            sock.sendall(
                b"".join(_read10_urbs(client, devid, (i * 128) % 2048, 128, i) for i in range(commands))
            )
            time.sleep(0.3)
            for i in range(commands):
                rets = [_next(sock, client) for _ in range(3)]
                assert all(isinstance(r, RetSubmit) and r.status == 0 for r in rets)
                offset = (i * 128) % 2048 * 512
                assert rets[1].transfer_buffer == content[offset : offset + 65536]  # type: ignore[union-attr]
                assert rets[2].transfer_buffer[:4] == b"USBS" and rets[2].transfer_buffer[12] == 0  # type: ignore[union-attr]
            assert not client.pending_seqnums
            sock.sendall(_read10_urbs(client, devid, 0, 8, 999))
            assert [_next(sock, client).status for _ in range(3)] == [0, 0, 0]  # type: ignore[attr-defined]


def test_server_stop_ends_a_session_whose_client_reads_nothing_and_frees_the_device(tmp_path: Path) -> None:
    """The URB thread waits on a client that reads nothing; stopping the server still ends the session,
    frees the device and returns."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    server = ServerThread([mass_storage_device(image, read_only=True)]).start()
    sock, client, devid = _import_disk(server.port)
    with sock:
        sock.sendall(b"".join(_read10_urbs(client, devid, 0, 128, i) for i in range(256)))
        time.sleep(0.3)
        assert server.server.sessions == 1
        server.stop()
        assert server.server.sessions == 0
        assert server.server.exports["1-1"].importer is None


def test_reads_sent_with_sendfile_reach_the_client_and_the_tap_byte_for_byte(tmp_path: Path) -> None:
    """A 64 KiB READ(10)'s data leaves as a FileRegion (sendfile); the client gets the image's bytes and a
    tap sees exactly the bytes the client received."""
    image = tmp_path / "disk.img"
    content = os.urandom(1 << 20)
    image.write_bytes(content)
    seen: list[bytes] = []
    tap_lock = threading.Lock()

    def tap(cid: int, from_client: bool, data: bytes) -> None:
        if not from_client:
            with tap_lock:
                seen.append(bytes(data))

    device = mass_storage_device(image, read_only=True)
    with ServerThread([device], tap=tap) as server:
        sock, client, devid = _import_disk(server.port)
        received = bytearray()
        with sock:
            before = len(b"".join(seen))
            sock.sendall(b"".join(_read10_urbs(client, devid, 256 * i, 128, i) for i in range(4)))
            for i in range(4):
                rets = [_next(sock, client) for _ in range(3)]
                assert rets[1].transfer_buffer == content[i * 131072 : i * 131072 + 65536]  # type: ignore[union-attr]
                for ret in rets:
                    received += pack(ret)  # type: ignore[arg-type]
            assert device.file_regions
            for _ in range(100):
                if len(b"".join(seen)) - before >= len(received):
                    break
                time.sleep(0.01)
            assert b"".join(seen)[before:] == bytes(received)
    assert not device.file_regions  # released: the next user of the model gets bytes again
