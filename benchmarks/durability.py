"""What the fsyncs of the commit protocol cost: durable commits against the same code with
``os.fsync`` a no-op (the store before power-loss durability), side by side in one process.

    python benchmarks/durability.py                        # both parts, zarr and HDF5
    python benchmarks/durability.py --videos 24 --size 112 # the extraction part's size

1. Store writes alone: ``write_video`` of ViT-S/14 videos at 224 px (T=16, L=256, D=384, one
   clip: 3 MiB of float16 each) as fast as the store takes them, i.e. how many videos per
   second the background writer keeps up with before it would hold a GPU back. Modes:
   no fsync, durable (commits batched per ``COMMIT_INTERVAL_S``), durable with a commit per
   video (``commit_interval = 0``).
2. ``spool extract`` end to end on make-toy videos (the setup of benchmarks/extract.py),
   durable and no-fsync runs alternating in ABBA order, ``--repeats`` of each; frames/s of
   each run, and the seconds the background writer spent in durable commits (the fsyncs
   are there, beside the backbone: they slow extraction only if the writer falls behind).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from spool.stores import COMMIT_INTERVAL_S, create_store


@contextmanager
def fsync_off(enabled: bool):
    """``os.fsync`` as a no-op while ``enabled``: every fsync Spool makes goes through it."""
    real = os.fsync
    if enabled:
        os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def store_writes(folder: Path, suffix: str, videos: int, mode: str) -> float:
    """Videos per second that ``write_video`` takes, close (the last commit) included."""
    T, L, D = 16, 256, 384
    rng = np.random.default_rng(0)
    patches = rng.standard_normal((1, T, L, D)).astype(np.float16)
    cls = rng.standard_normal((1, T, D)).astype(np.float16)
    frames = np.arange(T)[None]
    path = folder / f"{mode}{suffix}"
    store = create_store(path, video_ids=[f"v{i}" for i in range(videos)], labels=[0] * videos, splits=[0] * videos,
                         class_names=["a"], clips_per_video=1, num_frames=T, num_tokens=L, dim=D, attrs={})  # fmt: skip
    if mode == "per-video commits":
        store.commit_interval = 0
    with fsync_off(mode == "no fsync"):
        start = time.perf_counter()
        for v in range(videos):
            store.write_video(v, patches, cls, frames, 100, 25.0)
        store.close()
        seconds = time.perf_counter() - start
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    return videos / seconds


COMMIT_SECONDS: list[float] = []


def timed_commits() -> None:
    """Add the time of every store commit to COMMIT_SECONDS."""
    from spool.stores._common import SlotStore

    real = SlotStore.commit

    def commit(self) -> None:
        start = time.perf_counter()
        real(self)
        COMMIT_SECONDS.append(time.perf_counter() - start)

    SlotStore.commit = commit


def extraction(work: Path, args, durable: bool, run: int) -> tuple[float, float]:
    """frames/s of one run, and the seconds its commits took."""
    from spool.extract import ExtractConfig, run_extract

    out = work / f"feats-{run}.zarr"
    cfg = ExtractConfig(source=str(work / "videos"), out=str(out), backbone=args.backbone, weights="random",
                        image_size=args.size, frames=args.frames, workers=args.workers, batch_size=args.batch_size,
                        device=args.device)  # fmt: skip
    COMMIT_SECONDS.clear()
    with fsync_off(not durable):
        result = run_extract(cfg, progress=False)
    shutil.rmtree(out)
    return result.frames / result.seconds, sum(COMMIT_SECONDS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-videos", type=int, default=96, help="videos per store-write measurement")
    parser.add_argument("--videos", type=int, default=24, help="toy videos for the extraction part (a multiple of 6)")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="spool-durability-", dir=args.dir))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}; load average at start {os.getloadavg()[0]:.2f}; writing to {work}; "
          f"COMMIT_INTERVAL_S = {COMMIT_INTERVAL_S}")  # fmt: skip
    try:
        print("\n| backend | no fsync, videos/s | durable, videos/s | durable / no fsync | commit per video, videos/s |")
        print("|---|---:|---:|---:|---:|")
        for suffix in (".zarr", ".h5"):
            rates = {m: [] for m in ("no fsync", "durable", "per-video commits")}
            for _ in range(args.repeats):  # interleaved, so that load from other jobs hits every mode alike
                for mode in rates:
                    rates[mode].append(store_writes(work, suffix, args.write_videos, mode))
            med = {m: statistics.median(r) for m, r in rates.items()}
            print(f"| {suffix} | {med['no fsync']:.0f} | {med['durable']:.0f} | {med['durable'] / med['no fsync']:.2f} "
                  f"| {med['per-video commits']:.0f} |")  # fmt: skip

        from spool.toy import make_toy

        make_toy(work / "videos", videos_per_class=args.videos // 6, num_frames=48, size=160, seed=0)
        timed_commits()
        fps, commit_s = {True: [], False: []}, {True: [], False: []}
        for run in range(args.repeats):
            order = (False, True) if run % 2 == 0 else (True, False)  # ABBA: drifting load hits both alike
            for durable in order:
                rate, seconds = extraction(work, args, durable, 2 * run + durable)
                fps[durable].append(rate)
                commit_s[durable].append(seconds)
        print(f"\nspool extract, {args.videos} toy videos, {args.backbone} at {args.size} px, T={args.frames}, "
              f"--workers {args.workers}, {args.device}; frames/s per run (ABBA order)")  # fmt: skip
        print("| | frames/s, each run | median | writer's seconds in commits, each run |\n|---|---|---:|---|")
        for durable, name in ((False, "no fsync"), (True, "durable")):
            print(f"| {name} | {', '.join(f'{x:.1f}' for x in fps[durable])} | {statistics.median(fps[durable]):.1f} "
                  f"| {', '.join(f'{x:.2f}' for x in commit_s[durable])} |")  # fmt: skip
        print(f"durable / no fsync = {statistics.median(fps[True]) / statistics.median(fps[False]):.3f}")
        print(f"load average at end {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
