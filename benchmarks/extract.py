"""Extraction throughput: `spool extract` against the backbone alone and against a naive loop.

    python benchmarks/extract.py --videos 24 --size 112 --backbone dinov2_vits14
    python benchmarks/extract.py --workers auto 0 1 2          # several decode-worker counts, one run
    python benchmarks/extract.py --device cuda --backbone dinov2_vitl14 --size 224   # on a GPU

All three run on the same make-toy videos, side by side in one process:
  backbone-only  frames decoded beforehand, only normalise + backbone in fixed-size batches
  spool extract  the real pipeline (decode workers, batched backbone, background store writer)
  naive          one video at a time: decode, run the model, np.save one file per video
The goal is extract / backbone-only >= 0.9: decoding and writing hidden behind the backbone.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from spool.backbone import load_backbone, normalize_frames
from spool.decode import read_video
from spool.device import resolve_device
from spool.extract import ExtractConfig, run_extract
from spool.sources import load_source
from spool.toy import make_toy


def encode(encoder, frames: np.ndarray, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(frames).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        cls, patches = encoder(normalize_frames(x))
    return cls.to(torch.float16).cpu().numpy(), patches.to(torch.float16).cpu().numpy()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decoded_frames(paths, *, frames: int, size: int, decoder: str = "decord") -> np.ndarray:
    """(N, size, size, 3) uint8: the sampled frames of every video, decoded beforehand."""
    read = dict(frames=frames, clips=1, stride=None, size=size, decoder=decoder)
    return np.concatenate([read_video(p, **read).frames.reshape(-1, size, size, 3) for p in paths])


def backbone_fps(encoder, frames: np.ndarray, batch_size: int, device: torch.device, min_frames: int = 0) -> float:
    """Frames/s of normalise + backbone (+ copy back) alone, in fixed-size batches over
    ``frames``, cycled until at least ``min_frames`` went through. One warm-up batch first:
    first calls pay for allocator growth and kernel selection."""
    encode(encoder, np.resize(frames[:batch_size], (batch_size, *frames.shape[1:])), device)
    total = max(len(frames), min_frames)
    batch = np.zeros((batch_size, *frames.shape[1:]), np.uint8)
    sync(device)
    start = time.perf_counter()
    for i in range(0, total, batch_size):
        chunk = frames[i % len(frames) : i % len(frames) + min(batch_size, total - i)]
        batch[:] = 0
        batch[: len(chunk)] = chunk
        encode(encoder, batch, device)
    sync(device)
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24, help="toy videos (a multiple of 6)")
    parser.add_argument("--video-frames", type=int, default=48)
    parser.add_argument("--video-size", type=int, default=160)
    parser.add_argument("--frames", type=int, default=16, help="T sampled per clip")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", nargs="+", default=["auto"],
                        help="decode workers per extract run, each run in turn: numbers, or auto (spool's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each --workers value, interleaved")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="spool-bench-"))
    try:
        make_toy(work / "videos", videos_per_class=args.videos // 6, num_frames=args.video_frames,
                 size=args.video_size, seed=0)
        paths = [e.path for e in load_source(work / "videos").entries]
        encoder, _ = load_backbone(args.backbone, weights="random", image_size=args.size)
        encoder = encoder.to(device)
        read = dict(frames=args.frames, clips=1, stride=None, size=args.size)
        frames = decoded_frames(paths, frames=args.frames, size=args.size)
        num_frames = len(frames)
        backbone_runs: list[float] = []

        extract_fps: dict[str, list[float]] = {w: [] for w in args.workers}
        used: dict[str, int] = {}
        for run in range(args.repeats):
            # side by side: the backbone alone, then every setting, in reversed order every other
            # repeat (ABBA), so that load from other jobs drifting over the run hits all of them alike
            backbone_runs.append(backbone_fps(encoder, frames, args.batch_size, device))
            for w in args.workers if run % 2 == 0 else args.workers[::-1]:
                out = work / f"feats-{w}-{run}.zarr"
                cfg = ExtractConfig(source=str(work / "videos"), out=str(out), backbone=args.backbone,
                                    weights="random", image_size=args.size, frames=args.frames,
                                    workers=None if w == "auto" else int(w), batch_size=args.batch_size,
                                    device=str(device))  # fmt: skip
                result = run_extract(cfg, progress=False)
                extract_fps[w].append(result.frames / result.seconds)
                used[w] = result.workers
                shutil.rmtree(out)

        out = work / "naive"
        out.mkdir()
        sync(device)
        start = time.perf_counter()
        for i, p in enumerate(paths):
            video = read_video(p, **read)
            cls, patches = encode(encoder, video.frames.reshape(-1, args.size, args.size, 3), device)
            np.save(out / f"{i}.npy", patches)
        sync(device)
        naive_fps = num_frames / (time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {name}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end; backbone "
          f"{args.backbone} at {args.size} px, T={args.frames}, {len(paths)} videos, batch {args.batch_size}")
    backbone = float(np.median(backbone_runs))
    print(f"backbone only: {', '.join(f'{x:.1f}' for x in backbone_runs)} frames/s (median {backbone:.1f}); "
          f"naive loop: {naive_fps:.1f} frames/s; {args.repeats} repeats")
    print("| --workers | decode workers | spool extract, frames/s (each repeat) | median | extract / backbone "
          "(median over repeats, each against its repeat's backbone) | extract / naive |")
    print("|---|---:|---|---:|---:|---:|")
    for w, runs in extract_fps.items():
        med = float(np.median(runs))
        ratio = float(np.median([e / b for e, b in zip(runs, backbone_runs)]))
        print(f"| {w} | {used[w]} | {', '.join(f'{x:.1f}' for x in runs)} | {med:.1f} | {ratio:.2f} | "
              f"{med / naive_fps:.2f} |")


if __name__ == "__main__":
    main()
