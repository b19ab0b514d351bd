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
the bytes with `os.pread`; later epochs skip HDF5 entirely. Any other layout (chunked, compressed,
variable-length) is read through h5py as usual. `benchmarks/bench_data.py` measures both paths.

A single scoring pass over a large file (`locate_crops` -> `CropRanges`) finds every crop's byte range
first, in one pass, and keeps the ids, offsets and sizes in numpy arrays: nothing per crop is a Python
object, and HDF5's key index is closed and released before the loader workers start.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from lesionstack.data.decode import CorruptImageError, ImageTooLargeError, decode_image

_UNSEEN = object()  # a crop whose location has not been looked up yet (None means "read through h5py")

__all__ = ["CorruptImageError", "CropRanges", "H5Images", "ImageFileError", "ImageTooLargeError", "decode_jpeg",
           "list_ids", "locate_crops"]


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
    """Hand the memory that listing or looking up HDF5 keys left behind back to the OS: HDF5's free lists
    (`H5garbage_collect`) and the heap's freed pages (glibc's `malloc_trim`; elsewhere nothing). Measured on
    a 500,000-key file, listing and looking up every key, then closing it: +54 MB left with `malloc_trim`
    alone, +15 MB with both (14 MB of which are the ids, offsets and sizes kept)."""
    import ctypes

    try:  # dlsym on h5py's extension finds the HDF5 library it is linked to
        ctypes.CDLL(h5py.h5.__file__).H5garbage_collect()
    except (OSError, AttributeError, TypeError):
        pass
    # libc through the process's own symbols: ctypes.util.find_library runs `ldconfig` in a child process,
    # and such a child (spawned by vfork) reports this process's peak RSS as its own
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS, Windows): nothing to do
        pass


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ImageFileError(f"{path}: not a readable HDF5 file ({err})") from err


def _plain_location(file: h5py.File, key: bytes) -> tuple[int, int] | None:
    """Byte offset and size of the dataset `key` when it is a contiguous, unfiltered fixed-length string
    scalar (as the competition stores every crop); None for anything else. KeyError when there is none."""
    try:
        dsid = h5py.h5d.open(file.id, key)
    except (KeyError, ValueError, TypeError) as err:
        raise KeyError(key.decode(errors="replace")) from err
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


def _read_value(file: h5py.File, key: str, path: Path) -> bytes:
    """A crop's bytes read through h5py (any layout: chunked, compressed, variable-length, uint8 array)."""
    value = file[key][()]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:  # some re-packs store uint8 arrays
        return value.tobytes()
    raise CorruptImageError(key, f"expected JPEG bytes, found {type(value).__name__}", path)


def _as_bytes_array(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """isic_ids as one fixed-width bytes array (|S<n>, UTF-8): ~12 bytes a crop, no Python object per crop."""
    arr = np.asarray(ids)
    if arr.dtype.kind == "S":
        return arr
    return np.char.encode(arr.astype(str), "utf-8") if len(arr) else np.empty(0, "S1")


def list_ids(path: str | os.PathLike[str]) -> np.ndarray:
    """Every isic_id in an HDF5 image file (sorted, as HDF5 stores them) as a fixed-width bytes array;
    the file is closed and what listing cached is released before it returns (a Python list of 500,000
    ids is 33 MB; this is 6 MB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    with _open(path) as file:
        chunks, chunk = [], []
        for name in file.id:  # one name at a time, packed every 65,536
            chunk.append(name)
            if len(chunk) == 65_536:
                chunks.append(np.array(chunk, dtype="S"))
                chunk = []
        chunks.append(np.array(chunk, dtype="S") if chunk else np.empty(0, "S1"))
    width = max(c.dtype.itemsize for c in chunks)
    ids = np.concatenate([c.astype(f"S{width}") for c in chunks])
    release_freed_memory()
    return ids


class CropRanges:
    """Where each crop of `ids` lies in one HDF5 file, as arrays: the reader of a single scoring pass.

    Made by `locate_crops` in one pass over the keys, after which HDF5's key index is closed and released.
    A DataLoader worker that receives it reads each crop with `os.pread(offset, size)`, touching neither
    h5py nor a Python object per crop; a crop stored any other way (chunked, compressed, variable-length:
    offset -1) is read through h5py, opened in that process on first need."""

    def __init__(self, path: Path, ids: np.ndarray, offsets: np.ndarray, sizes: np.ndarray) -> None:
        self.path, self.ids, self.offsets, self.sizes = path, ids, offsets, sizes
        self._fd: int | None = None
        self._h5: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_h5": None, "_pid": None}

    def id(self, index: int) -> str:
        return self.ids[index].decode()

    def read_bytes(self, index: int) -> bytes:
        """The stored bytes of crop `index` (a position in `ids`)."""
        if self._pid != os.getpid():  # first read in this process (a fork's handles are not its own)
            self._fd, self._h5, self._pid = os.open(self.path, os.O_RDONLY), None, os.getpid()
        offset = int(self.offsets[index])
        if offset >= 0:
            # h5py drops a fixed-length string's NUL padding; so do we (a JPEG ends in FF D9)
            return os.pread(self._fd, int(self.sizes[index]), offset).rstrip(b"\0")  # type: ignore[arg-type]
        if self._h5 is None:
            self._h5 = _open(self.path)
        return _read_value(self._h5, self.id(index), self.path)

    def close(self) -> None:
        if self._pid == os.getpid():
            os.close(self._fd)  # type: ignore[arg-type]
            if self._h5 is not None:
                self._h5.close()
        self._fd = self._h5 = self._pid = None


def locate_crops(path: str | os.PathLike[str], ids: Sequence[str] | np.ndarray) -> CropRanges:
    """The byte range of every crop of `ids` (any order, repeats allowed), found in one pass; KeyError
    naming how many ids have no crop and the first three. The file is reopened every 65,536 lookups and
    closed at the end, with what HDF5 cached released (`release_freed_memory`): what stays is ~28 bytes
    per crop in three arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    keys = _as_bytes_array(ids)
    offsets, sizes = np.full(len(keys), -1, np.int64), np.zeros(len(keys), np.int64)
    missing, examples = 0, []  # a count and the first three: not a list as long as the file
    for start in range(0, len(keys), 65_536):
        with _open(path) as file:
            for i in range(start, min(start + 65_536, len(keys))):
                try:
                    location = _plain_location(file, keys[i].tobytes())
                except KeyError as err:
                    missing += 1
                    examples = examples if len(examples) == 3 else [*examples, err.args[0]]
                    continue
                if location is not None:
                    offsets[i], sizes[i] = location
        release_freed_memory()
    if missing:
        raise KeyError(f"{path}: no crop for {missing} id(s), e.g. {examples}")
    return CropRanges(path, keys, offsets, sizes)


class H5Images:
    """Lazy, picklable reader of a competition HDF5 image file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Each crop's byte range is remembered after its first read (training reads every crop each epoch;
        a single scoring pass uses `locate_crops` instead)."""
        self.path = Path(path)
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
            self._h5 = _open(self.path)
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
            return _plain_location(self._file(), isic_id.encode())
        except KeyError as err:
            raise KeyError(f"{self.path}: no image with key '{isic_id}'") from err

    def read_bytes(self, isic_id: str) -> bytes:
        """The stored JPEG bytes of one crop."""
        self._file()
        location = self._locations.get(isic_id, _UNSEEN)
        if location is _UNSEEN:
            location = self._locations[isic_id] = self._locate(isic_id)
        if location is not None:
            # h5py drops a fixed-length string's NUL padding; so do we (a JPEG ends in FF D9)
            return os.pread(self._fd, location[1], location[0]).rstrip(b"\0")  # type: ignore[arg-type]
        return _read_value(self._file(), isic_id, self.path)

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
