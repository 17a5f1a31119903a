"""The committed real-kernel captures (captures/samples/) keep dissecting consistently, without the VM."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_captures_tshark import _num, _pdml, _pdus

from captures.layers import read_packets
from captures.layers.usbip import USBIP_CmdSubmit, USBIP_RetSubmit, usbip_messages
from captures.transactions import analyze

SAMPLES = Path(__file__).resolve().parent.parent / "captures" / "samples"
USBIP_SAMPLE = SAMPLES / "kernel-usbip-attach-mass-storage.pcapng"
USBMON_SAMPLE = SAMPLES / "kernel-usbmon-vhci-mass-storage.pcapng"


def _story(path: Path) -> list[tuple[object, ...]]:
    return [
        (c.tag, c.opcode, c.logical_block_address, c.blocks, c.csw_status, c.data_bytes)
        for c in analyze(path).scsi_commands
    ]


def test_samples_are_small_and_pair_without_warnings() -> None:
    for path in (USBIP_SAMPLE, USBMON_SAMPLE):
        assert path.stat().st_size < 100_000
        a = analyze(path)
        assert (
            a.warnings == []
            and a.transactions
            and all(t.complete for t in a.transactions if t.kind == "submit")
        )


def test_usbip_and_usbmon_samples_tell_the_same_scsi_story() -> None:
    story = _story(USBIP_SAMPLE)
    assert len(story) == 29 and story == _story(USBMON_SAMPLE)
    assert all(status == 0 for *_rest, status, _bytes in story)


def test_scapy_frames_the_usbip_sample_like_the_fast_path() -> None:
    messages = [m for p in read_packets(USBIP_SAMPLE) if p.haslayer("TCP") for m in usbip_messages(p)]
    cmds = {m.seqnum: m for m in messages if isinstance(m, USBIP_CmdSubmit)}
    rets = [m for m in messages if isinstance(m, USBIP_RetSubmit)]
    fast = [(t.urb_id, t.endpoint, t.requested_length, t.status, t.actual_length)
            for t in analyze(USBIP_SAMPLE).transactions if t.kind == "submit"]  # fmt: skip
    ours = [(r.seqnum, cmds[r.seqnum].endpoint_address, cmds[r.seqnum].transfer_buffer_length, r.status, r.actual_length)
            for r in rets]  # fmt: skip
    assert ours == fast


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")
def test_usbip_sample_pairing_matches_tshark() -> None:
    by_seqnum = {t.urb_id: t for t in analyze(USBIP_SAMPLE).transactions if t.kind == "submit"}
    checked = 0
    for pdu in _pdus(_pdml(USBIP_SAMPLE, "-d", "tcp.port==3240,usbip"), "usbip"):
        if "usbip.urb" in pdu.wire and _num(pdu.wire["usbip.urb"][0]) == 3:
            ours = by_seqnum[_num(pdu.wire["usbip.sequence_no"][0])]
            assert (ours.frame, ours.response_frame) == (
                _num(pdu.generated["usbip.cmd_frame"][0]),
                _num(pdu.generated["usbip.ret_frame"][0]),
            )
            checked += 1
    assert checked == len(by_seqnum)
