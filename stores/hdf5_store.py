"""HDF5 backend (``*.h5`` / ``*.hdf5``) through h5py.

HDF5 keeps B-trees, heaps and object headers in the file, and a process killed while the
library rewrites them can leave a file that no longer opens. So this backend makes every
write after creation a plain overwrite of raw data bytes that are already allocated:

- every dataset is contiguous, fixed-size and allocated at creation (``ALLOC_TIME_EARLY``),
  without filters, so writing clips never allocates or moves anything;
- strings written later (failure reasons) are fixed-width bytes, not variable-length
  strings, which would allocate in the global heap on every write;
- attributes and the variable-length video ids are written once, at creation, in a temporary
  file that is renamed into place when complete.

The commit protocol is the zarr one with flush and fsync as the barrier: write the clips and
the per-video fields, ``flush`` (HDF5's buffers to the kernel: enough against a SIGKILL), and
when the commit comes (spool.stores._common, "Durability") ``fsync`` (the kernel's pages to
the disk: needed against a power loss, where the kernel may write the page holding the status
byte before those holding the clips), write the status bytes, ``flush``, ``fsync``. A SIGKILL
or a power loss leaves the metadata untouched and at most partly written videos whose status
byte is not DONE.

Because patches are contiguous, clip ``i`` lies at a fixed byte offset and reads go through a
numpy memmap of the file rather than h5py (see docs/benchmarks.md, "Store reads").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from spool.stores._common import (
    ClipWriter,
    SlotStore,
    check_replaceable,
    ERROR_BYTES,
    WriterLock,
    as_indices,
    check_schema_attrs,
    clip_tables,
    expected_arrays,
    fill_value,
    fsync_paths,
    output_buffer,
)
from spool.stores.base import StoreError


def lock_path(path: Path) -> Path:
    return Path(f"{path}.lock")


def read_h5_attrs(path: Path) -> dict[str, Any] | None:
    """The Spool attributes of an HDF5 file (each stored JSON-encoded), or None if not HDF5."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return {k: json.loads(v) for k, v in f.attrs.items()}
    except (OSError, ValueError, TypeError):
        return None


def _h5_dtype(name: str, spec_dtype: str) -> Any:
    if name == "video_id":
        return h5py.string_dtype("utf-8")
    if name == "error":
        return np.dtype(f"S{ERROR_BYTES}")
    return np.dtype(spec_dtype).newbyteorder("<")


def _create_dataset(f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any, data: np.ndarray | None) -> None:
    if data is not None:
        f.create_dataset(name, data=data, dtype=dtype, track_times=False)
        return
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    # Allocate now so later writes only overwrite bytes in place (see the module docstring).
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    fill = fill_value(name)
    big = name in ("patches", "cls")
    f.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        fillvalue=b"" if name == "error" else fill,
        # Feature slots are left as holes of a sparse file (reading as zeros) rather than written.
        fill_time="never" if big else "alloc",
        track_times=False,
        dcpl=dcpl,
    )


def create_hdf5(
    path: Path,
    attrs: dict[str, Any],
    video_ids: list[str],
    labels: np.ndarray,
    splits: np.ndarray,
    overwrite: bool,
) -> "HDF5FeatureStore":
    path = Path(path)
    lock = WriterLock(lock_path(path), path)  # same lock for the old and the new file
    try:
        check_replaceable(path, overwrite, read_h5_attrs)
        C, T, L, D = (int(attrs[k]) for k in ("clips_per_video", "num_frames", "num_tokens", "dim"))
        specs = expected_arrays(len(video_ids), C, T, L, D)
        static = clip_tables(labels, splits, C)
        static["video_id"] = np.array(video_ids, dtype=object)
        tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
        try:
            # libver "earliest": superblock v0, which has no "open for writing" flag a kill leaves set.
            with h5py.File(tmp, "w", libver="earliest", locking=False) as f:
                for k, v in attrs.items():
                    f.attrs[k] = json.dumps(v)
                for name, spec in specs.items():
                    _create_dataset(f, name, spec.shape, _h5_dtype(name, spec.dtype), static.get(name))
            fsync_paths([tmp])  # complete on the disk before its name appears
            os.replace(tmp, path)  # atomic: a kill leaves the old file or the complete new one
            fsync_paths([path.parent])
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except BaseException:
        lock.release()
        raise
    return HDF5FeatureStore(path, "a", _lock=lock)


def _open_writer(path: Path) -> h5py.File:
    """Open for writing without HDF5's sieve buffer, so every raw write reaches the file (or
    fails, e.g. on a full disk) in the call that makes it. With the buffer, a failed flush
    leaves dirty data that HDF5 retries at close and again at exit, where it crashes."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_sieve_buf_size(0)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)  # h5py.File's defaults
    fapl.set_file_locking(False, ignore_when_disabled=False)  # locking=False, see HDF5FeatureStore.__init__
    return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl))


class HDF5FeatureStore(SlotStore):
    def __init__(self, path: str | Path, mode: str = "r", *, _lock: WriterLock | None = None):
        self.path = Path(path)
        self.mode = mode
        if mode not in ("r", "a"):
            raise StoreError(f"mode must be 'r' (read) or 'a' (append/resume), got {mode!r}")
        self._lock = _lock
        self._file: h5py.File | None = None
        self._start_commits()
        try:
            if mode == "a" and self._lock is None:
                self._lock = WriterLock(lock_path(self.path), self.path)
            try:
                # HDF5's own file lock is off: writers are serialised by our lock file, and readers
                # must be able to open while `spool extract` writes (and within the same process).
                self._file = _open_writer(self.path) if mode == "a" else h5py.File(self.path, "r", locking=False)
            except OSError as e:
                raise StoreError(
                    f"{self.path} cannot be opened as HDF5 ({e}); create it with `spool extract SRC --out {self.path}`"
                ) from None
            try:
                self.attrs = {k: json.loads(v) for k, v in self._file.attrs.items()}
            except (TypeError, ValueError):
                raise StoreError(f"{self.path} is not a Spool feature store (attributes are not JSON)") from None
            check_schema_attrs(self.attrs, self.path)
            self._ds = self._check_datasets()
            self._mm = {name: self._memmap(name) for name in ("patches", "cls")}
        except BaseException:
            self.close()
            raise

    def _check_datasets(self) -> dict[str, h5py.Dataset]:
        f = self._file
        return self._checked_arrays(
            lambda name: f[name] if name in f and isinstance(f[name], h5py.Dataset) else None, string_kinds="OS", noun="dataset"
        )

    def _memmap(self, name: str) -> np.memmap | None:
        """A read-only view of a contiguous, unfiltered dataset's bytes, else None (use h5py)."""
        ds = self._ds[name]
        offset = ds.id.get_offset()
        if ds.chunks is not None or offset is None or ds.dtype != np.dtype("<f2") or ds.size == 0:
            return None
        return np.memmap(self.path, dtype="<f2", mode="r", offset=offset, shape=ds.shape)

    # --- shape -------------------------------------------------------------------------------
    @property
    def num_videos(self) -> int:
        return int(self._ds["video_id"].shape[0])

    # --- reading -----------------------------------------------------------------------------
    def _column(self, name: str) -> np.ndarray:
        data = self._ds[name][:]
        if name in ("video_id", "error"):  # variable-length / fixed-width UTF-8
            return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in data], dtype=object)
        return data

    def _read_clips(self, name: str, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None) -> np.ndarray:
        idx = as_indices(clip_indices, self.num_clips, self.path)
        ds = self._ds[name]
        out = output_buffer(out, (idx.size, *ds.shape[1:]), self.path)
        mm = self._mm.get(name)
        for k, i in enumerate(idx):
            if mm is not None:
                out[k] = mm[i]  # a clip is one contiguous run of bytes in the file
            else:
                ds.read_direct(out, np.s_[int(i)], np.s_[k])
        return out

    # --- writing -----------------------------------------------------------------------------
    def _writable(self) -> dict[str, h5py.Dataset]:
        if self.mode != "a" or self._lock is None or self._file is None:
            raise StoreError(f"{self.path} is open read-only (or closed); open it with mode='a' to write")
        return self._ds

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.id.get_vfd_handle())  # the sec2 driver's descriptor of this file

    def _status_of(self, video_index: int) -> int:
        return int(self._ds["status"][video_index])

    def _write_status(self, video_indices: np.ndarray, status: np.ndarray) -> None:
        d = self._writable()
        for v, st in zip(video_indices.tolist(), status.tolist()):  # bytes in place; no allocation
            d["status"][v] = st
        self._file.flush()

    def _write_slots(self, video_index: int, patches: Any, cls: Any, frame_indices: Any, num_frames: int, fps: float, error: str) -> None:
        d = self._writable()
        C = self.clips_per_video
        s = video_index * C
        d["patches"][s : s + C] = patches
        d["cls"][s : s + C] = cls
        d["frame_indices"][s : s + C] = frame_indices
        d["num_frames"][video_index] = int(num_frames)
        d["fps"][video_index] = float(fps)
        d["error"][video_index] = error.encode("utf-8")
        self._file.flush()  # to the kernel now: a SIGKILL cannot lose it; the commit's fsync puts it on the disk

    def _write_columns(self, columns: dict[str, np.ndarray]) -> None:
        d = self._writable()
        for name, values in columns.items():
            if name == "error":
                values = np.array([str(e).encode("utf-8") for e in values], dtype=d["error"].dtype)
            d[name][...] = values
            self._sync()  # ordering barrier, as in commit

    def clip_writer(self) -> "HDF5ClipWriter":
        offsets = {}
        for name in ("patches", "cls"):
            ds = self._ds[name]
            if ds.chunks is not None or ds.id.get_offset() is None or ds.dtype != np.dtype("<f2"):
                raise StoreError(
                    f"{self.path}: {name} is not one contiguous float16 block, so shards cannot write it side by side; "
                    "extract it without --shard, or re-create it with this Spool"
                )
            offsets[name] = (ds.id.get_offset(), self.clips_per_video * int(np.prod(ds.shape[1:])) * 2)
        return HDF5ClipWriter(self.path, offsets)

    def close(self) -> None:
        self._mm = {}
        try:
            if self._file is not None and self._lock is not None:
                self._close_commits()
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None
            if self._lock is not None:
                self._lock.release()
                self._lock = None


class HDF5ClipWriter(ClipWriter):
    """Clip slots only, written with ``pwrite`` at their fixed byte offsets, bypassing the HDF5
    library: datasets are contiguous and allocated at creation, so this is exactly the raw data
    write h5py would make, and no file metadata is read or written by shards at all."""

    def __init__(self, path: Path, offsets: dict[str, tuple[int, int]]):
        self.path = Path(path)
        self._offsets = offsets  # name -> (dataset offset, bytes per video)
        self._fd: int | None = os.open(self.path, os.O_WRONLY)

    def write(self, video_index: int, patches: np.ndarray, cls: np.ndarray) -> None:
        for name, data in (("patches", patches), ("cls", cls)):
            offset, per_video = self._offsets[name]
            buf = memoryview(np.ascontiguousarray(data, dtype="<f2")).cast("B")
            if len(buf) != per_video:
                raise StoreError(f"{self.path}: {name} of video {video_index} is {len(buf)} bytes, the slot holds {per_video}")
            pos, done = offset + video_index * per_video, 0
            while done < len(buf):  # pwrite may write less than asked
                done += os.pwrite(self._fd, buf[done:], pos + done)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
