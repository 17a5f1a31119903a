"""Backing stores: image files, the copy-on-write overlay, new sparse images, size strings."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.devices import storage
from emulator.devices.storage import (
    ImageStore,
    OverlayStore,
    StorageError,
    create_sparse_image,
    parse_size,
)
from emulator.errors import VusbError

BS = 512


def make_image(path: Path, blocks: int = 64, fill: bytes | None = None) -> Path:
    data = fill if fill is not None else bytes(i % 251 for i in range(blocks * BS))
    path.write_bytes(data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- ImageStore -------------------------------------------------------------------------------------------


def test_storage_error_is_a_vusb_error() -> None:
    assert issubclass(StorageError, VusbError)


def test_image_store_reads_what_the_file_holds(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    with ImageStore(image) as store:
        assert store.size == 64 * BS
        assert store.block_count == 64
        assert store.pread(3 * BS + 7, 100) == image.read_bytes()[3 * BS + 7 : 3 * BS + 107]


def test_image_store_writes_are_in_the_file_after_reopen(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    store = ImageStore(image)
    store.pwrite(5 * BS, b"\xaa" * BS)
    store.close()
    with ImageStore(image) as again:
        assert again.pread(5 * BS, BS) == b"\xaa" * BS
    assert image.read_bytes()[5 * BS : 6 * BS] == b"\xaa" * BS


def test_image_store_missing_path_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    with pytest.raises(StorageError, match=r"nope\.img: no such image file"):
        ImageStore(missing)


@pytest.mark.parametrize("read_only", [False, True])
def test_image_store_refuses_a_directory(tmp_path: Path, read_only: bool) -> None:
    with pytest.raises(StorageError, match="is a directory"):
        ImageStore(tmp_path, read_only=read_only)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_image_store_permission_denied_names_the_path(tmp_path: Path) -> None:
    image = make_image(tmp_path / "locked.img")
    image.chmod(0o444)
    with pytest.raises(StorageError, match=r"locked\.img: permission denied"):
        ImageStore(image)
    with ImageStore(image, read_only=True) as store:  # read-only still works
        assert store.read_only


def test_image_store_permission_error_from_open_becomes_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = make_image(tmp_path / "disk.img")

    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(storage.os, "open", deny)
    with pytest.raises(StorageError, match=r"disk\.img: permission denied"):
        ImageStore(image)


def test_image_store_size_not_a_block_multiple_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "odd.img"
    image.write_bytes(b"\0" * (BS * 3 + 1))
    with pytest.raises(StorageError, match=r"odd\.img: size 1537 is not a multiple of the 512-byte block"):
        ImageStore(image)


def test_image_store_empty_file_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "empty.img"
    image.touch()
    with pytest.raises(StorageError, match="empty"):
        ImageStore(image)


def test_image_store_honours_a_larger_block_size(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", blocks=16)  # 8 KiB
    with ImageStore(image, block_size=4096) as store:
        assert store.block_count == 2
    with pytest.raises(StorageError, match="power of two"):
        ImageStore(image, block_size=1000)


def test_image_store_read_only_refuses_writes_and_keeps_the_file(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    before = sha256(image)
    with ImageStore(image, read_only=True) as store, pytest.raises(StorageError, match="read-only"):
        store.pwrite(0, b"x" * BS)
    assert sha256(image) == before


def test_image_store_access_outside_the_image_is_an_error(tmp_path: Path) -> None:
    with ImageStore(make_image(tmp_path / "disk.img")) as store:
        with pytest.raises(StorageError, match="outside"):
            store.pread(store.size - 10, 11)
        with pytest.raises(StorageError, match="outside"):
            store.pwrite(store.size, b"x")


def test_image_store_flush_fsyncs_and_close_flushes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(storage.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    store = ImageStore(make_image(tmp_path / "disk.img"))
    store.pwrite(0, b"y" * BS)
    store.flush()
    assert len(synced) == 1
    store.close()
    assert len(synced) == 2
    store.close()  # idempotent
    assert len(synced) == 2
    with pytest.raises(StorageError, match="closed"):
        store.pread(0, 1)


def test_a_second_writer_on_the_same_image_is_refused(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    with ImageStore(image):
        with pytest.raises(StorageError, match="in use"):
            ImageStore(image)
        with pytest.raises(StorageError, match="in use"):
            OverlayStore(image)
    with ImageStore(image, read_only=True), ImageStore(image, read_only=True):
        pass  # readers share


# --- OverlayStore -----------------------------------------------------------------------------------------


def test_overlay_leaves_the_base_image_unchanged(tmp_path: Path) -> None:
    image = make_image(tmp_path / "base.img")
    before = sha256(image)
    with OverlayStore(image) as store:
        assert not store.read_only
        store.pwrite(0, b"\x11" * (8 * BS))
        store.pwrite(30 * BS + 5, b"\x22" * 700)  # unaligned, spans two blocks
        store.flush()
        assert store.pread(0, 8 * BS) == b"\x11" * (8 * BS)
        assert sha256(image) == before
    assert sha256(image) == before


def test_overlay_partial_block_write_keeps_the_rest_of_the_block_from_the_base(tmp_path: Path) -> None:
    image = make_image(tmp_path / "base.img")
    base = image.read_bytes()
    with OverlayStore(image) as store:
        store.pwrite(2 * BS + 100, b"\xee" * 10)
        expected = base[2 * BS : 2 * BS + 100] + b"\xee" * 10 + base[2 * BS + 110 : 3 * BS]
        assert store.pread(2 * BS, BS) == expected
        assert store.dirty_blocks == 1
        # A second partial write to the same block must not copy the base up again over the first.
        store.pwrite(2 * BS, b"\xdd" * 4)
        assert store.pread(2 * BS, BS) == b"\xdd" * 4 + expected[4:]


def test_overlay_read_spanning_clean_and_dirty_blocks(tmp_path: Path) -> None:
    image = make_image(tmp_path / "base.img")
    base = bytearray(image.read_bytes())
    with OverlayStore(image) as store:
        store.pwrite(3 * BS, b"\x01" * BS)
        store.pwrite(5 * BS, b"\x02" * (2 * BS))
        base[3 * BS : 4 * BS] = b"\x01" * BS
        base[5 * BS : 7 * BS] = b"\x02" * (2 * BS)
        assert store.pread(BS + 17, 8 * BS) == bytes(base[BS + 17 : 9 * BS + 17])


def test_overlay_dirty_map_crosses_region_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(OverlayStore, "REGION_BLOCKS", 4)
    image = make_image(tmp_path / "base.img", blocks=16)
    base = bytearray(image.read_bytes())
    with OverlayStore(image) as store:
        store.pwrite(3 * BS, b"\x09" * (6 * BS))  # blocks 3..8 over regions 0, 1 and 2
        base[3 * BS : 9 * BS] = b"\x09" * (6 * BS)
        assert store.dirty_blocks == 6
        assert store.pread(0, 16 * BS) == bytes(base)


def test_overlay_of_a_missing_base_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=r"gone\.img: no such image file"):
        OverlayStore(tmp_path / "gone.img")


def test_overlay_temp_file_is_not_left_behind(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with OverlayStore(make_image(tmp_path / "base.img"), tmp_dir=scratch) as store:
        store.pwrite(0, b"z" * BS)
        assert list(scratch.iterdir()) == []  # unlinked at creation


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    writes=st.lists(
        st.tuples(st.integers(0, 16 * BS - 1), st.binary(min_size=1, max_size=3 * BS)),
        min_size=1,
        max_size=12,
    )
)
def test_overlay_behaves_like_a_plain_byte_array(tmp_path: Path, writes: list[tuple[int, bytes]]) -> None:
    image = tmp_path / "prop.img"
    make_image(image, blocks=16)
    model = bytearray(image.read_bytes())
    before = sha256(image)
    with OverlayStore(image) as store:
        for offset, data in writes:
            data = data[: store.size - offset]
            store.pwrite(offset, data)
            model[offset : offset + len(data)] = data
        assert store.pread(0, store.size) == bytes(model)
        assert store.pread(BS - 3, 5 * BS) == bytes(model[BS - 3 : 6 * BS - 3])
    assert sha256(image) == before


# --- create_sparse_image / parse_size ---------------------------------------------------------------------


def test_create_sparse_image_makes_a_zero_image_of_the_size(tmp_path: Path) -> None:
    path = create_sparse_image(tmp_path / "new.img", 64 << 20)
    assert path.stat().st_size == 64 << 20
    assert path.stat().st_blocks * 512 < 1 << 20  # sparse: nothing allocated yet
    with ImageStore(path) as store:
        assert store.block_count == (64 << 20) // BS
        assert store.pread(store.size - BS, BS) == bytes(BS)


def test_create_sparse_image_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = make_image(tmp_path / "keep.img")
    before = sha256(path)
    with pytest.raises(StorageError, match=r"keep\.img: already exists"):
        create_sparse_image(path, 1 << 20)
    assert sha256(path) == before
    create_sparse_image(path, 1 << 20, overwrite=True)
    assert path.stat().st_size == 1 << 20
    assert path.read_bytes()[:BS] == bytes(BS)


@pytest.mark.parametrize("size", [0, -512, 1000])
def test_create_sparse_image_refuses_sizes_that_are_not_whole_blocks(tmp_path: Path, size: int) -> None:
    with pytest.raises(StorageError, match="not a positive multiple of 512"):
        create_sparse_image(tmp_path / "bad.img", size)
    assert not (tmp_path / "bad.img").exists()


def test_create_sparse_image_in_a_missing_directory_names_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such directory"):
        create_sparse_image(tmp_path / "no" / "where.img", 1 << 20)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4096", 4096),
        ("64M", 64 << 20),
        ("1g", 1 << 30),
        ("512k", 512 << 10),
        ("2GiB", 2 << 30),
        ("3MB", 3 << 20),
    ],
)
def test_parse_size_understands_binary_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "12X", "1.5G", "-1M", "10iB"])
def test_parse_size_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(StorageError, match="is not a size"):
        parse_size(text)
