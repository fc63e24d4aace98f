"""Temporal heads on trained features of real pixels: camera motion over photographs.

    python benchmarks/real_motion.py                      # the table in docs/benchmarks.md
    python benchmarks/real_motion.py --only-folds 0 --seeds 0  # one fold, one seed (a few minutes)

The photographs are the real ones that packages ship (scikit-image's sample data,
scikit-learn's two sample images, matplotlib's Grace Hopper): 21 distinct photographs.
Each clip is a virtual camera moving over one photograph. Two tasks:

- ``reversal``: 6 classes in 3 time-reversed pairs (pan right / pan left, tilt down / tilt
  up, zoom in / zoom out). Every clip of a forward class has its exact time reversal in
  the twin class, so the set of frames of a clip says nothing about the direction: any
  head that averages over frames (mean-linear) cannot exceed 0.5 top-1. Only temporal
  order tells the twins apart.
- ``kind``: 4 classes (static, pan, tilt, zoom), direction random. Averaging over frames
  is not at chance here by construction (a static clip's frames are all alike, a zoom's
  change scale); measured, mean-linear still is (docs/benchmarks.md).

Train and test clips come from disjoint photographs (``--folds`` splits the photographs
into that many groups; each fold tests on one group and trains on the rest). Everything
goes through the real pipeline: lossless H.264 files, ``spool extract`` with the trained
DINOv2 ViT-S/14 of ../shared/real-dinov2 (official key layout), ``spool train-head`` for
each head and seed. The result is a markdown table (mean and std over folds and seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REVERSAL_PAIRS = (("pan_right", "pan_left"), ("tilt_down", "tilt_up"), ("zoom_in", "zoom_out"))
KINDS = ("static", "pan", "tilt", "zoom")


def photographs() -> dict[str, np.ndarray]:
    """The real photographs shipped by scikit-image, scikit-learn and matplotlib, as RGB uint8."""
    import matplotlib.cbook
    import skimage.data as data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
             "immunohistochemistry", "moon", "page", "retina", "rocket", "text"]  # fmt: skip
    photos = {name: np.asarray(getattr(data, name)()) for name in names}
    photos["hubble_deep_field"] = np.asarray(Image.open(Path(data.__file__).parent / "hubble_deep_field.jpg"))
    photos["motorcycle"] = np.asarray(Image.open(Path(data.__file__).parent / "motorcycle_left.png"))
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        photos[Path(path).stem] = np.asarray(image)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper"] = np.asarray(Image.open(f))
    out = {}
    for name, image in sorted(photos.items()):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    return out


def photo_folds(names: list[str], folds: int, seed: int = 0) -> list[list[str]]:
    """The photographs split into ``folds`` disjoint test groups (deterministic)."""
    order = np.random.default_rng(seed).permutation(sorted(names))
    return [sorted(order[i::folds].tolist()) for i in range(folds)]


def camera_clip(photo: np.ndarray, motion: str, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(frames, size, size, 3): a square window moving over ``photo`` as ``motion`` says.

    Forward motions: pan_right (the window moves right, the scene left), tilt_down, zoom_in,
    and static. Speed, window size and position are drawn from ``rng``.
    """
    h, w = photo.shape[:2]
    side = min(h, w)
    crop = rng.uniform(0.45, 0.6) * side  # window side, in photo pixels
    travel = rng.uniform(0.3, 0.5) * crop  # how far the window moves over the clip
    s = np.linspace(0.0, 1.0, frames)
    if motion == "zoom_in":
        sides = crop * (1.0 - 0.45 * s)  # the window shrinks: the scene grows
    else:
        sides = np.full(frames, crop)
    # centre path, kept inside the photograph
    cx0, cy0 = rng.uniform(crop / 2, w - crop / 2), rng.uniform(crop / 2, h - crop / 2)
    if motion == "pan_right":
        cx0 = rng.uniform(crop / 2, w - crop / 2 - travel)
        cx, cy = cx0 + travel * s, np.full(frames, cy0)
    elif motion == "tilt_down":
        cy0 = rng.uniform(crop / 2, h - crop / 2 - travel)
        cx, cy = np.full(frames, cx0), cy0 + travel * s
    elif motion in ("zoom_in", "static"):
        cx, cy = np.full(frames, cx0), np.full(frames, cy0)
    else:
        raise ValueError(f"unknown motion {motion!r}")
    image = Image.fromarray(photo)
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        half = sides[i] / 2
        box = (cx[i] - half, cy[i] - half, cx[i] + half, cy[i] + half)
        out[i] = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=None))
    return out


def make_dataset(root: Path, task: str, photos: dict[str, np.ndarray], test_photos: list[str], *,
                 clips_per_photo: int, frames: int, size: int, seed: int) -> tuple[Path, Path]:
    """Write the clips as ``root/<class>/<photo>_<i>.mp4`` with UCF101-style split files.

    Returns (trainlist, testlist); ``classInd.txt`` sits beside them. Reversal twins are the
    same frames reversed, written losslessly, so they decode as exact reversals.
    """
    from spool.toy import write_video

    classes = [c for pair in REVERSAL_PAIRS for c in pair] if task == "reversal" else list(KINDS)
    lists = {"train": [], "test": []}
    for p, (name, photo) in enumerate(sorted(photos.items())):
        split = "test" if name in test_photos else "train"
        rng = np.random.default_rng([seed, p])
        for i in range(clips_per_photo):
            if task == "reversal":
                forward_class, reversed_class = REVERSAL_PAIRS[i % len(REVERSAL_PAIRS)]
                forward = camera_clip(photo, forward_class, frames, size, rng)
                clips = [(forward_class, forward), (reversed_class, forward[::-1].copy())]
            else:
                kind = KINDS[i % len(KINDS)]
                motion = {"static": "static", "pan": "pan_right", "tilt": "tilt_down", "zoom": "zoom_in"}[kind]
                clip = camera_clip(photo, motion, frames, size, rng)
                clips = [(kind, clip if rng.random() < 0.5 else clip[::-1].copy())]
            for label, clip in clips:
                rel = f"{label}/{name}_{i:03d}.mp4"
                write_video(root / rel, clip, options={"qp": "0"})
                lists[split].append(f"{rel} {classes.index(label) + 1}" if split == "train" else rel)
    splits = root.parent / f"{root.name}_splits"
    splits.mkdir(parents=True, exist_ok=True)
    (splits / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    (splits / "trainlist01.txt").write_text("\n".join(lists["train"]) + "\n")
    (splits / "testlist01.txt").write_text("\n".join(lists["test"]) + "\n")
    return splits / "trainlist01.txt", splits / "testlist01.txt"


def real_weights() -> Path:
    build = Path(__file__).resolve().parents[2] / "shared" / "real-dinov2" / "build.sh"
    folder = os.environ.get("SPOOL_REAL_DINOV2") or subprocess.run(
        ["bash", str(build)], check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    return Path(folder) / "dinov2_vits14_real.safetensors"


def build_store(work: Path, task: str, fold: int, folds: int, args: argparse.Namespace) -> Path:
    photos = photographs()
    test_photos = photo_folds(list(photos), folds)[fold]
    return extract_task(work / f"{task}-fold{fold}", task, photos, test_photos, weights=args.weights,
                        clips_per_photo=args.clips_per_photo, frames=args.frames, video_size=args.video_size,
                        size=args.size, seed=fold)  # fmt: skip


def extract_task(folder: Path, task: str, photos: dict[str, np.ndarray], test_photos: list[str], *, weights: Path,
                 clips_per_photo: int, frames: int, video_size: int, size: int, seed: int) -> Path:
    """Videos of ``task`` over ``photos`` (``test_photos`` in the test split), extracted with the
    trained ViT-S/14 into ``folder/feats.zarr`` (kept: a second call reuses it)."""
    from spool.extract import ExtractConfig, run_extract

    root, store = folder / "videos", folder / "feats.zarr"
    if not store.exists():
        train_list, test_list = make_dataset(root, task, photos, test_photos, clips_per_photo=clips_per_photo,
                                             frames=frames, size=video_size, seed=seed)
        run_extract(ExtractConfig(
            source=str(root), out=str(store), format="ucf101", split_files=(str(train_list), str(test_list)),
            weights=str(weights), image_size=size, frames=frames, workers=0, batch_size=32, device="cpu",
        ), progress=False)  # fmt: skip
    return store


# What the README tells users to take for small data: a narrow, shallow head (a few hundred
# clips cannot train the default 384-wide, 4-deep one), more steps at a higher rate.
SMALL_DATA = {"dim": 64, "depth": 2, "num_heads": 4, "lr": 1e-3}
# The heads compared, as TrainConfig options; everything else is train-head's defaults. The
# "spool, ..." rows take out what this benchmark led to (docs/benchmarks.md, "Real features").
HEAD_CONFIGS: dict[str, dict] = {
    "spool": {"head": "spool", **SMALL_DATA},
    "spool, no token norm": {"head": "spool", **SMALL_DATA, "correlation_token_norm": False},
    "spool, no moments": {"head": "spool", **SMALL_DATA, "correlation_moments": False},
    "spool, correlation 2": {"head": "spool", **SMALL_DATA, "correlation_range": 2},
    "spool, raw correlation 2 (before)": {"head": "spool", **SMALL_DATA, "correlation_range": 2,
                                          "correlation_token_norm": False, "correlation_moments": False},
    "spool, no correlation": {"head": "spool", **SMALL_DATA, "correlation_range": None},
    "spool, no spatial embedding": {"head": "spool", **SMALL_DATA, "spatial_embedding": False},
    "spool, neither (before)": {"head": "spool", **SMALL_DATA, "correlation_range": None, "spatial_embedding": False},
    "mean-linear": {"head": "mean-linear"},
    "attentive-probe": {"head": "attentive-probe", "temporal_embedding": True},
}


def train(store: Path, head: str, seed: int, out: Path, **overrides) -> dict:
    from spool.train import TrainConfig, train_head

    cfg = TrainConfig(store=str(store), out=str(out), seed=seed, device="cpu", overwrite=True,
                      **{**HEAD_CONFIGS[head], **overrides})  # fmt: skip
    t0 = time.perf_counter()
    result = train_head(cfg, progress=False)
    return {"top1": result.final["top1"], "best_top1": result.best.get("top1"),
            "train_acc": result.history[-1].train_acc, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spool-real-motion"))
    parser.add_argument("--tasks", nargs="+", default=["reversal", "kind"], choices=["reversal", "kind"])
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--only-folds", type=int, nargs="+", default=None, metavar="I",
                        help="run these of the --folds folds only (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=list(HEAD_CONFIGS), choices=list(HEAD_CONFIGS))
    parser.add_argument("--head-seeds", nargs="+", default=[], metavar="HEAD=N",
                        help="fewer seeds for some heads, e.g. 'spool, no correlation=1' (the first N of --seeds)")
    parser.add_argument("--clips-per-photo", type=int, default=24)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--video-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.weights = args.weights or real_weights()
    results = []
    for task in args.tasks:
        for fold in args.only_folds if args.only_folds is not None else range(args.folds):
            t0 = time.perf_counter()
            store = build_store(args.work, task, fold, args.folds, args)
            print(f"{task} fold {fold}: store ready in {time.perf_counter() - t0:.0f} s", flush=True)
            head_seeds = dict(item.rsplit("=", 1) for item in args.head_seeds)
            for head in args.heads:
                for seed in args.seeds[: int(head_seeds.get(head, len(args.seeds)))]:
                    run = args.work / f"{task}-fold{fold}" / "runs" / f"{head.replace(', ', '-').replace(' ', '_')}-seed{seed}"
                    r = train(store, head, seed, run)
                    results.append({"task": task, "fold": fold, "head": head, "seed": seed, **r})
                    print(f"  {head:16s} seed {seed}: test top-1 {r['top1']:.3f} (train {r['train_acc']:.3f}, {r['seconds']:.0f} s)", flush=True)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def table(results: list[dict]) -> str:
    lines = ["| task | head | final test top-1 (mean ± std) | runs | per run | train acc |", "|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in results):
        for head in dict.fromkeys(r["head"] for r in results):
            rows = [r for r in results if r["task"] == task and r["head"] == head]
            if rows:
                top1 = np.array([r["top1"] for r in rows])
                train = np.mean([r["train_acc"] for r in rows])
                each = ", ".join(f"{t:.2f}" for t in top1)
                lines.append(f"| {task} | {head} | {top1.mean():.3f} ± {top1.std():.3f} | {len(rows)} | {each} | {train:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
