"""What a Spool feature store holds, independent of the file format.

Layout (both backends, same names, same dtypes):

    per clip   patches        (N, T, L, D) float16   one chunk per clip
               cls            (N, T, D)    float16   one chunk per clip
               label          (N,)         int32
               video_index    (N,)         int64
               view_index     (N,)         int32
               split          (N,)         int8      SPLIT_CODES, -1 = none given
               frame_indices  (N, T)       int64     sampled frame numbers
    per video  video_id       (M,)         str       path relative to the source root
               num_frames     (M,)         int64
               fps            (M,)         float64
               status         (M,)         int8      PENDING / DONE / FAILED
               error          (M,)         str       why a video failed ("" otherwise)

N = M * clips_per_video and clip slots are fixed when the store is created:
clip ``v * clips_per_video + c`` is view ``c`` of video ``v``. A store's content is
therefore a function of its videos alone, whatever order they were processed in,
which is what makes kill-and-resume (and sharded writers) give identical stores.
A video's clips count only once its status is DONE; readers ignore other slots.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SCHEMA_VERSION = 1

SPLIT_NAMES = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLIT_NAMES)}
NO_SPLIT = -1

PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}


class StoreError(RuntimeError):
    """A store that cannot be opened, created or written as asked; the message says why."""


class StoreBusyError(StoreError):
    """Another process holds the store's writer lock (or this shard's lock)."""


@dataclass(frozen=True)
class VideoTable:
    video_id: np.ndarray  # (M,) object (str)
    label: np.ndarray  # (M,) int32
    split: np.ndarray  # (M,) int8
    num_frames: np.ndarray  # (M,) int64
    fps: np.ndarray  # (M,) float64
    status: np.ndarray  # (M,) int8
    error: np.ndarray  # (M,) object (str)


@dataclass(frozen=True)
class ClipTable:
    label: np.ndarray  # (N,) int32
    video_index: np.ndarray  # (N,) int64
    view_index: np.ndarray  # (N,) int32
    split: np.ndarray  # (N,) int8
    frame_indices: np.ndarray  # (N, T) int64
    done: np.ndarray  # (N,) bool: the clip's video finished; only these clips hold features


class FeatureStore(abc.ABC):
    """One feature store on disk. Open with ``spool.stores.open_store`` or ``create_store``.

    Writers (mode "a") hold an exclusive lock for their lifetime; a second writer gets a
    StoreError naming the holder instead of interleaving writes.
    """

    path: Path
    mode: str  # "r" or "a"
    attrs: dict[str, Any]  # schema_version, spool_version, backbone, weights, ... (see create_store)

    # --- shape of the store -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def num_videos(self) -> int: ...

    @property
    def clips_per_video(self) -> int:
        return int(self.attrs["clips_per_video"])

    @property
    def num_clips(self) -> int:
        return self.num_videos * self.clips_per_video

    @property
    def num_frames(self) -> int:  # T
        return int(self.attrs["num_frames"])

    @property
    def num_tokens(self) -> int:  # L
        return int(self.attrs["num_tokens"])

    @property
    def dim(self) -> int:  # D
        return int(self.attrs["dim"])

    @property
    def class_names(self) -> list[str]:
        return list(self.attrs["class_names"])

    # --- reading --------------------------------------------------------------------------
    @abc.abstractmethod
    def videos(self) -> VideoTable: ...

    @abc.abstractmethod
    def clips(self) -> ClipTable: ...

    @abc.abstractmethod
    def read_patches(self, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(n, T, L, D) float16 for the given clip slots, in the given order. Pass ``out`` (a
        C-contiguous float16 array of that shape) to reuse a buffer across batches: a fresh
        100 MB array costs more in page faults than reading the clips into it."""

    @abc.abstractmethod
    def read_cls(self, clip_indices: Sequence[int] | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(n, T, D) float16 for the given clip slots, in the given order (``out`` as above)."""

    def pending_videos(self) -> np.ndarray:
        """Indices of videos neither DONE nor FAILED: what a resumed extraction still has to do."""
        return np.flatnonzero(self.videos().status == PENDING)

    # --- writing (mode "a" only) -------------------------------------------------------------
    @abc.abstractmethod
    def write_video(
        self,
        video_index: int,
        patches: np.ndarray,  # (clips_per_video, T, L, D)
        cls: np.ndarray,  # (clips_per_video, T, D)
        frame_indices: np.ndarray,  # (clips_per_video, T)
        num_frames: int,
        fps: float,
    ) -> None:
        """Write all clips of one video, then mark it DONE. Crash-safe: a kill before the
        status is written leaves the video PENDING, and re-writing it is idempotent."""

    @abc.abstractmethod
    def mark_failed(self, video_index: int, reason: str, num_frames: int = 0, fps: float = 0.0) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
