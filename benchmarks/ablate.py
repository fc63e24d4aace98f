"""What the feature cache buys an ablation: one small grid trained three ways, side by side.

    python benchmarks/ablate.py                      # 4 cells x 1 seed, 3 epochs, 48 toy videos
    python benchmarks/ablate.py --epochs 2 --videos-per-class 4 --json

1. ``spool ablate`` in process: the store is read once, every cell trains on the shared
   FeatureSet (spool.ablate.run_ablation).
2. The same cells as separate ``spool train-head`` processes (python -m spool train-head),
   one after the other: each pays interpreter + torch start-up and reads the store again.
3. The backbone in the loop, as frozen-evaluation code usually does it: every training and
   evaluation batch decodes its videos (spool.decode.read_video) and runs the frozen
   backbone (spool.backbone.load_backbone) before the head; same head, epochs, batch size,
   clips and split as 1.

The videos are spool.toy.make_toy's; the backbone is dinov2_vits14 with random weights at
a small image size (so the backbone's cost is a lower bound of a real run's). Everything
lives in a temporary folder (or --dir) that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def make_data(root: Path, args) -> tuple[Path, Path]:
    from spool.extract import ExtractConfig, run_extract
    from spool.toy import make_toy

    videos = root / "videos"
    make_toy(videos, videos_per_class=args.videos_per_class, num_frames=args.video_frames, size=args.video_size)
    store = root / "feats.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are asked for on purpose
        run_extract(
            ExtractConfig(
                source=str(videos), out=str(store), weights="random", image_size=args.image_size,
                frames=args.frames, workers=0, device="cpu", decoder="pyav",
            ),
            progress=False,
        )  # fmt: skip
    return videos, store


def grid_dict(store: Path, out: Path, args, grid: dict | None = None, device: str = "auto") -> dict:
    return {
        "store": str(store),
        "out": str(out),
        "base": {"epochs": args.epochs, "heads": 6, "depth": 2, "dim": args.dim, "batch-size": args.batch_size, "lr": 1e-3},
        "grid": grid or {"lookahead": [0, 3], "range": [1, 2]},
        "seeds": [0],
        "workers": 0,
        "device": device,
    }


def run_in_process(grid_data: dict) -> tuple[float, list]:
    from spool.ablate import run_ablation
    from spool.grid import parse_grid

    t0 = time.perf_counter()
    result = run_ablation(parse_grid(grid_data), progress=False)
    return time.perf_counter() - t0, result


def run_processes(result, out: Path, device: str = "cpu") -> float:
    """Each run of the ablation as its own `spool train-head` process, sequentially."""
    t0 = time.perf_counter()
    for run in result.runs:
        c = run.cfg
        cmd = [
            sys.executable, "-m", "spool", "train-head", c.store, "--out", str(out / Path(run.dir).name),
            "--heads", str(c.num_heads), "--lookahead", str(c.lookahead), "--range", str(c.local_frame_range),
            "--depth", str(c.depth), "--dim", str(c.dim), "--epochs", str(c.epochs), "--batch-size", str(c.batch_size),
            "--lr", str(c.lr), "--seed", str(c.seed), "--workers", "0", "--device", device, "--quiet",
        ]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_backbone_in_loop(result, videos: Path, args) -> tuple[float, list[float]]:
    """Train the same heads with features recomputed from the videos at every step."""
    from spool.backbone import load_backbone, normalize_frames
    from spool.checkpoint import build_head
    from spool.decode import read_video
    from spool.sources import load_source
    from spool.stores import open_store
    from spool.train import lr_factor, make_head_config, make_optimizer
    from spool.data import assign_splits

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, _ = load_backbone("dinov2_vits14", weights="random", image_size=args.image_size)
    entries = load_source(videos).entries
    with open_store(result.grid.store) as store:
        table = store.clips()
        num_classes, T, L, D = len(store.class_names), store.num_frames, store.num_tokens, store.dim
    video_of, view_of = table.video_index, table.view_index
    top1s = []
    for run in result.runs:
        cfg = run.cfg
        splits = assign_splits(table.split, table.video_index, table.label, table.done,
                               val_fraction=cfg.val_fraction, seed=result.grid.split_seed)  # fmt: skip

        def features(clips: np.ndarray) -> torch.Tensor:
            frames = [read_video(entries[video_of[c]].path, frames=T, size=args.image_size, decoder="pyav").frames[view_of[c]] for c in clips]
            x = normalize_frames(torch.from_numpy(np.concatenate(frames)))  # (B*T, 3, H, W)
            _, patches = encoder(x)  # (B*T, L, D)
            return patches.reshape(len(clips), T, L, D)

        torch.manual_seed(cfg.seed)
        head_cfg = make_head_config(cfg, in_dim=D, num_frames=T, num_tokens=L, num_classes=num_classes)
        model = build_head("spool", head_cfg)
        opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
        steps = math.ceil(len(splits.train) / cfg.batch_size)
        warm = max(1, round(cfg.warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warm, steps * cfg.epochs))
        labels = torch.from_numpy(table.label.astype(np.int64))
        for epoch in range(cfg.epochs):
            model.train()
            order = splits.train[np.random.default_rng([cfg.seed, epoch]).permutation(len(splits.train))]
            for s in range(0, len(order), cfg.batch_size):
                clips = np.sort(order[s : s + cfg.batch_size])
                loss = F.cross_entropy(model(features(clips)), labels[clips])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                sched.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for s in range(0, len(splits.eval), cfg.batch_size):
                    clips = splits.eval[s : s + cfg.batch_size]
                    correct += int((model(features(clips)).argmax(1) == labels[clips]).sum())
        top1s.append(correct / len(splits.eval))  # clip level
    return time.perf_counter() - t0, top1s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos-per-class", type=int, default=8, help="toy videos per class (6 classes)")
    ap.add_argument("--video-frames", type=int, default=16)
    ap.add_argument("--video-size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=8, help="T frames per clip")
    ap.add_argument("--image-size", type=int, default=112, help="backbone input size (112: an 8 x 8 patch grid)")
    ap.add_argument("--dim", type=int, default=96, help="head width")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="spool-ablate-bench-"))
    try:
        t0 = time.perf_counter()
        videos, store = make_data(root, args)
        extract_s = time.perf_counter() - t0
        ablate_s, result = run_in_process(grid_dict(store, root / "ablation", args, device="cpu"))
        procs_s = run_processes(result, root / "processes")
        loop_s, loop_top1 = run_backbone_in_loop(result, videos, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "runs": len(result.runs),
        "epochs": args.epochs,
        "extract_s": extract_s,
        "ablate_in_process_s": ablate_s,
        "train_head_processes_s": procs_s,
        "backbone_in_loop_s": loop_s,
        "processes_over_ablate": procs_s / ablate_s,
        "backbone_over_ablate": loop_s / ablate_s,
        "ablate_top1": [r["top1"] for r in result.rows],
        "backbone_in_loop_top1_clip_level": loop_top1,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['runs']} runs x {args.epochs} epochs; extract (once, not in the ratios): {extract_s:.1f} s")
    print(f"spool ablate, in process, shared features : {ablate_s:8.1f} s   1.00x")
    print(f"spool train-head, one process per run     : {procs_s:8.1f} s   {procs_s / ablate_s:.2f}x")
    print(f"backbone in the loop (decode + ViT / step): {loop_s:8.1f} s   {loop_s / ablate_s:.2f}x")


if __name__ == "__main__":
    main()
