"""Backing stores for emulated disks: where the blocks of a mass-storage LUN live.

A store is a flat array of bytes whose size is a whole number of blocks. The SCSI target (`scsi.py`) talks
to stores through `Store` only; the stores know nothing about SCSI or USB. Offsets and lengths are in bytes
(positioned I/O, no file position), so one store may serve any number of callers without seeking.

- `ImageStore`: a raw disk image (or block device) through `os.pread`/`os.pwrite` on one file descriptor.
- `OverlayStore`: copy-on-write over a read-only base image; the base is never modified.
- `create_sparse_image`: make a new all-zero image of a given size without allocating its blocks.

Every deliberate failure is a `StorageError` naming the path, so the CLI can print one clear line.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

from emulator.devices.base import DeviceError, FileRegion

DEFAULT_BLOCK_SIZE = 512
# Below this a region is not worth its own syscall: pread + one sendmsg beats sendmsg + sendfile.
MIN_REGION = 16 * 1024


class StorageError(DeviceError):
    """A backing store could not be opened, created, read or written."""


def _check_block_size(block_size: int) -> None:
    if block_size < 512 or block_size & (block_size - 1):
        raise StorageError(f"block size {block_size} is not a power of two of at least 512")


class Store(ABC):
    """A fixed-size array of blocks with positioned byte I/O.

    `size` is in bytes and always a multiple of `block_size`. `pread`/`pwrite` take byte offsets and must
    stay inside `size` (the caller, the SCSI target, has already range-checked them; a store raises
    `StorageError` rather than silently growing or truncating). `flush` makes acknowledged writes durable.
    """

    size: int
    block_size: int
    read_only: bool
    name: str

    @property
    def block_count(self) -> int:
        return self.size // self.block_size

    @abstractmethod
    def pread(self, offset: int, length: int) -> bytes:
        """Return exactly `length` bytes starting at byte `offset`."""

    def region(self, offset: int, length: int) -> bytes | FileRegion:
        """The bytes at `offset`, or a `FileRegion` for them when this store is a file an edge can send
        without reading it into Python (`ImageStore`); other stores read them."""
        return self.pread(offset, length)

    @abstractmethod
    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at byte `offset`."""

    @abstractmethod
    def flush(self) -> None:
        """Make every write so far durable (SYNCHRONIZE CACHE, eject, close)."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store; idempotent."""

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise StorageError(
                f"{self.name}: access of {length} bytes at offset {offset} is outside the {self.size}-byte store"
            )

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "ro" if self.read_only else "rw"
        return f"<{type(self).__name__} {self.name} {self.size} bytes {mode}>"


def _open_image(path: Path, read_only: bool) -> int:
    """Open `path` for positioned I/O, turning every OS refusal into a StorageError naming the path."""
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise StorageError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise StorageError(f"{path}: is a directory, not a disk image") from None
    except PermissionError:
        hint = "" if read_only else " (open it read-only, or fix its permissions)"
        raise StorageError(f"{path}: permission denied{hint}") from None
    except OSError as exc:
        raise StorageError(f"{path}: cannot open image: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise StorageError(f"{path}: is a directory, not a disk image")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise StorageError(f"{path}: not a regular file or block device")
        # A shared lock for readers, an exclusive one for a writer: two servers writing one image (or one
        # writing under a copy-on-write overlay's base) would corrupt it silently.
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StorageError(f"{path}: image is in use by another store (locked)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class ImageStore(Store):
    """A raw image file (or block device) as a store; `read_only` opens it O_RDONLY and refuses writes."""

    def __init__(
        self, path: str | os.PathLike[str], read_only: bool = False, *, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        _check_block_size(block_size)
        self.path = Path(path)
        self.name = str(self.path)
        self.read_only = read_only
        self.block_size = block_size
        self._fd: int | None = None
        fd = _open_image(self.path, read_only)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            if size == 0:
                raise StorageError(f"{self.path}: image is empty")
            if size % block_size:
                raise StorageError(
                    f"{self.path}: size {size} is not a multiple of the {block_size}-byte block size"
                )
        except BaseException:
            os.close(fd)
            raise
        self.size = size
        self._fd = fd

    @property
    def closed(self) -> bool:
        return self._fd is None

    def _live_fd(self) -> int:
        if self._fd is None:
            raise StorageError(f"{self.path}: store is closed")
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        fd = self._fd
        if fd is None:
            fd = self._live_fd()  # raises
        if offset < 0 or length < 0 or offset + length > self.size:
            self._check_range(offset, length)  # raises
        try:
            data = os.pread(fd, length, offset)
            if len(data) == length:
                return data
            # Short reads only happen if the file shrank under us or on odd block devices; finish or fail.
            parts = [data]
            got = len(data)
            while got < length:
                more = os.pread(fd, length - got, offset + got)
                if not more:
                    raise StorageError(f"{self.path}: unexpected end of image at offset {offset + got}")
                parts.append(more)
                got += len(more)
            return b"".join(parts)
        except OSError as exc:
            raise StorageError(f"{self.path}: read error at offset {offset}: {exc.strerror or exc}") from exc

    def region(self, offset: int, length: int) -> bytes | FileRegion:
        # Read-only only: sendfile queues the page cache pages themselves, so on a writable image the next
        # command could rewrite them before a pipelining peer has read the earlier READ's data.
        fd = self._fd
        if fd is None or length < MIN_REGION or not self.read_only:
            return self.pread(offset, length)
        if offset < 0 or offset + length > self.size:
            self._check_range(offset, length)  # raises
        return FileRegion(fd, offset, length)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        fd = self._live_fd()
        if self.read_only:
            raise StorageError(f"{self.path}: store is read-only")
        self._check_range(offset, len(data))
        view = memoryview(data)
        try:
            while view:
                done = os.pwrite(fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise StorageError(f"{self.path}: write error at offset {offset}: {exc.strerror or exc}") from exc

    def flush(self) -> None:
        fd = self._live_fd()
        if self.read_only:
            return
        try:
            os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"{self.path}: fsync failed: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            fd, self._fd = self._fd, None
            os.close(fd)


class OverlayStore(Store):
    """Copy-on-write over a base image that is opened read-only and never modified.

    Written blocks live in an anonymous sparse temporary file (created in `tmp_dir`, default the system
    temp dir, and unlinked at once, so nothing is left behind even after a crash) at the same offsets as in
    the base; a per-block dirty map in memory says which blocks come from the overlay. The map is kept per
    region of `REGION_BLOCKS` blocks and only for regions that were written, so memory grows with what
    was written, not with the disk size. Writes smaller than a block copy the rest of the block up from
    the base first. Everything written is discarded on `close()`: the overlay is a scratch disk.
    """

    REGION_BLOCKS = 2048

    def __init__(
        self,
        base_path: str | os.PathLike[str],
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        tmp_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.base = ImageStore(base_path, read_only=True, block_size=block_size)
        self.name = f"{self.base.name} (copy-on-write)"
        self.size = self.base.size
        self.block_size = block_size
        self.read_only = False
        try:
            self._overlay = tempfile.TemporaryFile(dir=tmp_dir, prefix="vusb-overlay-")  # noqa: SIM115
            os.ftruncate(self._overlay.fileno(), self.size)
        except OSError as exc:
            self.base.close()
            where = tmp_dir if tmp_dir is not None else tempfile.gettempdir()
            raise StorageError(f"{where}: cannot create the overlay file: {exc.strerror or exc}") from None
        self._fd: int | None = self._overlay.fileno()
        # region index -> one byte per block of the region, 1 where the overlay holds the block
        self._dirty: dict[int, bytearray] = {}

    @property
    def dirty_blocks(self) -> int:
        """How many blocks have been written (and so are served from the overlay)."""
        return sum(bm.count(1) for bm in self._dirty.values())

    def _live_fd(self) -> int:
        if self._fd is None:
            raise StorageError(f"{self.name}: store is closed")
        return self._fd

    def _runs(self, first: int, last: int) -> list[tuple[bool, int, int]]:
        """Split blocks [first, last) into maximal runs of (dirty, start, end)."""
        runs: list[tuple[bool, int, int]] = []
        rb = self.REGION_BLOCKS
        block = first
        while block < last:
            region, index = divmod(block, rb)
            end_index = min(rb, index + (last - block))
            bm = self._dirty.get(region)
            if bm is None:
                run = (False, block, block + end_index - index)
                block = run[2]
            else:
                flag = bm[index]
                stop = bm.find(0 if flag else 1, index, end_index)
                stop = end_index if stop < 0 else stop
                run = (bool(flag), block, block + stop - index)
                block = run[2]
            if runs and runs[-1][0] == run[0] and runs[-1][2] == run[1]:
                runs[-1] = (run[0], runs[-1][1], run[2])
            else:
                runs.append(run)
        return runs

    def _is_dirty(self, block: int) -> bool:
        bm = self._dirty.get(block // self.REGION_BLOCKS)
        return bm is not None and bm[block % self.REGION_BLOCKS] == 1

    def _mark_dirty(self, first: int, last: int) -> None:
        rb = self.REGION_BLOCKS
        block = first
        while block < last:
            region, index = divmod(block, rb)
            end_index = min(rb, index + (last - block))
            bm = self._dirty.get(region)
            if bm is None:
                bm = self._dirty[region] = bytearray(rb)
            bm[index:end_index] = b"\x01" * (end_index - index)
            block += end_index - index

    def _overlay_pread(self, offset: int, length: int) -> bytes:
        fd = self._live_fd()
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            raise StorageError(f"{self.name}: overlay read error: {exc.strerror or exc}") from exc
        if len(data) != length:
            raise StorageError(f"{self.name}: overlay file is truncated")
        return data

    def region(self, offset: int, length: int) -> bytes | FileRegion:
        """Blocks never written come from the base, which is read-only: a region of it when all are."""
        bs = self.block_size
        if length >= MIN_REGION and self._fd is not None and not offset % bs and not length % bs:
            self._check_range(offset, length)
            runs = self._runs(offset // bs, (offset + length) // bs)
            if len(runs) == 1 and not runs[0][0]:
                return self.base.region(offset, length)
        return self.pread(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        self._live_fd()
        self._check_range(offset, length)
        if length == 0:
            return b""
        bs = self.block_size
        if not self._dirty:
            return self.base.pread(offset, length)
        end = offset + length
        parts = []
        for dirty, start, stop in self._runs(offset // bs, -(-end // bs)):
            lo = max(start * bs, offset)
            hi = min(stop * bs, end)
            parts.append(self._overlay_pread(lo, hi - lo) if dirty else self.base.pread(lo, hi - lo))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        fd = self._live_fd()
        self._check_range(offset, len(data))
        if not data:
            return
        bs = self.block_size
        end = offset + len(data)
        first, last = offset // bs, -(-end // bs)
        try:
            # Copy up the untouched parts of partially written edge blocks so the overlay holds whole blocks.
            for block in {first, last - 1}:
                lo, hi = block * bs, (block + 1) * bs
                if (offset > lo or end < hi) and not self._is_dirty(block):
                    os.pwrite(fd, self.base.pread(lo, bs), lo)
            view = memoryview(data)
            pos = offset
            while view:
                done = os.pwrite(fd, view, pos)
                view = view[done:]
                pos += done
        except OSError as exc:
            raise StorageError(f"{self.name}: overlay write error: {exc.strerror or exc}") from exc
        self._mark_dirty(first, last)

    def flush(self) -> None:
        """Nothing to make durable: the overlay is discarded on close and the base is never written."""
        self._live_fd()

    def close(self) -> None:
        if self._fd is None:
            return
        self._fd = None
        self._dirty.clear()
        try:
            self._overlay.close()
        finally:
            self.base.close()

    @property
    def closed(self) -> bool:
        return self._fd is None


_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Parse "64M", "1G", "512k", "4096" or "2GiB" (binary units) into bytes."""
    match = _SIZE_RE.match(text)
    if not match or (match.group(3) and not match.group(2) and match.group(3).lower() == "ib"):
        raise StorageError(f"{text!r} is not a size (examples: 64M, 1G, 4096)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def create_sparse_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    overwrite: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Path:
    """Create an all-zero image of `size` bytes that occupies (almost) no disk space until written.

    Refuses to replace an existing file unless `overwrite` is set; `size` must be a positive multiple of
    `block_size` so the result is a valid `ImageStore`.
    """
    _check_block_size(block_size)
    path = Path(path)
    if size <= 0 or size % block_size:
        raise StorageError(f"{path}: image size {size} is not a positive multiple of {block_size} bytes")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise StorageError(f"{path}: already exists (refusing to overwrite it)") from None
    except FileNotFoundError:
        raise StorageError(f"{path.parent}: no such directory") from None
    except IsADirectoryError:
        raise StorageError(f"{path}: is a directory") from None
    except PermissionError:
        raise StorageError(f"{path}: permission denied") from None
    except OSError as exc:
        raise StorageError(f"{path}: cannot create image: {exc.strerror or exc}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        if not overwrite:
            path.unlink(missing_ok=True)  # do not leave a half-made image behind
        if exc.errno in (errno.EFBIG, errno.EINVAL):
            raise StorageError(f"{path}: size {size} is too large for this filesystem") from None
        raise StorageError(f"{path}: cannot size image: {exc.strerror or exc}") from None
    os.close(fd)
    return path
