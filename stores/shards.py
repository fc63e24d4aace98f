"""Several processes extracting into one store: torchrun ranks, or the tasks of a job array.

Shard ``index`` of ``count`` owns the videos ``v`` with ``v % count == index`` (round robin, so
every shard gets a fair mix of a class-sorted list). The shards share one store like this:

* Each shard holds the store's writer lock *shared*, and its own shard lock exclusively: two
  processes of one shard, or a shard beside a non-sharded writer, are refused.
* A shard writes only its own videos' clip slots (``SlotStore.clip_writer``): separate chunk
  files in zarr, separate byte ranges in HDF5. No two shards ever write the same bytes.
* The per-video fields (status, num_frames, fps, frame_indices, error) share chunks between
  videos, so shards do not write them. After a video's clips are written, its shard appends
  one JSON line to its journal, ``shard-IIIII-of-NNNNN.jsonl``; that line is the shard's
  commit. A killed shard leaves at most a torn last line, which readers ignore and the next
  run of the shard cuts off. As a store's statuses are (spool.stores._common, "Durability"),
  the lines are batched: held back, then appended once the clips they point to are fsynced,
  and fsynced themselves, once per ``COMMIT_INTERVAL_S``.
* One exclusive writer merges the journals into the store (``SlotStore.apply_records``, with
  the status written last as usual) and replaces each finished journal by a small ``.done``
  marker. Any ``open_store(path, "a")`` merges first; so do torchrun's rank 0 once every rank
  has finished, the last shard of a job array to finish, and ``spool merge-shards``.

Journals live in ``STORE.zarr/.spool-shards/`` or next to ``STORE.h5`` in ``STORE.h5.shards/``.
Until they are merged, readers see the shards' videos as pending.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spool.stores._common import COMMIT_INTERVAL_S, WriterLock, check_video_write, fsync_paths, truncate_reason
from spool.stores.base import DONE, FAILED, PENDING, StoreBusyError, StoreError

_JOURNAL = re.compile(r"shard-(\d+)-of-(\d+)\.jsonl")
_MARKER = re.compile(r"shard-(\d+)-of-(\d+)\.done")


def shard_videos(num_videos: int, index: int, count: int) -> np.ndarray:
    """The video indices shard ``index`` of ``count`` owns: every ``count``-th from ``index``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must be i/n with 0 <= i < n, got {index}/{count}")
    return np.arange(index, num_videos, count, dtype=np.int64)


def shards_dir(path: str | Path) -> Path:
    path = Path(path)
    return path / ".spool-shards" if path.suffix.lower() == ".zarr" else path.with_name(path.name + ".shards")


def writer_lock_path(path: str | Path) -> Path:
    from spool.stores import backend_for

    path = Path(path)
    if backend_for(path) == "zarr":
        from spool.stores.zarr_store import LOCK_NAME

        return path / LOCK_NAME
    from spool.stores.hdf5_store import lock_path

    return lock_path(path)


def _stem(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def journal_line(
    video_index: int, status: int, num_frames: int, fps: float, frame_indices: np.ndarray, error: str
) -> bytes:
    """One video's record as its shard appends it: a JSON object on one line."""
    record = {"video": int(video_index), "status": int(status), "num_frames": int(num_frames), "fps": float(fps),
              "frame_indices": np.asarray(frame_indices).tolist(), "error": truncate_reason(error)}  # fmt: skip
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


@dataclass
class Journal:
    """One shard's journal as read back: its records (the last one per video wins), whether its
    last line says the shard finished, and how many bytes hold whole lines."""

    index: int
    count: int
    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    finished: bool = False
    whole_bytes: int = 0


def read_journal(file: Path) -> Journal:
    m = _JOURNAL.fullmatch(file.name)
    if m is None:
        raise StoreError(f"{file} is not a shard journal (expected shard-IIIII-of-NNNNN.jsonl)")
    journal = Journal(int(m.group(1)), int(m.group(2)))
    data = file.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes after the last newline: a line torn by a kill
    for number, line in enumerate(data[:end].splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise StoreError(
                f"{file}: line {number} is not JSON; the journal is damaged. Delete it and re-run "
                f"shard {journal.index}/{journal.count} (its videos are extracted again)"
            ) from None
        if record.get("finished"):
            journal.finished = True
        else:
            journal.records[int(record["video"])] = record
            journal.finished = False  # a re-run of a finished shard appends after its marker
    journal.whole_bytes = end
    return journal


def read_journals(path: str | Path) -> list[Journal]:
    d = shards_dir(path)
    if not d.is_dir():
        return []
    journals = []
    for f in sorted(d.iterdir()):
        if _JOURNAL.fullmatch(f.name):
            try:
                journals.append(read_journal(f))
            except FileNotFoundError:  # merged meanwhile: its records are in the store now
                pass
    return journals


def _finished(file: Path) -> bool:
    """Whether a journal's last whole line is the finish marker, reading only its tail (rank 0
    polls this while the other ranks work; their journals grow to megabytes)."""
    try:
        with open(file, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256))
            tail = f.read()
    except FileNotFoundError:
        return False
    lines = tail.split(b"\n")
    return len(lines) > 1 and b'"finished":true' in lines[-2]


def _status_after(journals: list[Journal], path: str | Path) -> np.ndarray:
    """Every video's status as the shards left it: the store's, with ``journals`` applied.
    The caller reads the journals before this reads the store: a merge deletes a journal only
    after writing its records into the store, so a merge running meanwhile cannot hide a video."""
    from spool.stores import open_store

    with open_store(path, "r") as store:
        status = store.videos().status.copy()
    for v, st in _recorded(journals).items():
        status[v] = st
    return status


def _recorded(journals: list[Journal]) -> dict[int, int]:
    out: dict[int, int] = {}
    for journal in journals:
        out.update({v: int(r["status"]) for v, r in journal.records.items()})
    return out


def recorded_status(path: str | Path) -> dict[int, int]:
    """Video -> status (DONE/FAILED) over every unmerged journal of the store."""
    return _recorded(read_journals(path))


class ShardWriter:
    """Writes shard ``index`` of ``count`` into an existing store while other shards write theirs.

    Same calls as a store open for writing (``write_video``, ``mark_failed``), then ``finish``
    once every video of the shard is done, then ``close``. ``wait``: seconds to wait for the
    store lock while a merge holds it."""

    def __init__(self, path: str | Path, index: int, count: int, *, wait: float = 60.0):
        from spool.stores import open_store

        self.path = Path(path)
        self.index, self.count = index, count
        shard_videos(0, index, count)  # checks i/n
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}; shards write into a store created first (spool extract does)")
        self._store_lock = WriterLock(writer_lock_path(self.path), self.path, shared=True, wait=wait)
        self._shard_lock = self._journal = self._clips = self.store = None
        try:
            self.store = open_store(self.path, "r")
            d = shards_dir(self.path)
            d.mkdir(exist_ok=True)
            stem = _stem(index, count)
            try:
                self._shard_lock = WriterLock(d / f"{stem}.lock", self.path)
            except StoreBusyError:
                raise StoreBusyError(
                    f"shard {index}/{count} of {self.path} is already being written by another process "
                    f"(lock file {d / (stem + '.lock')}); each shard runs once at a time"
                ) from None
            # A marker from an earlier run of this shard would tell a waiting rank 0 it is done already.
            (d / f"{stem}.done").unlink(missing_ok=True)
            journal_file = d / f"{stem}.jsonl"
            if journal_file.exists():
                whole = read_journal(journal_file).whole_bytes
                if whole != journal_file.stat().st_size:
                    os.truncate(journal_file, whole)  # drop a torn line so appends start on a fresh one
            self._journal = open(journal_file, "ab")
            fsync_paths([journal_file, d, d.parent])  # the journal's name, durable before its lines are
            self._clips = self.store.clip_writer()
        except BaseException:
            self.close()
            raise
        self.written = 0
        self._lines: list[bytes] = []  # journal lines whose clips are written but not yet synced
        self._lines_since: float | None = None
        self._write_failed = False

    def _check_owned(self, video_index: int) -> None:
        if not 0 <= video_index < self.store.num_videos or video_index % self.count != self.index:
            raise StoreError(
                f"{self.path}: video {video_index} is not shard {self.index}/{self.count}'s "
                "(a shard owns the videos v with v % count == index); writing it could collide with another shard"
            )

    def _append(self, line: bytes) -> None:
        self._lines.append(line)
        now = time.monotonic()
        if self._lines_since is None:
            self._lines_since = now
        if now - self._lines_since >= self.commit_interval:
            self.commit()

    commit_interval: float = COMMIT_INTERVAL_S

    def commit(self) -> None:
        """Append the held-back lines once the clips they point to are on the disk, then fsync them."""
        if not self._lines:
            return
        try:
            self._clips.sync()
            self._journal.write(b"".join(self._lines))
            self._journal.flush()
            os.fsync(self._journal.fileno())
        except BaseException:
            self._write_failed = True
            raise
        self._lines.clear()
        self._lines_since = None

    def write_video(
        self, video_index: int, patches: np.ndarray, cls: np.ndarray, frame_indices: np.ndarray, num_frames: int, fps: float
    ) -> None:
        s = self.store
        self._check_owned(video_index)
        patches, cls, frame_indices = check_video_write(
            video_index, s.num_videos, patches, cls, frame_indices, s.clips_per_video, s.num_frames, s.num_tokens, s.dim, s.path
        )  # fmt: skip
        self._write_clips(video_index, patches, cls)
        self._append(journal_line(video_index, DONE, num_frames, fps, frame_indices, ""))
        self.written += 1

    def _write_clips(self, video_index: int, patches: np.ndarray, cls: np.ndarray) -> None:
        try:
            self._clips.write(video_index, patches, cls)
        except BaseException:
            self._write_failed = True
            raise

    def mark_failed(self, video_index: int, reason: str, num_frames: int = 0, fps: float = 0.0) -> None:
        s = self.store
        self._check_owned(video_index)
        C, T = s.clips_per_video, s.num_frames
        # Zero the slots (zarr deletes the chunks), as SlotStore.mark_failed does.
        self._write_clips(video_index, np.zeros((C, T, s.num_tokens, s.dim), "<f2"), np.zeros((C, T, s.dim), "<f2"))
        self._append(journal_line(video_index, FAILED, num_frames, fps, np.full((C, T), -1), reason))
        self.written += 1

    def finish(self) -> None:
        """Record that this shard has no pending video left."""
        self._lines.append(json.dumps({"finished": True, "at": _now()}, separators=(",", ":")).encode() + b"\n")
        self.commit()

    def close(self) -> None:
        try:
            # what is held back goes in, unless a write failed before (that error was raised already)
            if self._journal is not None and getattr(self, "_lines", None) and not self._write_failed:
                self.commit()
        finally:
            for closer in (self._clips, self._journal, self.store, self._shard_lock, self._store_lock):
                if closer is not None:
                    (closer.release if isinstance(closer, WriterLock) else closer.close)()
            self._clips = self._journal = self.store = self._shard_lock = self._store_lock = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def merge_journals(store) -> int:
    """Apply every journal to ``store`` (open for writing, so no shard is running) and replace
    each finished journal by its ``.done`` marker. Returns the number of videos merged."""
    d = shards_dir(store.path)
    journals = read_journals(store.path)
    if not journals:
        return 0
    records: dict[int, dict[str, Any]] = {}
    for journal in journals:
        records.update(journal.records)
    if records:
        idx = np.fromiter(records, dtype=np.int64, count=len(records))
        rows = list(records.values())
        store.apply_records(
            idx,
            frame_indices=np.array([r["frame_indices"] for r in rows], dtype=np.int64),
            num_frames=np.array([r["num_frames"] for r in rows], dtype=np.int64),
            fps=np.array([r["fps"] for r in rows], dtype=np.float64),
            error=[r["error"] for r in rows],
            status=np.array([r["status"] for r in rows], dtype=np.int8),
        )
    for journal in journals:
        stem = _stem(journal.index, journal.count)
        if journal.finished:
            marker = {"shard": f"{journal.index}/{journal.count}", "videos": len(journal.records), "merged_at": _now()}
            tmp = d / f"{stem}.done.tmp"
            tmp.write_text(json.dumps(marker) + "\n")
            fsync_paths([tmp])
            tmp.replace(d / f"{stem}.done")
            fsync_paths([d])  # the marker, durable before the journal it replaces goes
        # Applied, so the journal can go: a re-run of an unfinished shard finds its videos DONE in the store.
        (d / f"{stem}.jsonl").unlink()
        (d / f"{stem}.lock").unlink(missing_ok=True)  # no shard holds it: the store lock is ours alone
    return len(records)


def remove_shards(path: str | Path) -> None:
    """Drop the journals and markers of a store that is being replaced."""
    shutil.rmtree(shards_dir(path), ignore_errors=True)


@dataclass
class ShardReport:
    """Where the shards of a store stand: ``count`` is the largest shard count seen."""

    path: str
    count: int = 0
    finished: list[int] = field(default_factory=list)  # shards (of ``count``) whose run finished
    running_or_killed: list[int] = field(default_factory=list)  # an unmerged, unfinished journal
    pending_videos: int = 0
    pending_by_shard: dict[int, int] = field(default_factory=dict)  # shard of ``count`` -> pending videos
    unmerged_videos: int = 0
    done_videos: int = 0  # DONE in the store or in an unmerged record

    @property
    def complete(self) -> bool:
        return self.pending_videos == 0

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "complete": self.complete}


def shard_report(path: str | Path) -> ShardReport:
    """Read-only: which shards finished and which videos are still pending, by shard."""
    d = shards_dir(path)
    report = ShardReport(path=str(path))
    plans: dict[int, set[int]] = {}
    # Journals, then markers, then the store: the order a merge creates them in reverse, so
    # a merge running meanwhile cannot hide a finished shard or a video.
    journals = read_journals(path)
    for j in journals:
        plans.setdefault(j.count, set()).update({j.index} if j.finished else set())
    if d.is_dir():
        for f in d.iterdir():
            if m := _MARKER.fullmatch(f.name):
                plans.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    report.count = max(plans, default=0)
    report.finished = sorted(plans.get(report.count, set()))
    report.running_or_killed = sorted(j.index for j in journals if j.count == report.count and not j.finished)
    report.unmerged_videos = len({v for j in journals for v in j.records})
    status = _status_after(journals, path)
    report.done_videos = int((status == DONE).sum())
    pending = np.flatnonzero(status == PENDING)
    report.pending_videos = int(pending.size)
    if report.count:
        shards, counts = np.unique(pending % report.count, return_counts=True)
        report.pending_by_shard = {int(s): int(c) for s, c in zip(shards, counts)}
    return report


def wait_for_shards(path: str | Path, count: int, *, poll: float = 5.0, on_wait=None) -> None:
    """Block until every shard of ``count`` has finished (torchrun's rank 0, before it merges).
    ``on_wait(unfinished)`` is called after each poll that still finds some running."""
    d = shards_dir(path)
    while True:
        unfinished = [
            i for i in range(count)
            if not (_finished(d / f"{_stem(i, count)}.jsonl") or (d / f"{_stem(i, count)}.done").exists())
        ]  # fmt: skip
        if not unfinished:
            return
        if on_wait is not None:
            on_wait(unfinished)
        time.sleep(poll)


def merge_shards(path: str | Path) -> ShardReport:
    """Merge every shard record into the store (refused while a shard still runs), then report.
    ``report.complete``: no video is pending, whichever shard it belongs to."""
    from spool.stores import open_store

    open_store(path, "a").close()  # opening for writing merges
    return shard_report(path)
