"""Read lesion crops from the competition's HDF5 files.

Each file holds one dataset per `isic_id`, a `numpy.bytes_` scalar of JPEG bytes (`h5[isic_id][()]`).
`H5Images` opens the file lazily, once per process: an h5py handle can neither be pickled nor shared
across a fork, so a DataLoader worker that receives the object opens its own handle on first use.
Crops are decoded by `lesionstack.data.decode.decode_image` (libjpeg-turbo through simplejpeg, several
times faster than Pillow), straight at a reduced scale (DCT scaling) when the model wants a smaller image,
and under its pixel cap, so one oversized crop cannot take the memory.

Reading one small dataset through h5py's high-level API costs about 160 us, more than decoding it. The
competition files store each crop as a contiguous, unfiltered fixed-length string, so the reader asks
HDF5 once for the byte offset and size of a crop (about 20 us, through the low-level API) and then reads
the bytes as a slice of a read-only memory map of the file; later epochs skip HDF5 entirely. Any other
layout (chunked, compressed, variable-length) is read through h5py as usual. `benchmarks/bench_data.py`
measures both paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from lesionstack.data.decode import CorruptImageError, ImageTooLargeError, decode_image

_UNSEEN = object()  # a crop whose location has not been looked up yet (None means "read through h5py")

__all__ = ["CorruptImageError", "H5Images", "ImageFileError", "ImageTooLargeError", "decode_jpeg"]


class ImageFileError(OSError):
    """An image file (HDF5) that is missing, truncated or not HDF5; the message names the file."""


def decode_jpeg(data: bytes, isic_id: str, min_side: int | None = None,
                path: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Decode a crop's bytes (JPEG, or any format `decode_image` sniffs) to an (H, W, 3) uint8 RGB array.

    With `min_side`, libjpeg decodes at the smallest of the scales 1/8..1 that keeps both sides at least
    `min_side` pixels, which skips most of the work when the model's input is much smaller than the crop.
    The pixel limits of `lesionstack.data.decode` apply: an oversized crop is decoded at a reduced scale
    or refused (`ImageTooLargeError`, a `CorruptImageError`), never held at full size.
    """
    return decode_image(data, min_side=min_side, where=isic_id, path=path)


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the OS (glibc's `malloc_trim`; elsewhere nothing). Listing or
    looking up the keys of a 500,000-crop file leaves ~50 MB of freed fragments in the heap that the process
    would otherwise keep for the rest of its run (measured: +97 MB after listing the keys, +47 MB after the
    trim, 33 MB of which is the list of ids itself)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing to do
        pass


class H5Images:
    """Lazy, picklable reader of a competition HDF5 image file."""

    def __init__(self, path: str | os.PathLike[str], cache_locations: bool = True) -> None:
        """`cache_locations`: remember each crop's byte range after its first read (training reads every crop
        each epoch); off for a single pass over a large file (scoring: nothing kept per crop)."""
        self.path = Path(path)
        self.cache_locations = cache_locations
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: image file not found")
        self._h5: h5py.File | None = None
        self._fd: int | None = None
        self._pid: int | None = None
        self._ids: list[str] | None = None
        # isic_id -> (byte offset, size), or None where the crop must be read through HDF5
        self._locations: dict[str, tuple[int, int] | None] = {}

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():  # first use in this process (or after a fork)
            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as err:
                raise ImageFileError(f"{self.path}: not a readable HDF5 file ({err})") from err
            # pread, not a memory map: every page a map touches stays in this process's RSS, so one pass
            # over the 3.5 GB of a 500,000-crop file grew it by ~14 kB per crop (a pread costs ~3 us more)
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_h5=None, _fd=None, _pid=None)
        return state

    @property
    def ids(self) -> list[str]:
        """All isic_ids in the file (sorted, as HDF5 stores them)."""
        if self._ids is None:
            self._ids = list(self._file().keys())
        return self._ids

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, isic_id: object) -> bool:
        return isinstance(isic_id, str) and isic_id in self._file()

    def _locate(self, isic_id: str) -> tuple[int, int] | None:
        """Byte offset and size of a contiguous, unfiltered fixed-length string; None for anything else."""
        try:
            dsid = h5py.h5d.open(self._file().id, isic_id.encode())
        except (KeyError, ValueError) as err:
            raise KeyError(f"{self.path}: no image with key '{isic_id}'") from err
        plist, dtype = dsid.get_create_plist(), dsid.get_type()
        plain = (
            plist.get_layout() == h5py.h5d.CONTIGUOUS
            and plist.get_nfilters() == 0
            and dtype.get_class() == h5py.h5t.STRING
            and not dtype.is_variable_str()
            and dsid.shape == ()
        )
        offset = dsid.get_offset() if plain else None
        return None if offset is None else (offset, dsid.get_storage_size())

    def read_bytes(self, isic_id: str) -> bytes:
        """The stored JPEG bytes of one crop."""
        self._file()
        location = self._locations.get(isic_id, _UNSEEN)
        if location is _UNSEEN:
            location = self._locate(isic_id)
            if self.cache_locations:
                self._locations[isic_id] = location
        if location is not None:
            # h5py drops a fixed-length string's NUL padding; so do we (a JPEG ends in FF D9)
            return os.pread(self._fd, location[1], location[0]).rstrip(b"\0")  # type: ignore[arg-type]
        value = self._file()[isic_id][()]
        if isinstance(value, (bytes, np.bytes_)):
            return bytes(value)
        if isinstance(value, np.ndarray) and value.dtype == np.uint8:  # some re-packs store uint8 arrays
            return value.tobytes()
        raise CorruptImageError(isic_id, f"expected JPEG bytes, found {type(value).__name__}", self.path)

    def read(self, isic_id: str, min_side: int | None = None, max_side: int | None = None) -> np.ndarray:
        """One crop as an (H, W, 3) uint8 RGB array (`min_side`, `max_side`: see `decode_image`)."""
        return decode_image(self.read_bytes(isic_id), min_side=min_side, max_side=max_side, where=isic_id,
                            path=self.path)

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            self._h5.close()
            os.close(self._fd)  # type: ignore[arg-type]
        self._h5 = self._fd = self._pid = None

    def __enter__(self) -> H5Images:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"H5Images({str(self.path)!r})"
