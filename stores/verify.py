"""``verify(path)``: read a whole store back and name every damaged part.

What it checks (``spool verify STORE``):

* the store opens: schema version, every array present with its shape and dtype;
* the fingerprint recomputed from the attributes, video ids, labels and splits equals the
  recorded one (a damaged label, split or video_id chunk changes it);
* the per-clip tables agree with the fixed slot layout (``video_index``, ``view_index``,
  ``label`` and ``split`` of each clip equal its video's), statuses are 0/1/2;
* every DONE video: ``num_frames`` >= 1, finite ``fps``, frame indices in ``[0, num_frames)``,
  and every clip's ``patches`` and ``cls`` read back with the right size, hold only finite
  values and are not all zero.

zarr does not write a chunk equal to its fill value (zeros), so a missing ``patches`` chunk
reads as zeros: for a DONE video that is damage (a deleted chunk, or a lost write) because
backbone features are never exactly zero, and it is reported as a missing chunk with its
file. HDF5 has no per-clip files; a clip lost there reads as zeros and is reported the same
way, with its clip slot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spool.stores import DONE, FAILED, PENDING, StoreError, backend_for, fingerprint, open_store

# Damage that extracting the video again repairs: its clip slots and per-video fields are
# rewritten whole. Damaged tables and attributes ("open", "fingerprint", "table") are not.
REPAIRABLE = ("missing-chunk", "bad-chunk", "non-finite", "zero", "frame-indices", "video")


@dataclass(frozen=True)
class Problem:
    kind: str  # "open", "fingerprint", "table", "missing-chunk", "bad-chunk", "non-finite", "zero", "frame-indices", "video"
    where: str  # the array, chunk file or clip slot
    message: str  # one line for people
    video_id: str | None = None


@dataclass
class VerifyReport:
    path: str
    backend: str
    num_videos: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    clips_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_videos(self) -> list[str]:
        return sorted({p.video_id for p in self.problems if p.video_id is not None})

    @property
    def unrepairable(self) -> list[Problem]:
        return [p for p in self.problems if p.kind not in REPAIRABLE or p.video_id is None]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "bad_videos": self.bad_videos}


def verify(path: str | Path) -> VerifyReport:
    """Check every array and every DONE video's clips of the store at ``path``.

    Raises StoreError only when ``path`` is not there or has no store suffix; anything wrong
    inside the store is a ``Problem`` in the report (``report.ok`` is False).
    """
    path = Path(path)
    backend = backend_for(path)
    if not path.exists():
        raise StoreError(f"no store at {path}")
    report = VerifyReport(path=str(path), backend=backend)
    try:
        store = open_store(path, mode="r")
    except StoreError as err:
        report.problems.append(Problem("open", str(path), str(err)))
        return report
    with store:
        try:
            videos, clips = store.videos(), store.clips()
        except Exception as err:  # a small array's chunk that does not decode
            report.problems.append(Problem("bad-chunk", str(path), f"the video or clip table cannot be read: {err}"))
            return report
        report.num_videos = store.num_videos
        report.done = int((videos.status == DONE).sum())
        report.failed = int((videos.status == FAILED).sum())
        report.pending = int((videos.status == PENDING).sum())
        _check_tables(store, videos, clips, report)
        _check_done_videos(store, videos, clips, report)
    return report


def _check_tables(store, videos, clips, report: VerifyReport) -> None:
    recorded = store.attrs.get("fingerprint")
    ids = [str(v) for v in videos.video_id]
    if recorded != fingerprint(store.attrs, ids, videos.label, videos.split):
        report.problems.append(Problem(
            "fingerprint", "video_id/label/split",
            "the fingerprint of the attributes, video ids, labels and splits differs from the recorded one: "
            "one of those arrays (or the attributes) was changed or damaged",
        ))
    C = store.clips_per_video
    n = np.arange(store.num_clips)
    checks = {
        "video_index": clips.video_index == n // C,
        "view_index": clips.view_index == n % C,
        "label": clips.label == np.repeat(videos.label, C),
        "split": clips.split == np.repeat(videos.split, C),
    }
    for name, ok in checks.items():
        bad = np.flatnonzero(~ok)
        if bad.size:
            report.problems.append(Problem(
                "table", name, f"{name} disagrees with the slot layout at {bad.size} clips (first: clip {int(bad[0])})",
                ids[int(bad[0]) // C],
            ))
    bad = np.flatnonzero(~np.isin(videos.status, (PENDING, DONE, FAILED)))
    if bad.size:
        report.problems.append(Problem("table", "status", f"status holds values other than 0/1/2 at {bad.size} videos", ids[int(bad[0])]))


def _chunk_file(store, name: str, clip: int) -> str:
    """The file of a clip's chunk (zarr) or the clip slot (HDF5), for messages."""
    if backend_for(store.path) == "zarr":
        arr = store._arrays[name]
        key = arr.metadata.chunk_key_encoding.encode_chunk_key((clip, *(0,) * (arr.ndim - 1)))
        return str(store.path / name / key)
    return f"{store.path}:{name}[{clip}]"


def _check_done_videos(store, videos, clips, report: VerifyReport) -> None:
    C, T = store.clips_per_video, store.num_frames
    zarr_backend = backend_for(store.path) == "zarr"
    buffers = {
        "patches": np.empty((1, T, store.num_tokens, store.dim), np.float16),
        "cls": np.empty((1, T, store.dim), np.float16),
    }
    for v in np.flatnonzero(videos.status == DONE):
        vid = str(videos.video_id[v])
        n_frames, fps = int(videos.num_frames[v]), float(videos.fps[v])
        if n_frames < 1 or not np.isfinite(fps):
            report.problems.append(Problem("video", f"num_frames/fps[{v}]", f"DONE with num_frames={n_frames}, fps={fps}", vid))
        for clip in range(v * C, (v + 1) * C):
            report.clips_checked += 1
            fi = clips.frame_indices[clip]
            if (fi < 0).any() or (fi >= max(n_frames, 1)).any():
                report.problems.append(Problem(
                    "frame-indices", f"frame_indices[{clip}]",
                    f"frame indices {fi.tolist()} outside [0, {n_frames}) for a DONE clip", vid,
                ))
            for name, buf in buffers.items():
                where = _chunk_file(store, name, clip)
                if zarr_backend and store._raw[name] and not Path(where).exists():
                    report.problems.append(Problem(
                        "missing-chunk", where,
                        f"{name} chunk of clip {clip} is missing (video DONE; features are never all zero)", vid,
                    ))
                    continue
                try:
                    x = (store.read_patches if name == "patches" else store.read_cls)([clip], out=buf)[0]
                except Exception as err:  # a wrong-sized or undecodable chunk
                    report.problems.append(Problem("bad-chunk", where, f"{name} of clip {clip} cannot be read: {err}", vid))
                    continue
                finite = np.isfinite(x)
                if not finite.all():
                    report.problems.append(Problem(
                        "non-finite", where, f"{name} of clip {clip} holds {int((~finite).sum())} NaN/inf values", vid,
                    ))
                elif not x.any():
                    report.problems.append(Problem(
                        "zero", where, f"{name} of clip {clip} is all zeros (a lost or never-written chunk)", vid,
                    ))


def repair(path: str | Path, report: VerifyReport) -> list[str]:
    """Mark the videos ``report`` names with repairable damage PENDING, so that re-running the
    same ``spool extract`` command extracts them again; the result equals an undamaged
    extraction. Returns their ids. Status is the commit of a video (docs/store-format.md), so
    this one column write is all it takes; ``report.unrepairable`` lists what it cannot fix."""
    ids = sorted({p.video_id for p in report.problems if p.kind in REPAIRABLE and p.video_id is not None})
    if not ids:
        return []
    with open_store(path, mode="a") as store:
        videos = store.videos()
        index = {str(v): i for i, v in enumerate(videos.video_id)}
        status = videos.status.copy()
        status[[index[v] for v in ids]] = PENDING
        store._write_columns({"status": status})
    return ids
