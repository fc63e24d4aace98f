"""Parts both backends share: the expected arrays, attribute building, the fingerprint,
input checks, the writer lock and the commit protocol (``SlotStore``).

Durability (docs/reliability.md, "Power loss"): a commit, a video's status, is written only
after the data it points to is on disk (fsynced), and is fsynced itself before ``commit``
returns. Commits are batched: a finished video's status is held back and written with the
others of the last ``COMMIT_INTERVAL_S`` seconds, so the fsyncs cost one round per second,
not one per video."""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import abc
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from spool.stores.base import (
    DONE, FAILED, NO_SPLIT, PENDING, SCHEMA_VERSION, SPLIT_CODES, ClipTable, FeatureStore, StoreBusyError, StoreError,
    VideoTable,
)

# Attributes that describe how or when a store was made, not what it holds: they are left
# out of the fingerprint so re-running the same extraction gives the same fingerprint.
# Callers should put the command line under "command".
NON_CONTENT_ATTRS = ("created_at", "command", "command_line", "argv", "hostname", "spool_version", "fingerprint")

# Attributes create_store adds; the caller's attrs may not set them.
SCHEMA_ATTRS = ("schema_version", "spool_version", "clips_per_video", "num_frames", "num_tokens", "dim", "class_names")

# Per-video arrays are chunked by this many videos (per-clip small arrays by this many videos'
# clips), so committing one video rewrites one small chunk, not the whole table.
VIDEO_CHUNK = 1024

# Failure reasons are truncated to this many UTF-8 bytes (HDF5 keeps them fixed-width so
# that marking a video failed never allocates file metadata).
ERROR_BYTES = 512


# Seconds a finished video's status may wait before it is committed (with the others of that
# time). A power loss, or a kill, loses at most this much finished work: those videos are
# still pending, and a re-run extracts them again.
COMMIT_INTERVAL_S = 1.0


def fsync_paths(paths: Iterable[str | Path]) -> None:
    """fsync every file and directory in ``paths``, several at once: the filesystem folds
    concurrent fsyncs into one journal commit (ext4: 162 files and directories in 35 ms this
    way, 0.5 s one after the other; docs/benchmarks.md, "Durability"). A path that no longer
    exists is skipped: zarr deletes a chunk that holds only the fill value, and the fsync of
    its directory, which the caller passes too, makes the deletion durable."""
    paths = list(dict.fromkeys(paths))
    if len(paths) <= 1:
        for p in paths:
            _fsync(p)
        return
    with ThreadPoolExecutor(min(16, len(paths))) as pool:
        for _ in pool.map(_fsync, paths):  # re-raises the first error (EIO: the data may be lost)
            pass


def _fsync(path: str | Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def with_directories(files: Iterable[Path], root: Path) -> set[Path]:
    """``files`` and every directory from each one's parent up to ``root``: a new file is
    durable only once the directory entries that lead to it are (fsync(2), NOTES)."""
    out = set()
    for f in files:
        out.add(f)
        d = f.parent
        while d != root and root in d.parents:
            out.add(d)
            d = d.parent
        out.add(root)
    return out


def sync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (a store just built, before it is renamed
    into place)."""
    paths = [Path(d) / f for d, _, fs in os.walk(root) for f in fs] + [Path(d) for d, _, _ in os.walk(root)]
    fsync_paths(paths)


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype string; "str" for text
    per: str  # "clip" or "video": which index its first axis counts


def expected_arrays(num_videos: int, clips_per_video: int, T: int, L: int, D: int) -> dict[str, ArraySpec]:
    """Every array of a store with its shape and dtype (the table in ``base``'s docstring)."""
    M, N = num_videos, num_videos * clips_per_video
    return {
        "patches": ArraySpec((N, T, L, D), "float16", "clip"),
        "cls": ArraySpec((N, T, D), "float16", "clip"),
        "label": ArraySpec((N,), "int32", "clip"),
        "video_index": ArraySpec((N,), "int64", "clip"),
        "view_index": ArraySpec((N,), "int32", "clip"),
        "split": ArraySpec((N,), "int8", "clip"),
        "frame_indices": ArraySpec((N, T), "int64", "clip"),
        "video_id": ArraySpec((M,), "str", "video"),
        "num_frames": ArraySpec((M,), "int64", "video"),
        "fps": ArraySpec((M,), "float64", "video"),
        "status": ArraySpec((M,), "int8", "video"),
        "error": ArraySpec((M,), "str", "video"),
    }


def fill_value(name: str) -> Any:
    # -1 marks "no frame sampled" so an unwritten frame_indices row cannot pass for frame 0.
    return {"frame_indices": -1, "video_id": "", "error": ""}.get(name, 0)


def spool_version() -> str:
    try:
        from importlib.metadata import version

        return version("spool")
    except Exception:  # not installed (running from a checkout): the version is informative only
        return "unknown"


def fingerprint(attrs: dict[str, Any], video_ids: Sequence[str], labels: np.ndarray, splits: np.ndarray) -> str:
    """sha256 over what defines a store's content: the attrs except NON_CONTENT_ATTRS, the
    video ids, labels and splits. Two stores with equal fingerprints hold the same features."""
    h = hashlib.sha256()
    content = {k: v for k, v in attrs.items() if k not in NON_CONTENT_ATTRS}
    h.update(json.dumps(content, sort_keys=True, ensure_ascii=True).encode())
    h.update(b"\0videos\0")
    for vid in video_ids:
        h.update(vid.encode("utf-8") + b"\0")
    h.update(np.ascontiguousarray(labels, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(splits, dtype="i1").tobytes())
    return h.hexdigest()


def build_attrs(
    caller_attrs: dict[str, Any],
    *,
    video_ids: Sequence[str],
    labels: np.ndarray,
    splits: np.ndarray,
    class_names: Sequence[str],
    clips_per_video: int,
    num_frames: int,
    num_tokens: int,
    dim: int,
) -> dict[str, Any]:
    clash = sorted(set(caller_attrs) & (set(SCHEMA_ATTRS) | {"created_at", "fingerprint"}))
    if clash:
        raise StoreError(f"attrs {clash} are set by create_store itself; pass them as arguments or drop them from attrs")
    try:
        json.dumps(caller_attrs)
    except TypeError as e:
        raise StoreError(f"attrs must be JSON-serialisable (store attributes are JSON): {e}") from None
    attrs = dict(caller_attrs)
    attrs.update(
        schema_version=SCHEMA_VERSION,
        spool_version=spool_version(),
        clips_per_video=int(clips_per_video),
        num_frames=int(num_frames),
        num_tokens=int(num_tokens),
        dim=int(dim),
        class_names=[str(c) for c in class_names],
    )
    attrs["fingerprint"] = fingerprint(attrs, video_ids, labels, splits)
    attrs["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return attrs


def check_create_inputs(
    video_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    splits: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    clips_per_video: int,
    num_frames: int,
    num_tokens: int,
    dim: int,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Validate create_store's arguments; returns (video_ids, labels int32, splits int8)."""
    ids = [str(v) for v in video_ids]
    labels_a = np.asarray(labels)
    splits_a = np.asarray(splits)
    if not ids:
        raise StoreError("create_store needs at least one video (video_ids is empty)")
    if labels_a.shape != (len(ids),) or splits_a.shape != (len(ids),):
        raise StoreError(
            f"labels {labels_a.shape} and splits {splits_a.shape} must both have shape ({len(ids)},), one per video id"
        )
    if len(set(ids)) != len(ids):
        dup = next(v for v in ids if ids.count(v) > 1)
        raise StoreError(f"video_ids must be unique; {dup!r} appears more than once")
    if not np.issubdtype(labels_a.dtype, np.integer) or not np.issubdtype(splits_a.dtype, np.integer):
        raise StoreError(f"labels and splits must be integers, got {labels_a.dtype} and {splits_a.dtype}")
    # -1 marks an unlabeled video (a folder without class sub-folders, an SSv2 test split)
    if labels_a.min() < -1 or labels_a.max() >= len(class_names):
        raise StoreError(
            f"labels must lie in [0, {len(class_names)}) (one per class name), or be -1 for unlabeled videos; "
            f"got {labels_a.min()}..{labels_a.max()}"
        )
    allowed = {NO_SPLIT, *SPLIT_CODES.values()}
    if not set(np.unique(splits_a).tolist()) <= allowed:
        raise StoreError(f"splits must be codes {sorted(allowed)} (base.SPLIT_CODES, -1 = none); got {np.unique(splits_a)}")
    for name, value in dict(clips_per_video=clips_per_video, num_frames=num_frames, num_tokens=num_tokens, dim=dim).items():
        if int(value) < 1:
            raise StoreError(f"{name} must be >= 1, got {value}")
    return ids, labels_a.astype(np.int32), splits_a.astype(np.int8)


def clip_tables(labels: np.ndarray, splits: np.ndarray, clips_per_video: int) -> dict[str, np.ndarray]:
    """The static per-clip arrays implied by the fixed slots: clip v*C + c is view c of video v."""
    M, C = len(labels), clips_per_video
    return {
        "label": np.repeat(labels.astype(np.int32), C),
        "video_index": np.repeat(np.arange(M, dtype=np.int64), C),
        "view_index": np.tile(np.arange(C, dtype=np.int32), M),
        "split": np.repeat(splits.astype(np.int8), C),
    }


def check_schema_attrs(attrs: dict[str, Any], path: Path) -> None:
    """Raise unless attrs come from a store this Spool can read."""
    if "schema_version" not in attrs:
        raise StoreError(f"{path} is not a Spool feature store (no schema_version attribute)")
    version = int(attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: store written by a newer Spool, schema v{version} > v{SCHEMA_VERSION}; upgrade spool"
        )
    missing = [k for k in SCHEMA_ATTRS if k not in attrs]
    if missing:
        raise StoreError(f"{path}: attributes {missing} are missing; the store is damaged or was not written by Spool")


def truncate_reason(reason: str) -> str:
    """The reason as stored: at most ERROR_BYTES UTF-8 bytes, cut at a character boundary."""
    return str(reason).encode("utf-8")[:ERROR_BYTES].decode("utf-8", errors="ignore")


def as_indices(clip_indices: Sequence[int] | np.ndarray, num_clips: int, path: Path) -> np.ndarray:
    idx = np.asarray(clip_indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= num_clips):
        bad = idx[(idx < 0) | (idx >= num_clips)][0]
        raise IndexError(f"{path}: clip index {bad} out of range, the store has {num_clips} clip slots")
    return idx


def output_buffer(out: np.ndarray | None, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """``out`` checked against the shape a read returns, or a new array of that shape."""
    if out is None:
        return np.empty(shape, dtype="<f2")
    if out.shape != shape or out.dtype != np.float16 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(
            f"{path}: out must be a writeable C-contiguous float16 array of shape {shape}, "
            f"got {out.dtype} {out.shape}"
        )
    return out


def check_video_write(
    video_index: int,
    num_videos: int,
    patches: np.ndarray,
    cls: np.ndarray,
    frame_indices: np.ndarray,
    C: int,
    T: int,
    L: int,
    D: int,
    path: Path,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not 0 <= video_index < num_videos:
        raise IndexError(f"{path}: video index {video_index} out of range, the store has {num_videos} videos")
    expect = {"patches": (C, T, L, D), "cls": (C, T, D), "frame_indices": (C, T)}
    arrays = {"patches": np.asarray(patches), "cls": np.asarray(cls), "frame_indices": np.asarray(frame_indices)}
    for name, arr in arrays.items():
        if arr.shape != expect[name]:
            raise StoreError(f"{path}: write_video {name} has shape {arr.shape}, the store expects {expect[name]} (clips_per_video, T, ...)")
    for name in ("patches", "cls"):
        if not np.issubdtype(arrays[name].dtype, np.floating):
            raise StoreError(f"{path}: write_video {name} must be floating point, got {arrays[name].dtype}")
    return (
        np.ascontiguousarray(arrays["patches"], dtype="<f2"),
        np.ascontiguousarray(arrays["cls"], dtype="<f2"),
        np.ascontiguousarray(arrays["frame_indices"], dtype=np.int64),
    )


class WriterLock:
    """A non-blocking flock on ``lock_path``, held until ``release``. The kernel drops it when
    the process dies, so a killed writer never leaves a stale lock behind.

    Exclusive (the default): one writer owns the whole store. Shared: the shards of a sharded
    extraction, which write disjoint clip slots side by side (stores/shards.py); they keep an
    exclusive writer out, and it keeps them out. ``wait`` seconds: how long to retry while
    another holder has it (a merge holds the store for seconds) before giving up."""

    def __init__(self, lock_path: Path, store_path: Path, *, shared: bool = False, wait: float = 0.0):
        self.lock_path = Path(lock_path)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                    continue
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if shared:
                    raise StoreBusyError(
                        f"{store_path} is locked for writing by PID {holder} (lock file {self.lock_path}): a "
                        "non-sharded `spool extract` or a shard merge holds it. Wait for it to finish, or stop it."
                    ) from None
                raise StoreBusyError(
                    f"{store_path} is locked for writing by PID {holder} (lock file {self.lock_path}): another "
                    "`spool extract`, or the shards of a sharded one, are writing it. Wait for them to finish, "
                    "or stop them."
                ) from None
        if not shared:  # shards share the lock, so only an exclusive holder names itself
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        # The lock file stays: unlinking it would let a waiter lock an orphaned inode.
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_replaceable(path: Path, overwrite: bool, read_attrs: Callable[[Path], dict[str, Any] | None]) -> bool:
    """Whether ``path`` holds a store that create_store is to replace (False: nothing there).
    An existing path is an error without ``overwrite``, and so is one that is not a Spool
    store: nothing but a Spool store is ever deleted."""
    if not (path.exists() or path.is_symlink()):
        return False
    if not overwrite:
        raise StoreError(
            f"{path} already exists; open it with open_store({str(path)!r}, 'a') to resume, "
            "or pass overwrite=True to replace it"
        )
    old = read_attrs(path)
    if old is None or "schema_version" not in old:
        raise StoreError(f"refusing to overwrite {path}: it is not a Spool feature store (no schema_version); remove it yourself")
    return True


class SlotStore(FeatureStore):
    """What both backends share: argument checks and the fixed-slot write protocol. A backend
    provides ``_read_clips``, ``_write_slots`` (a video's data and per-video fields),
    ``_write_status`` (the commit, docs/store-format.md) and ``_sync`` (everything written so
    far reaches the disk). ``write_video`` and ``mark_failed`` write the data and stage the
    status; ``commit`` writes the staged statuses between two syncs (module docstring)."""

    commit_interval: float = COMMIT_INTERVAL_S  # 0: commit every video as it is written

    def _start_commits(self) -> None:
        self._staged: dict[int, int] = {}  # video -> status, written but not committed
        self._staged_since: float | None = None
        self._write_failed = False

    @abc.abstractmethod
    def _writable(self) -> Any:
        """The backend's arrays, or a StoreError when the store is not open for writing."""

    @abc.abstractmethod
    def _column(self, name: str) -> np.ndarray:
        """All of array ``name`` as numpy; strings as an object array of str."""

    @abc.abstractmethod
    def _read_clips(self, name: str, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None) -> np.ndarray: ...

    @abc.abstractmethod
    def _write_columns(self, columns: dict[str, np.ndarray]) -> None:
        """Overwrite whole per-video/per-clip columns, in the dict's order, each durable (on
        the disk) before the next is written (strings as str). Used to merge shard records."""

    @abc.abstractmethod
    def clip_writer(self) -> "ClipWriter":
        """A writer of clip slots only, for one shard of a sharded extraction (stores/shards.py).
        It takes no lock and writes no per-video field: shards own disjoint videos, hence
        disjoint clip chunks/bytes, and their per-video records are merged by one exclusive writer."""

    @abc.abstractmethod
    def _write_slots(
        self, video_index: int, patches: np.ndarray, cls: np.ndarray, frame_indices: np.ndarray,
        num_frames: int, fps: float, error: str,
    ) -> None:
        """Everything of one video but its status, which ``commit`` writes after a ``_sync``."""

    @abc.abstractmethod
    def _write_status(self, video_indices: np.ndarray, status: np.ndarray) -> None:
        """Set the status of these videos (increasing indices): the commit."""

    @abc.abstractmethod
    def _status_of(self, video_index: int) -> int:
        """The status of one video as the file holds it."""

    @abc.abstractmethod
    def _sync(self) -> None:
        """Make every write made so far durable: it reaches the disk before this returns."""

    # --- the commit protocol ---------------------------------------------------------------------
    def commit(self) -> None:
        """Commit the videos written since the last commit: sync their data, then write their
        statuses, then sync those. A kill or power loss before the end leaves them pending."""
        if not self._staged:
            return
        try:
            self._sync()  # the features and per-video fields the statuses point to, durable first
            idx = np.array(sorted(self._staged), dtype=np.int64)
            self._write_status(idx, np.array([self._staged[v] for v in idx], dtype=np.int8))
            self._sync()
        except BaseException:
            self._write_failed = True
            raise
        self._staged.clear()
        self._staged_since = None

    def _stage(self, video_index: int, status: int) -> None:
        self._staged[video_index] = status
        now = time.monotonic()
        if self._staged_since is None:
            self._staged_since = now
        if now - self._staged_since >= self.commit_interval:
            self.commit()

    def _uncommit(self, video_index: int) -> None:
        # Rewriting a DONE/FAILED video: its PENDING must be on disk before the old data is
        # overwritten, so that neither a kill nor a power loss leaves DONE over half-new data.
        self._staged.pop(video_index, None)
        if self._status_of(video_index) != PENDING:
            self.commit()  # keeps the rule simple: no status write before the data written so far is synced
            self._write_status(np.array([video_index]), np.array([PENDING], dtype=np.int8))
            self._sync()

    def _write_video_slots(self, video_index: int, *slots, status: int) -> None:
        try:
            self._uncommit(video_index)
            self._write_slots(video_index, *slots)
        except BaseException:
            self._write_failed = True
            raise
        self._stage(video_index, status)

    def _close_commits(self) -> None:
        """Commit what is staged as the store closes, unless a write failed before (disk full):
        that error was raised already, and the staged videos stay pending for the re-run."""
        if getattr(self, "_staged", None) and not self._write_failed and self.mode == "a":
            self.commit()

    def _checked_arrays(self, get: Callable[[str], Any], string_kinds: str, noun: str) -> dict[str, Any]:
        """Every array of the schema, fetched with ``get(name)`` (None when absent), each checked
        for shape and dtype. ``string_kinds``: the dtype kinds the backend stores strings as."""
        ids = get("video_id")
        if ids is None:
            raise StoreError(f"{self.path}: {noun} 'video_id' is missing; the store is damaged, re-create it")
        specs = expected_arrays(ids.shape[0], self.clips_per_video, self.num_frames, self.num_tokens, self.dim)
        out = {}
        for name, spec in specs.items():
            arr = get(name)
            if arr is None:
                raise StoreError(f"{self.path}: {noun} {name!r} is missing; the store is damaged, re-create it")
            ok_dtype = arr.dtype.kind in string_kinds if spec.dtype == "str" else np.dtype(arr.dtype) == np.dtype(spec.dtype)
            if tuple(arr.shape) != spec.shape or not ok_dtype:
                raise StoreError(
                    f"{self.path}: {noun} {name!r} has shape {tuple(arr.shape)} dtype {arr.dtype}, "
                    f"expected {spec.shape} {spec.dtype}; the store is damaged or from another tool"
                )
            out[name] = arr
        return out

    def videos(self) -> VideoTable:
        self.commit()  # a writer reads what it wrote, from the disk
        C = self.clips_per_video
        return VideoTable(
            video_id=self._column("video_id"),
            label=np.ascontiguousarray(self._column("label")[::C]),  # per clip: one row per video
            split=np.ascontiguousarray(self._column("split")[::C]),
            num_frames=self._column("num_frames"),
            fps=self._column("fps"),
            status=self._column("status"),
            error=self._column("error"),
        )

    def clips(self) -> ClipTable:
        self.commit()
        return ClipTable(
            label=self._column("label"),
            video_index=self._column("video_index"),
            view_index=self._column("view_index"),
            split=self._column("split"),
            frame_indices=self._column("frame_indices"),
            done=np.repeat(self._column("status") == DONE, self.clips_per_video),
        )

    def read_patches(self, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._read_clips("patches", clip_indices, out)

    def read_cls(self, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self._read_clips("cls", clip_indices, out)

    def write_video(
        self,
        video_index: int,
        patches: np.ndarray,
        cls: np.ndarray,
        frame_indices: np.ndarray,
        num_frames: int,
        fps: float,
    ) -> None:
        self._writable()
        patches, cls, frame_indices = check_video_write(
            video_index, self.num_videos, patches, cls, frame_indices,
            self.clips_per_video, self.num_frames, self.num_tokens, self.dim, self.path,
        )  # fmt: skip
        self._write_video_slots(video_index, patches, cls, frame_indices, num_frames, fps, "", status=DONE)

    def mark_failed(self, video_index: int, reason: str, num_frames: int = 0, fps: float = 0.0) -> None:
        self._writable()
        if not 0 <= video_index < self.num_videos:
            raise IndexError(f"{self.path}: video index {video_index} out of range, the store has {self.num_videos} videos")
        # Reset the slots so a store where this video once half-wrote equals one where it never did.
        # Whole arrays, not scalars: h5py broadcasts a scalar with one write per row (~60x slower).
        C, T, L, D = self.clips_per_video, self.num_frames, self.num_tokens, self.dim
        self._write_video_slots(
            video_index, np.zeros((C, T, L, D), "<f2"), np.zeros((C, T, D), "<f2"), np.full((C, T), -1, np.int64),
            num_frames, fps, truncate_reason(reason), status=FAILED,
        )  # fmt: skip

    def apply_records(
        self,
        video_indices: np.ndarray,
        frame_indices: np.ndarray,
        num_frames: np.ndarray,
        fps: np.ndarray,
        error: Sequence[str],
        status: np.ndarray,
    ) -> None:
        """Commit per-video records whose clips are already written (a shard's journal): the
        same ordering as ``write_video``, for many videos in a few column writes. A kill midway
        leaves the records' videos uncommitted, and applying them again is idempotent."""
        self._writable()
        self.commit()
        idx = np.asarray(video_indices, dtype=np.int64)
        if idx.size == 0:
            return
        M, C, T = self.num_videos, self.clips_per_video, self.num_frames
        if idx.min() < 0 or idx.max() >= M:
            raise IndexError(f"{self.path}: shard record for video {int(idx.max())} out of range, the store has {M} videos")
        cols = {name: self._column(name) for name in ("status", "frame_indices", "num_frames", "fps", "error")}
        st = cols["status"]
        if np.any(st[idx] != PENDING):  # rewriting committed videos: uncommit them first
            st = st.copy()
            st[idx] = PENDING
            self._write_columns({"status": st})
        fi = cols["frame_indices"].reshape(M, C, T)
        fi[idx] = np.asarray(frame_indices, dtype=np.int64).reshape(idx.size, C, T)
        cols["num_frames"][idx] = num_frames
        cols["fps"][idx] = fps
        err = cols["error"]
        err[idx] = [truncate_reason(e) for e in error]
        self._write_columns({"frame_indices": fi.reshape(M * C, T), "num_frames": cols["num_frames"], "fps": cols["fps"], "error": err})
        st = st.copy()
        st[idx] = status
        self._write_columns({"status": st})  # the commit, last


class ClipWriter(abc.ABC):
    """Writes the clip slots (patches, cls) of videos, nothing else; see ``SlotStore.clip_writer``."""

    @abc.abstractmethod
    def write(self, video_index: int, patches: np.ndarray, cls: np.ndarray) -> None:
        """``patches`` (C, T, L, D) and ``cls`` (C, T, D) as little-endian float16, C-contiguous."""

    @abc.abstractmethod
    def sync(self) -> None:
        """Make the clips written so far durable (before the journal lines that point to them)."""

    @abc.abstractmethod
    def close(self) -> None: ...
