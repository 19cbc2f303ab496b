"""Read an HDF5 file whatever state its writer left it in, in bounded time, and write one atomically.

A process killed while it has a file open for (SWMR) writing leaves the superblock's "open for
write" flags set and possibly a stale end-of-file address; HDF5 then refuses every normal open
("file is already open for write"), and its SWMR reader retries failing metadata checksums in a
sleep loop that never ends on a corrupt file. `read_image` reads the file's bytes, clears the
flags and sets the end-of-file address in a copy of the superblock held in memory (the file on
disk is not touched), and opens that image read-only without SWMR: a damaged file fails at once
with HDF5's own message instead of hanging. Only superblock versions 2 and 3 (libver "latest",
as every file of ours) have the flags; older ones are opened unchanged.
"""
from __future__ import annotations

import io
import os
import struct
from typing import Any, Iterator

import h5py

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_MASK = 0xFFFFFFFF


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _MASK


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 `hashlittle`, the checksum of HDF5 metadata (superblock v2/v3)."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _MASK
    k = 0
    while n - k > 12:
        x, y, z = struct.unpack_from("<III", data, k)
        a, b, c = (a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 4); c = (c + b) & _MASK
        b = (b - a) & _MASK; b ^= _rot(a, 6); a = (a + c) & _MASK
        c = (c - b) & _MASK; c ^= _rot(b, 8); b = (b + a) & _MASK
        a = (a - c) & _MASK; a ^= _rot(c, 16); c = (c + b) & _MASK
        b = (b - a) & _MASK; b ^= _rot(a, 19); a = (a + c) & _MASK
        c = (c - b) & _MASK; c ^= _rot(b, 4); b = (b + a) & _MASK
        k += 12
    if n == k:
        return c
    x, y, z = struct.unpack("<III", data[k:].ljust(12, b"\0"))
    a, b, c = (a + x) & _MASK, (b + y) & _MASK, (c + z) & _MASK
    c ^= b; c = (c - _rot(b, 14)) & _MASK
    a ^= c; a = (a - _rot(c, 11)) & _MASK
    b ^= a; b = (b - _rot(a, 25)) & _MASK
    c ^= b; c = (c - _rot(b, 16)) & _MASK
    a ^= c; a = (a - _rot(c, 4)) & _MASK
    b ^= a; b = (b - _rot(a, 14)) & _MASK
    c ^= b; c = (c - _rot(b, 24)) & _MASK
    return c


def released(image: bytes) -> tuple[bytes, bool]:
    """(the image with the superblock's write flags cleared and its end-of-file address set to
    the image's length, whether the flags were set). Raises OSError when it is not HDF5."""
    if image[:8] != SIGNATURE:
        raise OSError("not an HDF5 file (no signature at offset 0)")
    version, size_offsets = image[8], image[9]
    if version < 2:
        return image, False
    if size_offsets != 8:
        raise OSError(f"unsupported superblock (offsets of {size_offsets} bytes)")
    end = 12 + 4 * 8  # flags byte at 11; base, extension, end-of-file, root addresses; checksum
    if len(image) < end + 4:
        raise OSError("truncated superblock")
    if struct.unpack_from("<I", image, end)[0] != lookup3(image[:end]):
        raise OSError("superblock checksum mismatch")
    was_open = image[11] != 0
    head = bytearray(image[:end])
    head[11] = 0
    base = struct.unpack_from("<Q", head, 12)[0]
    struct.pack_into("<Q", head, 28, len(image) - base)
    return bytes(head) + struct.pack("<I", lookup3(bytes(head))) + image[end + 4:], was_open


def read_image(path: str) -> tuple[h5py.File, bool]:
    """(the file opened read-only from a released in-memory image, whether its writer had left it
    open). Raises OSError naming nothing: callers add the path."""
    with open(path, "rb") as f:
        image, was_open = released(f.read())
    return h5py.File(io.BytesIO(image), "r"), was_open


def walk(f: h5py.File) -> Iterator[tuple[str, Any]]:
    """(path, object) of every group and dataset below the root, parents first."""
    names: list[str] = []
    f.visit(names.append)
    for name in names:
        yield name, f[name]


def write_atomically(path: str, fill: Any) -> None:
    """Create `path` by calling fill(h5py.File) on a new file built in memory, then writing its
    bytes to a temporary file next to `path`, flushing it to disk and renaming it into place: a
    kill or a full disk leaves the old file as it was, and a failed write is a plain OSError
    (HDF5 itself never meets the full disk, which would leave its library state broken)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", libver="latest") as f:
        fill(f)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(buf.getbuffer())
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
