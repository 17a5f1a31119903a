"""pytest integration: tests marked `kernel` run inside ONE guest boot per pytest run, reported on the host.

On the host, kernel items are collected normally. When the first one is due, the plugin boots the guest once
and runs `python -m pytest <every selected kernel nodeid>` there with `VUSB_IN_VM=1`; the guest side of this
same plugin streams each test report (pytest's own serialisation) as JSON lines into the share. The host then
replays those reports for each kernel item, so pass/fail/skip, failure text, captured output and durations
reach the host's summary and exit code. A kernel item without a guest report fails, with the reason (VM not
prepared, guest timeout or crash with its console tail, guest collection error).

Opt-out: `--no-kernel` or `VUSB_NO_KERNEL=1` deselects kernel tests (and `vm` tests, which boot guests from
the host) with a loud warning. Inside the guest, each test gets a timeout (`kernel(timeout=S)` marker keyword,
default 300 s) so one hung test fails alone instead of taking the whole boot down.
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

IN_VM = os.environ.get("VUSB_IN_VM") == "1"
RESULTS_ENV = "VUSB_VM_RESULTS"
DEFAULT_TEST_TIMEOUT = 300.0
DEFAULT_SUITE_TIMEOUT = 1800.0
KEEP_RUN_DIRS = 5
_SECTION = re.compile(r"^=+ [A-Za-z][^=]* =+$")  # pytest's section separators


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("vusb-vm", "vusb kernel tests in the QEMU guest (tools/vm)")
    group.addoption(
        "--no-kernel",
        action="store_true",
        default=os.environ.get("VUSB_NO_KERNEL") == "1",
        help="deselect tests marked `kernel`/`vm` (also VUSB_NO_KERNEL=1); they are NOT run, loudly",
    )
    group.addoption(
        "--vm-timeout",
        type=float,
        default=float(os.environ.get("VUSB_VM_TIMEOUT", DEFAULT_SUITE_TIMEOUT)),
        help=f"seconds for the whole kernel suite's guest, boot included (default {DEFAULT_SUITE_TIMEOUT:g})",
    )
    group.addoption("--vm-mem", type=int, default=2048, help="guest memory in MiB (default 2048)")


def pytest_configure(config: pytest.Config) -> None:
    if IN_VM:
        config.pluginmanager.register(GuestSide(config), "vusb-vm-guest")
    else:
        config.pluginmanager.register(HostSide(config), "vusb-vm-host")


def _is_kernel(item: pytest.Item) -> bool:
    return item.get_closest_marker("kernel") is not None


# ---- guest side ------------------------------------------------------------------------------------


class _TestTimeout(Exception):
    pass


class GuestSide:
    """Inside the guest: per-test timeouts, and every report appended to `$VUSB_VM_RESULTS` as it happens."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        path = os.environ.get(RESULTS_ENV)
        self.out = open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed at session end

    def _emit(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            self.out.write(json.dumps(record) + "\n")
            self.out.flush()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        marker = item.get_closest_marker("kernel")
        limit = float(marker.kwargs.get("timeout", DEFAULT_TEST_TIMEOUT)) if marker else DEFAULT_TEST_TIMEOUT
        self._emit({"start": item.nodeid})

        def expired(signum: int, frame: object) -> None:
            with contextlib.suppress(Exception):  # every thread's stack, into the captured stderr (fd 2)
                faulthandler.dump_traceback(file=2, all_threads=True)
            raise _TestTimeout(f"{item.nodeid} exceeded its {limit:g} s timeout in the guest")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        data = self.config.hook.pytest_report_to_serializable(config=self.config, report=report)
        self._emit({"report": data})

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self._emit({"collect_error": report.nodeid, "text": report.longreprtext})

    def pytest_sessionfinish(self, exitstatus: int) -> None:
        self._emit({"finished": int(exitstatus)})
        if self.out is not None:
            self.out.close()
            self.out = None


# ---- host side -------------------------------------------------------------------------------------


@dataclass
class SuiteOutcome:
    """What the one guest run of the kernel suite produced."""

    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    collect_errors: list[str] = field(default_factory=list)
    finished: int | None = None
    error: str | None = None  # harness failure (not prepared, timeout, crash)
    returncode: int | None = None
    boot_seconds: float = float("nan")
    command_seconds: float = float("nan")
    wall_seconds: float = 0.0
    accel: str = "?"
    run_dir: Path | None = None
    output_tail: str = ""


def parse_results(lines: Iterator[str] | list[str], outcome: SuiteOutcome) -> None:
    """Fold the guest's JSON-lines records into `outcome` (a torn last line from a dying guest is ignored)."""
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "report" in record:
            outcome.reports.setdefault(record["report"]["nodeid"], []).append(record["report"])
        elif "start" in record:
            outcome.started.append(record["start"])
        elif "collect_error" in record:
            outcome.collect_errors.append(f"{record['collect_error']}:\n{record['text']}")
        elif "finished" in record:
            outcome.finished = record["finished"]


class GuestEcho:
    """Echoes the guest's live output as whole `[vm] ` lines (it arrives in arbitrary chunks). The guest's
    FAILURES/ERRORS sections are skipped: the host prints each failure itself (they stay in the guest log)."""

    def __init__(self, write_line: Callable[[str], object]) -> None:
        self._write = write_line
        self._pending = {"stdout": "", "stderr": ""}
        self._muted = False

    def __call__(self, name: str, text: str) -> None:
        *lines, self._pending[name] = (self._pending[name] + text).split("\n")
        for line in lines:
            if name == "stdout" and _SECTION.match(line):
                self._muted = line.strip("= ") in ("FAILURES", "ERRORS")
                if self._muted:
                    self._write("[vm] (failure details follow in this run's own FAILURES section)")
                    continue
            if not (self._muted and name == "stdout"):
                self._write(f"[vm] {line}")


class HostSide:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.kernel_items: list[pytest.Item] = []
        self.deselected = 0
        self.outcome: SuiteOutcome | None = None

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if config.getoption("no_kernel"):
            dropped = [i for i in items if _is_kernel(i) or i.get_closest_marker("vm")]
            if dropped:
                self.deselected = len(dropped)
                config.hook.pytest_deselected(items=dropped)
                gone = set(dropped)
                items[:] = [i for i in items if i not in gone]
            return
        self.kernel_items = [i for i in items if _is_kernel(i)]

    def _warning(self) -> str:
        return (
            f"!!! vusb: {self.deselected} kernel/VM tests DESELECTED by --no-kernel / VUSB_NO_KERNEL=1: "
            "the kernel-facing paths were NOT tested in this run !!!"
        )

    def pytest_report_collectionfinish(self) -> list[str]:
        if self.deselected:
            return [self._warning()]
        if self.kernel_items:
            return [f"vusb: {len(self.kernel_items)} kernel tests will run in one QEMU guest boot"]
        return []

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> bool | None:
        if not _is_kernel(item):
            return None
        if self.outcome is None:
            self.outcome = self._run_suite()
        self._replay(item, self.outcome)
        return True

    # -- running the guest ---------------------------------------------------------------------------

    def _run_dir(self) -> Path:
        base = self.config.rootpath / ".vm"
        base.mkdir(exist_ok=True)
        old = sorted(base.glob("kernel-suite-*"))
        for stale in old[: max(0, len(old) - KEEP_RUN_DIRS + 1)]:
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > 3600:  # never a concurrent run's live directory
                    shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=time.strftime("kernel-suite-%Y%m%d-%H%M%S-"), dir=base))

    def _guest_command(self) -> list[str]:
        # Not loading hypothesis's plugin saves ~7 s of imports under TCG; @given tests still work without it.
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
        argv += ["--rootdir", str(self.config.rootpath)]
        if self.config.inipath is not None:
            argv += ["-c", str(self.config.inipath)]
        # One line per test, streamed to the host's terminal as it happens (progress in a long CI log).
        argv += ["-o", "console_output_style=classic", "-v"]
        return [*argv, *(i.nodeid for i in self.kernel_items)]

    def _run_suite(self) -> SuiteOutcome:
        from tools.vm.errors import VmError, VmTimeout
        from tools.vm.runner import run_in_vm

        outcome = SuiteOutcome()
        tr = self.config.pluginmanager.get_plugin("terminalreporter")
        run_dir = self._run_dir()
        outcome.run_dir = run_dir
        results = run_dir / "results.jsonl"
        stream = self.config.option.verbose >= 0  # -q silences the guest's live output (still in the logs)

        if tr is not None:
            tr.write_line("")
            tr.write_line(
                f"vusb: booting the QEMU guest for {len(self.kernel_items)} kernel tests (log: {run_dir})"
            )
        started = time.monotonic()
        try:
            res = run_in_vm(
                self._guest_command(),
                timeout=self.config.getoption("vm_timeout"),
                env={RESULTS_ENV: str(results)},
                cwd=self.config.rootpath,
                mem_mb=self.config.getoption("vm_mem"),
                io_dir=run_dir,
                on_output=GuestEcho(tr.write_line) if stream and tr is not None else None,
            )
        except VmTimeout as exc:
            outcome.error = str(exc)
            outcome.output_tail = _tail(exc.stdout + exc.stderr)
        except VmError as exc:
            outcome.error = str(exc)
        else:
            outcome.returncode = res.returncode
            outcome.boot_seconds = res.boot_seconds
            outcome.command_seconds = res.command_seconds
            outcome.accel = res.accel
            outcome.output_tail = _tail(res.stdout + res.stderr)
        outcome.wall_seconds = time.monotonic() - started
        if results.is_file():
            parse_results(results.read_text(errors="replace").splitlines(), outcome)
        return outcome

    # -- reporting -----------------------------------------------------------------------------------

    def _replay(self, item: pytest.Item, outcome: SuiteOutcome) -> None:
        ihook = item.ihook
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        records = outcome.reports.get(item.nodeid, [])
        if records and records[-1].get("when") == "teardown":
            for data in records:
                if isinstance(data.get("longrepr"), list):  # a skip's (path, lineno, reason) tuple, via JSON
                    data = {**data, "longrepr": tuple(data["longrepr"])}
                report = self.config.hook.pytest_report_from_serializable(config=self.config, data=data)
                ihook.pytest_runtest_logreport(report=report)
        else:
            report = pytest.TestReport(
                nodeid=item.nodeid,
                location=item.location,
                keywords=dict.fromkeys(item.keywords, 1),
                outcome="failed",
                longrepr=self._missing_reason(item, outcome),
                when="setup" if not records else "call",
                sections=[],
                duration=0.0,
                start=time.time(),
                stop=time.time(),
                user_properties=[],
            )
            ihook.pytest_runtest_logreport(report=report)
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)

    def _missing_reason(self, item: pytest.Item, outcome: SuiteOutcome) -> str:
        running = bool(outcome.started) and outcome.started[-1] == item.nodeid
        parts = ["vusb: this kernel test has no complete result from the guest."]
        if outcome.error is not None:
            parts.append(
                ("It was running when the guest stopped: " if running else "The guest run failed: ")
                + outcome.error
            )
        elif outcome.collect_errors:
            parts.append(
                "The guest could not collect the kernel tests:\n" + "\n".join(outcome.collect_errors)
            )
        else:
            parts.append(f"The guest pytest exited {outcome.returncode} without running it.")
        if outcome.output_tail:
            parts.append("--- guest output (tail) ---\n" + outcome.output_tail)
        if outcome.run_dir is not None:
            parts.append(f"(guest logs: {outcome.run_dir})")
        return "\n".join(parts)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        if self.deselected:
            tr.write_sep("!", "vusb kernel tests NOT run", red=True, bold=True)
            tr.write_line(self._warning(), red=True, bold=True)
            return
        outcome = self.outcome
        if outcome is None:
            return
        tr.write_sep("-", "vusb kernel VM")
        done = sum(1 for i in self.kernel_items if i.nodeid in outcome.reports)
        if outcome.error is None:
            tr.write_line(
                f"{done}/{len(self.kernel_items)} kernel tests in one guest boot ({outcome.accel}): "
                f"boot-to-command {outcome.boot_seconds:.1f} s, guest pytest {outcome.command_seconds:.1f} s, "
                f"kernel suite wall {outcome.wall_seconds:.1f} s"
            )
        else:
            tr.write_line(
                f"kernel suite FAILED to run to the end after {outcome.wall_seconds:.1f} s "
                f"({done}/{len(self.kernel_items)} tests reported): {outcome.error.splitlines()[0]}",
                red=True,
            )
        if outcome.run_dir is not None:
            tr.write_line(
                f"guest logs (stdout, stderr, console.log, dmesg, results.jsonl): {outcome.run_dir}"
            )


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
