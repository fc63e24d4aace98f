"""What `spool info` shows about a store: its attributes, progress, what the DONE videos
cover, why videos failed, and its size on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from spool.sampling import clip_span
from spool.stores.shards import recorded_status
from spool.stores.base import DONE, FAILED, NO_SPLIT, SPLIT_NAMES, STATUS_NAMES, FeatureStore


def bytes_on_disk(path: str | Path) -> int:
    """Allocated bytes (st_blocks, so sparse HDF5 holes count as free) of a file or directory tree."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:  # a writer renamed a chunk over it meanwhile
                pass
    return total


def summarize(store: FeatureStore, max_failures: int = 20) -> dict[str, Any]:
    """A JSON-serialisable summary of ``store``. Split and class counts are over DONE videos
    only, since only their clips hold features; ``failures`` lists at most ``max_failures``."""
    v = store.videos()
    done = v.status == DONE
    split_names = {code: name for code, name in enumerate(SPLIT_NAMES)} | {NO_SPLIT: "none"}
    per_split = {name: int(np.sum(done & (v.split == code))) for code, name in split_names.items()}
    class_names = store.class_names
    labeled = done & (v.label >= 0)
    class_counts = np.bincount(v.label[labeled], minlength=len(class_names))
    failed = np.flatnonzero(v.status == FAILED)
    sampling = store.attrs.get("sampling")  # written by spool extract; absent in hand-made stores
    short = None
    if sampling:
        span = clip_span(int(sampling["frames"]), sampling.get("stride"))
        short = int(np.sum(done & (v.num_frames < span)))
    return {
        "path": str(store.path),
        "attrs": dict(store.attrs),
        "num_videos": store.num_videos,
        "num_clips": store.num_clips,
        "clip_shape": [store.num_frames, store.num_tokens, store.dim],  # (T, L, D)
        "status": {name: int(np.sum(v.status == code)) for code, name in STATUS_NAMES.items()},
        "done_clips": int(done.sum()) * store.clips_per_video,
        "done_videos_per_split": per_split,
        "done_videos_per_class": {name: int(n) for name, n in zip(class_names, class_counts)},
        "done_videos_unlabeled": int(np.sum(done & (v.label < 0))),
        "short_videos": short,  # DONE videos with fewer frames than one clip spans: frames repeat
        "num_failed": int(failed.size),
        "failures": [{"video_id": str(v.video_id[i]), "reason": str(v.error[i])} for i in failed[:max_failures]],
        "bytes_on_disk": bytes_on_disk(store.path),
        # Videos that shards finished but nobody merged yet: counted above as pending.
        "unmerged_shard_videos": len(recorded_status(store.path)),
    }
