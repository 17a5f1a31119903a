"""`vusb bench`: run the benchmarks of tools/bench from a source checkout.

Benchmarks print figures and ratios against a reference measured in the same run (never pass/fail timings);
they live in the repository, not in the installed package, so this command finds them next to the sources.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from emulator.errors import VusbError

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "tools" / "bench"


def available() -> dict[str, Path]:
    """Benchmark name (file name without `bench_` and `.py`, dashes for underscores) → script."""
    if not BENCH_DIR.is_dir():
        return {}
    return {p.stem.removeprefix("bench_").replace("_", "-"): p for p in sorted(BENCH_DIR.glob("bench_*.py"))}


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        text = line.strip().strip('"').strip()
        if text:
            return text
    return ""


@click.command("bench")
@click.argument("names", nargs=-1)
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
def bench_command(names: tuple[str, ...], list_only: bool) -> None:
    """Run benchmarks (all host-side ones by default; `server-vm` and other *-vm ones boot the kernel VM)."""
    benches = available()
    if not benches:
        raise VusbError(f"no benchmarks at {BENCH_DIR}: `vusb bench` runs from a source checkout of vusb")
    if list_only:
        for name, path in benches.items():
            click.echo(f"{name:14} {_summary(path)}")
        return
    unknown = [n for n in names if n not in benches]
    if unknown:
        raise click.UsageError(f"unknown benchmark {', '.join(unknown)} (have: {', '.join(benches)})")
    chosen = list(names) or [n for n in benches if not n.endswith("-vm")]
    failed = []
    for name in chosen:
        click.echo(f"== {name}")
        res = subprocess.run([sys.executable, str(benches[name])], cwd=ROOT, check=False)
        if res.returncode != 0:
            failed.append(name)
    if failed:
        raise VusbError(f"benchmark(s) failed: {', '.join(failed)}")
