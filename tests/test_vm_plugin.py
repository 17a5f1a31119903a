"""The pytest plugin end to end: a small project of kernel tests is run by a nested host pytest, and the guest's
outcomes (pass, failure text, skip reason, per-test timeout) must come back as that run's results and exit code.
Also: missing kernel = failure (not skip), and the explicit opt-out deselects loudly."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SAMPLE = """
import os, time, pytest

@pytest.mark.kernel
def test_runs_inside_the_guest():
    assert os.environ["VUSB_IN_VM"] == "1"
    assert open("/proc/sys/kernel/hostname").read().strip() == "vusb-vm"

@pytest.mark.kernel
def test_fails_in_guest():
    print("guest stdout before failing")
    assert 1 + 1 == 3, "guest-side failure text"

@pytest.mark.kernel
def test_skips_in_guest():
    pytest.skip("guest-side skip reason")

@pytest.mark.kernel(timeout=3)
def test_hangs_in_guest():
    time.sleep(120)

@pytest.mark.kernel
def test_after_the_hang_still_runs():
    assert os.path.isdir("/sys/kernel/config")

def test_on_the_host():
    assert os.environ.get("VUSB_IN_VM") != "1"
"""


def _project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "conftest.py").write_text('pytest_plugins = ["tools.vm.pytest_plugin"]\n')
    (proj / "pytest.ini").write_text(
        f"[pytest]\npythonpath = {REPO}\nmarkers =\n    kernel: in the guest\n    vm: boots guests\n"
    )
    (proj / "test_sample.py").write_text(SAMPLE)
    return proj


def _pytest(
    proj: Path, *args: str, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], dict]:
    junit = proj / "junit.xml"
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", "-rA", *args],
        cwd=proj,
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "VUSB_NO_KERNEL"}, **(env or {})},
        timeout=600,
    )
    outcomes = {}
    if junit.is_file():
        for case in ET.parse(junit).iter("testcase"):
            kind = next(
                (child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed"
            )
            text = "".join(child.get("message", "") + (child.text or "") for child in case)
            outcomes[case.get("name")] = (kind, text)
    return res, outcomes


@pytest.mark.vm
def test_plugin_reports_each_guest_outcome_on_the_host_from_one_boot(tmp_path):
    proj = _project(tmp_path)
    res, outcomes = _pytest(proj)
    out = res.stdout + res.stderr
    assert res.returncode == 1, out
    assert outcomes["test_runs_inside_the_guest"][0] == "passed", out
    assert outcomes["test_on_the_host"][0] == "passed", out
    kind, text = outcomes["test_fails_in_guest"]
    assert kind == "failure" and "guest-side failure text" in text and "assert (1 + 1) == 3" in text
    assert "guest stdout before failing" in out  # the guest's captured output is replayed
    kind, text = outcomes["test_skips_in_guest"]
    assert kind == "skipped" and "guest-side skip reason" in text
    kind, text = outcomes["test_hangs_in_guest"]
    assert kind == "failure" and "exceeded its 3 s timeout in the guest" in text
    assert "in test_hangs_in_guest" in out  # faulthandler's stack dump, from the captured stderr
    assert outcomes["test_after_the_hang_still_runs"][0] == "passed", out
    assert out.count("vusb: booting the QEMU guest for 5 kernel tests") == 1
    assert "5/5 kernel tests in one guest boot" in out and "boot-to-command" in out


def test_plugin_fails_kernel_tests_when_the_guest_kernel_is_missing(tmp_path):
    proj = _project(tmp_path)
    res, outcomes = _pytest(proj, env={"VUSB_CACHE": str(tmp_path / "empty-cache")})
    assert res.returncode == 1
    kernel_tests = [name for name in outcomes if name != "test_on_the_host"]
    assert len(kernel_tests) == 5
    for name in kernel_tests:
        kind, text = outcomes[name]
        assert kind in ("failure", "error") and "bash tools/setup.sh" in text, (name, kind, text)
    assert outcomes["test_on_the_host"][0] == "passed"


@pytest.mark.parametrize("how", [("--no-kernel",), ()])
def test_plugin_opt_out_deselects_kernel_tests_with_a_loud_warning(tmp_path, how):
    proj = _project(tmp_path)
    env = {} if how else {"VUSB_NO_KERNEL": "1"}
    res, outcomes = _pytest(proj, *how, env=env)
    assert res.returncode == 0, res.stdout
    assert list(outcomes) == ["test_on_the_host"]
    assert "5 deselected" in res.stdout
    assert res.stdout.count("kernel/VM tests DESELECTED") == 2  # after collection and in the summary
