"""Recording USB/IP sessions to pcapng (captures.record), checked against the sessions that really happened.

Real sessions run through vusb's server and userspace host on loopback; the truth is what the other end's socket
moved (a plain tap on the host, decoded with the core codec), and the recordings are held to it through tshark
(the reference dissector, with its TCP analysis), through captures.transactions' pairing, and byte for byte
through their reassembled TCP streams. Crashes, full disks, garbage and bad paths are real too: a SIGKILLed
`vusb serve`, RLIMIT_FSIZE, a raw socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from captures import wire
from captures.reader import iter_frames
from captures.record import PcapngRecorder, RecordedDevice, exported_devices
from captures.transactions import analyze
from emulator import __version__
from emulator.devices.mass_storage import mass_storage_device
from emulator.host import HostError, import_device, list_devices
from emulator.msc_host import MassStorage
from emulator.server import ServerThread, UsbipServer
from emulator.usbip import pack
from emulator.usbip.codec import DEFAULT_LIMITS, READERS, peek_message_type
from emulator.usbip.messages import CmdSubmit, Message, OpRepImport, OpReqImport, RetSubmit, UsbDevice

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
DECODE = ["-d", "tcp.port==3240,usbip"]
VUSB = [sys.executable, "-m", "emulator.cli"]
ENV = {**os.environ, "COLUMNS": "400", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
# every frame tshark flags: expert warnings and errors, malformed packets, TCP analysis (lost, retransmitted,
# out-of-order, window full, ACK of unseen data, ...)
PROBLEMS = '_ws.expert.severity >= "Warning" || _ws.malformed || tcp.analysis.flags'


# -- helpers ---------------------------------------------------------------------------------------------------


class Streams:
    """A plain tap on the host: every byte of its connections, per direction (True: client → server)."""

    def __init__(self) -> None:
        self.data = {True: bytearray(), False: bytearray()}

    def __call__(self, cid: int, from_client: bool, data: bytes) -> None:
        self.data[from_client] += data


def decode_stream(stream: bytes | bytearray, directions: dict[int, int]) -> list[Message]:
    """Every message of one direction of a USB/IP connection, decoded by the core codec (CMD_SUBMIT directions
    are recorded into `directions`, RET_SUBMIT payloads read by them)."""
    data = bytes(stream)
    out: list[Message] = []
    pos = 0
    while pos < len(data):
        kind = peek_message_type(data, pos, pos, urb_phase=data[pos : pos + 2] == b"\0\0")
        assert kind is not None, f"a partial message at byte {pos}"
        result = READERS[kind](data, pos, pos, DEFAULT_LIMITS, directions.__getitem__)
        assert not isinstance(result, int), f"a partial {kind.__name__} at byte {pos}"
        message, size = result
        if isinstance(message, CmdSubmit):
            directions[message.seqnum] = message.direction
        out.append(message)
        pos += size
    return out


def session_truth(streams: Streams) -> tuple[list[CmdSubmit], list[RetSubmit]]:
    directions: dict[int, int] = {}
    sent = decode_stream(streams.data[True], directions)
    received = decode_stream(streams.data[False], directions)
    return [m for m in sent if isinstance(m, CmdSubmit)], [m for m in received if isinstance(m, RetSubmit)]


def tshark(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TSHARK or "tshark", "-r", str(path), *DECODE, *args], capture_output=True, text=True, timeout=300
    )


def tshark_problems(path: Path) -> str:
    """The frames tshark flags (empty when there are none), and anything it says on stderr but its root
    warning."""
    result = tshark(path, "-Y", PROBLEMS, "-T", "fields", "-e", "frame.number", "-e", "_ws.expert.message")
    stderr = "\n".join(line for line in result.stderr.splitlines() if "Running as user" not in line)
    return (result.stdout + stderr).strip()


def tshark_pdus(path: Path) -> list[tuple[int, int, int | None]]:
    """(command, seqnum, actual_length) of every USB/IP URB PDU tshark dissects, in frame order."""
    result = tshark(path, "-T", "fields", "-E", "separator=/t", "-e", "usbip.urb", "-e", "usbip.sequence_no",
                    "-e", "usbip.actual_length")
    assert result.returncode == 0, result.stderr
    pdus = []
    for line in result.stdout.splitlines():
        commands, seqnums, lengths = [*line.split("\t"), "", "", ""][:3]
        if not commands:
            continue
        actual = [int(x) for x in lengths.split(",")] if lengths else []
        for command, seqnum in zip(commands.split(","), seqnums.split(","), strict=True):
            number = int(command, 0)
            pdus.append((number, int(seqnum), actual.pop(0) if number == 3 and actual else None))
    return pdus


def tcp_segments(path: Path | bytes) -> list[tuple[bool, bytes]]:
    """(to the server, payload) of every TCP segment with payload, from the Ethernet frames of a capture."""
    data = path.read_bytes() if isinstance(path, Path) else path
    out = []
    for _number, _linktype, _ts, buf, off, caplen, _orig, _be in iter_frames(data):
        frame = buf[off : off + caplen]
        ethertype = struct.unpack_from(">H", frame, 12)[0]
        ip = 14
        if ethertype == 0x0800:
            tcp = ip + (frame[ip] & 0x0F) * 4
            end = ip + struct.unpack_from(">H", frame, ip + 2)[0]
        else:
            assert ethertype == 0x86DD
            tcp = ip + 40
            end = tcp + struct.unpack_from(">H", frame, ip + 4)[0]
        dport = struct.unpack_from(">H", frame, tcp + 2)[0]
        payload = frame[tcp + (frame[tcp + 12] >> 4) * 4 : end]
        if payload:
            out.append((dport == 3240, bytes(payload)))
    return out


def whole_blocks(data: bytes) -> int:
    """Where the last whole pcapng block ends (the file's length when it ends on a block)."""
    off = 0
    while off + 12 <= len(data):
        length = struct.unpack_from("<I", data, off + 4)[0]
        if length < 12 or off + length > len(data):
            break
        off += length
    return off


def disk_image(path: Path, size: int = 1 << 20) -> bytes:
    content = os.urandom(size)
    path.write_bytes(content)
    return content


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve_process(*args: str, port: int, **popen: Any) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([*VUSB, "serve", "--port", str(port), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **popen)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vusb serve exited early: {proc.communicate()[1]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise AssertionError("vusb serve never listened")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


async def disk_session(port: int, *, host: str = "127.0.0.1", tap: Any = None, max_transfer: int = 65536,
                       reads: tuple[tuple[int, int], ...] = ((16, 8),), write: bytes = b"") -> list[bytes]:
    """Import 1-1, open it as a disk, run the READ(10)s (lba, blocks) and one WRITE(10) at block 32."""
    async with await import_device(host, "1-1", port, tap=tap) as device:
        msc = await MassStorage(device, max_transfer=max_transfer).open()
        data = [await msc.read_blocks(lba, blocks) for lba, blocks in reads]
        if write:
            await msc.write_blocks(32, write)
        return data


def record_server_session(tmp_path: Path, name: str, **session: Any) -> tuple[Path, Streams, list[bytes], bytes]:
    """A recorded server (in this process) and a host session against it; the recording is closed."""
    content = disk_image(tmp_path / f"{name}.img")
    devices = [mass_storage_device(str(tmp_path / f"{name}.img"))]
    path = tmp_path / f"{name}.pcapng"
    streams = Streams()
    with PcapngRecorder(path, mode="server", address="127.0.0.1:0",
                        devices=exported_devices(devices, ["test disk"])) as recorder:

        async def main() -> list[bytes]:
            async with UsbipServer(devices, port=0, tap=recorder.tap) as server:
                return await disk_session(server.port, tap=streams, **session)

        data = asyncio.run(main())
    assert recorder.error is None
    return path, streams, data, content


# -- a real session, three ways of reading it ------------------------------------------------------------------


@needs_tshark
def test_server_recording_is_clean_in_tshark_and_agrees_with_the_session_the_host_saw(tmp_path: Path) -> None:
    payload = os.urandom(4096)
    path, streams, data, content = record_server_session(tmp_path, "s", reads=((16, 8),), write=payload)
    assert data == [content[16 * 512 : 24 * 512]]
    cmds, rets = session_truth(streams)
    assert len(cmds) == len(rets) >= 20

    assert tshark_problems(path) == ""
    pdus = tshark_pdus(path)
    assert [s for c, s, _ in pdus if c == 1] == [m.seqnum for m in cmds]
    assert [(s, n) for c, s, n in pdus if c == 3] == [(m.seqnum, m.actual_length) for m in rets]
    read10 = tshark(path, "-Y", "scsi_sbc.opcode == 0x28 && usbms.dCBWSignature", "-T", "fields",
                    "-e", "usbms.dCBWDataTransferLength", "-e", "scsi_sbc.rdwr10.lba", "-e", "scsi_sbc.rdwr10.xferlen")
    assert read10.stdout.split() == ["4096", "16", "8"]

    analysis = analyze(path)
    assert analysis.warnings == []
    submits = [t for t in analysis.transactions if t.kind == "submit"]
    by_seqnum = {m.seqnum: m for m in rets}
    assert [t.urb_id for t in submits] == [m.seqnum for m in cmds]
    assert all(t.complete for t in submits)
    assert [(t.status, t.actual_length) for t in submits] == [
        (by_seqnum[t.urb_id].status, by_seqnum[t.urb_id].actual_length) for t in submits
    ]
    scsi = {c.name: c for c in analysis.scsi_commands}
    assert (scsi["READ_10"].logical_block_address, scsi["READ_10"].blocks, scsi["READ_10"].data_bytes) == (16, 8, 4096)
    assert (scsi["WRITE_10"].logical_block_address, scsi["WRITE_10"].data_bytes) == (32, 4096)

    # what the session moved, byte for byte, in the recording's TCP streams
    segments = tcp_segments(path)
    assert b"".join(p for to_server, p in segments if to_server) == streams.data[True]
    assert b"".join(p for to_server, p in segments if not to_server) == streams.data[False]


@needs_tshark
def test_recording_metadata_names_vusb_the_mode_the_device_and_each_connection(tmp_path: Path) -> None:
    path, _, _, _ = record_server_session(tmp_path, "m")
    info = subprocess.run(["capinfos", str(path)], capture_output=True, text=True, timeout=60).stdout
    assert f"Capture application: vusb {__version__}" in info
    assert "vusb server listening on 127.0.0.1:0, exporting 1-1 1209:0004 “Virtual Disk” (test disk)" in info
    assert "Encapsulation = Ethernet" in info and "decode with -d tcp.port==3240,usbip" in info
    comments = tshark(path, "-Y", "frame.comment", "-T", "fields", "-e", "frame.comment").stdout.splitlines()
    assert comments[0].startswith("connection 1 (server): 127.0.0.1:")
    assert comments[1] == "connection 1: OP_REQ_IMPORT of 1-1 1209:0004 “Virtual Disk” (test disk)"
    assert comments[2] == "connection 1: imported 1-1 1209:0004 (ST_OK)"
    assert comments[3] == "connection 1 closed: closed by peer"
    flags = tshark(path, "-Y", "tcp.flags.syn == 1 || tcp.flags.fin == 1", "-T", "fields", "-e", "tcp.flags.str")
    assert [f.strip("·") for f in flags.stdout.split()] == ["S", "A··S", "A···F", "A···F"]  # SYN ... FIN both ways


@needs_tshark
def test_read_of_120_kib_is_split_into_segments_of_at_most_65495_bytes_that_reassemble(tmp_path: Path) -> None:
    path, streams, data, content = record_server_session(tmp_path, "big", max_transfer=128 << 10, reads=((0, 240),))
    assert data == [content[: 240 * 512]]
    segments = tcp_segments(path)
    sizes = [len(p) for _, p in segments]
    assert max(sizes) == 65495  # the 122928-byte RET_SUBMIT was cut at the IPv4 limit ...
    assert 122880 + 48 - 65495 in sizes  # ... and its rest went in the next segment
    assert b"".join(p for to_server, p in segments if not to_server) == streams.data[False]
    assert tshark_problems(path) == ""
    assert (3, max(s for c, s, _ in tshark_pdus(path) if c == 3) - 1, 122880) in tshark_pdus(path)
    reads = [c for c in analyze(path).scsi_commands if c.name == "READ_10"]
    assert [(c.blocks, c.data_bytes) for c in reads] == [(240, 122880)]


def test_host_and_server_recordings_of_one_session_pair_to_the_same_transactions(tmp_path: Path) -> None:
    """The server records with `vusb serve`-style metadata in this process, the host with `vusb disk dump
    --record` in another: both files pair to the same URBs and SCSI commands."""
    disk_image(tmp_path / "d.img", 256 << 10)
    server_file, host_file = tmp_path / "server.pcapng", tmp_path / "host.pcapng"
    devices = [mass_storage_device(str(tmp_path / "d.img"))]
    with PcapngRecorder(server_file, mode="server", address="127.0.0.1:0") as recorder, \
            ServerThread(devices, tap=recorder.tap) as server:
        dump = subprocess.run(
            [*VUSB, "disk", "dump", "-r", "127.0.0.1", "-p", str(server.port), "-b", "1-1", "-o",
             str(tmp_path / "out.img"), "--record", str(host_file)],
            capture_output=True, text=True, timeout=120, env=ENV)
    assert dump.returncode == 0, dump.stderr
    assert "recorded" in dump.stderr and str(host_file) in dump.stderr
    assert (tmp_path / "out.img").read_bytes() == (tmp_path / "d.img").read_bytes()

    def urbs(path: Path) -> list[tuple[Any, ...]]:
        return [(t.urb_id, t.endpoint, t.requested_length, t.status, t.actual_length, t.bot)
                for t in analyze(path).transactions if t.kind == "submit"]

    def commands(path: Path) -> list[tuple[Any, ...]]:
        return [(c.tag, c.name, c.logical_block_address, c.blocks, c.data_bytes, c.csw_status)
                for c in analyze(path).scsi_commands]

    assert urbs(host_file) == urbs(server_file)
    assert commands(host_file) == commands(server_file)
    assert sum(c[4] for c in commands(host_file) if c[1] == "READ_10") == 256 << 10
    if TSHARK is not None:
        assert tshark_problems(host_file) == ""
        notes = tshark(host_file, "-Y", "frame.comment", "-T", "fields", "-e", "frame.comment").stdout
        assert "connection 1 (host): 127.0.0.1:" in notes
        assert "imported 1-1: 1209:0004 (SCSI INQUIRY “vusb Virtual Disk 0100”)" in notes


# -- crashes, full disks, bad paths, garbage -------------------------------------------------------------------


@needs_tshark
def test_recording_of_a_server_killed_mid_transfer_is_readable_up_to_its_last_record(tmp_path: Path) -> None:
    content = disk_image(tmp_path / "k.img", 4 << 20)
    path = tmp_path / "killed.pcapng"
    port = free_port()
    with serve_process("--disk", str(tmp_path / "k.img"), "--read-only", "--record", str(path), port=port) as proc:

        async def main() -> int:
            completed = 0
            async with await import_device("127.0.0.1", "1-1", port) as device:
                msc = await MassStorage(device).open()
                with pytest.raises(HostError):  # reads go on until the server is gone
                    for i in range(1000):
                        if i == 25:
                            os.kill(proc.pid, signal.SIGKILL)  # while the next READ(10) is on its way
                        data = await msc.read_blocks(i % 64 * 128, 128)
                        assert data == content[i % 64 * 65536 : (i % 64 + 1) * 65536]
                        completed += 1
            return completed

        done = asyncio.run(main())
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    data = path.read_bytes()
    end = whole_blocks(data)
    assert len(data) - end < 65536 + 200  # at most the block a write was cut in
    trimmed = tmp_path / "trimmed.pcapng"
    trimmed.write_bytes(data[:end])
    reads = [c for c in analyze(trimmed).scsi_commands if c.name == "READ_10"]
    assert done >= 25
    assert len(reads) >= done  # every reply the host got was written before it was sent
    assert all(c.data_bytes == 65536 and c.csw_status == 0 for c in reads[:done])
    assert tshark_problems(trimmed) == ""
    # (stream 0 is serve_process's readiness probe) the session really ended without a goodbye
    assert tshark(trimmed, "-Y", "tcp.stream == 1 && tcp.flags.fin == 1").stdout == ""
    whole = tshark(path, "-T", "fields", "-e", "frame.number")
    assert len(whole.stdout.split()) == len(list(iter_frames(data[:end])))
    if end != len(data):
        assert "cut short in the middle of a packet" in whole.stderr


def test_unwritable_record_path_is_one_clear_line_before_anything_is_served_or_imported(tmp_path: Path) -> None:
    port = free_port()
    for target, why in ((tmp_path / "no" / "such" / "dir.pcapng", "No such file or directory"),
                        (tmp_path, "Is a directory")):
        served = subprocess.run([*VUSB, "serve", "--hid-keyboard", "--port", str(port), "--record", str(target)],
                                capture_output=True, text=True, timeout=60, env=ENV)
        assert served.returncode == 1
        assert served.stderr.strip() == f"vusb: error: cannot record to {target}: {why}"
        assert "listening" not in served.stdout + served.stderr
    # the host commands check the path before connecting: nothing listens on `port`, yet the error is the path's
    (tmp_path / "in.img").write_bytes(bytes(512))
    for command in (["info"], ["disk", "dump", "-o", str(tmp_path / "x.img")],
                    ["disk", "write", "-i", str(tmp_path / "in.img")]):
        result = subprocess.run([*VUSB, *command, "-r", "127.0.0.1", "-p", str(port), "-b", "1-1", "--record",
                                 str(tmp_path)], capture_output=True, text=True, timeout=60, env=ENV)
        assert result.returncode == 1
        assert result.stderr.strip() == f"vusb: error: cannot record to {tmp_path}: Is a directory"


@needs_tshark
def test_full_disk_stops_recording_with_one_logged_error_and_the_session_goes_on(tmp_path: Path) -> None:
    content = disk_image(tmp_path / "f.img", 2 << 20)
    path = tmp_path / "full.pcapng"
    limit = 300_000
    port = free_port()

    def small_files() -> None:  # RLIMIT_FSIZE: writes past `limit` fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    with serve_process("--disk", str(tmp_path / "f.img"), "--read-only", "--record", str(path), port=port,
                       preexec_fn=small_files) as proc:
        data = asyncio.run(disk_session(port, reads=tuple((i * 128, 128) for i in range(32))))
        again = asyncio.run(list_devices("127.0.0.1", port))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert b"".join(data) == content
    assert [d.udev.busid for d in again] == ["1-1"]
    assert proc.returncode == 0, err
    assert err.count("stopped:") == 1 and "File too large" in err, err
    assert "recording stopped early: File too large" in err  # the summary says so too
    assert "Traceback" not in err
    recorded = path.read_bytes()
    assert 0 < len(recorded) <= limit
    assert whole_blocks(recorded) == len(recorded)  # cut back to a whole block
    assert tshark_problems(path) == ""
    assert analyze(path).transactions  # what fitted is readable


@needs_tshark
def test_garbage_from_a_peer_is_recorded_as_sent_and_neither_recorder_nor_server_breaks(tmp_path: Path) -> None:
    disk_image(tmp_path / "g.img", 64 << 10)
    path = tmp_path / "garbage.pcapng"
    junk = b"GET / HTTP/1.0\r\nHost: vusb\r\n\r\n" + bytes(range(256))
    devices = [mass_storage_device(str(tmp_path / "g.img"))]
    with PcapngRecorder(path, mode="server", address="127.0.0.1:0") as recorder:

        async def main() -> list[bytes]:
            async with UsbipServer(devices, port=0, tap=recorder.tap) as server:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(junk)
                await writer.drain()
                assert await asyncio.wait_for(reader.read(), 10) == b""  # the server hung up on it
                writer.close()
                return await disk_session(server.port)

        assert asyncio.run(main())
    assert recorder.error is None
    sent = b"".join(p for to_server, p in tcp_segments(path) if to_server)
    assert sent.startswith(junk)  # the junk connection came first, byte for byte
    comments = tshark(path, "-Y", "frame.comment", "-T", "fields", "-e", "frame.comment").stdout
    assert "not a USB/IP stream it can follow from byte 0 on (version 0x4745)" in comments
    # the next session is recorded in full (captures.transactions refuses the junk stream, so tshark reads it)
    read10 = tshark(path, "-Y", "tcp.stream == 1 && scsi_sbc.opcode == 0x28 && usbms.dCBWSignature", "-T", "fields",
                    "-e", "scsi_sbc.rdwr10.lba", "-e", "scsi_sbc.rdwr10.xferlen")
    assert read10.stdout.split() == ["16", "8"]
    assert tshark(path, "-Y", f"tcp.stream == 1 && ({PROBLEMS})").stdout == ""


@needs_tshark
def test_ipv6_session_is_recorded_as_ipv6_and_reads_clean(tmp_path: Path) -> None:
    disk_image(tmp_path / "v6.img", 64 << 10)
    path = tmp_path / "v6.pcapng"
    devices = [mass_storage_device(str(tmp_path / "v6.img"))]
    with PcapngRecorder(path, mode="server", address="[::1]:0") as recorder:

        async def main() -> list[bytes]:
            async with UsbipServer(devices, host="::1", port=0, tap=recorder.tap) as server:
                return await disk_session(server.port, host="::1")

        asyncio.run(main())
    assert tshark_problems(path) == ""
    sources = set(tshark(path, "-T", "fields", "-e", "ipv6.src").stdout.split())
    assert sources == {"::1"}
    assert [c.name for c in analyze(path).scsi_commands].count("READ_10") == 1


# -- the recorder on its own -----------------------------------------------------------------------------------


def _synthetic_session() -> list[tuple[bool, bytes]]:
    """(to the server, message) of a session made with the core codec: OP_REQ_IMPORT, GET_DESCRIPTOR, then three
    READ(10)s of 120 KiB over Bulk-Only Transport."""
    udev = UsbDevice(path="/sys/devices/platform/vusb/usb1/1-1", busid="1-1", busnum=1, devnum=2, speed=3,
                     idVendor=0x1209, idProduct=0x0004, bcdDevice=0x0100)
    out = [(True, pack(OpReqImport(busid="1-1"))), (False, pack(OpRepImport(status=0, udev=udev)))]
    seqnum = 0

    def exchange(cmd: dict[str, Any], ret: dict[str, Any]) -> None:
        nonlocal seqnum
        seqnum += 1
        out.append((True, pack(CmdSubmit(seqnum=seqnum, devid=0x10002, **cmd))))
        out.append((False, pack(RetSubmit(seqnum=seqnum, **ret))))

    exchange({"direction": 1, "ep": 0, "transfer_buffer_length": 18, "setup": bytes.fromhex("8006000100001200")},
             {"actual_length": 18, "transfer_buffer": bytes(range(18))})
    for tag in range(1, 4):
        cdb = struct.pack(">BBIBHB", 0x28, 0, tag * 240, 0, 240, 0)
        cbw = struct.pack("<IIIBBB16s", 0x43425355, tag, 122880, 0x80, 0, len(cdb), cdb)
        exchange({"direction": 0, "ep": 2, "transfer_buffer_length": 31, "transfer_buffer": cbw},
                 {"actual_length": 31})
        exchange({"direction": 1, "ep": 1, "transfer_buffer_length": 122880},
                 {"actual_length": 122880, "transfer_buffer": os.urandom(122880)})
        exchange({"direction": 1, "ep": 1, "transfer_buffer_length": 13},
                 {"actual_length": 13, "transfer_buffer": struct.pack("<IIIB", 0x53425355, tag, 0, 0)})
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_split_of_the_socket_data_gives_each_server_message_its_own_segments_and_the_same_streams(
    tmp_path: Path, data: st.DataObject
) -> None:
    messages = _synthetic_session()
    # the socket reads and writes: runs of messages in one direction, joined and then cut anywhere
    calls: list[tuple[bool, bytes, list[int]]] = []
    i = 0
    while i < len(messages):
        direction = messages[i][0]
        run = 1
        while i + run < len(messages) and messages[i + run][0] == direction:
            run += 1
        take = data.draw(st.integers(1, run))
        chunk = b"".join(m for _, m in messages[i : i + take])
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(chunk) - 1)), max_size=3)))
        for a, b in zip([0, *cuts], [*cuts, len(chunk)], strict=True):
            if a < b:
                # a socket write as one buffer, or as several (data_iov: cut anywhere, empty buffers too)
                inner = sorted(data.draw(st.lists(st.integers(0, b - a), max_size=3)))
                calls.append((direction, chunk[a:b], [0, *inner, b - a]))
        i += take
    path = tmp_path / f"split-{len(calls)}-{hashlib.sha256(repr(calls).encode()).hexdigest()[:12]}.pcapng"
    with PcapngRecorder(path, mode="server", address="test") as recorder:
        tap = recorder.tap
        tap.opened(7, ("192.0.2.1", 50000), ("192.0.2.2", 3240))
        for direction, chunk, buffers in calls:
            if len(buffers) == 2:
                tap.data(7, direction, chunk)
            else:
                view = memoryview(bytearray(chunk))
                tap.data_iov(7, direction, [view[x:y] for x, y in itertools.pairwise(buffers)])
        tap.closed(7, "done")
    segments = tcp_segments(path)
    for direction in (True, False):
        assert b"".join(p for d, p in segments if d == direction) == b"".join(m for d, m in messages if d == direction)
    # every message from the server ends a segment: its bytes never share a segment with the next message's;
    # the client's segments end where its socket writes did (or at 65495 bytes)
    ends: dict[bool, set[int]] = {True: set(), False: set()}
    offset = {True: 0, False: 0}
    for direction, message in messages:
        offset[direction] += len(message)
        ends[direction].add(offset[direction])
    writes: set[int] = set()
    sent = 0
    for direction, chunk, _ in calls:
        if direction:
            sent += len(chunk)
            writes.add(sent)
    position = {True: 0, False: 0}
    for direction, payload in segments:
        assert len(payload) <= 65495
        start, position[direction] = position[direction], position[direction] + len(payload)
        assert not any(start < end < position[direction] for end in ends[direction] if not direction)
        assert not direction or position[direction] in writes or len(payload) == 65495
    analysis = analyze(path)
    assert [t.actual_length for t in analysis.transactions if t.kind == "submit"].count(122880) == 3
    assert all(t.complete for t in analysis.transactions)
    path.unlink()


def test_plain_tap_without_open_or_close_still_gives_a_whole_conversation(tmp_path: Path) -> None:
    path = tmp_path / "plain.pcapng"
    messages = _synthetic_session()
    with PcapngRecorder(path, mode="host", address="somewhere", devices=[RecordedDevice("1-1")]) as recorder:
        tap = recorder.tap
        for direction, message in messages:
            tap(3, direction, message)  # the plain (cid, from_client, data) shape
    frames = list(iter_frames(path.read_bytes()))
    assert len(frames) == 3 + len(messages) + 3 + 3  # handshake, one per message (3 split in two), FIN
    analysis = analyze(path)
    assert len([t for t in analysis.transactions if t.complete]) == sum(1 for d, _ in messages if not d)


def test_recorder_bug_is_logged_once_and_the_server_session_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from captures import record

    def broken(self: Any, *args: Any) -> None:
        raise RuntimeError("framing bug")

    monkeypatch.setattr(record._Stream, "cut", broken)
    with caplog.at_level(logging.ERROR, logger="captures.record"):
        disk_image(tmp_path / "b.img", 64 << 10)
        devices = [mass_storage_device(str(tmp_path / "b.img"))]
        recorder = PcapngRecorder(tmp_path / "bug.pcapng", mode="server", address="x")

        async def main() -> list[bytes]:
            async with UsbipServer(devices, port=0, tap=recorder.tap) as server:
                return await disk_session(server.port)

        assert asyncio.run(main())[0] == (tmp_path / "b.img").read_bytes()[16 * 512 : 24 * 512]
        recorder.close()
    assert recorder.error == "internal error: RuntimeError('framing bug')"
    assert [r.getMessage().count("framing bug") for r in caplog.records].count(1) == 1
    assert recorder.summary().endswith("recording stopped early: internal error: RuntimeError('framing bug')")
    recorded = (tmp_path / "bug.pcapng").read_bytes()
    assert whole_blocks(recorded) == len(recorded)
    assert tcp_segments(recorded) == []  # nothing half-made: the batch the bug hit was dropped


def test_close_is_idempotent_and_later_tap_calls_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.pcapng"
    recorder = PcapngRecorder(path, mode="server", address="x")
    tap = recorder.tap
    tap.opened(1, ("127.0.0.1", 40001), ("127.0.0.1", 3240))
    recorder.close()
    size = path.stat().st_size
    recorder.close()
    tap.data(1, True, b"\0" * 48)
    tap.closed(1, "late")
    assert path.stat().st_size == size
    assert len(list(iter_frames(path.read_bytes()))) == 6  # handshake, and the FINs close() wrote
    assert "recorded 6 frames of 1 connection(s)" in recorder.summary()


def test_demo_records_only_when_asked_and_then_holds_its_devlist_and_its_disk_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "demo.pcapng"
    plain = subprocess.run([*VUSB, "demo", "--size", "2"], capture_output=True, text=True, timeout=300, env=ENV,
                           cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    assert "recorded" not in plain.stderr and list(tmp_path.iterdir()) == []
    demo = subprocess.run([*VUSB, "demo", "--size", "2", "--record", str(path)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert demo.returncode == 0, demo.stderr
    assert f"of 2 connection(s) to {path}" in demo.stderr
    analysis = analyze(path)
    assert [t.kind for t in analysis.transactions[:2]] == ["devlist", "import"]
    names = [c.name for c in analysis.scsi_commands]
    assert names.count("WRITE_10") >= 1 and names.count("READ_10") == names.count("WRITE_10")
    assert all(c.csw_status == 0 for c in analysis.scsi_commands)
    if TSHARK is not None:
        assert tshark_problems(path) == ""


@needs_tshark
def test_unlinked_urb_is_recorded_and_the_stream_stays_in_step_after_it(tmp_path: Path) -> None:
    """A keyboard with no key pressed NAKs its interrupt IN: the host's URB times out and is unlinked
    (CMD_UNLINK / RET_UNLINK, no RET_SUBMIT); the recorder's framing must carry on past it."""
    from emulator.devices.hid import hid_keyboard_device
    from emulator.host import TransferTimeout

    path = tmp_path / "unlink.pcapng"
    streams = Streams()
    with PcapngRecorder(path, mode="server", address="127.0.0.1:0") as recorder:

        async def main() -> bytes:
            async with UsbipServer([hid_keyboard_device()], port=0, tap=recorder.tap) as server, \
                    await import_device("127.0.0.1", "1-1", server.port, tap=streams) as device:
                await device.set_configuration(1)
                with pytest.raises(TransferTimeout):
                    await device.interrupt_in(0x81, 8, timeout=0.2)
                return await device.get_descriptor(1, 0, 18)  # after the unlink, the stream goes on

        descriptor = asyncio.run(main())
    assert descriptor[:2] == b"\x12\x01"
    assert tshark_problems(path) == ""
    assert tshark(path, "-Y", "usbip.urb == 2 || usbip.urb == 4").stdout.count("\n") == 2  # CMD_/RET_UNLINK
    submits = [t for t in analyze(path).transactions if t.kind == "submit"]
    assert [t.unlinked for t in submits].count(True) == 1
    assert submits[-1].complete and submits[-1].actual_length == 18
    assert b"".join(p for d, p in tcp_segments(path) if not d) == streams.data[False]


def test_tap_calls_from_several_threads_keep_every_frame_whole_and_each_stream_in_order(tmp_path: Path) -> None:
    """Taps may be called from a thread per session: each call's frames land whole, each connection in order."""
    import threading

    path = tmp_path / "threads.pcapng"
    messages = _synthetic_session()
    with PcapngRecorder(path, mode="server", address="test") as recorder:
        taps = [recorder.tap for _ in range(4)]

        def session(tap: Any) -> None:
            tap.opened(1, ("127.0.0.1", 40000 + taps.index(tap)), ("127.0.0.1", 3240))
            for direction, message in messages:
                tap(1, direction, message)
            tap.closed(1, "done")

        threads = [threading.Thread(target=session, args=(tap,)) for tap in taps]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    analysis = analyze(path)
    assert len([t for t in analysis.transactions if t.complete]) == 4 * sum(1 for d, _ in messages if not d)
    assert recorder.error is None and recorder.connections == 4


def test_buffer_lists_frame_like_their_join_and_are_written_before_the_call_returns(tmp_path: Path) -> None:
    """`data_iov` (a socket write's buffers, as the server's sendmsg takes them) records what `data` would with
    the buffers joined, cut anywhere; the tap is done with them when it returns (the edge may reuse them)."""
    messages = _synthetic_session()
    paths = {shape: tmp_path / f"{shape}.pcapng" for shape in ("joined", "buffers")}
    for shape, path in paths.items():
        with PcapngRecorder(path, mode="server", address="test") as recorder:
            tap = recorder.tap
            tap.opened(1, ("127.0.0.1", 40000), ("127.0.0.1", 3240))
            scratch = bytearray(256 << 10)
            for direction, message in messages:
                if shape == "joined":
                    tap.data(1, direction, message)
                    continue
                scratch[: len(message)] = message
                view = memoryview(scratch)
                cuts = [0, *sorted({min(48, len(message)), len(message) // 3, len(message) - 1}), len(message)]
                tap.data_iov(1, direction, [view[a:b] for a, b in itertools.pairwise(cuts)])
                scratch[:] = bytes(len(scratch))  # reused: the recording must already hold the bytes
            tap.closed(1, "done")
    assert tcp_segments(paths["joined"]) == tcp_segments(paths["buffers"])
    frames = list(iter_frames(paths["buffers"].read_bytes()))
    assert len(frames) == len(list(iter_frames(paths["joined"].read_bytes())))
    for _number, _linktype, _ts, buffer, offset, caplen, length, _ in frames:  # legal IPv4, checksums right
        ip = bytes(buffer[offset + 14 : offset + 34])
        assert caplen == length and struct.unpack(">H", ip[2:4])[0] == length - 14 <= 65535
        assert wire.ipv4_checksum(ip[:10] + bytes(2) + ip[12:]) == struct.unpack(">H", ip[10:12])[0]


def test_iov_callback_gives_a_recorder_its_own_data_iov_and_a_plain_tap_the_joined_bytes(tmp_path: Path) -> None:
    from emulator.tap import iov_callback

    plain = Streams()
    joined = iov_callback(plain)
    assert joined is not None
    joined(1, False, [b"ab", memoryview(b"cd"), bytearray(b"e")])
    assert plain.data[False] == b"abcde"
    assert iov_callback(None) is None
    with PcapngRecorder(tmp_path / "i.pcapng", mode="server", address="x") as recorder:
        tap = recorder.tap
        assert iov_callback(tap) is tap.data_iov


# -- file regions: READ data the server sendfiles, copied file to file ----------------------------------------


def _server_file(tmp_path: Path, messages: list[tuple[bool, bytes]]) -> tuple[int, list[int]]:
    """The server's messages of `messages` laid end to end in a file (opened read-only) and where each begins."""
    path = tmp_path / "sent.bin"
    offsets = []
    with path.open("wb") as f:
        for _, message in messages:
            offsets.append(f.tell())
            f.write(message)
    return os.open(path, os.O_RDONLY), offsets


def _record_with_regions(path: Path, messages: list[tuple[bool, bytes]], fd: int, offsets: list[int],
                         shape: str) -> PcapngRecorder:
    """`messages` through a recorder's `data_parts`: each server message with a payload as its header and its
    payload as a file region (`shape` "cut": the region in two; "whole": the whole message a region, which
    starts a message, the recorder's general path); client messages as bytes."""
    from emulator.devices.base import FileRegion

    with PcapngRecorder(path, mode="server", address="test") as recorder:
        tap = recorder.tap
        tap.opened(1, ("127.0.0.1", 40000), ("127.0.0.1", 3240))
        for (direction, message), offset in zip(messages, offsets, strict=True):
            if direction or len(message) <= 48 or message[:4] != b"\0\0\0\3":
                tap.data_parts(1, direction, [message])
            elif shape == "whole":
                tap.data_parts(1, direction, [FileRegion(fd, offset, len(message))])
            elif shape == "cut":
                middle = (len(message) - 48) // 3
                tap.data_parts(1, direction, [message[:48], FileRegion(fd, offset + 48, middle),
                                              FileRegion(fd, offset + 48 + middle, len(message) - 48 - middle)])
            else:
                tap.data_parts(1, direction, [message[:48], FileRegion(fd, offset + 48, len(message) - 48)])
        tap.closed(1, "done")
    return recorder


@pytest.mark.parametrize("shape", ["payload", "cut", "whole"])
def test_file_regions_are_recorded_as_the_bytes_they_hold(tmp_path: Path, shape: str) -> None:
    """A RET_SUBMIT whose data is a file region (what the server sendfiles from a read-only image) records
    exactly as its bytes would: same segments (120 KiB split at 65495), the same frames, legal IPv4."""
    messages = _synthetic_session()
    fd, offsets = _server_file(tmp_path, messages)
    try:
        regions = _record_with_regions(tmp_path / "regions.pcapng", messages, fd, offsets, shape)
    finally:
        os.close(fd)
    with PcapngRecorder(tmp_path / "bytes.pcapng", mode="server", address="test") as recorder:
        tap = recorder.tap
        tap.opened(1, ("127.0.0.1", 40000), ("127.0.0.1", 3240))
        for direction, message in messages:
            tap.data(1, direction, message)
        tap.closed(1, "done")
    assert regions.error is None
    assert tcp_segments(tmp_path / "regions.pcapng") == tcp_segments(tmp_path / "bytes.pcapng")
    assert regions.frames == recorder.frames
    recorded = (tmp_path / "regions.pcapng").read_bytes()
    assert whole_blocks(recorded) == len(recorded) == regions.size
    analysis = analyze(tmp_path / "regions.pcapng")
    assert [c.data_bytes for c in analysis.scsi_commands] == [122880] * 3


def test_file_regions_fall_back_to_read_and_write_where_copy_file_range_cannot_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another filesystem (EXDEV), a block device (EINVAL): the recorder reads the region and writes it."""
    import errno

    calls = []

    def cannot(*args: Any) -> int:
        calls.append(args)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", cannot)
    messages = _synthetic_session()
    fd, offsets = _server_file(tmp_path, messages)
    try:
        recorder = _record_with_regions(tmp_path / "fallback.pcapng", messages, fd, offsets, "payload")
    finally:
        os.close(fd)
    assert recorder.error is None
    assert len(calls) == 1  # asked once, then read and written
    sent = [m for d, m in messages if not d]
    assert b"".join(p for d, p in tcp_segments(tmp_path / "fallback.pcapng") if not d) == b"".join(sent)


def _read_reply(tmp_path: Path) -> tuple[bytes, bytes, bytes]:
    """A CMD_SUBMIT (bulk IN, 64 KiB), its RET_SUBMIT header, and 64 KiB of data."""
    cmd = pack(CmdSubmit(seqnum=1, devid=0x10002, direction=1, ep=1, transfer_buffer_length=65536))
    ret = pack(RetSubmit(seqnum=1, actual_length=65536, transfer_buffer=bytes(65536)))[:48]
    return cmd, ret, os.urandom(65536)


def test_image_shorter_than_its_region_stops_recording_at_the_last_whole_block(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The image shrank under a READ (the server's sendfile fails on it too): the recorder cannot write what
    the frame headers promise, so it cuts the file back to before that tap call, logs one error and stops.
    The tap call returns normally: the session is the server's business."""
    from emulator.devices.base import FileRegion

    cmd, ret, data = _read_reply(tmp_path)
    image = tmp_path / "short.img"
    image.write_bytes(data[:40000])
    fd = os.open(image, os.O_RDONLY)
    path = tmp_path / "short.pcapng"
    try:
        with caplog.at_level(logging.ERROR, logger="captures.record"), \
                PcapngRecorder(path, mode="server", address="x") as recorder:
            tap = recorder.tap
            tap.opened(1, ("127.0.0.1", 40000), ("127.0.0.1", 3240))
            tap.data_parts(1, True, [cmd])
            before = recorder.size
            tap.data_parts(1, False, [ret, FileRegion(fd, 0, 65536)])
            assert recorder.size == before
            tap.data_parts(1, True, [cmd])  # ignored from now on
    finally:
        os.close(fd)
    assert recorder.error is not None and "ended at byte 40000" in recorder.error
    assert sum("ended at byte 40000" in r.getMessage() for r in caplog.records) == 1
    recorded = path.read_bytes()
    assert len(recorded) == before == whole_blocks(recorded)
    assert [d for d, _ in tcp_segments(recorded)] == [True]  # the CMD_SUBMIT, nothing of the reply


def test_file_size_limit_inside_a_region_copy_cuts_back_to_the_last_whole_block(tmp_path: Path) -> None:
    """RLIMIT_FSIZE reached halfway through a region's copy_file_range (EFBIG; ENOSPC takes the same path):
    the partial frames of that tap call go, the file ends on the block before them, recording stops."""
    from emulator.devices.base import FileRegion

    cmd, ret, data = _read_reply(tmp_path)
    image = tmp_path / "data.img"
    image.write_bytes(data)
    fd = os.open(image, os.O_RDONLY)
    path = tmp_path / "limit.pcapng"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        with PcapngRecorder(path, mode="server", address="x") as recorder:
            tap = recorder.tap
            tap.opened(1, ("127.0.0.1", 40000), ("127.0.0.1", 3240))
            tap.data_parts(1, True, [cmd])
            before = recorder.size
            resource.setrlimit(resource.RLIMIT_FSIZE, (before + 30000, hard))  # Python ignores SIGXFSZ
            try:
                tap.data_parts(1, False, [ret, FileRegion(fd, 0, 65536)])
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            assert recorder.error == "File too large"
    finally:
        os.close(fd)
    recorded = path.read_bytes()
    assert len(recorded) == before == whole_blocks(recorded)
    assert [d for d, _ in tcp_segments(recorded)] == [True]


def test_parts_callback_gives_a_recorder_its_data_parts_and_other_taps_the_regions_read(tmp_path: Path) -> None:
    from emulator.devices.base import FileRegion
    from emulator.tap import parts_callback

    (tmp_path / "f.bin").write_bytes(b"0123456789")
    fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
    try:
        plain = Streams()
        read = parts_callback(plain)
        assert read is not None
        read(1, False, [b"ab", FileRegion(fd, 3, 4), memoryview(b"cd")])
        assert plain.data[False] == b"ab3456cd"
    finally:
        os.close(fd)
    assert parts_callback(None) is None
    with PcapngRecorder(tmp_path / "p.pcapng", mode="server", address="x") as recorder:
        tap = recorder.tap
        assert parts_callback(tap) is tap.data_parts
