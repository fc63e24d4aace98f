"""Zarr v3 directory backend (``*.zarr``).

Crash safety rests on one property of zarr 3.1's LocalStore, checked in its source
(``zarr/storage/_local.py``: ``_atomic_write``): every chunk and metadata document is written
to ``<key>.<uuid>.partial`` and renamed over the key. A SIGKILL therefore leaves each chunk
either old or new, never torn, and the commit protocol only needs ordering: a video's clip
chunks are written (and renamed) before the status chunk that says DONE. A killed writer may
leave ``*.partial`` files; the next writer removes them when it opens the store.

For a power loss, ordering the writes is not enough: the kernel may write the status chunk
to the disk before the clip chunks. So every chunk file a video's write touches is noted,
and ``_sync`` fsyncs them and the directories leading to them (new chunk directories,
renamed entries) before the statuses are written (spool.stores._common, "Durability").

Reads of patches and cls bypass zarr: their chunks are uncompressed, one clip per chunk, so a
clip is ``readinto`` straight from its chunk file (see docs/benchmarks.md, "Store reads").
Stores whose chunks are compressed or laid out differently fall back to zarr indexing.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.codecs import BytesCodec

from spool.stores._common import (
    ClipWriter,
    SlotStore,
    check_replaceable,
    VIDEO_CHUNK,
    WriterLock,
    as_indices,
    check_schema_attrs,
    clip_tables,
    expected_arrays,
    fill_value,
    fsync_paths,
    output_buffer,
    sync_tree,
    with_directories,
)
from spool.stores.base import DONE, StoreError

LOCK_NAME = ".spool-writer.lock"
# Populate the mapping in one go rather than page fault by page fault (Linux only).
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def read_group_attrs(path: Path) -> dict[str, Any] | None:
    """The group attributes of a zarr v3 directory, or None if ``path`` is not one."""
    meta = Path(path) / "zarr.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("node_type") != "group":
        return None
    return dict(doc.get("attributes", {}))


def _array_kwargs(name: str, spec_shape: tuple[int, ...], clips_per_video: int) -> dict[str, Any]:
    if name in ("patches", "cls"):
        # One uncompressed chunk per clip: float16 features barely compress, and raw chunks
        # let read_patches map a clip's chunk file and copy it out, bypassing zarr.
        return dict(chunks=(1, *spec_shape[1:]), compressors=None)
    rows = VIDEO_CHUNK * (clips_per_video if name in ("label", "video_index", "view_index", "split", "frame_indices") else 1)
    return dict(chunks=(min(rows, spec_shape[0]), *spec_shape[1:]))


def chunk_files(root: Path, name: str, arr: zarr.Array, start: int, stop: int) -> list[Path]:
    """The chunk files of array ``name`` that hold rows ``start:stop`` (whether they exist or not)."""
    if stop <= start:
        return []
    rows = arr.chunks[0]
    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    rest = itertools.product(*(range(math.ceil(n / c)) for n, c in zip(arr.shape[1:], arr.chunks[1:])))
    rest = list(rest)
    return [root / name / encode((i, *r)) for i in range(start // rows, (stop - 1) // rows + 1) for r in rest]


def create_zarr(
    path: Path,
    attrs: dict[str, Any],
    video_ids: list[str],
    labels: np.ndarray,
    splits: np.ndarray,
    overwrite: bool,
) -> "ZarrFeatureStore":
    path = Path(path)
    old_lock = None
    if check_replaceable(path, overwrite, read_group_attrs):
        old_lock = WriterLock(path / LOCK_NAME, path)  # refuse while another writer is at work

    # Build next to the target and rename into place, so a kill during creation never leaves
    # a half-made store at ``path``.
    tmp = path.parent / f".{path.name}.creating-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    C, T, L, D = (int(attrs[k]) for k in ("clips_per_video", "num_frames", "num_tokens", "dim"))
    specs = expected_arrays(len(video_ids), C, T, L, D)
    static = clip_tables(labels, splits, C)
    try:
        group = zarr.create_group(store=str(tmp), zarr_format=3, attributes=attrs)
        with warnings.catch_warnings():
            # Variable-length strings have no final zarr v3 spec yet; zarr warns on every use.
            warnings.simplefilter("ignore")
            for name, spec in specs.items():
                dtype = str if spec.dtype == "str" else spec.dtype
                arr = group.create_array(
                    name, shape=spec.shape, dtype=dtype, fill_value=fill_value(name), **_array_kwargs(name, spec.shape, C)
                )
                if name in static:
                    arr[:] = static[name]
                elif name == "video_id":
                    arr[:] = np.array(video_ids, dtype=object)
        new_lock = WriterLock(tmp / LOCK_NAME, path)  # flock follows the inode through the rename
        sync_tree(tmp)  # complete on the disk before its name appears
        if old_lock is not None:
            trash = path.parent / f".{path.name}.deleting-{os.getpid()}"
            os.rename(path, trash)
            os.rename(tmp, path)
            old_lock.release()
            shutil.rmtree(trash)
        else:
            os.rename(tmp, path)
        fsync_paths([path.parent])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for lock in (old_lock, locals().get("new_lock")):
            if lock is not None:
                lock.release()
        raise
    return ZarrFeatureStore(path, "a", _lock=new_lock)


class ZarrFeatureStore(SlotStore):
    def __init__(self, path: str | Path, mode: str = "r", *, _lock: WriterLock | None = None):
        self.path = Path(path)
        self.mode = mode
        if mode not in ("r", "a"):
            raise StoreError(f"mode must be 'r' (read) or 'a' (append/resume), got {mode!r}")
        attrs = read_group_attrs(self.path)
        if attrs is None:
            raise StoreError(
                f"{self.path} is not a Spool feature store (no readable zarr.json); create it with "
                f"`spool extract SRC --out {self.path}`"
            )
        check_schema_attrs(attrs, self.path)
        self.attrs = attrs
        self._lock = _lock
        self._start_commits()
        self._written: set[Path] = set()  # chunk files written since the last _sync
        if mode == "a" and self._lock is None:
            self._lock = WriterLock(self.path / LOCK_NAME, self.path)
        try:
            if mode == "a":
                self._remove_partial_files()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._group = zarr.open_group(str(self.path), mode="r+" if mode == "a" else "r", zarr_format=3)
            self._arrays = self._check_arrays()
        except BaseException:
            self.close()
            raise
        self._raw = {name: self._raw_chunk_ok(name) for name in ("patches", "cls")}

    # --- opening ----------------------------------------------------------------------------
    def _check_arrays(self) -> dict[str, zarr.Array]:
        g = self._group
        return self._checked_arrays(
            lambda name: g[name] if name in g and isinstance(g[name], zarr.Array) else None, string_kinds="TUO", noun="array"
        )

    def _raw_chunk_ok(self, name: str) -> bool:
        """Whether clips of ``name`` can be read straight from their chunk files."""
        arr = self._arrays[name]
        codecs = arr.metadata.codecs
        return (
            len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and codecs[0].endian is not None
            and codecs[0].endian.value == "little"
            and tuple(arr.chunks) == (1, *arr.shape[1:])
            and float(arr.fill_value) == 0.0
        )

    def _remove_partial_files(self) -> None:
        # Leftovers of a killed writer's tmp-then-rename chunk writes; never valid data.
        for root, _dirs, files in os.walk(self.path):
            for f in files:
                if f.endswith(".partial"):
                    os.unlink(os.path.join(root, f))

    # --- shape -------------------------------------------------------------------------------
    @property
    def num_videos(self) -> int:
        return int(self._arrays["video_id"].shape[0])

    # --- reading -----------------------------------------------------------------------------
    def _column(self, name: str) -> np.ndarray:
        data = self._arrays[name][:]
        return np.asarray(data).astype(object) if name in ("video_id", "error") else data

    def _read_clips(self, name: str, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None) -> np.ndarray:
        arr = self._arrays[name]
        idx = as_indices(clip_indices, self.num_clips, self.path)
        out = output_buffer(out, (idx.size, *arr.shape[1:]), self.path)
        if not self._raw[name]:
            for k, i in enumerate(idx):
                out[k] = arr[int(i)]
            return out
        # Each clip's chunk file is mapped and copied into ``out``, one after the other:
        # measured faster than zarr (even batched), than readinto and than a thread pool on
        # a 2-core box (docs/benchmarks.md, "Store reads").
        nbytes = out[0].nbytes if idx.size else 0
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
        zeros = (0,) * (arr.ndim - 1)
        base = self.path / name
        for k, i in enumerate(idx):
            chunk = base / encode((int(i), *zeros))
            try:
                fd = os.open(chunk, os.O_RDONLY)
            except FileNotFoundError:
                # zarr drops chunks equal to the fill value, so a missing chunk reads as zeros;
                # but backbone features are never all zero, so for a DONE video it is damage,
                # and training on the zeros would be a silent wrong result.
                self._check_missing_chunk(name, int(i), chunk)
                out[k] = 0
                continue
            try:
                size = os.fstat(fd).st_size
                if size != nbytes:
                    raise StoreError(f"{chunk}: chunk holds {size} bytes, expected {nbytes}; the store is damaged")
                with mmap.mmap(fd, nbytes, flags=_MAP_FLAGS, prot=mmap.PROT_READ) as m:
                    out[k] = np.frombuffer(m, dtype="<f2").reshape(out.shape[1:])
            finally:
                os.close(fd)
        return out

    def _check_missing_chunk(self, name: str, clip: int, chunk: Path) -> None:
        video = clip // self.clips_per_video
        if int(self._arrays["status"][video]) != DONE:
            return  # a pending or failed video's clips are zeros by design
        video_id = self._arrays["video_id"][video]
        raise StoreError(
            f"{chunk}: the {name} chunk of clip {clip} (video {video_id!r}) is missing, but the video is DONE: the "
            f"store is damaged. `spool verify --repair {self.path}` marks the damaged videos pending; then re-run "
            "the same `spool extract` command to extract them again"
        )

    # --- writing -----------------------------------------------------------------------------
    def _writable(self) -> dict[str, zarr.Array]:
        if self.mode != "a" or self._lock is None:
            raise StoreError(f"{self.path} is open read-only (or closed); open it with mode='a' to write")
        return self._arrays

    def _note(self, name: str, start: int, stop: int) -> None:
        self._written.update(chunk_files(self.path, name, self._arrays[name], start, stop))

    def _sync(self) -> None:
        fsync_paths(with_directories(self._written, self.path))
        self._written.clear()

    def _status_of(self, video_index: int) -> int:
        return int(self._arrays["status"][video_index])

    def _write_status(self, video_indices: np.ndarray, status: np.ndarray) -> None:
        # one renamed chunk per 1024 videos: each is written whole or not at all
        self._writable()["status"].set_orthogonal_selection((video_indices,), status)
        rows = self._arrays["status"].chunks[0]
        for chunk in np.unique(video_indices // rows):
            self._note("status", int(chunk) * rows, int(chunk) * rows + 1)

    def _write_slots(self, video_index: int, patches: Any, cls: Any, frame_indices: Any, num_frames: int, fps: float, error: str) -> None:
        a = self._writable()
        C = self.clips_per_video
        s = video_index * C
        a["patches"][s : s + C] = patches  # all zeros (a failed video): zarr drops the chunks
        a["cls"][s : s + C] = cls
        a["frame_indices"][s : s + C] = frame_indices
        a["num_frames"][video_index] = int(num_frames)
        a["fps"][video_index] = float(fps)
        a["error"][video_index] = error
        for name in ("patches", "cls", "frame_indices"):
            self._note(name, s, s + C)
        for name in ("num_frames", "fps", "error"):
            self._note(name, video_index, video_index + 1)

    def _write_columns(self, columns: dict[str, np.ndarray]) -> None:
        a = self._writable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # variable-length strings, see create_zarr
            for name, values in columns.items():
                a[name][:] = np.asarray(values, dtype=object) if name in ("video_id", "error") else values
                self._note(name, 0, a[name].shape[0])
                self._sync()  # the ordering barrier, as in commit

    def clip_writer(self) -> "ZarrClipWriter":
        return ZarrClipWriter(self.path, self.clips_per_video)

    def close(self) -> None:
        try:
            if self._lock is not None:
                self._close_commits()
        finally:
            if self._lock is not None:
                self._lock.release()
                self._lock = None


class ZarrClipWriter(ClipWriter):
    """Clip slots only. Each clip is its own chunk file, written to a temporary name and renamed
    (module docstring), so shards writing other videos never touch the same file."""

    def __init__(self, path: Path, clips_per_video: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(path), mode="r+", zarr_format=3)
        self.path = Path(path)
        self._patches, self._cls = group["patches"], group["cls"]
        self._C = clips_per_video
        self._written: set[Path] = set()

    def write(self, video_index: int, patches: np.ndarray, cls: np.ndarray) -> None:
        s = video_index * self._C
        self._patches[s : s + self._C] = patches  # all zeros (a failed video): zarr drops the chunks
        self._cls[s : s + self._C] = cls
        for name, arr in (("patches", self._patches), ("cls", self._cls)):
            self._written.update(chunk_files(self.path, name, arr, s, s + self._C))

    def sync(self) -> None:
        fsync_paths(with_directories(self._written, self.path))
        self._written.clear()

    def close(self) -> None:
        self._patches = self._cls = None
