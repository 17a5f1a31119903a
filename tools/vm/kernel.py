"""The guest kernel: Debian's packaged `linux-image-*-amd64`, unpacked into a cache, never installed.

`prepare()` resolves the package that `linux-image-amd64` currently depends on (never pinned), fetches it with
`apt-get download`, unpacks it with `dpkg -x`, and runs `depmod -b` (the .deb ships no modules.dep). The result
is recorded in `current.json`; re-running with the same package costs two `apt-cache` calls.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tools.vm.errors import SETUP_HINT, PrepareError, VmNotPrepared

log = logging.getLogger("tools.vm")

META_PACKAGE = "linux-image-amd64"
_CURRENT = "current.json"


def cache_dir() -> Path:
    """Where kernels and initramfs images live: `$VUSB_CACHE`, else `~/.cache/vusb/vm`."""
    env = os.environ.get("VUSB_CACHE")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "vusb" / "vm"


@dataclass(frozen=True)
class GuestKernel:
    """One unpacked kernel package: `root` is the `dpkg -x` tree."""

    package: str
    version: str
    release: str
    root: Path

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        """`lib/modules/<release>` inside the unpacked tree (what the guest links at /lib/modules)."""
        return self.root / "lib" / "modules" / self.release

    def problems(self) -> list[str]:
        """What is missing from the unpacked tree (empty when it is usable)."""
        missing = []
        for path in (self.vmlinuz, self.modules_dir / "modules.dep", self.modules_dir / "modules.dep.bin"):
            if not path.is_file():
                missing.append(str(path))
        return missing


# ---- pure parsing of apt's answers -------------------------------------------------------------------


def parse_apt_depends(text: str) -> str:
    """The versioned image package from `apt-cache depends linux-image-amd64` output.

    >>> parse_apt_depends("linux-image-amd64\\n  Depends: linux-image-6.1.0-56-amd64\\n")
    'linux-image-6.1.0-56-amd64'
    """
    for line in text.splitlines():
        m = re.match(r"\s*\|?Depends:\s+(linux-image-\d\S*)\s*$", line)
        if m:
            return m.group(1)
    raise PrepareError(f"`apt-cache depends {META_PACKAGE}` names no linux-image-<version> package")


def parse_apt_version(text: str) -> str:
    """The `Version:` field of `apt-cache show --no-all-versions PKG` output."""
    for line in text.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    raise PrepareError("`apt-cache show` printed no Version field")


def release_of(root: Path) -> str:
    """The kernel release (`6.1.0-56-amd64`) of an unpacked package: its single `lib/modules/<release>`."""
    for base in (root / "lib" / "modules", root / "usr" / "lib" / "modules"):
        if base.is_dir():
            releases = sorted(p.name for p in base.iterdir() if p.is_dir())
            if len(releases) == 1:
                return releases[0]
            raise PrepareError(f"expected one kernel release under {base}, found {releases or 'none'}")
    raise PrepareError(f"no lib/modules directory in the unpacked kernel package at {root}")


# ---- host commands ---------------------------------------------------------------------------------


def _run(argv: list[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    if tool is None:
        raise VmNotPrepared(f"`{argv[0]}` is not installed: {SETUP_HINT}")
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)


def _apt_update() -> None:
    log.info("vm: apt-get update")
    res = _run(["apt-get", "update", "-qq"])
    if res.returncode != 0:
        raise PrepareError(f"`apt-get update` failed: {res.stderr.strip()[-500:]}")


def resolve_package(*, allow_update: bool = True) -> tuple[str, str]:
    """(package, version) of the image `linux-image-amd64` depends on now, as apt's lists say."""
    for attempt in (0, 1):
        dep = _run(["apt-cache", "depends", META_PACKAGE])
        if dep.returncode == 0 and "Depends:" in dep.stdout:
            package = parse_apt_depends(dep.stdout)
            show = _run(["apt-cache", "show", "--no-all-versions", package])
            if show.returncode == 0:
                return package, parse_apt_version(show.stdout)
        if attempt == 0 and allow_update:
            _apt_update()
            continue
        break
    raise PrepareError(
        f"apt does not know {META_PACKAGE}: is this Debian amd64 with Debian's apt sources? "
        f"({dep.stderr.strip()[-300:]})"
    )


def _dir_name(package: str, version: str) -> str:
    return f"{package}_{version}".replace(":", "%3a")


def load_prepared(cache: Path | None = None) -> GuestKernel:
    """The kernel recorded by the last `prepare()`, checked to be complete; else `VmNotPrepared`."""
    cache = cache or cache_dir()
    meta = cache / _CURRENT
    if not meta.is_file():
        raise VmNotPrepared(f"no guest kernel in {cache}: {SETUP_HINT}")
    try:
        data = json.loads(meta.read_text())
        kernel = GuestKernel(data["package"], data["version"], data["release"], Path(data["root"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise VmNotPrepared(f"{meta} is unreadable ({exc}): {SETUP_HINT}") from exc
    missing = kernel.problems()
    if missing:
        raise VmNotPrepared(f"the guest kernel in {cache} is incomplete (missing {missing[0]}): {SETUP_HINT}")
    return kernel


def _write_current(cache: Path, kernel: GuestKernel) -> None:
    data = asdict(kernel)
    data["root"] = str(kernel.root)
    tmp = cache / (_CURRENT + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(cache / _CURRENT)


def _unpack(package: str, version: str, dest: Path, work: Path) -> str:
    """Download and unpack `package=version` into `dest` (atomically); returns the kernel release."""
    res = _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=work)
    if res.returncode != 0:
        # The lists may be older than the mirror (the old .deb is gone): refresh once and retry.
        _apt_update()
        res = _run(["apt-get", "download", "-q", f"{package}={version}"], cwd=work)
    if res.returncode != 0:
        raise PrepareError(f"`apt-get download {package}={version}` failed: {res.stderr.strip()[-500:]}")
    debs = sorted(work.glob("*.deb"))
    if len(debs) != 1:
        raise PrepareError(f"`apt-get download` left {len(debs)} .deb files in {work}, expected 1")
    tree = work / "tree"
    res = _run(["dpkg", "-x", str(debs[0]), str(tree)])
    if res.returncode != 0:
        raise PrepareError(f"`dpkg -x {debs[0].name}` failed: {res.stderr.strip()[-500:]}")
    release = release_of(tree)
    if not (tree / "lib" / "modules" / release).is_dir():
        # A merged-/usr package: give depmod and the guest the classic path too.
        (tree / "lib").mkdir(exist_ok=True)
        (tree / "lib" / "modules").symlink_to("../usr/lib/modules")
    res = _run(["depmod", "-b", str(tree), release])
    if res.returncode != 0:
        raise PrepareError(f"`depmod -b {tree} {release}` failed: {res.stderr.strip()[-500:]}")
    tree.rename(dest)
    return release


def prepare(cache: Path | None = None, *, force: bool = False) -> GuestKernel:
    """Make the current Debian kernel available in the cache; a no-op when it already is."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    arch = _run(["dpkg", "--print-architecture"]).stdout.strip()
    if arch != "amd64":
        raise PrepareError(f"the VM harness needs a Debian amd64 host (this one is {arch or 'unknown'})")
    try:
        package, version = resolve_package()
    except PrepareError as exc:
        # Offline with a usable cache: keep what we have rather than fail.
        try:
            kernel = load_prepared(cache)
        except VmNotPrepared:
            raise exc from None
        log.warning(
            "vm: cannot resolve %s (%s); keeping %s %s", META_PACKAGE, exc, kernel.package, kernel.version
        )
        return kernel
    dest = cache / "kernels" / _dir_name(package, version)
    if not force:
        try:
            kernel = load_prepared(cache)
        except VmNotPrepared:
            pass
        else:
            if (kernel.package, kernel.version, kernel.root) == (package, version, dest):
                log.info("vm: %s %s already unpacked in %s", package, version, dest)
                return kernel
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("vm: fetching %s %s into %s", package, version, dest)
    with tempfile.TemporaryDirectory(prefix="unpack-", dir=dest.parent) as work:
        release = _unpack(package, version, dest, Path(work))
    kernel = GuestKernel(package, version, release, dest)
    missing = kernel.problems()
    if missing:
        raise PrepareError(f"the unpacked {package} lacks {missing[0]}")
    _write_current(cache, kernel)
    for old in (cache / "kernels").iterdir():
        if old != dest and not old.name.startswith("unpack-"):
            log.info("vm: removing the superseded kernel %s", old.name)
            shutil.rmtree(old, ignore_errors=True)
    return kernel
