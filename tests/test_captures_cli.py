"""`vusb dissect`: table, JSON lines, summary, filters, and one-line errors for bad files, through the real CLI group."""

from __future__ import annotations

import json
from pathlib import Path

import captures_script as script
import pytest
from click.testing import CliRunner, Result

from emulator.cli import cli

ENV = {"COLUMNS": "220"}


@pytest.fixture(scope="module")
def usbip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "usbip.pcap"
    path.write_bytes(script.usbip_capture(script.mass_storage_urbs(), coalesce_rets=True))
    return path


@pytest.fixture(scope="module")
def usbmon_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "usbmon.pcap"
    path.write_bytes(script.usbmon_capture(script.mass_storage_urbs(), mmapped=True))
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["dissect", *args], env=ENV)


def json_lines(result: Result) -> list[dict[str, object]]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_table_shows_requests_statuses_and_scsi_phases(usbip_file: Path) -> None:
    result = run(str(usbip_file))
    assert result.exit_code == 0, result.output
    for text in ("OP_REQ_IMPORT 1-1", "GET_DESCRIPTOR DEVICE index 0", "SET_CONFIGURATION 1", "GET_MAX_LUN",
                 "CBW INQUIRY tag 0x00000001", "data READ_10", "CSW TEST_UNIT_READY failed", "-EPIPE", "4096/4096"):  # fmt: skip
        assert text in result.stdout, text


def test_json_lines_have_one_object_per_transaction(usbmon_file: Path) -> None:
    rows = json_lines(run(str(usbmon_file), "--json"))
    assert len(rows) == len(script.mass_storage_urbs())
    first = rows[0]
    assert (first["protocol"], first["endpoint"], first["transfer_type"], first["setup"]) == (
        "usbmon", 0x80, "control", "8006000100001200",
    )  # fmt: skip
    assert rows[-1]["status_name"] == "-EPIPE"


def test_endpoint_filter_is_exact_except_the_control_pipe(usbmon_file: Path) -> None:
    assert {r["endpoint"] for r in json_lines(run(str(usbmon_file), "--json", "--endpoint", "0x81"))} == {
        0x81
    }
    assert {r["endpoint"] for r in json_lines(run(str(usbmon_file), "--json", "--endpoint", "0"))} == {
        0x00,
        0x80,
    }


def test_device_and_busid_filters(usbip_file: Path, usbmon_file: Path) -> None:
    everything = json_lines(run(str(usbip_file), "--json"))
    assert json_lines(run(str(usbip_file), "--json", "--busid", "1-1")) == everything
    assert json_lines(run(str(usbip_file), "--json", "--busid", "2-1")) == []
    assert len(json_lines(run(str(usbmon_file), "--json", "--device", "1:2"))) == len(
        script.mass_storage_urbs()
    )
    assert json_lines(run(str(usbmon_file), "--json", "--device", "1:3")) == []


def test_scsi_opcode_filter_takes_names_and_numbers(usbmon_file: Path) -> None:
    by_name = json_lines(run(str(usbmon_file), "--json", "--scsi-opcode", "read_10"))
    assert by_name == json_lines(run(str(usbmon_file), "--json", "--scsi-opcode", "0x28"))
    assert [r["bot"] for r in by_name] == ["CBW", "data", "CSW"]
    commands = json_lines(run(str(usbmon_file), "--json", "--scsi"))
    assert [c["name"] for c in commands] == [
        "INQUIRY", "READ_CAPACITY_10", "READ_10", "TEST_UNIT_READY", "REQUEST_SENSE", "WRITE_10",
    ]  # fmt: skip
    assert commands[3]["csw_status"] == 1 and commands[2]["data_bytes"] == 4096


def test_summary_counts_errors_bytes_and_latency_percentiles(usbip_file: Path) -> None:
    summary = json_lines(run(str(usbip_file), "--summary", "--json"))[0]
    assert summary["urbs"] == len(script.mass_storage_urbs())
    assert summary["errors_by_status"] == {"-EPIPE": 1}
    assert summary["bytes_out"] == 5 * 31 + 31 + 512
    assert 0 < summary["latency"]["p50"] <= summary["latency"]["p90"] <= summary["latency"]["p99"]
    assert summary["scsi"]["commands"] == 6 and summary["scsi"]["failed"] == 1
    text = run(str(usbip_file), "--summary")
    assert text.exit_code == 0 and "latency ms: p50" in text.stdout and "SCSI commands 6" in text.stdout


def test_garbage_file_is_one_error_line_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"this is not a capture at all")
    result = run(str(bad))
    assert result.exit_code == 1
    assert "vusb: error:" in result.stderr and "not a pcap or pcapng capture" in result.stderr
    assert "Traceback" not in result.output


def test_truncated_file_error_names_the_frame(tmp_path: Path, usbmon_file: Path) -> None:
    from captures.reader import iter_frames

    data = usbmon_file.read_bytes()
    complete = sum(1 for _n, _lt, _ts, _b, off, cap, _o, _be in iter_frames(data) if off + cap <= 300)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:300])
    result = run(str(cut))
    assert result.exit_code == 1
    assert f"frame {complete + 1}: pcap record at byte" in result.stderr and "truncated" in result.stderr


def test_wrong_link_type_is_named(tmp_path: Path) -> None:
    from captures import synth

    path = tmp_path / "wifi.pcap"
    path.write_bytes(synth.pcap([(1.0, b"\0" * 40)], 105))
    result = run(str(path))
    assert result.exit_code == 1 and "frame 1: link type 105" in result.stderr


def test_bad_filter_values_are_usage_errors(usbmon_file: Path) -> None:
    for args in (["--device", "12"], ["--endpoint", "0x31"], ["--scsi-opcode", "FROB"]):
        result = run(str(usbmon_file), *args)
        assert result.exit_code == 2, args
        assert "Traceback" not in result.output


def _frames(data: bytes) -> list[tuple[float, bytes]]:
    from captures.reader import iter_frames

    return [(ts, buf[off : off + cap]) for _n, _lt, ts, buf, off, cap, _o, _be in iter_frames(data)]


def test_urb_whose_answer_was_not_captured_is_listed_as_pending(tmp_path: Path) -> None:
    from captures import synth
    from captures.reader import LINKTYPE_ETHERNET

    frames = _frames(script.usbip_capture(script.mass_storage_urbs()[:2]))
    path = tmp_path / "stopped.pcap"
    path.write_bytes(synth.pcap(frames[:-1], LINKTYPE_ETHERNET))  # the last RET_SUBMIT's segment never came
    result = run(str(path), "--json")
    assert result.exit_code == 0
    assert len(json_lines(result)) == 3  # import, and both URBs (the second without a response)
    assert json_lines(result)[-1]["response_frame"] is None
    assert json_lines(result)[-1]["status_name"] == "pending"


def test_segment_cut_by_the_snapshot_length_is_an_error_saying_so(tmp_path: Path) -> None:
    from captures import synth
    from captures.reader import LINKTYPE_ETHERNET

    frames = _frames(script.usbip_capture(script.mass_storage_urbs()[:2]))
    ts, last = frames[-1]
    frames[-1] = (ts, last[:-20])  # the IP header still claims the whole payload
    path = tmp_path / "snapped.pcap"
    path.write_bytes(synth.pcap(frames, LINKTYPE_ETHERNET))
    result = run(str(path))
    assert (
        result.exit_code == 1
        and f"frame {len(frames)}:" in result.stderr
        and "snapshot length" in result.stderr
    )


def test_a_capture_stopping_mid_message_warns(tmp_path: Path) -> None:
    from captures import synth
    from captures.reader import LINKTYPE_ETHERNET

    frames = _frames(script.usbip_capture(script.mass_storage_urbs()[:12]))
    big = max(
        range(len(frames)), key=lambda i: len(frames[i][1])
    )  # the first segment of the 4096-byte answer
    path = tmp_path / "mid.pcap"
    path.write_bytes(synth.pcap(frames[: big + 1], LINKTYPE_ETHERNET))
    result = run(str(path))
    assert result.exit_code == 0
    assert "vusb: warning:" in result.stderr and "ends inside a USB/IP message" in result.stderr
    assert "data READ_10" in result.stdout
