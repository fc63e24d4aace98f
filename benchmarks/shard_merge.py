"""What sharding costs: merging the shards' journals of a Kinetics-size store, and the journal
write per video.

    python benchmarks/shard_merge.py [--videos 306245] [--shards 64] [--frames 16] [--dir /tmp]

Builds a store of ``--videos`` videos (T frames, a 1 x 1 feature so the store is small: a merge
never reads or writes features), writes ``--shards`` journals holding every video through
``journal_line`` (what a shard appends per video), then times ``merge_shards`` (read and parse
the journals, rewrite the per-video columns, write the status last) for zarr and HDF5. Also
times ``journal_line`` + append alone, the per-video cost a shard adds to extraction.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from spool.stores import DONE, create_store, open_store
from spool.stores.shards import journal_line, merge_shards, shard_videos, shards_dir


def build(path: Path, num_videos: int, shards: int, frames: int) -> float:
    """The store and its journals; returns the seconds spent writing journal lines."""
    create_store(
        path, video_ids=[f"class_{v % 400:03d}/video_{v:07d}.mp4" for v in range(num_videos)],
        labels=[v % 400 for v in range(num_videos)], splits=[0] * num_videos,
        class_names=[f"class_{c:03d}" for c in range(400)], clips_per_video=1, num_frames=frames,
        num_tokens=1, dim=1, attrs={},
    ).close()  # fmt: skip
    d = shards_dir(path)
    d.mkdir()
    frame_indices = np.arange(frames)[None] * 7
    spent = 0.0
    for i in range(shards):
        with open(d / f"shard-{i:05d}-of-{shards:05d}.jsonl", "wb") as f:
            t0 = time.perf_counter()
            for v in shard_videos(num_videos, i, shards):
                f.write(journal_line(int(v), DONE, 250, 25.0, frame_indices + int(v) % 5, ""))
                f.flush()
            f.write(b'{"finished":true,"at":"now"}\n')
            spent += time.perf_counter() - t0
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=306_245)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        for suffix in (".zarr", ".h5"):
            path = root / f"merge{suffix}"
            spent = build(path, args.videos, args.shards, args.frames)
            journal_mib = sum(f.stat().st_size for f in shards_dir(path).iterdir()) / 2**20
            t0 = time.perf_counter()
            report = merge_shards(path)
            merge_s = time.perf_counter() - t0
            with open_store(path) as store:
                assert report.complete and (store.videos().status == DONE).all()
            print(
                f"{suffix}: {args.videos} videos in {args.shards} journals ({journal_mib:.0f} MiB): "
                f"merge {merge_s:.1f} s; journal line + append {1e6 * spent / args.videos:.1f} us per video"
            )
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
