"""The seal of a sparse volume: only allocated extents are read, the values are unchanged."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vhost_pv.cli import EXIT_CHECK, EXIT_OK, main
from vhost_pv.volume.header import VolumeHeader
from vhost_pv.volume.seal import check_seal, compute_seal, read_seal, write_seal
from vhost_pv.volume.volume import CreateOptions, create_volume

GiB = 1 << 30
MiB = 1 << 20


def reference_digests(fd: int, header: VolumeHeader, chunk: int) -> list[bytes]:
    """The seal as it was computed before holes were skipped: every byte read."""
    digests = []
    for start in range(0, header.capacity, chunk):
        length = min(chunk, header.capacity - start)
        data = os.pread(fd, length, header.data_offset + start)
        digests.append(hashlib.sha256(data + bytes(length - len(data))).digest())
    return digests


@pytest.fixture
def sparse(tmp_path: Path) -> Iterator[tuple[Path, int, VolumeHeader]]:
    """A sparse 1 GiB volume with a few written places (one spanning a chunk boundary)."""
    path = tmp_path / "vol.img"
    header = create_volume(path, CreateOptions(size=GiB, ring_size=MiB, allowed_uids=(os.getuid(),)))
    fd = os.open(path, os.O_RDWR)
    for offset in (0, 5 * MiB + 123, 64 * MiB - 7, 700 * MiB, GiB - 4096):
        os.pwrite(fd, os.urandom(4096)[: min(4096, GiB - offset)], header.data_offset + offset)
    try:
        yield path, fd, header
    finally:
        os.close(fd)


def test_sparse_seal_equals_the_full_read_seal(sparse: tuple[Path, int, VolumeHeader]) -> None:
    _, fd, header = sparse
    started = time.monotonic()
    seal = compute_seal(fd, header)
    print(f"sealed a sparse 1 GiB volume in {time.monotonic() - started:.3f} s")
    assert seal.digests == reference_digests(fd, header, seal.chunk_size)


def test_only_chunks_with_data_are_read(sparse: tuple[Path, int, VolumeHeader],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _, fd, header = sparse
    reads: list[int] = []
    real_pread = os.pread

    def counting_pread(f: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(f, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    seal = compute_seal(fd, header)
    chunks = {(offset - header.data_offset) // seal.chunk_size for offset in reads}
    touched = (0, 5 * MiB + 123, 64 * MiB - 7, 64 * MiB, 700 * MiB, GiB - 4096)
    written = {o // seal.chunk_size for o in touched}
    # A file system may report a little more as data (whole blocks), never less.
    assert written <= chunks
    assert len(chunks) <= 2 * len(written) < len(seal.digests)


def _small_volume(tmp_path: Path) -> tuple[int, VolumeHeader]:
    """64 MiB with data near the start only: small enough to read in full quickly."""
    path = tmp_path / "small.img"
    header = create_volume(path, CreateOptions(size=64 * MiB, ring_size=MiB, allowed_uids=(os.getuid(),)))
    fd = os.open(path, os.O_RDWR)
    os.pwrite(fd, os.urandom(8192), header.data_offset + 3 * MiB)
    return fd, header


@pytest.mark.parametrize("failure", [errno.EINVAL, errno.EOPNOTSUPP])
def test_without_seek_data_everything_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              failure: int) -> None:
    fd, header = _small_volume(tmp_path)
    real_lseek = os.lseek
    reads: list[int] = []
    real_pread = os.pread

    def no_seek_data(f: int, offset: int, whence: int) -> int:
        if whence in (os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(failure, os.strerror(failure))
        return real_lseek(f, offset, whence)

    def counting_pread(f: int, n: int, offset: int) -> bytes:
        reads.append(offset)
        return real_pread(f, n, offset)

    monkeypatch.setattr(os, "lseek", no_seek_data)
    monkeypatch.setattr(os, "pread", counting_pread)
    try:
        seal = compute_seal(fd, header)
        assert len(reads) == len(seal.digests)  # every chunk read, as before
        monkeypatch.undo()
        assert seal.digests == reference_digests(fd, header, seal.chunk_size)
    finally:
        os.close(fd)


def test_enxio_means_zeros_from_there_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENXIO from SEEK_DATA: nothing but holes after the offset (also past EOF)."""
    fd, header = _small_volume(tmp_path)
    real_lseek = os.lseek
    cutoff = header.data_offset + 8 * MiB  # no data was written after this

    def enxio_late(f: int, offset: int, whence: int) -> int:
        if whence == os.SEEK_DATA and offset >= cutoff:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return real_lseek(f, offset, whence)

    monkeypatch.setattr(os, "lseek", enxio_late)
    try:
        seal = compute_seal(fd, header)
        monkeypatch.undo()
        assert seal.digests == reference_digests(fd, header, seal.chunk_size)
    finally:
        os.close(fd)


def test_tampering_with_one_byte_reports_that_chunk(sparse: tuple[Path, int, VolumeHeader],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path, fd, header = sparse
    seal = compute_seal(fd, header)
    write_seal(fd, seal)
    stored = read_seal(fd, header)
    assert stored is not None and stored.digests == seal.digests
    assert check_seal(fd, header, stored).changed_chunks == []
    assert main(["verify", str(path)]) == EXIT_OK
    assert "unchanged" in capsys.readouterr().out

    # One byte in a chunk that was a hole: it becomes allocated and must be seen.
    target = 300 * MiB + 17
    os.pwrite(fd, b"\x01", header.data_offset + target)
    assert check_seal(fd, header, stored).changed_chunks == [target // seal.chunk_size]
    assert main(["verify", "--json", str(path)]) == EXIT_CHECK
    report = json.loads(capsys.readouterr().out)
    start = target // seal.chunk_size * seal.chunk_size
    assert report["changed_chunks"] == [target // seal.chunk_size]
    assert report["changed_ranges"] == [{"offset": start, "length": seal.chunk_size}]
