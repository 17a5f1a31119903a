"""tools/bench/bench_bridge_vm.py's usbmon timeline: the phases of a Bulk-Only command, read from a usbmon text
trace (the format of Documentation/usb/usbmon.rst), on a made-up two-bus trace."""

from __future__ import annotations

from tools.bench.bench_bridge_vm import PHASES, bot_timeline

LOCAL, REMOTE = 22, 20


def _command(start: int, parts: int = 4) -> list[str]:
    """One 1 MiB READ: CBW, the data in `parts` URBs at the remote, the CSW; times in µs from `start`."""
    lines = [f"t {start} S Bo:{LOCAL}:002:2 -115 31 = 55534243", f"t {start + 300} C Bo:{LOCAL}:002:2 0 31 >",
             f"t {start + 400} S Bi:{LOCAL}:002:1 -115 1048576 <",
             f"t {start + 3000} S Bo:{REMOTE}:002:2 -115 31 = 55534243", f"t {start + 4000} C Bo:{REMOTE}:002:2 0 31 >"]
    size = (1 << 20) // parts
    lines += [f"t {start + 4100 + i} S Bi:{REMOTE}:002:1 -115 {size} <" for i in range(parts)]
    lines += [f"t {start + 8000 + 4000 * i} C Bi:{REMOTE}:002:1 0 {size} = 00" for i in range(parts)]
    lines += [f"t {start + 8000 + 4000 * parts} C Bi:{REMOTE}:002:1 0 13 = 55534253",
              f"t {start + 30000} C Bi:{LOCAL}:002:1 0 1048576 = 00", f"t {start + 30100} S Bi:{LOCAL}:002:1 -115 13 <",
              f"t {start + 31000} C Bi:{LOCAL}:002:1 0 13 = 55534253"]
    return lines


def test_each_phase_is_the_median_over_the_commands_that_have_a_next_one():
    trace = _command(1000) + _command(35000) + _command(69000)
    timeline = bot_timeline(trace, LOCAL, REMOTE)
    assert timeline == {"local CBW at device": 300, "remote CBW submitted": 3000, "remote CBW done": 4000,
                        "remote first data": 8000, "remote last data": 20000, "remote CSW": 24000,
                        "local data done": 30000, "local CSW done": 31000, "next local CBW": 34000}
    assert list(timeline) == list(PHASES)


def test_commands_of_another_length_and_lines_usbmon_garbled_are_left_out():
    small = [line.replace("1048576", "65536") for line in _command(0)]
    trace = ["garbage", "t x S Bo:22:002:2 -115 31", *small, *_command(40000),
             "t 1 S Ci:22:002:0 s a1 fe 0000 0000 0001 1 <", *_command(80000)]
    timeline = bot_timeline(trace, LOCAL, REMOTE)
    assert timeline["next local CBW"] == 40000 and timeline["local data done"] == 30000
